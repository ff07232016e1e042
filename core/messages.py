"""Messages in the database: storing what a portal sent, recording every status report.

These are plain functions on a caller-owned session. :func:`record_status` is the one place a
message's status changes: it keeps the report in the history, applies it only when it moves the
status forward, and puts the new status in the portal's outbox (one row per message, coalesced).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from .models import Message, OutboxEntry, StatusEvent, utcnow
from .statuses import FINAL_STATUSES, QUEUED, moves_forward

#: message_id prefix of the app page's test messages: Bitrix24 never issued their ids (its own
#: are 32 hex digits), so their statuses are kept here and never reported to the portal
TEST_MESSAGE_PREFIX = "test-"


@dataclass(frozen=True)
class StatusChange:
    """A status that was applied; event hooks hear about it after the commit."""

    message_pk: int
    portal_id: int
    previous: str | None
    status: str
    raw_status: str | None
    source: str


def record_status(
    session: Session,
    message: Message,
    status: str,
    *,
    source: str,
    raw_status: str | None = None,
    detail: str | None = None,
    report: bool = True,
) -> StatusChange | None:
    """Record a status report about ``message``; apply it when it moves the status forward.

    The caller should hold the message row locked (``with_for_update``) so concurrent reports
    about one message apply in order. Returns the change, or None when it was only recorded.

    :param report: put the new status in the outbox for Bitrix24 (False for statuses Bitrix24
        need not hear, such as the initial ``queued`` of a message it just handed us).
    """
    previous = message.status
    applied = moves_forward(previous, status)
    session.add(
        StatusEvent(
            message_pk=message.id,
            status=status,
            raw_status=raw_status,
            source=source,
            applied=applied,
            detail=detail,
        )
    )
    if not applied:
        return None
    message.status = status
    if raw_status is not None:
        message.raw_status = raw_status
    if status in FINAL_STATUSES:
        message.next_attempt_at = None
        message.sending_since = None
    if report:
        enqueue_report(session, message)
    return StatusChange(message.id, message.portal_id, previous, status, raw_status, source)


def enqueue_report(session: Session, message: Message) -> None:
    """Put the message's current status in its portal's outbox, replacing an unsent one."""
    if message.message_id.startswith(TEST_MESSAGE_PREFIX):
        return
    entry = session.scalar(select(OutboxEntry).where(OutboxEntry.message_pk == message.id))
    if entry is None:
        session.add(
            OutboxEntry(
                portal_id=message.portal_id,
                message_pk=message.id,
                code=message.code,
                message_id=message.message_id,
                status=message.status,
            )
        )
    else:
        entry.status = message.status
        entry.version += 1
        entry.attempts = 0
        entry.last_error = None


def new_message(
    *,
    portal_id: int,
    code: str,
    message_id: str,
    to_raw: str,
    to: str | None,
    body: str,
    module_id: str | None,
    context: dict[str, Any],
    now: dt.datetime | None = None,
) -> Message:
    """A new message row, queued and due for its first attempt."""
    now = now or utcnow()
    return Message(
        portal_id=portal_id,
        code=code,
        message_id=message_id,
        to_raw=to_raw,
        to=to,
        body=body,
        module_id=module_id,
        context=context,
        status=QUEUED,
        attempts=0,
        next_attempt_at=now,
        created_at=now,
        updated_at=now,
    )
