"""Messages in the database: storing what a portal sent, recording every status report.

These are plain functions on a caller-owned session. :func:`record_status` is the one place a
message's status changes: it keeps the report in the history, applies it only when it moves the
status forward, and puts the new status in the portal's outbox (one row per message, coalesced).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert
from sqlalchemy.dialects import postgresql, sqlite
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
    # One statement, no look-up first: this runs for every status of every message.
    session.execute(
        _statement(session, "upsert_report"),
        {
            "portal_id": message.portal_id,
            "message_pk": message.id,
            "code": message.code,
            "message_id": message.message_id,
            "status": message.status,
            "version": 1,
            "attempts": 0,
            "created_at": utcnow(),
        },
    )


#: statements of the hot paths, built once per dialect: building one and computing its cache
#: key costs more than running it
_STATEMENTS: dict[tuple[str, str], Any] = {}


def _statement(session: Session, name: str) -> Any:
    """The statement ``name`` (``insert_messages``, ``upsert_report``) for the session's
    database: ``INSERT … ON CONFLICT`` is spelt per dialect (SQLite and PostgreSQL agree)."""
    dialect = session.get_bind().dialect.name
    statement = _STATEMENTS.get((dialect, name))
    if statement is None:
        insert_for = postgresql.insert if dialect == "postgresql" else sqlite.insert
        if name == "insert_messages":
            messages = Message.__table__
            statement = (
                insert_for(messages)
                .on_conflict_do_nothing(
                    index_elements=[messages.c.portal_id, messages.c.message_id]
                )
                .returning(messages.c.id, messages.c.portal_id, messages.c.message_id)
            )
        else:
            outbox = OutboxEntry.__table__
            upsert = insert_for(outbox)
            statement = upsert.on_conflict_do_update(
                index_elements=[outbox.c.message_pk],
                set_={
                    "status": upsert.excluded.status,
                    "version": outbox.c.version + 1,
                    "attempts": 0,
                    "last_error": None,
                },
            )
        _STATEMENTS[(dialect, name)] = statement
    return statement


_INSERT_STATUS_EVENT = insert(StatusEvent.__table__)


def message_row(
    *,
    portal_id: int,
    code: str,
    message_id: str,
    to_raw: str,
    to: str | None,
    body: str,
    module_id: str | None,
    context: dict[str, Any],
    now: dt.datetime,
) -> dict[str, Any]:
    """The row of a new message: queued, due at once."""
    return {
        "portal_id": portal_id,
        "code": code,
        "message_id": message_id,
        "to_raw": to_raw,
        "to": to,
        "body": body,
        "module_id": module_id,
        "context": context,
        "status": QUEUED,
        "attempts": 0,
        "next_attempt_at": now,
        "created_at": now,
        "updated_at": now,
    }


def insert_message_rows(
    session: Session,
    rows: list[dict[str, Any]],
    *,
    source: str = "handler",
    now: dt.datetime | None = None,
) -> dict[tuple[int, str], int]:
    """Store new messages (rows of :func:`message_row`), each with the first entry of its
    history, in as few statements as the database allows.

    The path of every HANDLER call, so no ORM objects: one multi-row ``INSERT … ON CONFLICT DO
    NOTHING … RETURNING`` skips every ``(portal, message_id)`` that is stored already (or
    comes twice in ``rows``), which tells a repeated or concurrent call apart without a look-up
    first; one more ``INSERT`` writes the history of those stored.

    :returns: ``{(portal_id, message_id): id}`` of the messages stored now; a row that is
        missing was stored before.
    """
    now = now or utcnow()
    if not rows:
        return {}
    # On the session's connection: the same transaction, without the ORM's execute machinery.
    conn = session.connection()
    result = conn.execute(_statement(session, "insert_messages"), rows)
    stored = {(row.portal_id, row.message_id): row.id for row in result}
    if stored:
        conn.execute(
            _INSERT_STATUS_EVENT,
            [
                {
                    "message_pk": message_pk,
                    "status": QUEUED,
                    "raw_status": None,
                    "source": source,
                    "applied": True,
                    "detail": None,
                    "created_at": now,
                }
                for message_pk in stored.values()
            ],
        )
    return stored
