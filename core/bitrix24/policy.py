"""What an outgoing request to a portal or to Bitrix24's OAuth server may do.

Addresses we call come from the OAuth server's answer or from our own database, never straight
from a request; this module is the second fence in case one ever does:

- only ``http`` and ``https`` URLs with a host are called (:func:`check_url`);
- redirects are never followed (every caller passes ``allow_redirects=False``): a 3xx answer
  is a :class:`RedirectRefused` error, so a portal cannot bounce us to an internal address.
  Bitrix24's own domain-change redirect is handled on top of this, by its own function;
- a call made while a web request waits on it gets :data:`WEB_TIMEOUT` instead of the
  worker's long read timeout, and holds one of :data:`web_slots`, so slow portals can occupy
  at most a few of the server's threads (the caller answers 503 instead of queueing up).
"""

from __future__ import annotations

import threading
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
    """A bound on calls in flight at once: a semaphore whose waiters give up quickly.

    :param size: calls at once.
    :param wait: seconds :meth:`hold` waits for a free slot by default.
    """

    def __init__(self, size: int = WEB_SLOTS, wait: float = WEB_SLOT_WAIT) -> None:
        self.size = size
        self.wait = wait
        self._semaphore = threading.BoundedSemaphore(size)

    @contextmanager
    def hold(self, wait: float | None = None) -> Iterator[None]:
        """Hold one slot for the duration of the block.

        :param wait: seconds to wait for a slot (default :attr:`wait`).
        :raises SlotsBusy: no slot came free in time.
        """
        if not self._semaphore.acquire(timeout=self.wait if wait is None else wait):
            raise SlotsBusy("SLOTS_BUSY", "too many slow portal calls in flight; try again")
        try:
            yield
        finally:
            self._semaphore.release()


#: the process-wide slots for portal calls made inside web requests
web_slots = CallSlots()
