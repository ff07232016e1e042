"""Rate limits on the public routes, so one noisy client cannot starve the others.

Who is counted (``[rate_limit]`` in the config; the reasoning is in docs/operations.md):

- **A HANDLER call with a valid key** counts against its *portal* (``member_id`` from the
  URL, trusted only because the key proves it: the route checks it with
  :mod:`b24sms.handler_keys` and passes the verdict to :func:`limit_handler_call`):
  ``portal_rate`` / ``portal_burst``, set far above anything Bitrix24 sends — it never
  retries a refused call, so every refusal here is a lost message. Such calls never count
  against the sending IP: Bitrix24 calls every portal's handler from the same few servers,
  and one portal must not use up another's allowance.
- **Everything else** — install, events, gateway callbacks, the app page, HANDLER calls without
  a valid key, unknown URLs — counts against the *client IP*: every request against
  ``ip_rate`` / ``ip_burst``, and every answer 4xx (other than 429) against a much smaller
  failure budget, ``failure_rate`` / ``failure_burst``. An address whose failure budget is
  spent is refused until it refills, so guessing keys, forging signatures or fuzzing costs a
  client far more than working traffic does.

``/healthz``, ``/metrics`` and static files are not limited, nor are the ``exempt`` networks.
A refusal is ``429 {"error": "rate_limited", "message": …}`` with ``Retry-After`` (seconds),
decided before the body is read.

The client IP is the TCP peer unless ``trusted_proxies`` says otherwise: a number N means N
proxies of ours append to ``X-Forwarded-For`` (the client is the N-th address from the right);
a list of addresses or networks means: skip those, from the right, while the peer is one of
them. Anything else in ``X-Forwarded-For`` is the client's to write, so it is not believed.
IPv6 clients are counted per /64, the block one subscriber usually gets.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flask import Flask, Response, current_app, g, request

from ..config import RateLimitConfig
from ..errors import error_response
from ..rate_limit_store import Buckets, Limit, make_buckets

if TYPE_CHECKING:
    from ..service import Service

log = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: blueprints and endpoints never limited: monitoring must see an overloaded service
EXEMPT_BLUEPRINTS = frozenset({"health", "metrics"})
EXEMPT_ENDPOINTS = frozenset({"static"})
HANDLER_ENDPOINT = "bitrix24.handler"
#: portal tokens one process leases from shared buckets at most, and for how long (seconds)
MAX_LEASE = 20
LEASE_SECONDS = 1.0
#: seconds between two log lines about one refused key
LOG_EVERY = 60.0


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """``["10.0.0.0/8", "::1"]`` → networks (a bare address is a /32 or /128)."""
    return tuple(ipaddress.ip_network(str(v), strict=False) for v in values)


def _address(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not text:
        return None
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def _within(address: Any, networks: Sequence[Network]) -> bool:
    return address is not None and any(address in network for network in networks)


def client_ip(
    remote_addr: str | None, forwarded_for: Sequence[str], trusted_proxies: int | Sequence[Network]
) -> str:
    """The client's address as ``trusted_proxies`` allows us to know it (module docstring).

    :param remote_addr: the TCP peer.
    :param forwarded_for: every ``X-Forwarded-For`` header, in order.
    :param trusted_proxies: a count of our proxies, or their networks.
    :returns: the address as text; the peer's when the header cannot be believed or parsed.
    """
    hops = [hop.strip() for value in forwarded_for for hop in value.split(",") if hop.strip()]
    peer = remote_addr or ""
    if isinstance(trusted_proxies, int):
        if trusted_proxies <= 0 or len(hops) < trusted_proxies:
            return peer
        candidate = hops[-trusted_proxies]
        return candidate if _address(candidate) is not None else peer
    if not _within(_address(peer), trusted_proxies):
        return peer
    for hop in reversed(hops):
        address = _address(hop)
        if address is None:
            return peer
        if not _within(address, trusted_proxies):
            return hop
    return hops[0] if hops else peer


def ip_key(ip: str) -> str:
    """What one client is counted as: the IPv4 address, the IPv6 /64, or the text itself."""
    address = _address(ip)
    if address is None:
        return ip or "unknown"
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@dataclass(frozen=True)
class Decision:
    """A refusal: which budget is spent and how long until it is not."""

    scope: str
    key: str
    wait: float
    reason: str


class RateLimiter:
    """The limits of one app and the buckets they live in."""

    def __init__(self, settings: RateLimitConfig, buckets: Buckets) -> None:
        self.buckets = buckets
        self.portal = Limit(settings.portal_rate, settings.portal_burst)
        self.ip = Limit(settings.ip_rate, settings.ip_burst)
        self.failures = Limit(settings.failure_rate, settings.failure_burst)
        proxies = settings.trusted_proxies
        self.trusted_proxies: int | tuple[Network, ...] = (
            proxies if isinstance(proxies, int) else parse_networks(proxies)
        )
        self.exempt = parse_networks(settings.exempt)
        #: portal tokens taken from shared buckets at a time (1: none leased; see check_portal)
        self.lease_size = (
            max(1, min(MAX_LEASE, int(self.portal.burst // 100))) if buckets.shared else 1
        )
        self._leases: dict[str, tuple[float, float]] = {}
        self._lease_lock = threading.Lock()
        self._logged: dict[tuple[str, str], tuple[float, int]] = {}
        self._log_lock = threading.Lock()

    def check_portal(self, member_id: str) -> Decision | None:
        """A HANDLER call of ``member_id`` with a valid key: one token of the portal's bucket.

        With buckets shared through Redis, a process takes a few tokens at a time (a lease,
        kept for at most :data:`LEASE_SECONDS`) and spends them without asking again, so a
        burst costs one Redis round trip per :attr:`lease_size` calls instead of one per call.
        A lease is at most a hundredth of the burst, so the limit stays what it says; small
        budgets (tests, strict setups) lease nothing and count every call in Redis.
        """
        key = f"portal:{member_id}"
        if self.lease_size > 1:
            # One lease at a time per process: threads that find it spent wait for the one
            # fetching a new lease (one round trip), rather than each fetching one of its own.
            with self._lease_lock:
                if self._spend_lease(member_id):
                    return None
                if not self.buckets.take(key, self.portal, self.lease_size):
                    self._leases[member_id] = (
                        self.lease_size - 1.0,
                        time.monotonic() + LEASE_SECONDS,
                    )
                    return None
        wait = self.buckets.take(key, self.portal)
        if wait:
            return Decision("portal", member_id, wait, "too many HANDLER calls for this portal")
        return None

    def _spend_lease(self, member_id: str) -> bool:
        """Spend a token of this process's lease for the portal (caller holds the lock)."""
        lease = self._leases.get(member_id)
        if lease is None:
            return False
        tokens, until = lease
        if tokens < 1 or time.monotonic() >= until:
            del self._leases[member_id]
            return False
        self._leases[member_id] = (tokens - 1, until)
        return True

    def check_ip(self, key: str) -> Decision | None:
        """Any other request: refused while the failure budget or the request budget is spent."""
        wait = self.buckets.peek(f"fail:{key}", self.failures)
        if wait:
            return Decision("ip", key, wait, "too many failed requests from this address")
        wait = self.buckets.take(f"ip:{key}", self.ip)
        if wait:
            return Decision("ip", key, wait, "too many requests from this address")
        return None

    def count_failure(self, key: str) -> None:
        """An answer 4xx to ``key``: spend one token of its failure budget."""
        self.buckets.charge(f"fail:{key}", self.failures)

    def note_refusal(self, decision: Decision, path: str) -> None:
        """Log a refusal, at most once a minute per key, with how many were refused meanwhile."""
        now = time.monotonic()
        marker = (decision.scope, decision.key)
        with self._log_lock:
            last, refused = self._logged.get(marker, (-math.inf, 0))
            refused += 1
            if now - last < LOG_EVERY:
                self._logged[marker] = (last, refused)
                return
            self._logged[marker] = (now, 0)
            if len(self._logged) > 10_000:
                self._logged.clear()
        if decision.scope == "portal":
            # Bitrix24 does not retry: this is a message lost, which an operator must hear of.
            log.warning(
                "rate limit: refused %d HANDLER call(s) of portal %s (429); Bitrix24 does not "
                "retry them, so those messages are lost; raise rate_limit.portal_rate / "
                "portal_burst if this is genuine traffic",
                refused,
                decision.key,
            )
        else:
            log.warning(
                "rate limit: refused %d request(s) from %s (429, %s), latest %s",
                refused,
                decision.key,
                decision.reason,
                path,
            )


def _limiter() -> RateLimiter | None:
    return current_app.extensions.get("b24sms.rate_limit")


def _too_many(decision: Decision) -> Response:
    seconds = max(1, math.ceil(decision.wait))
    response = error_response(429, "rate_limited", f"{decision.reason}; retry after {seconds} s")
    response.headers["Retry-After"] = str(seconds)
    return response


def _client() -> tuple[RateLimiter, str] | None:
    """The app's limiter and this request's client address; None when nothing is limited."""
    limiter = _limiter()
    if limiter is None:
        return None
    ip = client_ip(
        request.remote_addr, request.headers.getlist("X-Forwarded-For"), limiter.trusted_proxies
    )
    if _within(_address(ip), limiter.exempt):
        return None
    return limiter, ip


def _refuse(limiter: RateLimiter, decision: Decision | None) -> Response | None:
    if decision is None:
        return None
    limiter.note_refusal(decision, request.path)
    return _too_many(decision)


def _check_address(limiter: RateLimiter, ip: str) -> Response | None:
    key = ip_key(ip)
    g.b24sms_rate_limit_ip = key  # after_request spends its failure budget on a 4xx
    return _refuse(limiter, limiter.check_ip(key))


def limit_handler_call(member_id: str | None) -> Response | None:
    """The HANDLER's limit, given the route's verdict on the call's key: ``member_id`` when the
    key proved it (the portal's budget), None when not (the client address's, as any request).

    :returns: the 429 answer, or None when the call may go ahead.
    """
    client = _client()
    if client is None:
        return None
    limiter, ip = client
    if member_id:
        return _refuse(limiter, limiter.check_portal(member_id))
    return _check_address(limiter, ip)


def before_request() -> Response | None:
    """Refuse the request with 429 when its budget is spent (runs before the body is read).

    Not for the HANDLER: its route checks the key first and calls :func:`limit_handler_call`.
    """
    if request.blueprint in EXEMPT_BLUEPRINTS or request.endpoint in EXEMPT_ENDPOINTS:
        return None
    if request.endpoint == HANDLER_ENDPOINT:
        return None
    client = _client()
    if client is None:
        return None
    return _check_address(*client)


def after_request(response: Response) -> Response:
    """Spend the client's failure budget on a 4xx answer (429 excepted: it is ours)."""
    key = g.pop("b24sms_rate_limit_ip", None)
    limiter = _limiter()
    status = response.status_code
    if key is not None and limiter is not None and 400 <= status < 500 and status != 429:
        limiter.count_failure(key)
    return response


def init_app(app: Flask, service: Service) -> None:
    """Install the limits of ``[rate_limit]`` on ``app`` (nothing when ``enabled = false``)."""
    settings = service.config.rate_limit
    if not settings.enabled:
        return
    buckets = make_buckets(settings, service.settings.queue_url)
    app.extensions["b24sms.rate_limit"] = RateLimiter(settings, buckets)
    app.before_request(before_request)
    app.after_request(after_request)
