"""Proving that an access token someone shows us is alive at a portal we know.

Used where a caller cannot be checked by ``application_token``: a re-install that brings a new
one, and the app page that Bitrix24 opens in a frame with the user's ``AUTH_ID``.

The token is always tried at the portal's *stored* ``client_endpoint``, never at an address
from the request: a token is only proof of "this portal" when the portal itself accepts it.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import requests

from .. import metrics
from .client import shared_session, user_agent
from .oauth import CONNECT_TIMEOUT

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
    settings: Mapping[str, Any],
    *,
    ttl: float = 0.0,
) -> bool:
    """True when ``app.info`` answers with a result for this token at this portal.

    For a local app (``client_id`` ``local.…``) the answer must also name *our* app
    (``result.CODE == client_id``): a token another app on the same portal received is alive
    there too, and must not open our data. Marketplace apps' codes differ from their client_id,
    so for them a live token is the proof.

    :param client_endpoint: the portal's stored REST address.
    :param access_token: the token to check.
    :param settings: ``config["bitrix24"]`` (``client_id``, ``timeout``, ``user_agent``).
    :param ttl: seconds to remember a positive answer (0: ask every time). Refusals are
        remembered for at most :data:`NEGATIVE_TTL` seconds.
    """
    if not access_token:
        return False
    key = _cache.key(client_endpoint, access_token) if ttl > 0 else ""
    if key:
        cached = _cache.get(key)
        if cached is not None:
            return cached
    answer = _ask(client_endpoint, access_token, settings)
    if key:
        _cache.put(key, answer, ttl if answer else min(ttl, NEGATIVE_TTL))
    return answer


def _ask(client_endpoint: str, access_token: str, settings: Mapping[str, Any]) -> bool:
    method = "app.info"
    started = time.perf_counter()
    try:
        response = shared_session().post(
            client_endpoint.rstrip("/") + "/" + method,
            json={"auth": access_token},
            headers={"User-Agent": user_agent(settings)},
            timeout=(CONNECT_TIMEOUT, float(settings.get("timeout", 30))),
        )
        body = response.json()
    except (requests.RequestException, ValueError) as exc:
        metrics.observe_rest_request(method, time.perf_counter() - started)
        metrics.count_rest_error(method, type(exc).__name__)
        log.warning("token probe at %s failed: %s", _host(client_endpoint), type(exc).__name__)
        return False
    metrics.observe_rest_request(method, time.perf_counter() - started)
    if response.status_code != 200 or not isinstance(body, dict) or "result" not in body:
        error = body.get("error") if isinstance(body, dict) else None
        metrics.count_rest_error(method, str(error or f"HTTP_{response.status_code}"))
        return False
    client_id = str(settings.get("client_id") or "")
    result = body["result"]
    if (
        client_id.startswith("local.")
        and isinstance(result, dict)
        and result.get("CODE")
        and str(result["CODE"]) != client_id
    ):
        log.warning("token probe at %s: the token belongs to another app", _host(client_endpoint))
        return False
    return True


def _host(url: str) -> str:
    return urlsplit(url).netloc
