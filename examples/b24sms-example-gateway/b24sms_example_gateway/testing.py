"""A fake Example Carrier API on 127.0.0.1, for this plugin's tests and for yours.

Ship a fake with your plugin: its users and b24sms's own end-to-end tests can then exercise the
whole path without an account or a network. Standard library only.

::

    with FakeCarrier(api_key="k", webhook_secret="s" * 16) as carrier:
        options = {"api_url": carrier.url, "api_key": "k", "sender": "ACME",
                   "webhook_secret": "s" * 16}
        …                                   # send through the gateway
        carrier.sent                        # [{"sms_id", "from", "to", "text", "webhook_url", …}]
        carrier.fail_next(503)              # the next send answers 503 (or 422, 429 …)
        carrier.report("ec_1", "delivered") # POST a signed webhook to the message's webhook_url
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

#: the carrier's states and what its API documentation says each means (the contract tests
#: check the gateway's status map against this, so it is written from the docs, not the map)
DOCUMENTED_STATES = {
    "accepted": "queued",  # taken, not yet handed to a network
    "enroute": "sent",  # handed to the mobile network
    "delivered": "delivered",  # the handset confirmed it
    "expired": "undelivered",  # the network gave up before the validity period ended
    "undeliverable": "undelivered",  # the network refused it
    "rejected": "failed",  # the carrier refused it (content, number)
}


def signature_header(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The ``Example-Signature`` value the carrier sends with ``body``."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


class FakeCarrier:
    """The Example Carrier API, in memory. ``start()``/``stop()`` or use it as a context manager."""

    def __init__(
        self, api_key: str = "test-key", webhook_secret: str = "test-webhook-secret"
    ) -> None:
        self.api_key = api_key
        self.webhook_secret = webhook_secret
        self.sent: list[dict[str, Any]] = []
        self.states: dict[str, str] = {}
        self._failures: list[int] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the fake first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def fail_next(self, status: int, times: int = 1) -> None:
        with self._lock:
            self._failures.extend([status] * times)

    def report(self, sms_id: str, state: str, error_code: str | None = None) -> int:
        """POST a signed webhook for ``sms_id`` to its ``webhook_url``; answers the HTTP status."""
        self.states[sms_id] = state
        message = next(m for m in self.sent if m["sms_id"] == sms_id)
        body = json.dumps({"sms_id": sms_id, "state": state, "error_code": error_code}).encode()
        request = urllib.request.Request(
            message["webhook_url"],
            data=body,
            headers={
                "Content-Type": "application/json",
                "Example-Signature": signature_header(self.webhook_secret, body),
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    # the server ------------------------------------------------------------------------------

    def _answer(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, dict]:
        if headers.get("Authorization") != f"Bearer {self.api_key}":
            return 401, {"error": {"code": "auth", "message": "bad API key"}}
        if method == "GET" and path.startswith("/v1/sms/"):
            sms_id = path.rsplit("/", 1)[1]
            if sms_id not in self.states:
                return 404, {"error": {"code": "not_found", "message": "no such sms"}}
            return 200, {"sms_id": sms_id, "state": self.states[sms_id]}
        if method != "POST" or path != "/v1/sms":
            return 404, {"error": {"code": "not_found", "message": path}}
        with self._lock:
            failure = self._failures.pop(0) if self._failures else None
        if failure is not None:
            return failure, {"error": {"code": f"http_{failure}", "message": "scripted failure"}}
        payload = json.loads(body or b"{}")
        if not str(payload.get("to", "")).startswith("+"):
            return 422, {"error": {"code": "invalid_number", "message": "to must be E.164"}}
        sms_id = f"ec_{next(self._ids)}"
        with self._lock:
            self.sent.append({"sms_id": sms_id, **payload})
            self.states[sms_id] = "accepted"
        return 202, {"sms_id": sms_id, "state": "accepted"}

    def start(self) -> FakeCarrier:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, data = fake._answer(self.command, self.path, self.headers, body)
                payload = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
