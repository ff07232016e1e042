"""Waiting before trying again: retry delays, and retrying while the database is unreachable.

- :func:`retry_delay`: seconds before a message's or a status batch's next attempt
  (exponential backoff with full jitter, a server's ``Retry-After`` as a floor);
- :func:`retry_while_unreachable`: run one transaction again and again while the database
  cannot be reached, for as long as the caller can afford (recording a send's outcome,
  releasing a flush lease).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import OperationalError

__all__ = ["retry_delay", "retry_while_unreachable"]

T = TypeVar("T")

#: seconds before the first retry of :func:`retry_while_unreachable`, and at most between two
FIRST_RETRY = 0.1
MAX_RETRY = 2.0


def retry_delay(
    attempt: int,
    base: float,
    cap: float,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Seconds before attempt ``attempt + 1``: exponential backoff with full jitter.

    A uniform draw from ``[0, min(cap, base * 2 ** (attempt - 1))]`` spreads the retries of a
    burst that failed together (AWS "full jitter"). A gateway's ``retry_after`` is a floor: it
    asked us not to come back sooner, even beyond the cap.
    """
    exponent = min(max(attempt - 1, 0), 60)
    ceiling = min(cap, base * (2.0**exponent))
    delay = (rng or random).uniform(0.0, ceiling)
    if retry_after is not None and retry_after > delay:
        delay = float(retry_after)
    return delay


def retry_while_unreachable(
    action: Callable[[], T],
    deadline: float,
    *,
    on_retry: Callable[[OperationalError, float], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``action()`` (one transaction), again while it raises ``OperationalError`` (the database
    cannot be reached), waiting 0.1 s, then twice as long each time up to 2 s, until
    ``time.monotonic()`` would pass ``deadline``; then the last error propagates.

    :param on_retry: called with the error and the wait before each new try (to log it).
    """
    delay = FIRST_RETRY
    while True:
        try:
            return action()
        except OperationalError as exc:
            if time.monotonic() + delay > deadline:
                raise
            if on_retry is not None:
                on_retry(exc, delay)
            sleep(delay)
            delay = min(delay * 2, MAX_RETRY)
