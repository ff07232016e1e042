"""An attacker's HTTP server on loopback: it records every request it receives.

Tests point forged installs, fake portals and redirect targets at it, then check what reached
it. What it answers is up to the test (``answer``: a function of the recorded request).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


#: (status, headers, body) — body a dict is sent as JSON
Answer = tuple[int, dict[str, str], Any]


def json_answer(payload: Any, status: int = 200) -> Answer:
    return status, {}, payload


def redirect_to(location: str, status: int = 302) -> Callable[[Recorded], Answer]:
    """An answer function that sends every request to ``location``."""
    return lambda _request: (status, {"Location": location}, b"")


class Recorder:
    """A threaded HTTP server on 127.0.0.1 that records requests (``requests``) and answers
    with ``answer(request)``; default: 200 ``{"result": true}``, as a portal would."""

    def __init__(self, answer: Callable[[Recorded], Answer] | None = None) -> None:
        self.answer = answer or (lambda _request: json_answer({"result": True}))
        self.requests: list[Recorded] = []
        self._lock = threading.Lock()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                request = Recorded(self.command, self.path, dict(self.headers), body)
                with recorder._lock:
                    recorder.requests.append(request)
                status, headers, payload = recorder.answer(request)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                if not isinstance(payload, bytes):
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_HEAD = _handle

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def host(self) -> str:
        """``127.0.0.1:<port>``."""
        return f"127.0.0.1:{self._server.server_address[1]}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
