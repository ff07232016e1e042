"""A fake generic SMS HTTP API on 127.0.0.1, for the ``http`` gateway — and a base for fakes.

Two API shapes, both answering 200 with JSON::

    POST /json/send   JSON {"to": "+1…", "text": "…", …}
                      → {"messages": [{"id": "json-1", "status": "ACCEPTED"}]}
    POST /form/send   form to=+1…&text=…   (or GET /form/send?to=…&text=…)
                      → {"result": {"msg_id": "form-1"}, "state": "ENROUTE"}

Usage::

    with FakeSmsApi() as api:                 # or api = FakeSmsApi().start(); …; api.stop()
        options = {"url": api.json_url, "response_id": "messages.0.id",
                   "response_status": "messages.0.status"}
        …
        api.requests[-1].json                 # what the gateway sent: RecordedRequest
        api.messages                          # accepted messages: [{"id", "to", "text", "shape"}]

Scripting (all thread-safe; each call adds to what was scripted before):

- ``api.fail_next(503, times=2, retry_after="7", body="busy")`` — the next two sends answer 503;
  any status works (400, 401, 429…);
- ``api.fail_to["+15550000000"] = 400`` — sends to that number answer 400 (``{"error": …}``);
- ``api.delay = 1.5`` — every answer waits that long first (client timeouts);
- ``api.answer = (200, b"OK")`` — every send answers exactly this (status, raw body bytes),
  e.g. 2xx without an id;
- ``api.require_headers = {"Authorization": "Bearer t"}`` — other requests answer 401;
- ``api.initial_status = "QUEUED"`` — the status word put in successful answers;
- ``api.echo_failures = True`` — scripted failures without a ``body`` repeat the number and
  text they were sent (``{"error": "cannot deliver to +1…: …", "to": …, "text": …}``);
- ``api.idempotency_header = "Idempotency-Key"`` (or ``FakeSmsApi(idempotency_header=…)``) —
  honour that header as idempotent APIs do: a send whose key was accepted before answers the
  first answer again and adds no message (``api.replayed`` counts those); a key whose send
  failed is not remembered, so its retry is a send like any other. Sends with one key are
  handled one after the other.

Connections: ``api.connections`` counts the TCP connections the fake accepted (kept-alive ones
once), ``api.peak_in_flight`` the most requests it was answering at one time.

Delivery reports: ``signature_header(body, secret, timestamp)`` is the ``t=…,v1=…`` value the
``http`` gateway checks, ``sign(body, secret)`` the old-style signature of the body alone;
``post_callback(url, payload, secret, encoding="json"|"form", header="X-Signature")`` posts a
signed report and returns the :class:`requests.Response` (``secret=None`` sends it unsigned,
``signature="…"`` sends that signature instead, ``timestamp=`` signs with that time,
``legacy=True`` signs the old way).

:class:`CallbackSink` answers 200 to anything and turns what it received into the
:class:`b24sms.gateway.CallbackRequest` the core would build, for gateway-level callback tests.

:class:`FakeServer` is the reusable part: a ``ThreadingHTTPServer`` on port 0 with ``start()``,
``stop()``, ``url``, a context manager and ``requests`` (every :class:`RecordedRequest`).
Subclasses implement ``handle(request) -> (status, headers, body)``.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import requests

__all__ = [
    "CallbackSink",
    "FakeServer",
    "FakeSmsApi",
    "RecordedRequest",
    "post_callback",
    "sign",
    "signature_header",
]


@dataclass
class RecordedRequest:
    """One request as the fake received it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    #: (host, port) of the client socket: equal ports mean one kept-alive connection
    client: tuple[str, int] = ("", 0)

    @property
    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8"))

    @property
    def form(self) -> dict[str, str]:
        return dict(parse_qsl(self.body.decode("utf-8"), keep_blank_values=True))

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers.items() if k.lower() == name.lower()), None)


Answer = tuple[int, Mapping[str, str], bytes]


class _Server(ThreadingHTTPServer):
    # socketserver's backlog of 5 resets connections when a burst of clients connects at once
    # (the concurrency tests); real servers listen with a backlog of 128 and more.
    request_queue_size = 128


class FakeServer:
    """A threaded HTTP server on 127.0.0.1:0 that records requests and answers ``handle()``."""

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self.lock = threading.Lock()
        #: TCP connections accepted; a kept-alive connection counts once however many requests
        self.connections = 0
        #: requests being answered right now, and the most there ever were at once
        self.in_flight = 0
        self.peak_in_flight = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # lifecycle -------------------------------------------------------------------------------

    def start(self) -> FakeServer:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # The head and the body of an answer are two writes: with Nagle's algorithm the
            # body would wait for the client's delayed ACK, 40 ms per answer on Linux.
            disable_nagle_algorithm = True

            def setup(self) -> None:
                super().setup()
                with fake.lock:
                    fake.connections += 1

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                request = RecordedRequest(
                    method=self.command,
                    path=parts.path,
                    query=dict(parse_qsl(parts.query, keep_blank_values=True)),
                    headers={k: v for k, v in self.headers.items()},
                    body=body,
                    client=(self.client_address[0], self.client_address[1]),
                )
                with fake.lock:
                    fake.requests.append(request)
                    fake.in_flight += 1
                    fake.peak_in_flight = max(fake.peak_in_flight, fake.in_flight)
                try:
                    status, headers, payload = fake.handle(request)
                finally:
                    with fake.lock:
                        fake.in_flight -= 1
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "start() the fake first"
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def handle(self, request: RecordedRequest) -> Answer:
        raise NotImplementedError

    @staticmethod
    def json_answer(status: int, data: Any, **headers: str) -> Answer:
        return status, {"Content-Type": "application/json", **headers}, json.dumps(data).encode()


@dataclass
class _Failure:
    status: int
    times: int
    retry_after: str | None = None
    body: str | None = None


class FakeSmsApi(FakeServer):
    """The fake SMS API (see the module docstring)."""

    def __init__(
        self,
        *,
        initial_status: str = "",
        delay: float = 0.0,
        require_headers: Mapping[str, str] | None = None,
        idempotency_header: str | None = None,
    ) -> None:
        super().__init__()
        self.initial_status = initial_status
        self.delay = delay
        self.answer: tuple[int, bytes] | None = None
        self.fail_to: dict[str, int] = {}
        self.require_headers: dict[str, str] = dict(require_headers or {})
        self.messages: list[dict[str, str]] = []
        #: scripted failures repeat the number and text they were sent (as many APIs do)
        self.echo_failures = False
        #: the header an idempotent API reads its key from; None: keys are ignored
        self.idempotency_header = idempotency_header
        #: sends answered with a remembered answer instead of becoming a message
        self.replayed = 0
        self._answers_by_key: dict[str, Answer] = {}
        self._key_locks: dict[str, threading.Lock] = {}
        self._failures: list[_Failure] = []
        self._ids = itertools.count(1)

    @property
    def json_url(self) -> str:
        return f"{self.url}/json/send"

    @property
    def form_url(self) -> str:
        return f"{self.url}/form/send"

    def provider(self, **options: Any) -> dict[str, Any]:
        """A ``[providers.<CODE>]`` table of an ``http`` provider sending here (JSON shape),
        with ``options`` added."""
        base = {"plugin": "http", "name": "HTTP", "url": self.json_url}
        return {**base, "response_id": "messages.0.id", **options}

    def fail_next(
        self,
        status: int = 503,
        *,
        times: int = 1,
        retry_after: str | None = None,
        body: str | None = None,
    ) -> None:
        """The next ``times`` sends answer ``status`` (after those scripted before)."""
        with self.lock:
            self._failures.append(_Failure(status, times, retry_after, body))

    def _next_failure(self) -> _Failure | None:
        with self.lock:
            while self._failures and self._failures[0].times <= 0:
                self._failures.pop(0)
            if not self._failures:
                return None
            self._failures[0].times -= 1
            return self._failures[0]

    def _failure_text(self, request: RecordedRequest) -> str:
        if not self.echo_failures:
            return json.dumps({"error": "scripted"})
        try:
            data = request.json if request.path.startswith("/json") else request.form
        except ValueError:
            data = {}
        to, text = data.get("to"), data.get("text")
        return json.dumps({"error": f"cannot deliver to {to}: {text}", "to": to, "text": text})

    def handle(self, request: RecordedRequest) -> Answer:
        key = request.header(self.idempotency_header) if self.idempotency_header else None
        if not key:
            return self._send(request)
        with self.lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self.lock:
                first = self._answers_by_key.get(key)
                if first is not None:
                    self.replayed += 1
                    return first
            answer = self._send(request)
            if 200 <= answer[0] < 300:
                with self.lock:
                    self._answers_by_key[key] = answer
            return answer

    def _send(self, request: RecordedRequest) -> Answer:
        if self.delay:
            time.sleep(self.delay)
        shape = request.path.strip("/").split("/")[0]
        if request.path not in ("/json/send", "/form/send"):
            return self.json_answer(404, {"error": "no such endpoint"})
        for name, value in self.require_headers.items():
            if request.header(name) != value:
                return self.json_answer(401, {"error": "unauthorized"})
        failure = self._next_failure()
        if failure is not None:
            headers = {"Retry-After": failure.retry_after} if failure.retry_after else {}
            body = failure.body if failure.body is not None else self._failure_text(request)
            return failure.status, {"Content-Type": "application/json", **headers}, body.encode()
        try:
            if request.method == "GET":
                data = request.query
            else:
                data = request.json if shape == "json" else request.form
        except ValueError:
            data = None
        if not isinstance(data, dict):
            return self.json_answer(400, {"error": "cannot parse the body"})
        to, text = data.get("to"), data.get("text")
        if not to or text is None:
            return self.json_answer(400, {"error": "to and text are required"})
        if to in self.fail_to:
            return self.json_answer(self.fail_to[to], {"error": f"cannot send to {to}"})
        if self.answer is not None:
            return self.answer[0], {"Content-Type": "application/json"}, self.answer[1]
        message_id = f"{shape}-{next(self._ids)}"
        with self.lock:
            self.messages.append({"id": message_id, "to": to, "text": text, "shape": shape})
        if shape == "json":
            status = self.initial_status or "ACCEPTED"
            return self.json_answer(200, {"messages": [{"id": message_id, "status": status}]})
        status = self.initial_status or "ENROUTE"
        return self.json_answer(200, {"result": {"msg_id": message_id}, "state": status})


def sign(body: bytes, secret: str) -> str:
    """The old-style signature: the hex HMAC-SHA256 of ``body`` alone under ``secret`` (accepted
    only with ``callback_legacy_signatures = true``)."""
    return hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def signature_header(body: bytes, secret: str, timestamp: float | None = None) -> str:
    """``t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">``: what a gateway sends in
    ``X-Signature`` (``timestamp`` default: now)."""
    t = str(int(time.time() if timestamp is None else timestamp))
    message = t.encode("ascii") + b"." + body
    return f"t={t},v1={hmac.new(secret.encode('utf-8'), message, hashlib.sha256).hexdigest()}"


def post_callback(
    url: str,
    payload: Any,
    secret: str | None,
    *,
    encoding: str = "json",
    header: str = "X-Signature",
    signature: str | None = None,
    timestamp: float | None = None,
    legacy: bool = False,
    timeout: float = 10,
) -> requests.Response:
    """POST a delivery report to ``url`` signed like the ``http`` gateway expects: with a
    timestamp (``timestamp``, default now; the same timestamp and payload give the very same
    request again: a replay), or the old way with ``legacy=True``."""
    if encoding == "json":
        body = json.dumps(payload).encode("utf-8")
        content_type = "application/json"
    else:
        body = urlencode(payload).encode("utf-8")
        content_type = "application/x-www-form-urlencoded"
    headers = {"Content-Type": content_type}
    if signature is not None:
        headers[header] = signature
    elif secret is not None:
        headers[header] = (
            sign(body, secret) if legacy else signature_header(body, secret, timestamp)
        )
    return requests.post(url, data=body, headers=headers, timeout=timeout)


class CallbackSink(FakeServer):
    """Answers 200 to everything; stands in for our callback route in gateway-level tests.

    ``sink.url + "/gateways/<code>/callback"`` is a URL a fake can post to; afterwards
    ``sink.callback_request(i)`` turns the i-th recorded request into the
    :class:`b24sms.gateway.CallbackRequest` the core would hand to ``parse_callback``.
    """

    def handle(self, request: RecordedRequest) -> Answer:
        return 200, {"Content-Type": "text/plain"}, b""

    def callback_request(self, index: int = -1) -> Any:
        from b24sms.gateway import CallbackRequest

        recorded = self.requests[index]
        content_type = recorded.header("Content-Type") or ""
        form = recorded.form if "x-www-form-urlencoded" in content_type else {}
        query = urlencode(recorded.query)
        return CallbackRequest(
            method=recorded.method,
            url=f"{self.url}{recorded.path}" + (f"?{query}" if query else ""),
            headers=dict(recorded.headers),
            body=recorded.body,
            form=form,
            args=dict(recorded.query),
            content_type=content_type,
        )
