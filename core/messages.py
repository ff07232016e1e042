"""Messages in the database: storing what a portal sent, recording every status report.

These are plain functions on a caller-owned session. :func:`record_status` is the one place a
message's status changes: it keeps the report in the history, applies it only when it moves the
status forward, and puts the new status in the portal's outbox (one row per message, coalesced).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from . import counts
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
    """The statement ``name`` (``upsert_report``) for the session's
    database: ``INSERT … ON CONFLICT`` is spelt per dialect (SQLite and PostgreSQL agree)."""
    dialect = session.get_bind().dialect.name
    statement = _STATEMENTS.get((dialect, name))
    if statement is None:
        insert_for = postgresql.insert if dialect == "postgresql" else sqlite.insert
        if name == "upsert_report":
            outbox = cast(Table, OutboxEntry.__table__)
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
    conn: Connection,
    rows: list[dict[str, Any]],
    *,
    source: str = "handler",
    now: dt.datetime | None = None,
) -> dict[tuple[int, str], int]:
    """Store new messages (rows of :func:`message_row`), each with the first entry of its
    history, in one statement on PostgreSQL and two on SQLite, however many there are.

    Per-database SQL on purpose (the only such in the HANDLER path): docs/benchmarks.md, change
    13, measured it against SQLAlchemy Core's multi-row insert: the insert 15.3 → 4.4 % of the
    HANDLER's samples under gunicorn, HANDLER 59–60 → 60–62 % of the bare route.

    The path of every HANDLER call. The rows go to the database as one JSON array, which the
    statement reads as a table (``json_to_recordset`` / ``json_each``): the SQL text is the same
    for every batch (the driver parses and prepares it once, rather than a statement with a
    placeholder per value per row), and the work per row stays in the database. ``ON CONFLICT
    DO NOTHING`` skips every ``(portal, message_id)`` that is stored already or comes twice in
    ``rows``, which tells a repeated or concurrent call apart without a look-up first.

    :returns: ``{(portal_id, message_id): id}`` of the messages stored now; a row that is
        missing was stored before.
    """
    if not rows:
        return {}
    now = now or utcnow()
    bulk = _bulk_statements(conn.dialect)
    batch = json.dumps(rows, default=bulk.datetime_text, separators=(",", ":"))
    params = {
        "rows": batch,
        "status": QUEUED,
        "source": source,
        "created_at": bulk.datetime_text(now),
    }
    stored = {
        (row.portal_id, row.message_id): row.id
        for row in conn.execute(bulk.insert_messages, params)
    }
    if stored and bulk.insert_history is not None:
        params["ids"] = json.dumps(list(stored.values()))
        conn.execute(bulk.insert_history, params)
    if stored:
        # The statement bypasses the ORM, whose flushes keep the counts: count here.
        per_code: dict[str, int] = {}
        counted: set[tuple[int, str]] = set()
        for row in rows:
            key = (row["portal_id"], row["message_id"])
            if key in stored and key not in counted:  # a row sent twice is stored once
                counted.add(key)
                per_code[row["code"]] = per_code.get(row["code"], 0) + 1
        for code, count in per_code.items():
            counts.add(conn, (code, QUEUED, False), stored=count)
    return stored


@dataclass(frozen=True)
class _Bulk:
    insert_messages: Any
    #: None where ``insert_messages`` writes the history too (PostgreSQL)
    insert_history: Any
    datetime_text: Any


_BULK: dict[str, _Bulk] = {}


def _bulk_statements(dialect: Any) -> _Bulk:
    """The two statements of :func:`insert_message_rows` for ``dialect``, built once from the
    tables' columns (so a column added to the model cannot be left out silently)."""
    bulk = _BULK.get(dialect.name)
    if bulk is not None:
        return bulk
    messages, events = Message.__table__, StatusEvent.__table__
    columns = [c for c in messages.columns if c.name in _MESSAGE_ROW_COLUMNS]
    quote = dialect.identifier_preparer.quote
    names = ", ".join(quote(c.name) for c in columns)
    history = "message_pk, status, raw_status, source, applied, detail, created_at"
    if dialect.name == "postgresql":
        record = ", ".join(f"{quote(c.name)} {c.type.compile(dialect=dialect)}" for c in columns)
        insert_messages = text(
            f"WITH new AS (INSERT INTO messages ({names}) "
            f"SELECT {names} FROM json_to_recordset(CAST(:rows AS json)) AS r({record}) "
            "ON CONFLICT (portal_id, message_id) DO NOTHING "
            "RETURNING id, portal_id, message_id, created_at), "
            f"history AS (INSERT INTO status_events ({history}) "
            "SELECT id, :status, NULL, :source, true, NULL, created_at FROM new) "
            "SELECT id, portal_id, message_id FROM new"
        )
        bulk = _Bulk(insert_messages, None, _datetime_text)
    else:
        values = ", ".join(f"json_extract(value, '$.{c.name}')" for c in columns)
        # (WHERE true: SQLite's grammar needs it between a SELECT and an upsert clause.)
        insert_messages = text(
            f"INSERT INTO messages ({names}) SELECT {values} FROM json_each(:rows) WHERE true "
            "ON CONFLICT (portal_id, message_id) DO NOTHING "
            "RETURNING id, portal_id, message_id"
        )
        insert_history = text(
            f"INSERT INTO status_events ({history}) "
            "SELECT value, :status, NULL, :source, 1, NULL, :created_at FROM json_each(:ids)"
        )
        # Dates as the DateTime type stores them on this database, so rows read back alike.
        store = events.c.created_at.type.dialect_impl(dialect).bind_processor(dialect)
        bulk = _Bulk(insert_messages, insert_history, store or _datetime_text)
    _BULK[dialect.name] = bulk
    return bulk


def _datetime_text(value: Any) -> str:
    if isinstance(value, dt.datetime):
        return value.isoformat(sep=" ")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


#: the columns :func:`message_row` fills
_MESSAGE_ROW_COLUMNS = frozenset(
    message_row(
        portal_id=0,
        code="",
        message_id="",
        to_raw="",
        to=None,
        body="",
        module_id=None,
        context={},
        now=dt.datetime(2000, 1, 1),
    )
)
