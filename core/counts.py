"""Message counts kept in step with the messages: the ``message_counts`` table.

``/metrics`` reports messages per CODE, status and "a gateway accepted it". Counting them at
each scrape reads every message ever stored; instead every transaction that stores, moves or
deletes messages adds its changes to a few counter rows before it commits, so the counts are
right across processes and machines and a scrape reads a few dozen rows.

How the changes are gathered:

- ORM changes (a status applied by :func:`b24sms.messages.record_status`, an external id set,
  a message added or deleted through a session) are read from the session's pending changes
  before each flush (:func:`_collect`), so no caller can forget them;
- bulk statements that bypass the ORM (the HANDLER's :func:`b24sms.messages.insert_message_rows`,
  retention's batch deletes) call :func:`add` themselves.

The changes wait on the connection (``Connection.info``) and are written by :func:`apply` as
the transaction's last statements: by the session's ``before_commit`` hook, or by
:meth:`b24sms.db.Database.connection` for Core transactions. Written last and in key order,
the counter rows are locked for the shortest time and always in the same order, so two
transactions cannot deadlock over them; on PostgreSQL each transaction picks one of
:data:`SLOTS` rows per key at random, so concurrent HANDLER transactions seldom wait for each
other. A transaction that rolls back drops its changes (the ``begin`` and ``rollback`` hooks),
and a savepoint rolled back drops what was noted since it was taken.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any, cast

from sqlalchemy import Table, event, inspect
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from .models import Message, MessageCount
from .statuses import ACCEPTED_STATUSES

#: counter rows per key on PostgreSQL (SQLite has one writer at a time: one row is enough)
SLOTS = 8
#: Connection.info keys: the counts noted in this transaction, and per open savepoint
_PENDING = "b24sms_message_counts"
_SAVED = "b24sms_message_counts_savepoints"

Key = tuple[str, str, bool]


def is_accepted(status: str | None, external_id: str | None) -> bool:
    """Whether a message counts as accepted by a gateway (``b24sms_messages_sent``)."""
    return external_id is not None or status in ACCEPTED_STATUSES


def add(conn: Connection, key: Key, *, stored: int = 0, removed: int = 0) -> None:
    """Note a change of the counts of ``key`` (code, status, accepted) in this transaction."""
    pending: dict[Key, list[int]] = conn.info.setdefault(_PENDING, {})
    counts = pending.setdefault(key, [0, 0])
    counts[0] += stored
    counts[1] += removed


def add_removed(conn: Connection, rows: Iterable[tuple[str, str, bool, int]]) -> None:
    """Note deleted messages: ``(code, status, accepted, how many)`` per key."""
    for code, status, accepted, count in rows:
        add(conn, (code, status, bool(accepted)), stored=-count, removed=count)


def apply(conn: Connection) -> None:
    """Write the changes this transaction noted (call it just before the commit)."""
    pending: dict[Key, list[int]] | None = conn.info.pop(_PENDING, None)
    if not pending:
        return
    slot = random.randrange(SLOTS) if conn.dialect.name == "postgresql" else 0
    rows = [
        {
            "code": code,
            "status": status,
            "accepted": accepted,
            "slot": slot,
            "stored": stored,
            "removed": removed,
        }
        for (code, status, accepted), (stored, removed) in sorted(pending.items())
        if stored or removed
    ]
    if rows:
        # In key order, the same in every transaction, so their row locks cannot deadlock; as
        # one executemany (psycopg pipelines it: one round trip).
        conn.execute(_upsert(conn.dialect.name), rows)


def discard(conn: Connection) -> None:
    """Forget the changes noted on ``conn`` (its transaction did not commit)."""
    conn.info.pop(_PENDING, None)


_UPSERTS: dict[str, Any] = {}


def _upsert(dialect: str) -> Any:
    statement = _UPSERTS.get(dialect)
    if statement is None:
        table = cast(Table, MessageCount.__table__)
        insert = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)
        statement = insert.on_conflict_do_update(
            index_elements=[table.c.code, table.c.status, table.c.accepted, table.c.slot],
            set_={
                "stored": table.c.stored + insert.excluded.stored,
                "removed": table.c.removed + insert.excluded.removed,
            },
        )
        _UPSERTS[dialect] = statement
    return statement


def totals(conn: Connection | Session) -> list[tuple[str, str, bool, int, int]]:
    """``(code, status, accepted, stored, removed)`` per key, the slots added up."""
    from .queries import message_totals

    return [
        (code, status, bool(accepted), int(stored or 0), int(removed or 0))
        for code, status, accepted, stored, removed in conn.execute(message_totals())
    ]


def _key_of(message: Message, *, old: bool) -> Key:
    state = inspect(message)
    values = []
    for name in ("status", "external_id"):
        history = state.attrs[name].history
        if old and history.deleted:
            values.append(history.deleted[0])
        else:
            values.append(getattr(message, name))
    status, external_id = values
    return (message.code, status, is_accepted(status, external_id))


def _collect(session: Session, flush_context: Any, instances: Any) -> None:
    """``before_flush``: note what the pending ORM changes do to the counts."""
    changes: list[tuple[Key, int, int]] = []
    for obj in session.new:
        if isinstance(obj, Message):
            changes.append((_key_of(obj, old=False), 1, 0))
    for obj in session.dirty:
        if isinstance(obj, Message):
            before, after = _key_of(obj, old=True), _key_of(obj, old=False)
            if before != after:
                changes.append((before, -1, 0))
                changes.append((after, 1, 0))
    for obj in session.deleted:
        if isinstance(obj, Message):
            changes.append((_key_of(obj, old=True), -1, 1))
    if not changes:
        return
    conn = session.connection()
    for key, stored, removed in changes:
        add(conn, key, stored=stored, removed=removed)


def _before_commit(session: Session) -> None:
    # The commit flushes after this hook: flush first, so this transaction's last changes are
    # noted, then write the counts.
    if not session.in_transaction():
        return
    session.flush()
    apply(session.connection())


def _discard_on(conn: Connection, *args: Any) -> None:
    discard(conn)
    conn.info.pop(_SAVED, None)


def _on_savepoint(conn: Connection, name: str) -> None:
    # What was noted before the savepoint, to go back to if it is rolled back.
    pending = conn.info.get(_PENDING, {})
    conn.info.setdefault(_SAVED, []).append({k: list(v) for k, v in pending.items()})


def _on_rollback_savepoint(conn: Connection, name: str, context: Any) -> None:
    saved = conn.info.get(_SAVED)
    if saved:
        conn.info[_PENDING] = saved.pop()


def _on_release_savepoint(conn: Connection, name: str, context: Any) -> None:
    saved = conn.info.get(_SAVED)
    if saved:
        saved.pop()


_installed = False


def install(engine: Engine) -> None:
    """Keep counts for ``engine``'s transactions (once per engine; the session hooks once)."""
    global _installed
    if not _installed:
        event.listen(Session, "before_flush", _collect)
        event.listen(Session, "before_commit", _before_commit)
        _installed = True
    event.listen(engine, "begin", _discard_on)
    event.listen(engine, "rollback", _discard_on)
    event.listen(engine, "savepoint", _on_savepoint)
    event.listen(engine, "rollback_savepoint", _on_rollback_savepoint)
    event.listen(engine, "release_savepoint", _on_release_savepoint)
