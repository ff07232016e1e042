"""The Bitrix24 REST client for one portal: JSON calls, batches, typed errors, token refresh.

The portal's tokens are read from the database on every call, because another thread or process
may have refreshed them a moment ago; an ``expired_token`` answer is refreshed through
:func:`b24sms.bitrix24.oauth.refresh_tokens` (serialised per portal) and the call repeated once.

Do not call it while holding an open :meth:`~b24sms.db.Database.session`: the client opens its own
short transactions, and on SQLite every transaction takes the database-wide write lock.
Pacing is the caller's business; :attr:`Bitrix24Client.last_time` exposes the answer's ``time``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

from .. import __version__, metrics
from ..config import Bitrix24Config
from ..db import Database
from ..models import PaymentState, Portal, PortalState, utcnow
from ..php_form import php_urlencode
from ..portals import set_payment_state
from . import method_limits, redirects
from .errors import (
    Bitrix24Error,
    OperationTimeLimit,
    PortalBlocked,
    TokenExpired,
    TokensRevoked,
    TransientError,
    from_response,
    network_error,
)
from .oauth import CONNECT_TIMEOUT, inactive_portal_error, refresh_tokens
from .policy import RedirectRefused, check_url, refuse_redirect

__all__ = [
    "MAX_BATCH",
    "BatchResult",
    "Bitrix24Client",
    "php_urlencode",
    "shared_session",
    "user_agent",
]

log = logging.getLogger(__name__)

#: Bitrix24 runs at most this many commands per ``batch`` request
MAX_BATCH = 50
#: how ``portals.last_error`` of a paused portal begins (``portals list``, the app page)
_PAUSE_MARK = "paused"

_session_lock = threading.Lock()
_session: tuple[int, requests.Session] | None = None


def shared_session() -> requests.Session:
    """The process-wide HTTP session (keep-alive connections to the portals and OAuth).

    A forked child gets its own: sockets inherited from the parent must not be shared.
    """
    global _session
    with _session_lock:
        if _session is None or _session[0] != os.getpid():
            session = requests.Session()
            # Many worker threads talk to the same few hosts; the default pool of 10 would
            # discard connections under load.
            adapter = HTTPAdapter(pool_connections=16, pool_maxsize=64)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            _session = (os.getpid(), session)
        return _session[1]


def user_agent(settings: Bitrix24Config) -> str:
    """``[bitrix24] user_agent`` when set, else ``b24sms/<version>``."""
    return settings.user_agent or f"b24sms/{__version__}"


@dataclass
class BatchResult:
    """What a ``batch`` answered, per command key.

    With ``halt=True`` the commands after the first failing one are not run: their keys are in
    :attr:`skipped`, in neither :attr:`results` nor :attr:`errors`.
    """

    results: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, Bitrix24Error] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    #: the answer's ``time`` block (``operating``, ``operating_reset_at``…)
    time: dict[str, Any] | None = None


class Bitrix24Client:
    """REST calls to one portal on behalf of this app.

    :param db: the database holding the portal and its tokens.
    :param portal_id: primary key of the :class:`~b24sms.models.Portal`.
    :param settings: ``[bitrix24]`` of the config.
    :param http: the HTTP session; default :func:`shared_session`.
    :param timeout: ``(connect, read)`` seconds per request; default the connect timeout and
        ``settings.timeout``. Calls made inside a web request pass
        :data:`~b24sms.bitrix24.policy.WEB_TIMEOUT`.

    Requests go only to http(s) endpoints and never follow a redirect (a 3xx raises
    :class:`~b24sms.bitrix24.policy.RedirectRefused`): see :mod:`b24sms.bitrix24.policy`.
    """

    def __init__(
        self,
        db: Database,
        portal_id: int,
        settings: Bitrix24Config,
        http: requests.Session | None = None,
        *,
        timeout: float | tuple[float, float] | None = None,
    ) -> None:
        self.db = db
        self.portal_id = portal_id
        self.settings = settings
        self.http = http or shared_session()
        self.timeout = timeout or (CONNECT_TIMEOUT, settings.timeout)
        #: the ``time`` block of the latest answer that had one: ``operating``,
        #: ``operating_reset_at``… for pacing
        self.last_time: dict[str, Any] | None = None
        #: the portal's domain as last read, for log lines
        self.domain: str = f"portal#{portal_id}"
        self._payment_state: str | None = None
        #: the portal had a pause (OVERLOAD_LIMIT / PORTAL_DELETED) when last read: the next
        #: successful answer clears it
        self._pause_seen = False
        self._db_key = str(getattr(db, "url", ""))

    def call(self, method: str, params: Mapping[str, Any] | None = None) -> Any:
        """Call one REST method and return its ``result``.

        :param method: e.g. ``messageservice.sender.add``.
        :param params: the method's parameters (nested dicts and lists allowed).
        :raises Bitrix24Error: the typed error of the answer (see :mod:`.errors`); an
            ``expired_token`` is refreshed and the call repeated once before anything is raised.
        """
        return self._request(method, dict(params or {})).get("result")

    def batch(
        self, commands: Mapping[str, tuple[str, Mapping[str, Any]]], halt: bool = False
    ) -> BatchResult:
        """Run up to :data:`MAX_BATCH` commands in one request.

        :param commands: key → ``(method, params)``; the keys name the results.
        :param halt: stop at the first failing command.
        :returns: per-key results and errors.
        :raises ValueError: more than :data:`MAX_BATCH` commands, or a ``batch`` inside.
        :raises Bitrix24Error: the batch request itself failed (like :meth:`call`).
        """
        if len(commands) > MAX_BATCH:
            raise ValueError(f"a batch takes at most {MAX_BATCH} commands, got {len(commands)}")
        if not commands:
            return BatchResult()
        cmd: dict[str, str] = {}
        keys: dict[str, str] = {}
        for key, (method, params) in commands.items():
            if method.strip().lower() == "batch":
                raise ValueError("Bitrix24 runs no batch inside a batch")
            query = php_urlencode(params or {})
            cmd[str(key)] = f"{method}?{query}" if query else method
            keys[str(key)] = key
        payload = self._request("batch", {"halt": 1 if halt else 0, "cmd": cmd})
        outer = payload.get("result")
        outer = outer if isinstance(outer, dict) else {}
        answered = _keyed(outer.get("result"))
        failed = _keyed(outer.get("result_error"))
        batch = BatchResult(
            time=payload.get("time") if isinstance(payload.get("time"), dict) else None
        )
        for wire_key, key in keys.items():
            if wire_key in failed:
                error = failed[wire_key]
                if isinstance(error, str):
                    error = {"error": error}
                batch.errors[key] = from_response(None, error)
            elif wire_key in answered:
                batch.results[key] = answered[wire_key]
            else:
                batch.skipped.append(key)
        self._note_batch(commands, outer, failed, batch)
        for key, error in batch.errors.items():
            metrics.count_rest_error(commands[key][0], error.code)
        if batch.errors:
            log.info(
                "%s: batch of %d: %d failed (%s)",
                self.domain,
                len(cmd),
                len(batch.errors),
                ", ".join(sorted({e.code for e in batch.errors.values()})),
            )
        return batch

    # -- the request, with one refresh --------------------------------------------------------

    def _request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        try:
            payload = self._request_refreshing(method, params)
        except Bitrix24Error as exc:
            # From the portal (HTTP 402) or the OAuth server (settings/oauth/error-codes.md).
            if exc.code.upper() == PaymentState.PAYMENT_REQUIRED:
                self._payment(PaymentState.PAYMENT_REQUIRED, None)
            raise
        if self._payment_state == PaymentState.PAYMENT_REQUIRED:
            # Bitrix24 answers again: paid.
            self._payment(None, PaymentState.PAYMENT_REQUIRED)
        if self._pause_seen:
            self._unpause()
        return payload

    def _unpause(self) -> None:
        """Bitrix24 answered again after OVERLOAD_LIMIT / PORTAL_DELETED: the block was lifted."""
        with self.db.session() as session:
            method_limits.clear_portal_pause(session, self.portal_id)
            portal = session.get(Portal, self.portal_id)
            if portal is not None and (portal.last_error or "").startswith(_PAUSE_MARK):
                portal.last_error = None
                portal.paused_until = None
        self._pause_seen = False
        log.warning("%s: answers again; pause lifted", self.domain)

    def _payment(self, state: str | None, only_from: str | None) -> None:
        with self.db.session() as session:
            changed = set_payment_state(session, self.portal_id, state, only_from=only_from)
        if changed:
            log.warning("%s: payment state %s", self.domain, state or "cleared")

    def _request_refreshing(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        token, endpoint = self._load(method)
        try:
            return self._post(endpoint, method, params, token)
        except TokenExpired:
            log.info("%s: %s: access token expired, refreshing", self.domain, method)
        except (TokensRevoked, PortalBlocked) as exc:
            self._mark(exc, token)
            raise
        # Raises TokensRevoked itself (and marks the portal) when the refresh is refused.
        refresh_tokens(
            self.db, self.portal_id, token, self.settings, self.http, timeout=self.timeout
        )
        # Re-read rather than trust the returned token alone: the refresh may have moved the
        # portal to another client_endpoint, and someone may already hold an even newer token.
        token, endpoint = self._load(method)
        try:
            return self._post(endpoint, method, params, token)
        except (TokensRevoked, PortalBlocked) as exc:
            self._mark(exc, token)
            raise

    def _load(self, method: str) -> tuple[str, str]:
        with self.db.session() as session:
            portal = session.get(Portal, self.portal_id)
            if portal is None:
                raise TokensRevoked("PORTAL_NOT_FOUND", f"no portal with id {self.portal_id}")
            self.domain = portal.domain
            self._payment_state = portal.payment_state
            if portal.state != PortalState.ACTIVE:
                raise inactive_portal_error(portal)
            if not portal.access_token:
                raise TokensRevoked("NO_AUTH_FOUND", f"portal {portal.domain} has no token")
            paused = method_limits.portal_pause(session, self.portal_id)
            self._pause_seen = paused is not None
            if paused is not None and paused > utcnow():
                raise PortalBlocked(
                    "PORTAL_PAUSED", f"{portal.domain} paused until {paused:%H:%M:%S} UTC"
                )
            # A method whose time budget is spent is not called until it resets: Bitrix24
            # would only answer OPERATION_TIME_LIMIT again (settings/performance/limits.md).
            until = method_limits.blocked_until(session, self.portal_id, method)
            if until is not None:
                raise OperationTimeLimit(
                    "OPERATION_TIME_LIMIT",
                    f"{method} paused until {until:%H:%M:%S} UTC",
                    None,
                    until,
                )
            return portal.access_token, portal.client_endpoint

    def _post(
        self, endpoint: str, method: str, params: dict[str, Any], token: str
    ) -> dict[str, Any]:
        url = endpoint if endpoint.endswith("/") else endpoint + "/"
        url += method
        started = time.perf_counter()

        def send(target: str) -> requests.Response:
            # Redirects are ours to follow: requests would resend a POST as a bodiless GET, and
            # a portal must not bounce our token to another address unchecked (see .policy),
            # nor to a host outside [bitrix24] allowed_domains (an install could not go there).
            check_url(target)
            if target != url and self.settings.allowed_domains:
                from .verify import domain_allowed  # verify imports this module

                host = urlsplit(target).netloc
                if not domain_allowed(host, self.settings.allowed_domains):
                    raise RedirectRefused(
                        "REDIRECT_REFUSED", f"redirect to {host}, outside allowed_domains", 302
                    )
            return self.http.post(
                target,
                json={**params, "auth": token},
                headers={"User-Agent": user_agent(self.settings), "Accept": "application/json"},
                timeout=self.timeout,
                allow_redirects=False,
            )

        try:
            response = send(url)
            if response.status_code in redirects.REDIRECT_STATUSES:
                response = self._follow(endpoint, method, url, response, send)
            refuse_redirect(response)  # any other 3xx
        except (requests.RequestException, Bitrix24Error) as exc:
            failure = exc if isinstance(exc, Bitrix24Error) else network_error(exc, url)
            metrics.observe_rest_request(method, time.perf_counter() - started)
            metrics.count_rest_error(method, failure.code)
            log.warning("%s: %s failed: %s", self.domain, method, failure)
            raise failure from None
        metrics.observe_rest_request(method, time.perf_counter() - started)
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if isinstance(payload, dict) and isinstance(payload.get("time"), dict):
            self.last_time = payload["time"]
        if (
            200 <= response.status_code < 300
            and isinstance(payload, dict)
            and not payload.get("error")
        ):
            method_limits.note_answer(self._db_key, self.portal_id, method, payload.get("time"))
            return payload
        if 200 <= response.status_code < 300 and not isinstance(payload, dict):
            error: Bitrix24Error = TransientError(
                "ERROR_UNEXPECTED_ANSWER", "the answer is not a JSON object", response.status_code
            )
        else:
            error = from_response(response.status_code, payload)
        if isinstance(error, OperationTimeLimit):
            self._limit(method, error, payload)
        metrics.count_rest_error(method, error.code)
        level = logging.INFO if isinstance(error, TokenExpired) else logging.WARNING
        log.log(level, "%s: %s answered %s", self.domain, method, error)
        raise error

    def _follow(
        self,
        endpoint: str,
        method: str,
        url: str,
        response: requests.Response,
        send: Callable[[str], requests.Response],
    ) -> requests.Response:
        """The portal moved (change-domen.md): send the same POST to the new address, and
        remember it as the portal's endpoint and domain."""
        try:
            response, final_url = redirects.follow_redirects(url, response, send)
        except redirects.TooManyRedirects as exc:
            refused = RedirectRefused("REDIRECT_REFUSED", str(exc), response.status_code)
            refused.location = response.headers.get("Location")
            raise refused from None
        moved = redirects.moved_endpoint(endpoint, method, final_url)
        if moved is not None and 200 <= response.status_code < 300:
            # Only an answer that worked proves the new address is the portal.
            with self.db.session() as session:
                portal = session.get(Portal, self.portal_id)
                if portal is not None and portal.client_endpoint == endpoint:
                    portal.client_endpoint = moved.client_endpoint
                    portal.domain = moved.domain
            log.warning("%s: portal moved to %s; endpoint updated", self.domain, moved.domain)
            self.domain = moved.domain
        return response

    def _limit(self, method: str, error: OperationTimeLimit, body: Any) -> None:
        """Block ``method`` alone until its budget resets (settings/performance/limits.md)."""
        error.reset_at = method_limits.reset_at(self._db_key, self.portal_id, method, body)
        with self.db.session() as session:
            method_limits.block(session, self.portal_id, method, error.reset_at)
        log.warning("%s: %s blocked until %s UTC", self.domain, method, error.reset_at)

    def _note_batch(
        self,
        commands: Mapping[str, tuple[str, Mapping[str, Any]]],
        outer: Mapping[str, Any],
        failed: Mapping[str, Any],
        batch: BatchResult,
    ) -> None:
        """Per command: remember its answer's time, or block its method when it was refused
        with OPERATION_TIME_LIMIT (each nested call has its own budget: limits.md)."""
        times = _keyed(outer.get("result_time"))
        for key, (method, _params) in commands.items():
            error = batch.errors.get(key)
            if isinstance(error, OperationTimeLimit):
                body = failed.get(str(key))
                self._limit(method, error, body)
            elif key in batch.results:
                method_limits.note_answer(self._db_key, self.portal_id, method, times.get(str(key)))

    def _mark(self, error: Bitrix24Error, token: str) -> None:
        """Record on the portal that Bitrix24 refused it: dead tokens need a re-install;
        OVERLOAD_LIMIT / PORTAL_DELETED pause it (:func:`.method_limits.pause_portal`)."""
        with self.db.session() as session:
            portal = session.get(Portal, self.portal_id)
            if portal is None or portal.state != PortalState.ACTIVE:
                return
            if isinstance(error, PortalBlocked):
                # Lifted by support or the portal's administrator (_includes/system-errors.md):
                # a pause with backoff, which the next successful answer ends.
                until = method_limits.pause_portal(session, self.portal_id)
                portal.paused_until = max(portal.paused_until or until, until)
                portal.last_error = f"{_PAUSE_MARK} until {until:%Y-%m-%d %H:%M} UTC: {error}"
                log.error("%s: %s; every call paused until %s UTC", self.domain, error, until)
                self._pause_seen = True
                return
            # A re-install may have stored fresh tokens while our call was on its way.
            if portal.access_token != token:
                return
            portal.state = PortalState.NEEDS_REINSTALL
            portal.last_error = str(error)
        log.warning("%s: marked %s after %s", self.domain, portal.state, error.code)


def _keyed(value: Any) -> dict[str, Any]:
    # PHP encodes an empty array as [] and an array with keys 0..n-1 as a JSON list.
    if isinstance(value, dict):
        return {str(k): v for k, v in value.items()}
    if isinstance(value, list):
        return {str(i): v for i, v in enumerate(value)}
    return {}
