"""What an outgoing request to a portal or to Bitrix24's OAuth server may do.

Addresses we call come from the OAuth server's answer or from our own database, never straight
from a request; this module is the second fence in case one ever does:

- only ``http`` and ``https`` URLs with a host are called (:func:`check_url`);
- redirects are never followed (every caller passes ``allow_redirects=False``): a 3xx answer
  is a :class:`RedirectRefused` error, so a portal cannot bounce us to an internal address.
  Bitrix24's own domain-change redirect is handled on top of this, by its own function;
- a call made while a web request waits on it gets :data:`WEB_TIMEOUT` instead of the
  worker's long read timeout, and holds one of :data:`web_slots`, so slow portals can occupy
  at most a few of the server's threads (the caller answers 503 instead of queueing up). One
  portal (one REST host) holds at most one of them at a time, so a single slow portal cannot
  take them all and lock every other portal out of its app page.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import requests

from .errors import PermanentError, TransientError

__all__ = [
    "ALLOWED_SCHEMES",
    "WEB_TIMEOUT",
    "CallSlots",
    "EndpointRefused",
    "RedirectRefused",
    "SlotsBusy",
    "check_url",
    "refuse_redirect",
    "web_slots",
]

ALLOWED_SCHEMES = frozenset({"http", "https"})
#: (connect, read) seconds for a call a web request waits on: the install's OAuth exchange and
#: provider sync, the app page's AUTH_ID check. A portal slower than this is answered 503 later.
WEB_TIMEOUT = (3.0, 5.0)
#: portal calls in flight at once per process on behalf of web requests
WEB_SLOTS = 4
#: seconds a web request waits for a free slot before it answers 503
WEB_SLOT_WAIT = 0.05


class EndpointRefused(PermanentError):
    """The URL is not one we call: not http(s), or without a host."""


class RedirectRefused(TransientError):
    """The server answered a redirect, which we do not follow. Transient: the work is kept and
    retried (a renamed portal is moved by the domain-change handling, not by us).

    :attr:`location` is the answer's ``Location`` header (None when absent), for that handling;
    it is not part of the message, which is logged.
    """

    location: str | None = None


class SlotsBusy(TransientError):
    """Every slot for portal calls from web requests is taken: answer 503, try again later."""


def check_url(url: str) -> str:
    """``url`` when it is an http(s) URL with a host.

    :raises EndpointRefused: anything else (``file:``, ``gopher:``, no host, unparsable).
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        raise EndpointRefused("ENDPOINT_REFUSED", "the address does not parse") from None
    if parts.scheme.lower() not in ALLOWED_SCHEMES or not host:
        raise EndpointRefused(
            "ENDPOINT_REFUSED",
            f"only http(s) addresses with a host are called, not {parts.scheme}:",
        )
    return url


def refuse_redirect(response: requests.Response) -> None:
    """Raise :class:`RedirectRefused` when ``response`` is a 3xx (sent without following it)."""
    if 300 <= response.status_code < 400:
        host = urlsplit(response.url or "").netloc or "?"
        error = RedirectRefused(
            "REDIRECT_REFUSED",
            f"{host} answered {response.status_code}; redirects are not followed",
            response.status_code,
        )
        error.location = response.headers.get("Location")
        raise error


class CallSlots:
    """A bound on calls in flight at once, and on calls to one host at once: waiters give up
    quickly.

    :param size: calls at once, over all hosts.
    :param wait: seconds :meth:`hold` waits for a free slot by default.
    :param per_host: calls at once to one host (the ``host`` of :meth:`hold`).
    """

    def __init__(self, size: int = WEB_SLOTS, wait: float = WEB_SLOT_WAIT, per_host: int = 1):
        self.size = size
        self.wait = wait
        self.per_host = per_host
        self._free = threading.Condition()
        self._in_flight = 0
        self._by_host: dict[str, int] = {}

    @contextmanager
    def hold(self, wait: float | None = None, host: str | None = None) -> Iterator[None]:
        """Hold one slot for the duration of the block.

        :param wait: seconds to wait for a slot (default :attr:`wait`).
        :param host: the host the call goes to (``host[:port]``, compared case-insensitively):
            at most :attr:`per_host` calls to it at once. None: only the overall bound.
        :raises SlotsBusy: no slot came free in time (for this host, or at all).
        """
        key = host.lower() if host else None
        deadline = time.monotonic() + (self.wait if wait is None else wait)
        with self._free:
            while not self._can_take(key):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SlotsBusy("SLOTS_BUSY", "too many slow portal calls in flight; try again")
                self._free.wait(left)
            self._in_flight += 1
            if key is not None:
                self._by_host[key] = self._by_host.get(key, 0) + 1
        try:
            yield
        finally:
            with self._free:
                self._in_flight -= 1
                if key is not None:
                    self._by_host[key] -= 1
                    if not self._by_host[key]:
                        del self._by_host[key]
                self._free.notify_all()

    def _can_take(self, key: str | None) -> bool:
        if self._in_flight >= self.size:
            return False
        return key is None or self._by_host.get(key, 0) < self.per_host


#: the process-wide slots for portal calls made inside web requests
web_slots = CallSlots()
