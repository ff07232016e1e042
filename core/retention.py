"""Retention: how long message data is kept, and erasing a portal's data.

``[retention]`` in the config: ``redact_after_days`` (default 30) erases the body, the numbers
and the CRM context of final messages and keeps the rest (status, CODE, times, history: the
statistics); ``delete_after_days`` (default 180) deletes final messages with their history. An
uninstall with ``CLEAN=1`` makes the portal's messages final (failed, not reported) and deletes
its data the same way. ``docs/operations.md`` says what is kept and why.

Everything happens in small batches (``batch_size`` messages per transaction, found through
partial indexes that hold only the rows waiting for it), from a periodic queue task and
``b24sms purge``, never on the HANDLER's path: a batch holds the writer lock for milliseconds.

Nothing here deletes or redacts a message that is not final: every statement that does carries
the condition ``status IN ('delivered', 'undelivered', 'failed')`` itself, whatever selected
its ids (:func:`b24sms.queries.final`).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Select, Table, delete, func, select, update
from sqlalchemy.orm import Session

from . import counts, queries
from .config import RetentionConfig
from .counts import is_accepted
from .messages import record_status
from .models import (
    Message,
    OutboxEntry,
    Portal,
    PortalPacing,
    PortalState,
    ProviderRegistration,
    StatusEvent,
    utcnow,
)
from .statuses import FAILED

if TYPE_CHECKING:
    from sqlalchemy import CursorResult

    from .db import Database
    from .service import Service

log = logging.getLogger(__name__)

#: what an erased message is failed with (it can no longer be sent for a portal that left)
ERASED_DETAIL = "the portal uninstalled the app with CLEAN: its data is erased"
#: seconds between two ``PRAGMA optimize`` runs from the periodic task
OPTIMIZE_EVERY = 3600.0


@dataclass
class RetentionReport:
    """What one run did (or, with ``dry_run``, would do)."""

    redacted: int = 0
    deleted: int = 0
    erased_messages: int = 0
    erased_portals: int = 0
    #: False when the run stopped at its time budget with work left
    finished: bool = True

    def __str__(self) -> str:
        return (
            f"redacted {self.redacted}, deleted {self.deleted}, "
            f"erased {self.erased_messages} messages of {self.erased_portals} portals"
            + ("" if self.finished else " (more left for the next run)")
        )


# -- erasing a portal (uninstall with CLEAN) -----------------------------------------------------


def start_erasure(session: Session, portal: Portal) -> None:
    """Uninstall with CLEAN, in the event's transaction: the portal stops at once, its data
    goes in batches afterwards (:func:`erase_portal`).

    Its messages still in flight are failed (not reported: the portal is gone), so that every
    message of it is final and the deletion path never has to touch one that is not. The
    member_id is freed (the row keeps a placeholder), so a re-install gets a fresh portal row
    while this one is being emptied.
    """
    for message in session.scalars(queries.portal_not_final(portal.id)):
        message.next_attempt_at = None
        message.sending_since = None
        message.last_error = ERASED_DETAIL
        record_status(
            session, message, FAILED, source="uninstall", detail=ERASED_DETAIL, report=False
        )
    session.execute(delete(OutboxEntry).where(OutboxEntry.portal_id == portal.id))
    portal.state = PortalState.ERASING
    portal.member_id = f"erasing:{portal.id}"
    portal.access_token = None
    portal.refresh_token = None
    portal.application_token = None
    portal.uninstalled_at = utcnow()


def erase_portal(db: Database, portal_id: int, batch_size: int, deadline: float | None) -> bool:
    """Delete an erasing portal's messages in batches, then the portal; True when it is gone,
    False when ``deadline`` (``time.monotonic()``) came first."""
    while True:
        with db.session() as session:
            deleted = _delete_batch(session, queries.portal_final_messages(portal_id, batch_size))
        if deleted < batch_size:
            break
        if deadline is not None and time.monotonic() >= deadline:
            return False
    with db.session() as session:
        left = session.scalar(select(Message.id).where(Message.portal_id == portal_id).limit(1))
        if left is not None:
            # Only possible if something made it not final again: never delete it.
            log.warning("portal %s: a message not final is left; not erased yet", portal_id)
            return False
        for table in (OutboxEntry, ProviderRegistration, PortalPacing):
            session.execute(delete(table).where(table.portal_id == portal_id))
        session.execute(
            delete(Portal).where(Portal.id == portal_id, Portal.state == PortalState.ERASING)
        )
    log.info("portal %s: its data is erased", portal_id)
    return True


#: seconds the uninstall event spends erasing before it answers (the periodic task finishes)
ERASE_BUDGET = 5.0


def erase_now(service: Service, portal_id: int) -> bool:
    """After an uninstall with CLEAN: erase the portal for :data:`ERASE_BUDGET` seconds at
    most, each batch its own short transaction; True when it is gone already."""
    size = service.config.retention.batch_size
    try:
        return erase_portal(service.db, portal_id, size, time.monotonic() + ERASE_BUDGET)
    except Exception:
        # The uninstall is committed; the periodic task erases what is left.
        log.exception("portal %s: erasing failed; the retention task tries again", portal_id)
        return False


# -- retention ---------------------------------------------------------------------------------


def _delete_batch(session: Session, selection: Select[Any]) -> int:
    """Delete the final messages among the ids ``selection`` picks, their history and outbox
    entries; keep the counts in step. Returns how many were deleted."""
    ids = list(session.scalars(selection))
    if not ids:
        return 0
    # The condition again, in every statement: whatever picked the ids, only final messages go.
    final_ids = select(Message.id).where(Message.id.in_(ids), queries.final())
    session.execute(delete(StatusEvent).where(StatusEvent.message_pk.in_(final_ids)))
    session.execute(delete(OutboxEntry).where(OutboxEntry.message_pk.in_(final_ids)))
    table = cast(Table, Message.__table__)
    deleted = session.execute(
        delete(table)
        .where(table.c.id.in_(ids), queries.final())
        .returning(table.c.code, table.c.status, table.c.external_id)
    ).all()
    # The counts lose what was deleted, as the statement says, not what was asked for.
    keys: dict[tuple[str, str, bool], int] = {}
    for code, status, external_id in deleted:
        key = (code, status, is_accepted(status, external_id))
        keys[key] = keys.get(key, 0) + 1
    counts.add_removed(session.connection(), [(*key, n) for key, n in keys.items()])
    return len(deleted)


def _redact_batch(session: Session, cutoff: dt.datetime, batch_size: int, now: dt.datetime) -> int:
    ids = session.scalars(queries.to_redact(cutoff, batch_size)).all()
    if not ids:
        return 0
    table = cast(Table, Message.__table__)
    result = cast(
        "CursorResult[Any]",
        session.execute(
            update(table)
            .where(table.c.id.in_(ids), queries.final())
            .values(
                body="",
                to_raw="",
                to=None,
                context={},
                redacted_at=now,
                # not a change of the message's state: keep what updated_at says
                updated_at=table.c.updated_at,
            )
        ),
    )
    return int(result.rowcount or 0)


def _batches(
    db: Database, step: Callable[[Session], int], batch_size: int, deadline: float | None
) -> tuple[int, bool]:
    """Run ``step`` (one batch, one transaction) until a batch is short or the deadline
    passes: (rows done, finished)."""
    done = 0
    while True:
        with db.session() as session:
            count = step(session)
        done += count
        if count < batch_size:
            return done, True
        if deadline is not None and time.monotonic() >= deadline:
            return done, False


def erasing_portals(session: Session) -> Sequence[int]:
    """Ids of the portals whose data is being erased."""
    return session.scalars(select(Portal.id).where(Portal.state == PortalState.ERASING)).all()


def run(
    db: Database,
    settings: RetentionConfig,
    *,
    budget: float | None = None,
    now: dt.datetime | None = None,
) -> RetentionReport:
    """Erase the portals being erased, then redact and delete what is due, in batches, for at
    most ``budget`` seconds (None: until done)."""
    now = now or utcnow()
    deadline = None if budget is None else time.monotonic() + budget
    report = RetentionReport()
    size = settings.batch_size
    with db.read() as session:
        portals = erasing_portals(session)
    for portal_id in portals:
        with db.read() as session:
            left = _count(session, select(Message.id).where(Message.portal_id == portal_id))
        if erase_portal(db, portal_id, size, deadline):
            report.erased_portals += 1
            report.erased_messages += left
        else:
            report.finished = False
            return report
    if settings.delete_after_days:
        cutoff = now - dt.timedelta(days=settings.delete_after_days)
        report.deleted, finished = _batches(
            db, lambda s: _delete_batch(s, queries.to_delete(cutoff, size)), size, deadline
        )
        if not finished:
            report.finished = False
            return report
    if settings.redact_after_days:
        cutoff = now - dt.timedelta(days=settings.redact_after_days)
        report.redacted, report.finished = _batches(
            db, lambda s: _redact_batch(s, cutoff, size, now), size, deadline
        )
    return report


def pending(
    db: Database, settings: RetentionConfig, now: dt.datetime | None = None
) -> RetentionReport:
    """What :func:`run` would do now (``b24sms purge --dry-run``), counted, changing nothing."""
    now = now or utcnow()
    report = RetentionReport()
    with db.read() as session:
        portals = erasing_portals(session)
        report.erased_portals = len(portals)
        if portals:
            report.erased_messages = _count(
                session, select(Message.id).where(Message.portal_id.in_(portals))
            )
        deleting = None
        if settings.delete_after_days:
            deleting = now - dt.timedelta(days=settings.delete_after_days)
            report.deleted = _count(session, queries.to_delete(deleting, None))
        if settings.redact_after_days:
            cutoff = now - dt.timedelta(days=settings.redact_after_days)
            redacting = queries.to_redact(cutoff, None)
            if deleting is not None:
                # deleted first, so not redacted
                redacting = redacting.where(Message.created_at >= deleting)
            report.redacted = _count(session, redacting)
    return report


def _count(session: Session, selection: Select[Any]) -> int:
    return int(session.scalar(select(func.count()).select_from(selection.subquery())) or 0)


# -- the periodic task ---------------------------------------------------------------------------

_last_optimize = 0.0
_optimize_lock = threading.Lock()

#: seconds one periodic run may spend (it runs again at the next sweep interval)
PERIODIC_BUDGET = 10.0


def periodic(service: Service) -> RetentionReport:
    """The queue's periodic retention task: a bounded run, then SQLite's planner statistics
    refreshed at most every :data:`OPTIMIZE_EVERY` seconds."""
    global _last_optimize
    report = run(service.db, service.config.retention, budget=PERIODIC_BUDGET)
    if report.redacted or report.deleted or report.erased_portals:
        log.info("retention: %s", report)
    with _optimize_lock:
        due = time.monotonic() - _last_optimize >= OPTIMIZE_EVERY or not _last_optimize
        if due:
            _last_optimize = time.monotonic()
    if due:
        service.db.optimize()
    return report
