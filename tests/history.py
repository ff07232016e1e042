"""A database with a long history, loaded fast: for the query-plan test and ``bench/growth.py``.

The shape of issue 18's measurements: ``portals`` portals, three CODEs, 98 % of the messages
final, spread over ``days`` days before ``now``, each with its history (one status event per
status it went through). The 2 % not final: 1.5 % ``sent`` and waiting for a report (a gateway
that never sends a final one), 0.5 % ``queued`` and waiting out a retry delay.

Rows go in as plain Core inserts on SQLite and ``COPY`` on PostgreSQL. The tables are
reflected, so the same loader fills the schema of an older revision (the benchmark's
"before"); where the ``message_counts`` table exists it is filled from the loaded rows, as the
migration that made it would have. Then ANALYZE, as an operator's database would have had.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import MetaData, Table, inspect, text
from sqlalchemy.engine import Connection, Engine

from b24sms import schema
from b24sms.db import Database

CODES = ("sms_a", "sms_b", "sms_c")
BATCH = 20_000


def migrated_database(kind: str, path: Any, postgres_url: str | None = None) -> Database:
    """A database at the newest revision: SQLite in the directory ``path``, or the emptied
    PostgreSQL database ``postgres_url``."""
    if kind == "sqlite":
        db = Database(f"sqlite:///{path}/b24sms.sqlite3")
    else:
        from tests.deployment import reset_schema

        assert postgres_url is not None
        reset_schema(postgres_url)
        db = Database(postgres_url)
    schema.upgrade(db)
    return db


def each_database(request: Any, path: Any) -> Iterator[Database]:
    """The body of a fixture parametrized with "sqlite" and "postgresql": a migrated database
    of that kind (PostgreSQL through the module's ``postgres_url`` fixture, which skips when
    the server is absent), disposed of afterwards."""
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    database = migrated_database(request.param, path, url)
    try:
        yield database
    finally:
        database.dispose()


def message_status(i: int) -> str:
    """The status of the ``i``-th message: 98 % final, spread like a real month."""
    share = i % 200
    if share < 3:
        return "sent"
    if share == 3:
        return "queued"
    if share < 12:
        return "failed"
    if share < 20:
        return "undelivered"
    return "delivered"


def _statuses_through(status: str) -> tuple[str, ...]:
    if status == "queued":
        return ("queued",)
    if status == "failed":
        return ("queued", "failed")
    return ("queued", "sent") + (() if status == "sent" else (status,))


def _rows(
    count: int, portal_ids: Sequence[int], now: dt.datetime, days: float, first_id: int
) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
    span = dt.timedelta(days=days).total_seconds()
    for n in range(count):
        i = first_id + n
        created = now - dt.timedelta(seconds=span * (count - n) / count)
        status = message_status(i)
        accepted = status != "queued" and not (status == "failed" and i % 2)
        message = {
            "id": i,
            "portal_id": portal_ids[i % len(portal_ids)],
            "code": CODES[(i // len(portal_ids)) % len(CODES)],
            "message_id": f"{i:032x}",
            "to_raw": f"+1415555{i % 10_000:04d}",
            "to": f"+1415555{i % 10_000:04d}",
            "body": f"Your code is {i % 1_000_000:06d}",
            "module_id": "crm",
            "context": "{}",
            "status": status,
            "external_id": f"ext-{i}" if accepted else None,
            "raw_status": None,
            "attempts": 1,
            "last_error": None,
            # a queued message waits out a retry delay; nothing else is due
            "next_attempt_at": now + dt.timedelta(hours=1) if status == "queued" else None,
            "sending_since": None,
            "created_at": created,
            "updated_at": created + dt.timedelta(seconds=5),
        }
        events = [
            {
                "message_pk": i,
                "status": step,
                "raw_status": None,
                "source": "handler" if step == "queued" else "gateway",
                "applied": True,
                "detail": None,
                "created_at": created + dt.timedelta(seconds=k),
            }
            for k, step in enumerate(_statuses_through(status))
        ]
        yield message, events


def add_portals(conn: Connection, count: int, now: dt.datetime) -> list[int]:
    """``count`` active portals, each with the three CODEs registered; their ids."""
    portals = Table("portals", MetaData(), autoload_with=conn)
    registrations = Table("provider_registrations", MetaData(), autoload_with=conn)
    ids = []
    for p in range(count):
        row = {
            "member_id": f"{p + 1:032x}",
            "domain": f"portal{p + 1}.bitrix24.test",
            # a closed loopback port: status reports to it fail at once (no DNS, no waiting)
            "client_endpoint": f"http://127.0.0.1:9/portal{p + 1}/rest/",
            "application_token": f"app-token-{p + 1}",
            "state": "active",
            "installed_at": now - dt.timedelta(days=400),
            "updated_at": now - dt.timedelta(days=400),
        }
        ids.append(conn.execute(portals.insert().values(row)).inserted_primary_key[0])
    conn.execute(
        registrations.insert(),
        [
            {"portal_id": pid, "code": code, "state": "registered", "updated_at": now}
            for pid in ids
            for code in CODES
        ],
    )
    return ids


def load_history(
    engine: Engine,
    messages: int,
    *,
    portals: int = 20,
    days: float = 30,
    now: dt.datetime,
) -> list[int]:
    """Fill an empty database (schema made) with ``portals`` portals and ``messages`` messages
    and their histories, then ANALYZE; returns the portal ids."""
    with engine.begin() as conn:
        portal_ids = add_portals(conn, portals, now)
    messages_table = Table("messages", MetaData(), autoload_with=engine)
    events_table = Table("status_events", MetaData(), autoload_with=engine)
    message_columns = [c.name for c in messages_table.columns if c.name != "redacted_at"]
    event_columns = [c.name for c in events_table.columns if c.name != "id"]
    if engine.dialect.name == "postgresql":
        _copy(engine, messages, portal_ids, now, days, message_columns, event_columns)
    else:
        _insert(engine, messages, portal_ids, now, days, messages_table, events_table)
    with engine.begin() as conn:
        if inspect(conn).has_table("message_counts"):
            conn.execute(
                text(
                    "INSERT INTO message_counts (code, status, accepted, slot, stored, removed) "
                    "SELECT code, status, CASE WHEN external_id IS NOT NULL "
                    "OR status IN ('sent', 'delivered', 'undelivered') THEN true ELSE false END, "
                    "0, COUNT(*), 0 FROM messages GROUP BY 1, 2, 3"
                )
            )
    analyze(engine)
    return portal_ids


def analyze(engine: Engine) -> None:
    """Planner statistics, as a database in service has them."""
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE")
    else:
        with engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")


def _insert(
    engine: Engine,
    count: int,
    portal_ids: Sequence[int],
    now: dt.datetime,
    days: float,
    messages: Table,
    events: Table,
) -> None:
    with engine.begin() as conn:
        batch: list[dict[str, Any]] = []
        history: list[dict[str, Any]] = []
        for message, steps in _rows(count, portal_ids, now, days, 1):
            message["context"] = {}
            batch.append(message)
            history.extend(steps)
            if len(batch) >= BATCH:
                conn.execute(messages.insert(), batch)
                conn.execute(events.insert(), history)
                batch, history = [], []
        if batch:
            conn.execute(messages.insert(), batch)
            conn.execute(events.insert(), history)


def _copy(
    engine: Engine,
    count: int,
    portal_ids: Sequence[int],
    now: dt.datetime,
    days: float,
    message_columns: list[str],
    event_columns: list[str],
) -> None:
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        quoted = ", ".join(f'"{c}"' for c in message_columns)
        with (
            cursor.copy(f"COPY messages ({quoted}) FROM STDIN") as copy_messages,
        ):
            for message, _ in _rows(count, portal_ids, now, days, 1):
                copy_messages.write_row([message[c] for c in message_columns])
        with cursor.copy(
            f"COPY status_events ({', '.join(event_columns)}) FROM STDIN"
        ) as copy_events:
            for _, steps in _rows(count, portal_ids, now, days, 1):
                for step in steps:
                    copy_events.write_row([step[c] for c in event_columns])
        # COPY with explicit ids leaves the sequence behind: new rows must not collide.
        cursor.execute("SELECT setval('messages_id_seq', (SELECT max(id) FROM messages))")
        raw.commit()
    finally:
        raw.close()


__all__ = [
    "CODES",
    "add_portals",
    "analyze",
    "each_database",
    "load_history",
    "message_status",
    "migrated_database",
]
