"""Pacing: how fast, and whether at all right now, a portal may be called with status batches.

- a token bucket mirroring the portal's leaky bucket (``requests_per_second``, ``burst``), its
  state in the portal's ``portal_pacing`` row so every process spends from one bucket; a slice of
  the burst is left for other callers (provider sync on install);
- :func:`wait_before_calling`: the one question the flush asks before a batch — may the portal
  be called now (a pause after ``QUERY_LIMIT_EXCEEDED``, ``OPERATION_TIME_LIMIT`` or a failed
  request)? A per-method block would be answered here too.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .lease import LEASE_MARGIN

if TYPE_CHECKING:
    from ..models import Portal, PortalPacing
    from ..service import Service

#: the part of the portal's burst we leave to other callers (provider sync, installs)
BUCKET_RESERVE = 0.1


@dataclass(frozen=True)
class Pacing:
    """The settings one flush works with: the bucket, the lease, retries."""

    rate: float
    capacity: float
    lease_ttl: float
    max_attempts: int
    retry_base: float
    retry_cap: float


def pacing_of(service: Service) -> Pacing:
    """The :class:`Pacing` of the service's ``[bitrix24]`` and ``[service]`` settings."""
    b24 = service.config.bitrix24
    burst = float(b24.burst)
    return Pacing(
        rate=b24.requests_per_second,
        capacity=max(1.0, burst - max(1.0, round(burst * BUCKET_RESERVE))),
        lease_ttl=b24.timeout + LEASE_MARGIN,
        max_attempts=service.settings.max_attempts,
        retry_base=service.settings.retry_base_delay,
        retry_cap=service.settings.retry_max_delay,
    )


def seconds(value: float) -> dt.timedelta:
    """``value`` seconds as a timedelta."""
    return dt.timedelta(seconds=value)


def wait_before_calling(portal: Portal, now: dt.datetime) -> float:
    """Seconds before the portal may be called with a status batch (0.0: now).

    The flush asks this, and only this, before spending a token: a pause set by the error policy
    (``QUERY_LIMIT_EXCEEDED``, ``OPERATION_TIME_LIMIT``, a failed request's backoff).
    """
    if portal.paused_until is not None and portal.paused_until > now:
        return (portal.paused_until - now).total_seconds()
    return 0.0


def take_token(
    state: PortalPacing, now: dt.datetime, rate: float, capacity: float, cost: float = 1.0
) -> float:
    """Spend ``cost`` requests from the bucket: 0 when taken, else the seconds until they are
    free."""
    level = float(state.bucket_level or 0.0)
    if state.bucket_at is not None:
        elapsed = max(0.0, (now - state.bucket_at).total_seconds())
        level = max(0.0, level - elapsed * rate)
    if level + cost <= capacity + 1e-9:
        state.bucket_level = level + cost
        state.bucket_at = now
        return 0.0
    return (level + cost - capacity) / rate
