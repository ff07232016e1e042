"""The emulator: one app's OAuth server plus any number of emulated portals.

``Emulator`` plays ``oauth.bitrix.info`` for one app (a ``client_id`` / ``client_secret`` pair) and
owns the portals the app is installed on; each portal is an :class:`EmulatedPortal` with its own
HTTP server, so a service under test talks to several portals exactly as it would in production.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Self

from .httpd import HttpRequest, JSONAnswer, RestError, ServerThread
from .portal import SCOPE, EmulatedPortal

__all__ = ["Emulator"]

OAUTH_DOMAIN = "oauth.bitrix.info"


@dataclass
class _OAuthInjection:
    error: str
    status: int
    remaining: int
    description: str


def _oauth_error(status: int, error: str, description: str) -> JSONAnswer:
    return status, {"error": error, "error_description": description}


class Emulator:
    """A Bitrix24 OAuth server for one app, and the portals that app is installed on.

    ::

        with Emulator(client_id="local.test", client_secret="s3cret") as emu:
            portal = emu.add_portal()
            portal.install("http://127.0.0.1:8000")

    Attributes tests may change at any time: ``token_ttl`` (seconds, for tokens issued from then
    on), ``refresh_delay`` (seconds the token endpoint sleeps before it answers, to widen race
    windows). ``stats`` counts ``refreshes`` and ``refresh_errors`` over all portals.

    :param client_id: the app's ``client_id``; refreshes with another one get ``invalid_client``.
    :param client_secret: the app's ``client_secret``.
    :param token_ttl: access token lifetime in seconds.
    :param requests_per_second: the leaky bucket's drain rate, per portal.
    :param burst: the leaky bucket's capacity, per portal.
    :param host: the loopback address every server binds to.
    :param port: the OAuth server's port (0: a free one).
    """

    def __init__(
        self,
        client_id: str = "local.emulator",
        client_secret: str = "secret",
        token_ttl: float = 3600.0,
        requests_per_second: float = 2.0,
        burst: float = 50,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.token_ttl = token_ttl
        self.requests_per_second = requests_per_second
        self.burst = burst
        self.host = host
        self.refresh_delay = 0.0
        self.portals: dict[str, EmulatedPortal] = {}
        self.stats: dict[str, int] = {"refreshes": 0, "refresh_errors": 0}
        self._port = port
        self._server: ServerThread | None = None
        self._lock = threading.RLock()
        self._injections: list[_OAuthInjection] = []

    def __repr__(self) -> str:
        where = self._server.base_url if self._server else "not started"
        return f"<Emulator {self.client_id} {where} portals={len(self.portals)}>"

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> Self:
        """Start the OAuth server (idempotent). :returns: self."""
        with self._lock:
            if self._server is None:
                self._server = ServerThread(self, self.host, self._port)
        return self

    def stop(self) -> None:
        """Stop every portal server and the OAuth server (idempotent)."""
        with self._lock:
            portals = list(self.portals.values())
            server, self._server = self._server, None
        stoppers: list[Callable[[], None]] = [portal.stop for portal in portals]
        if server is not None:
            stoppers.append(server.stop)
        # Each shutdown waits out its server's poll interval; waiting them out together keeps
        # a test's teardown as short as one interval.
        threads = [threading.Thread(target=stop) for stop in stoppers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- addresses -------------------------------------------------------------------------------

    def _running(self) -> ServerThread:
        if self._server is None:
            raise RuntimeError("the emulator is not running: call start()")
        return self._server

    @property
    def port(self) -> int:
        """The OAuth server's port."""
        return self._running().port

    @property
    def oauth_url(self) -> str:
        """``http://127.0.0.1:<port>/oauth/token/``: the token endpoint."""
        return f"{self._running().base_url}/oauth/token/"

    @property
    def server_endpoint(self) -> str:
        """``http://127.0.0.1:<port>/rest/``: what Bitrix24 calls ``server_endpoint``."""
        return f"{self._running().base_url}/rest/"

    # -- portals ---------------------------------------------------------------------------------

    def add_portal(
        self, domain: str | None = None, member_id: str | None = None, *, port: int = 0
    ) -> EmulatedPortal:
        """Start a new portal server with the app silently installed (see :class:`EmulatedPortal`).

        :param domain: the portal's domain; default ``127.0.0.1:<port>``, which is also where
            its REST server answers (so an app deriving ``http://{DOMAIN}/rest/`` reaches it).
        :param member_id: default 32 random hex characters.
        :param port: the portal server's port (0: a free one).
        """
        self.start()
        with self._lock:
            if member_id is not None and member_id in self.portals:
                raise ValueError(f"a portal with member_id {member_id} exists already")
            portal = EmulatedPortal(
                self, domain=domain, member_id=member_id, host=self.host, port=port
            )
            self.portals[portal.member_id] = portal
        return portal

    def portal(self, member_id: str) -> EmulatedPortal:
        """The portal with this ``member_id`` (KeyError if none)."""
        return self.portals[member_id]

    # -- the OAuth server ------------------------------------------------------------------------

    def inject(self, error: str, status: int, count: int = 1, description: str = "") -> None:
        """Make the next ``count`` token requests answer ``{"error": error}`` with ``status``
        (e.g. ``PAYMENT_REQUIRED``, ``invalid_scope``); no token is spent."""
        with self._lock:
            self._injections.append(_OAuthInjection(error, status, count, description or error))

    def _take_injection(self) -> JSONAnswer | None:
        with self._lock:
            if not self._injections:
                return None
            injection = self._injections[0]
            injection.remaining -= 1
            if injection.remaining <= 0:
                self._injections.pop(0)
            return _oauth_error(injection.status, injection.error, injection.description)

    def handle_http(self, request: HttpRequest) -> JSONAnswer:
        """Answer one request to the OAuth server (called by the server thread)."""
        if request.path.rstrip("/") != "/oauth/token":
            return _oauth_error(404, "not_found", "Unknown OAuth endpoint")
        try:
            params = request.params()
        except RestError as exc:
            return _oauth_error(400, "invalid_request", exc.description)
        answer = self._take_injection() or self._refresh(params)
        if answer[0] != 200:
            with self._lock:
                self.stats["refresh_errors"] += 1
        return answer

    def _refresh(self, params: Mapping[str, Any]) -> JSONAnswer:
        if (
            params.get("client_id") != self.client_id
            or params.get("client_secret") != self.client_secret
        ):
            return _oauth_error(401, "invalid_client", "Invalid client credentials")
        if params.get("grant_type") != "refresh_token":
            return _oauth_error(400, "unsupported_grant_type", "Only refresh_token is supported")
        refresh_token = params.get("refresh_token")
        if not isinstance(refresh_token, str) or not refresh_token:
            return _oauth_error(400, "invalid_request", "refresh_token is required")
        if self.refresh_delay > 0:
            time.sleep(self.refresh_delay)
        with self._lock:
            portals = list(self.portals.values())
        for portal in portals:
            issued = portal._redeem_refresh_token(refresh_token)
            if issued is None:
                continue
            access, refresh, expires_at = issued
            with self._lock:
                self.stats["refreshes"] += 1
            return 200, {
                "access_token": access,
                "expires": int(expires_at),
                "expires_in": int(self.token_ttl),
                "scope": SCOPE,
                "domain": OAUTH_DOMAIN,
                "server_endpoint": self.server_endpoint,
                "status": "L",
                "client_endpoint": portal.client_endpoint,
                "member_id": portal.member_id,
                "user_id": portal.users.owner(access).id,
                "refresh_token": refresh,
            }
        return _oauth_error(400, "invalid_grant", "Invalid refresh token")
