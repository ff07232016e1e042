"""Per-method time budgets: which REST method of which portal is blocked, and until when.

Bitrix24 accounts each method's execution time per app; when a method's budget is spent, its
next call answers HTTP 429 ``OPERATION_TIME_LIMIT`` and "other applications, webhooks, and
methods continue to function" — also for commands inside a ``batch``, each checked against its
own method's budget. The advice: "suspend calls to the blocked method ... for the first retry,
refer to ``operating_reset_at`` from the last successful response"
(bitrix24/b24restdocs ``settings/performance/limits.md``).

So a block names one method of one portal, and lasts until the error's ``operating_reset_at``,
else the one of that method's last successful answer, else :data:`FALLBACK` seconds.

Blocks live in the database (``method_limits``), because every process calling the portal
(web, workers on other machines) must stop calling the method, not only the one that was told.
The last successful answer's ``operating_reset_at`` is kept per process: it is only a hint for
an error that lacks its own, the process that got the error is the one that made the calls
before it, and writing it on every successful call would cost a database write per REST call.
Only single calls carry operating fields: a batch's ``time`` and its ``result_time`` entries
have none ("an external call to batch is not accounted for in operating", limits.md; the example
answers of ``settings/how-to-call-rest-api/batch.md``), so a command run only inside batches
falls back to :data:`FALLBACK`.

A whole portal can be paused too (:func:`pause_portal`): ``OVERLOAD_LIMIT`` and
``PORTAL_DELETED`` are lifted by Bitrix24's support or the portal's administrator
(``_includes/system-errors.md``), so they pause every method for :data:`PORTAL_PAUSE`, doubling
while they last (up to :data:`PORTAL_PAUSE_CAP`), until a successful answer clears the pause
(:func:`clear_portal_pause`). Its rows use method names no REST method has.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Mapping
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..models import MethodLimit, utcnow

__all__ = [
    "FALLBACK",
    "PORTAL",
    "PORTAL_PAUSE",
    "PORTAL_PAUSE_CAP",
    "block",
    "blocked_until",
    "clear",
    "clear_portal_pause",
    "note_answer",
    "operating_reset_at",
    "pause_portal",
    "portal_pause",
    "reset_at",
    "wait_seconds",
]

#: seconds a method stays blocked when neither the error nor an earlier answer said until when
FALLBACK = 60.0
#: a reset further away than Bitrix24's 10-minute accounting window is not believed
MAX_BLOCK = 600.0

#: the pseudo-method whose block pauses every method of a portal
PORTAL = "*portal"
#: the pseudo-method whose "blocked_until" holds when the current run of portal pauses began
_PORTAL_SINCE = "*portal-since"
#: the first pause of a portal after OVERLOAD_LIMIT / PORTAL_DELETED, in seconds
PORTAL_PAUSE = 600.0
#: the longest pause: a lifted block is noticed within this time
PORTAL_PAUSE_CAP = 6 * 3600.0

_hints_lock = threading.Lock()
#: (database, portal_id, method) -> operating_reset_at of its last successful answer
_hints: dict[tuple[str, int, str], dt.datetime] = {}


def operating_reset_at(body: Any) -> dt.datetime | None:
    """``time.operating_reset_at`` of an answer (or of an error body), as naive UTC."""
    block = body.get("time") if isinstance(body, Mapping) else None
    if not isinstance(block, Mapping):
        return None
    try:
        stamp = float(block.get("operating_reset_at"))  # type: ignore[arg-type]  # None: TypeError below
        return dt.datetime.fromtimestamp(stamp, dt.UTC).replace(tzinfo=None)
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def note_answer(database: str, portal_id: int, method: str, time_block: Any) -> None:
    """Remember the ``operating_reset_at`` of a successful answer of ``method`` (a ``time``
    block), the fallback for a later ``OPERATION_TIME_LIMIT`` that lacks one. ``database``
    names the portal's database: a portal id means nothing outside it."""
    moment = operating_reset_at({"time": time_block})
    if moment is not None:
        with _hints_lock:
            _hints[(database, portal_id, method.lower())] = moment


def reset_at(database: str, portal_id: int, method: str, error_body: Any) -> dt.datetime:
    """Until when an ``OPERATION_TIME_LIMIT`` of ``method`` blocks it: the error's
    ``operating_reset_at``, else the last successful answer's, else :data:`FALLBACK` seconds;
    never more than :data:`MAX_BLOCK` seconds away."""
    now = utcnow()
    moment = operating_reset_at(error_body)
    if moment is None or moment <= now:
        with _hints_lock:
            moment = _hints.get((database, portal_id, method.lower()))
    if moment is None or moment <= now:
        moment = now + dt.timedelta(seconds=FALLBACK)
    return min(moment, now + dt.timedelta(seconds=MAX_BLOCK))


def block(session: Session, portal_id: int, method: str, until: dt.datetime) -> None:
    """Block ``method`` of the portal until ``until`` (a later block is kept)."""
    method = method.lower()
    row = session.get(MethodLimit, (portal_id, method))
    if row is None:
        try:
            with session.begin_nested():
                session.add(MethodLimit(portal_id=portal_id, method=method, blocked_until=until))
            return
        except IntegrityError:
            # Another process recorded the same block a moment ago: extend theirs.
            row = session.get(MethodLimit, (portal_id, method), populate_existing=True)
            if row is None:
                return
    if row.blocked_until is None or row.blocked_until < until:
        row.blocked_until = until


def blocked_until(session: Session, portal_id: int, method: str) -> dt.datetime | None:
    """When ``method`` of the portal may be called again; None when it may now."""
    until = session.scalar(
        select(MethodLimit.blocked_until).where(
            MethodLimit.portal_id == portal_id, MethodLimit.method == method.lower()
        )
    )
    return until if until is not None and until > utcnow() else None


def wait_seconds(session: Session, portal_id: int, method: str) -> float:
    """Seconds until ``method`` of the portal may run; 0 when it may now."""
    until = blocked_until(session, portal_id, method)
    return (until - utcnow()).total_seconds() if until is not None else 0.0


def clear(session: Session, portal_id: int) -> None:
    """Forget the portal's blocks (a re-install starts afresh)."""
    session.execute(delete(MethodLimit).where(MethodLimit.portal_id == portal_id))


def pause_portal(session: Session, portal_id: int) -> dt.datetime:
    """Pause every method of the portal after ``OVERLOAD_LIMIT`` / ``PORTAL_DELETED``; returns
    until when. The pause is as long as the portal has been refusing so far (so it doubles),
    at least :data:`PORTAL_PAUSE` and at most :data:`PORTAL_PAUSE_CAP` seconds."""
    now = utcnow()
    since = session.scalar(
        select(MethodLimit.blocked_until).where(
            MethodLimit.portal_id == portal_id, MethodLimit.method == _PORTAL_SINCE
        )
    )
    if since is None:
        since = now
        block(session, portal_id, _PORTAL_SINCE, since)
    pause = min(PORTAL_PAUSE_CAP, max(PORTAL_PAUSE, (now - since).total_seconds()))
    until = now + dt.timedelta(seconds=pause)
    block(session, portal_id, PORTAL, until)
    return until


def portal_pause(session: Session, portal_id: int) -> dt.datetime | None:
    """The end of the portal's pause, also when it has passed (no successful answer since);
    None when the portal is not paused."""
    return session.scalar(
        select(MethodLimit.blocked_until).where(
            MethodLimit.portal_id == portal_id, MethodLimit.method == PORTAL
        )
    )


def clear_portal_pause(session: Session, portal_id: int) -> None:
    """A successful answer: the portal's pause and its backoff are over."""
    session.execute(
        delete(MethodLimit).where(
            MethodLimit.portal_id == portal_id, MethodLimit.method.in_((PORTAL, _PORTAL_SINCE))
        )
    )
