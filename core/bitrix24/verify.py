"""Proving, with Bitrix24 itself, who is calling us.

Two proofs, both asked of Bitrix24 and never of an address a request names:

- :func:`prove_install`: an install (event or UI form), a re-install, or an update that brings
  new tokens. Its refresh token is exchanged at Bitrix24's OAuth server (``[bitrix24]
  oauth_url``) with our ``client_id`` and ``client_secret``; the answer names the portal
  (``member_id``, ``client_endpoint``, ``server_endpoint``) and the install's own fields must
  agree with it. Bitrix24 asks apps to "verify the token on the server side" and to "ensure the
  token was issued for your application and Bitrix24", and names the authorization server "the
  holder of the application's authorization; only it issues and renews tokens" (b24restdocs
  ``settings/cloud-and-on-premise/security-recommendations.md``, ``settings/oauth/index.md``);
  the answer's fields are listed in ``settings/oauth/auto-renewal.md``.
- :func:`prove_admin`: a proven install may change whom we trust for a portal (a first
  install, a re-install of a portal that is not active, a new ``application_token``) only when
  the user whose tokens it brought is an administrator: installing an app "is performed by a
  user with administrator rights" (b24restdocs ``settings/app-installation/index.md``), and
  every user of a portal can read their own tokens in the app's frame. ``user.admin`` is asked
  with the access token the OAuth server just issued, at the ``client_endpoint`` the OAuth
  server named (``api-reference/common/users/user-admin.md``: ``true`` when "the current user
  has the permissions to manage application settings").
- :func:`probe_token`: an access token someone shows us (the app page's ``AUTH_ID``) is tried
  with ``app.info`` at the portal's *stored* ``client_endpoint``: a token is only proof of
  "a user of this portal, in our app" when the portal itself accepts it and names our app.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import hashlib
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests

from .. import metrics
from ..config import Bitrix24Config
from .client import shared_session, user_agent
from .errors import Bitrix24Error, TokensRevoked, TransientError
from .oauth import CONNECT_TIMEOUT, exchange_refresh_token
from .policy import WEB_TIMEOUT, SlotsBusy, check_url, refuse_redirect, web_slots

log = logging.getLogger(__name__)

#: seconds a refused token stays refused in the cache (short: a portal may have been down)
NEGATIVE_TTL = 5.0
#: entries the cache keeps at most (oldest dropped first)
CACHE_SIZE = 4096


class _ProbeCache:
    """A small thread-safe TTL cache of probe answers, keyed by a digest of endpoint and token.

    Keeps digests, not tokens, so a memory dump of the cache gives nobody a usable token.
    """

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self.size = size
        self._entries: OrderedDict[str, tuple[float, bool]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(client_endpoint: str, access_token: str) -> str:
        material = f"{client_endpoint.rstrip('/')}\0{access_token}".encode()
        return hashlib.sha256(material).hexdigest()

    def get(self, key: str) -> bool | None:
        now = time.monotonic()
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            expires, answer = entry
            if expires <= now:
                del self._entries[key]
                return None
            return answer

    def put(self, key: str, answer: bool, ttl: float) -> None:
        with self._lock:
            self._entries[key] = (time.monotonic() + ttl, answer)
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_cache = _ProbeCache()


def clear_cache() -> None:
    """Forget every cached probe answer (tests; after an uninstall nothing else is needed,
    because callers check the portal's state before they probe)."""
    _cache.clear()


def probe_token(
    client_endpoint: str,
    access_token: str,
    settings: Bitrix24Config,
    *,
    ttl: float = 0.0,
    web: bool = True,
) -> bool:
    """True when ``app.info`` answers for this token at this portal, naming our app.

    The answer's ``CODE`` must be *our* app's (:func:`app_code`): an answer without one proves
    nothing (any server can answer ``{"result": {}}``), and a token another app on the same
    portal received is alive there too, and must not open our data (b24restdocs
    ``api-reference/common/system/app-info.md``: ``CODE`` "application code").

    :param client_endpoint: the portal's stored REST address.
    :param access_token: the token to check.
    :param settings: ``[bitrix24]`` of the config (``client_id``, ``app_code``, ``timeout``,
        ``user_agent``).
    :param ttl: seconds to remember a positive answer (0: ask every time). Refusals are
        remembered for at most :data:`NEGATIVE_TTL` seconds.
    :param web: the caller is a web request: short timeouts, and one of the process's
        :data:`~.policy.web_slots` is held for the call (one at a time per portal host).
    :raises SlotsBusy: ``web`` and every slot is taken (answer 503; nothing was asked).
    """
    if not access_token:
        return False
    key = _cache.key(client_endpoint, access_token) if ttl > 0 else ""
    if key:
        cached = _cache.get(key)
        if cached is not None:
            return cached
    if web:
        with web_slots.hold(host=host_of(client_endpoint)):
            answer = _ask(client_endpoint, access_token, settings, WEB_TIMEOUT)
    else:
        answer = _ask(client_endpoint, access_token, settings, None)
    if key:
        _cache.put(key, answer, ttl if answer else min(ttl, NEGATIVE_TTL))
    return answer


def app_code(settings: Bitrix24Config) -> str | None:
    """Our app's ``CODE`` as ``app.info`` names it: ``[bitrix24] app_code`` when set, else the
    ``client_id`` of a local app (whose CODE it is); None for a Market app without
    ``app_code`` (its CODE, e.g. ``vendor.app``, differs from its client_id ``app.…``)."""
    configured, client_id = settings.app_code, settings.client_id
    return configured or (client_id if client_id.startswith("local.") else None)


def _ask(
    client_endpoint: str,
    access_token: str,
    settings: Bitrix24Config,
    timeout: tuple[float, float] | None,
) -> bool:
    answer = _rest_call(client_endpoint, "app.info", access_token, settings, timeout)
    if answer is None or answer[0] != 200:
        return False
    result = answer[1]
    code = result.get("CODE") if isinstance(result, dict) else None
    if not isinstance(code, str) or not code:
        log.warning("token probe at %s: app.info named no app CODE", host_of(client_endpoint))
        return False
    ours = app_code(settings)
    if ours is None:
        log.warning("token probe: set [bitrix24] app_code to the Market app's CODE")
        return False
    if code != ours:
        log.warning("token probe at %s: the token belongs to another app", host_of(client_endpoint))
        return False
    return True


def _rest_call(
    client_endpoint: str,
    method: str,
    access_token: str,
    settings: Bitrix24Config,
    timeout: tuple[float, float] | None,
) -> tuple[int, Any] | None:
    """One REST call, no redirect followed: ``(200, result)``, ``(status, error code)`` for
    an error answer, or None when the portal could not be asked or answered garbage (logged
    without the token)."""
    started = time.perf_counter()
    try:
        url = check_url(client_endpoint.rstrip("/") + "/" + method)
        response = shared_session().post(
            url,
            json={"auth": access_token},
            headers={"User-Agent": user_agent(settings)},
            timeout=timeout or (CONNECT_TIMEOUT, settings.timeout),
            allow_redirects=False,
        )
        refuse_redirect(response)
        body = response.json()
    except (requests.RequestException, ValueError, Bitrix24Error) as exc:
        metrics.observe_rest_request(method, time.perf_counter() - started)
        metrics.count_rest_error(method, getattr(exc, "code", type(exc).__name__))
        log.warning("%s at %s failed: %s", method, host_of(client_endpoint), type(exc).__name__)
        return None
    metrics.observe_rest_request(method, time.perf_counter() - started)
    if response.status_code != 200 or not isinstance(body, dict) or "result" not in body:
        error = body.get("error") if isinstance(body, dict) else None
        code = str(error or f"HTTP_{response.status_code}")
        metrics.count_rest_error(method, code)
        return response.status_code, code
    return 200, body["result"]


#: seconds an install waits for the portal's slot before its admin check answers 503
ADMIN_SLOT_WAIT = 2.0


def prove_admin(proven: ProvenInstall, settings: Bitrix24Config) -> None:
    """Check that the user whose tokens an install brought administers the portal.

    ``user.admin`` is asked with the access token the OAuth server issued for that user, at the
    ``client_endpoint`` it named (never an address from the request), with short timeouts and
    holding the portal host's slot in :data:`~.policy.web_slots`.

    :param proven: the install, as the OAuth server confirmed it.
    :param settings: ``[bitrix24]`` of the config.
    :raises InstallRefused: 403 ``admin_required`` when ``user.admin`` is not ``true`` (or the
        portal refuses the call); 503 ``portal_unavailable`` when the portal could not be asked.
    """
    host = host_of(proven.client_endpoint)
    try:
        with web_slots.hold(wait=ADMIN_SLOT_WAIT, host=host):
            answer = _rest_call(
                proven.client_endpoint, "user.admin", proven.access_token, settings, WEB_TIMEOUT
            )
    except SlotsBusy:
        answer = None
    if answer is None or answer[0] >= 500:
        raise InstallRefused(
            503,
            "portal_unavailable",
            "the portal could not confirm the installing user; send again",
        )
    if answer[0] != 200 or answer[1] is not True:  # strictly JSON true (user-admin.md)
        log.warning("install at %s refused: the user is not an administrator (%s)", host, answer)
        raise InstallRefused(
            403,
            "admin_required",
            "only an administrator of the portal may install or update the app",
        )


def host_of(url: str) -> str:
    """``host[:port]`` of ``url`` as written (the key of a portal's call slot); "?" when it
    does not parse."""
    try:
        return urlsplit(url).netloc
    except ValueError:
        return "?"


# -- installs, proven at the OAuth server ------------------------------------------------------


@dataclass(frozen=True)
class InstallClaim:
    """What an install (or an update carrying tokens) says about itself: not yet believed."""

    member_id: str
    #: the portal's address as the request names it (``auth[domain]``, or the form's ``DOMAIN``)
    domain: str
    refresh_token: str
    #: ``auth[client_endpoint]``, or ``{scheme}://{DOMAIN}/rest/`` for the UI form; None: absent
    client_endpoint: str | None = None
    server_endpoint: str | None = None


@dataclass(frozen=True)
class ProvenInstall:
    """The portal as Bitrix24's OAuth server named it, with the fresh token pair it issued."""

    member_id: str
    #: host (and port, when not the default) of :attr:`client_endpoint`
    domain: str
    client_endpoint: str
    server_endpoint: str | None
    access_token: str
    refresh_token: str
    expires_at: dt.datetime | None
    scope: str | None


class InstallRefused(Exception):
    """The install is not proven; ``status``/``error``/``message`` make the JSON answer (no
    secret in them)."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message


def domain_allowed(host: str, patterns: Sequence[str]) -> bool:
    """True when ``patterns`` is empty or ``host`` (without its port) matches one glob of it,
    case-insensitively (``[bitrix24] allowed_domains``)."""
    if not patterns:
        return True
    name = _hostname(host)
    return bool(name) and any(fnmatch.fnmatchcase(name, p.strip().lower()) for p in patterns)


def prove_install(
    claim: InstallClaim,
    settings: Bitrix24Config,
    *,
    timeout: tuple[float, float] = WEB_TIMEOUT,
) -> ProvenInstall:
    """Exchange the install's refresh token at the OAuth server and check the install agrees.

    Nothing but the OAuth server is asked; nothing is stored. The exchange spends the claimed
    refresh token: the caller stores the new pair of the result.

    :param claim: what the install says.
    :param settings: ``[bitrix24]`` of the config (``oauth_url``, ``client_id``,
        ``client_secret``, ``allowed_domains``…).
    :param timeout: ``(connect, read)`` seconds for the exchange (a web request waits on it).
    :returns: the portal as the OAuth server names it.
    :raises InstallRefused: 403 the domain is outside ``allowed_domains``; 401 the OAuth server
        refused the token, or named another portal, endpoint or domain; 503 it could not be
        asked (unreachable, redirect, 5xx): the install may be sent again.
    """
    allowed = settings.allowed_domains
    if not domain_allowed(claim.domain, allowed):
        # Checked before the exchange too: outsiders cost us no call to the OAuth server.
        raise InstallRefused(403, "domain_not_allowed", "auth[domain]: not in allowed_domains")
    try:
        answer = exchange_refresh_token(claim.refresh_token, settings, timeout=timeout)
    except TokensRevoked as exc:
        raise InstallRefused(
            401, "unauthorized", f"Bitrix24's OAuth server refused the tokens ({exc.code})"
        ) from None
    except TransientError as exc:
        log.warning("install proof: OAuth server not usable: %s", exc)
        raise InstallRefused(
            503, "oauth_unavailable", "Bitrix24's OAuth server could not be asked; send again"
        ) from None
    except Bitrix24Error as exc:
        raise InstallRefused(
            401, "unauthorized", f"Bitrix24's OAuth server refused the install ({exc.code})"
        ) from None
    proven = _proven(answer)
    _agree(claim, proven)
    if not domain_allowed(proven.domain, allowed):
        raise InstallRefused(403, "domain_not_allowed", "auth[domain]: not in allowed_domains")
    return proven


def _proven(answer: Mapping[str, Any]) -> ProvenInstall:
    from ..portals import token_expiry

    endpoint = answer.get("client_endpoint")
    member_id = answer.get("member_id")
    try:
        if not isinstance(endpoint, str) or not isinstance(member_id, str) or not member_id:
            raise ValueError("no client_endpoint or member_id")
        check_url(endpoint)
    except (ValueError, Bitrix24Error):
        log.warning("install proof: the OAuth answer names no usable portal")
        raise InstallRefused(
            503, "oauth_unavailable", "Bitrix24's OAuth server named no usable portal"
        ) from None
    server_endpoint = answer.get("server_endpoint")
    scope = answer.get("scope")
    return ProvenInstall(
        member_id=member_id,
        domain=_netloc(endpoint),
        client_endpoint=endpoint,
        server_endpoint=server_endpoint if isinstance(server_endpoint, str) else None,
        access_token=str(answer["access_token"]),
        refresh_token=str(answer["refresh_token"]),
        expires_at=token_expiry(answer.get("expires"), answer.get("expires_in")),
        scope=scope if isinstance(scope, str) else None,
    )


def _agree(claim: InstallClaim, proven: ProvenInstall) -> None:
    """The install's own fields must say what the OAuth server said (the field is named)."""
    mismatch = None
    if claim.member_id != proven.member_id:
        mismatch = "member_id"
    elif (
        not _HOST.fullmatch(claim.domain)
        or _netloc(f"{_scheme(proven.client_endpoint)}://{claim.domain}") != proven.domain
    ):
        mismatch = "domain"
    elif (
        claim.client_endpoint is not None
        and _same_url(claim.client_endpoint, proven.client_endpoint) is False
    ):
        mismatch = "client_endpoint"
    elif (
        claim.server_endpoint
        and proven.server_endpoint
        and _same_url(claim.server_endpoint, proven.server_endpoint) is False
    ):
        mismatch = "server_endpoint"
    if mismatch:
        log.warning("install refused: %s differs from the OAuth server's answer", mismatch)
        raise InstallRefused(
            401, "unauthorized", f"{mismatch}: differs from what Bitrix24's OAuth server says"
        )


_DEFAULT_PORTS = {"http": 80, "https": 443}
#: what a domain field may hold: a host name or IPv4 address, and a port (no user, no path)
_HOST = re.compile(r"[A-Za-z0-9.-]+(:\d{1,5})?")


def _scheme(url: str) -> str:
    return urlsplit(url).scheme.lower()


def _netloc(url: str) -> str:
    """``host[:port]`` of ``url``, lower-cased, without the scheme's default port."""
    try:
        parts = urlsplit(url)
        host, port = (parts.hostname or "").lower(), parts.port
    except ValueError:
        return ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS.get(parts.scheme.lower()):
        return host
    return f"{host}:{port}"


def _same_url(one: str, other: str) -> bool:
    """Same scheme, host, port and path (a trailing slash aside)."""
    try:
        a, b = urlsplit(one), urlsplit(other)
    except ValueError:
        return False
    return (
        a.scheme.lower() == b.scheme.lower()
        and _netloc(one) == _netloc(other)
        and a.path.rstrip("/") == b.path.rstrip("/")
    )


def _hostname(host: str) -> str:
    try:
        return (urlsplit(f"//{host}").hostname or "").lower()
    except ValueError:
        return ""
