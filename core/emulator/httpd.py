"""The HTTP plumbing shared by the emulator's servers: one loopback server per thread, JSON out.

Each server hands every request to an *app* object with a ``handle_http(request)`` method and
writes back whatever JSON it returns. A failure inside the app becomes a 500 JSON answer, never a
dead server thread, because a test whose fake crashed silently is worse than one that fails loudly.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from dataclasses import dataclass
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from .php_lenient_form import php_form_decode

log = logging.getLogger("b24sms.emulator")

JSONAnswer = tuple[int, Any]


class RestError(Exception):
    """A Bitrix24 error answer: ``{"error": code, "error_description": description}``."""

    def __init__(
        self, code: str, description: str, status: int = 400, extra: dict[str, Any] | None = None
    ) -> None:
        super().__init__(f"{code}: {description}")
        self.code = code
        self.description = description
        self.status = status
        #: more members of the answer, e.g. a ``time`` block
        self.extra = dict(extra or {})

    def body(self) -> dict[str, Any]:
        """The JSON body Bitrix24 answers with."""
        return {"error": self.code, "error_description": self.description, **self.extra}


@dataclass(frozen=True)
class HtmlPage:
    """An answer that is a page of the portal's own UI, not a REST payload."""

    html: str


@dataclass
class HttpRequest:
    """One incoming request, already decoded."""

    verb: str
    path: str
    query: list[tuple[str, str]]
    body: bytes
    content_type: str

    def params(self) -> dict[str, Any]:
        """Query string, then the body (JSON or form) on top, PHP bracket keys nested.

        :raises RestError: when a JSON body does not parse to an object.
        """
        params = php_form_decode(self.query)
        if not self.body.strip():
            return params
        ctype = self.content_type.split(";", 1)[0].strip().lower()
        if ctype == "application/json" or (
            ctype != "application/x-www-form-urlencoded" and self.body.lstrip()[:1] in (b"{", b"[")
        ):
            try:
                decoded = json.loads(self.body)
            except ValueError as exc:
                raise RestError("INVALID_REQUEST", f"Invalid JSON body: {exc}", 400) from exc
            if not isinstance(decoded, dict):
                raise RestError("INVALID_REQUEST", "JSON body must be an object", 400)
            params.update(decoded)
            return params
        text = self.body.decode("utf-8", errors="replace")
        params.update(php_form_decode(parse_qsl(text, keep_blank_values=True)))
        return params


def time_block(start: float, finish: float) -> dict[str, Any]:
    """The ``time`` member of a Bitrix24 answer for a call that ran from ``start`` to ``finish``.

    Without ``operating`` / ``operating_reset_at``: a single method's answer adds them
    (:meth:`~.portal.EmulatedPortal` accounts each method); a ``batch`` and its ``result_time``
    entries have none (``settings/how-to-call-rest-api/batch.md`` shows none, and "an external
    call to batch is not accounted for in operating", ``settings/performance/limits.md``).
    """
    return {
        "start": start,
        "finish": finish,
        "duration": finish - start,
        "processing": finish - start,
        "date_start": datetime.fromtimestamp(start).astimezone().isoformat(timespec="seconds"),
        "date_finish": datetime.fromtimestamp(finish).astimezone().isoformat(timespec="seconds"),
    }


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0 closes every connection, so a stopped server cannot keep answering on a
    # keep-alive connection that a client pooled before the stop.
    protocol_version = "HTTP/1.0"
    server_version = "b24sms-emulator/1.0"
    server: _LoopbackServer

    def log_message(self, format: str, *args: Any) -> None:
        # The default writes every request line to stderr, and a query string may carry a token:
        # log the path only, and only at debug. A request line too broken to parse leaves no
        # command or path behind, hence getattr.
        path = (getattr(self, "path", None) or "").split("?", 1)[0]
        log.debug(
            "%s %s %s", getattr(self, "command", None), path, " ".join(str(arg) for arg in args[1:])
        )

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise RestError("INVALID_REQUEST", "Bad Content-Length", 400) from None
        return self.rfile.read(length) if length > 0 else b""

    def _dispatch(self) -> None:
        try:
            split = urlsplit(self.path)
            request = HttpRequest(
                verb=self.command,
                path=split.path,
                query=parse_qsl(split.query, keep_blank_values=True),
                body=self._read_body(),
                content_type=self.headers.get("Content-Type", ""),
            )
            # An app answers (status, payload), or (status, payload, headers) for a redirect.
            status, payload, *more = self.server.app.handle_http(request)
            headers = more[0] if more else {}
        except RestError as exc:
            status, payload, headers = exc.status, exc.body(), {}
        except Exception:
            log.exception("emulator failed on %s %s", self.command, self.path.split("?", 1)[0])
            status, payload, headers = (
                500,
                RestError("INTERNAL_SERVER_ERROR", "Internal server error", 500).body(),
                {},
            )
        self._write_json(status, payload, headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # The stdlib answers unsupported verbs and malformed requests with HTML; callers of the
        # emulator may rely on every answer being JSON.
        self.close_connection = True
        self._write_json(
            code, {"error": "INVALID_REQUEST", "error_description": message or explain or str(code)}
        )

    def _write_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        if isinstance(payload, HtmlPage):
            data, content_type = payload.html.encode("utf-8"), "text/html; charset=utf-8"
        else:
            data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
            content_type = "application/json; charset=utf-8"
        try:
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            # The client went away (timeout, test over); nothing to answer to.
            log.debug("client disconnected before the answer")


class _LoopbackServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default backlog of 5 resets connections when a worker pool calls at once.
    request_queue_size = 128

    def __init__(self, host: str, port: int, app: Any) -> None:
        self.app = app
        super().__init__((host, port), _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver calls this inside its except clause; a reset connection is not news.
        log.debug("connection error from %s: %r", client_address, sys.exc_info()[1])


class ServerThread:
    """A :class:`ThreadingHTTPServer` bound to ``host:port`` (0 = free port), served from a
    thread."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, name: str = "") -> None:
        self._server = _LoopbackServer(host, port, app)
        self.host = host
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.02},
            name=name or f"b24sms-emulator:{self.port}",
            daemon=True,
        )
        self._thread.start()
        self._stopped = False

    def serve(self, app: Any) -> None:
        """Hand the requests from now on to ``app`` (a portal's old address after a move)."""
        self._server.app = app

    @property
    def base_url(self) -> str:
        """``http://host:port``."""
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        """Stop serving and release the port; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
