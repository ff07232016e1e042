"""Every recurring query finds its rows through an index, on SQLite and on PostgreSQL.

The queries are the ones the code runs (:data:`b24sms.queries.RECURRING`, built by the same
functions), asked of a database with a history (tests/history.py) and planner statistics. A
full scan of ``messages`` or ``status_events`` fails the test, whatever the machine's speed:
dropping an index, or writing a condition a partial index cannot serve (a bound parameter
where SQLite needs the literal), shows here before it shows as a slow HANDLER.

PostgreSQL runs with its default settings (no ``enable_seqscan = off``): with enough rows and
ANALYZE its planner takes the index on its own, which is what a production database does.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy.engine import Connection

from b24sms.db import Database
from b24sms.queries import RECURRING
from tests.history import load_history, migrated_database

NOW = dt.datetime(2026, 12, 1, 12, 0)
#: enough that a scan costs the planner far more than an index (PostgreSQL weighs that)
MESSAGES = {"sqlite": 20_000, "postgresql": 60_000}
WATCHED = ("messages", "status_events")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def history_db(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A database at head holding a history, analyzed."""
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    db = migrated_database(request.param, tmp_path_factory.mktemp("plans"), url)
    try:
        load_history(db.engine, MESSAGES[request.param], now=NOW)
        yield db
    finally:
        db.dispose()


def _compiled(conn: Connection, statement: Any) -> tuple[str, Any]:
    compiled = statement.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
    if conn.dialect.name == "sqlite":
        return str(compiled), tuple(compiled.params[k] for k in compiled.positiontup)
    return str(compiled), compiled.params


def sqlite_full_scans(conn: Connection, statement: Any) -> tuple[list[str], list[str]]:
    """(the plan's lines, those that scan a watched table whole)."""
    sql, params = _compiled(conn, statement)
    lines = [row[-1] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params)]
    # "SCAN t" reads the table whole; "SCAN t USING [COVERING] INDEX i" reads a whole index,
    # as bad. Only "SEARCH t USING …" is bounded.
    scans = [line for line in lines if line.split()[:2] in (["SCAN", t] for t in WATCHED)]
    return lines, scans


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


def postgresql_full_scans(conn: Connection, statement: Any) -> tuple[list[str], list[str]]:
    """(the plan's nodes, the sequential scans of a watched table)."""
    sql, params = _compiled(conn, statement)
    (raw,) = conn.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {sql}", params).one()
    plan = (raw if isinstance(raw, list) else json.loads(raw))[0]["Plan"]
    nodes = [
        f"{n['Node Type']} {n.get('Relation Name', '')} {n.get('Index Name', '')}".strip()
        for n in _nodes(plan)
    ]
    scans = [
        line
        for node, line in zip(_nodes(plan), nodes, strict=True)
        if node["Node Type"] == "Seq Scan" and node.get("Relation Name") in WATCHED
    ]
    return nodes, scans


@pytest.mark.parametrize("name", sorted(RECURRING))
def test_recurring_query_uses_an_index(history_db: Database, name: str) -> None:
    statement = RECURRING[name](NOW)
    with history_db.engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            plan, scans = sqlite_full_scans(conn, statement)
        else:
            plan, scans = postgresql_full_scans(conn, statement)
    assert not scans, f"{name}: full scan in the plan {plan}"


def test_the_check_sees_a_full_scan(history_db: Database) -> None:
    """The check itself can fail: a query without a usable index is caught."""
    from sqlalchemy import select

    from b24sms.models import Message

    # body has no index: a scan is the only way
    statement = select(Message.id).where(Message.body == "x")
    with history_db.engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            _, scans = sqlite_full_scans(conn, statement)
        else:
            _, scans = postgresql_full_scans(conn, statement)
    assert scans


def test_not_final_with_bound_parameters_misses_the_partial_index(history_db: Database) -> None:
    """Why the queries write statuses as literals: SQLite cannot match ``IN (?, ?)`` to the
    partial index's condition, and falls back to a scan."""
    if history_db.engine.dialect.name != "sqlite":
        pytest.skip("a SQLite planner rule")
    from sqlalchemy import select

    from b24sms.models import NOT_FINAL_STATUSES, Message

    statement = (
        select(Message.id)
        .where(Message.code == "sms_a", Message.status.in_(NOT_FINAL_STATUSES))
        .order_by(Message.updated_at)
        .limit(10)
    )
    with history_db.engine.connect() as conn:
        plan, _ = sqlite_full_scans(conn, statement)
    assert not any("ix_messages_not_final_code_updated" in line for line in plan)
