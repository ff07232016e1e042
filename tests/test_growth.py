"""Cost that does not grow with history: reads beside the writers, counts kept in step across
processes, keyset pages, the migration that brings an existing database along.

SQLite and PostgreSQL (skipped with the reason when PostgreSQL is not running).
"""

from __future__ import annotations

import datetime as dt
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError

from b24sms import counts, schema
from b24sms.db import Database
from b24sms.messages import insert_message_rows, message_row
from b24sms.models import Message, Portal, ProviderRegistration
from b24sms.web.app_data import PAGE_SIZE, Filters, message_rows
from tests.history import add_portals, each_database, load_history, migrated_database

REPO = Path(__file__).resolve().parent.parent
NOW = dt.datetime(2026, 12, 1, 12, 0)


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    yield from each_database(request, tmp_path)


def scanned_counts(db: Database) -> dict[tuple[str, str, bool], int]:
    """What a scan of the messages says the counts are."""
    with db.read() as session:
        rows = session.execute(select(Message.code, Message.status, Message.external_id)).all()
    found: dict[tuple[str, str, bool], int] = {}
    for code, status, external_id in rows:
        key = (code, status, counts.is_accepted(status, external_id))
        found[key] = found.get(key, 0) + 1
    return found


def kept_counts(db: Database) -> dict[tuple[str, str, bool], int]:
    with db.read() as session:
        return {(c, s, a): stored for c, s, a, stored, _ in counts.totals(session) if stored}


# -- reads beside the writers -------------------------------------------------------------------


@pytest.mark.slow
def test_a_read_neither_waits_for_nor_holds_up_the_writer(tmp_path: Path) -> None:
    """SQLite: a write transaction holds the process's writer lock and the file's; a read
    runs meanwhile and sees the last commit; a writer commits while a read is open."""
    db = migrated_database("sqlite", tmp_path)
    try:
        with db.connection() as conn:
            add_portals(conn, 1, NOW)
        writing = threading.Event()
        release = threading.Event()

        def long_write() -> None:
            with db.session() as session:
                registration = session.scalars(select(ProviderRegistration)).first()
                assert registration is not None
                registration.state = "error"
                session.flush()
                writing.set()
                release.wait(10)

        writer = threading.Thread(target=long_write)
        writer.start()
        try:
            assert writing.wait(10)
            started = time.monotonic()
            with db.read() as session:
                states = set(session.scalars(select(ProviderRegistration.state)))
            waited = time.monotonic() - started
        finally:
            release.set()
            writer.join(10)
        assert states == {"registered"}  # the snapshot of the last commit
        assert waited < 1.0, f"the read waited {waited:.2f}s for the writer"

        # And the other way round: a read open for a while does not hold a write up.
        with db.read() as session:
            session.execute(select(func.count()).select_from(ProviderRegistration)).scalar()
            started = time.monotonic()
            with db.session() as writer_session:
                writer_session.execute(
                    ProviderRegistration.__table__.update().values(state="registered")
                )
            assert time.monotonic() - started < 1.0
    finally:
        db.dispose()


def test_a_read_session_refuses_to_write(db: Database) -> None:
    with db.connection() as conn:
        add_portals(conn, 1, NOW)
    with pytest.raises(DBAPIError), db.read() as session:
        session.execute(ProviderRegistration.__table__.update().values(state="error"))
    # ...and leaves the connection usable for writers afterwards.
    with db.session() as session:
        session.execute(ProviderRegistration.__table__.update().values(state="error"))
    with db.read() as session:
        assert set(session.scalars(select(ProviderRegistration.state))) == {"error"}


# -- counts in step, across processes ----------------------------------------------------------

WRITER = """
import datetime as dt, sys
from b24sms.db import Database
from b24sms.messages import insert_message_rows, message_row, record_status
from b24sms.models import Message

url, tag, portal_id, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
db = Database(url)
now = dt.datetime(2026, 12, 1)
for n in range(count):
    row = message_row(portal_id=portal_id, code="sms_" + "abc"[n % 3], message_id=f"{tag}-{n}",
        to_raw="+14155550100", to="+14155550100", body="hi", module_id=None, context={}, now=now)
    with db.connection() as conn:
        (pk,) = insert_message_rows(conn, [row, row], now=now).values()
    with db.session() as session:
        message = session.get(Message, pk)
        if n % 4:
            message.external_id = f"{tag}-{n}"
            record_status(session, message, "sent", source="gateway")
        if n % 4 == 2:
            record_status(session, message, "delivered", source="callback")
        if n % 4 == 3:
            record_status(session, message, "queued", source="callback")  # not applied
        if n % 8 == 1:
            session.delete(message)
db.dispose()
"""


@pytest.mark.slow
def test_counts_stay_right_with_processes_writing_at_once(db: Database) -> None:
    with db.connection() as conn:
        (portal_id,) = add_portals(conn, 1, NOW)
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, db.url, f"w{i}", str(portal_id), "40"], cwd=REPO
        )
        for i in range(3)
    ]
    for writer in writers:
        assert writer.wait(120) == 0
    scanned = scanned_counts(db)
    assert sum(scanned.values()) == 3 * 35  # 40 each, 5 deleted
    assert kept_counts(db) == scanned


def queued_message(portal_id: int, code: str, message_id: str) -> Message:
    return Message(
        portal_id=portal_id,
        code=code,
        message_id=message_id,
        to_raw="+14155550100",
        body="hi",
        context={},
        status="queued",
    )


def test_a_rolled_back_transaction_leaves_the_counts_alone(db: Database) -> None:
    with db.connection() as conn:
        (portal_id,) = add_portals(conn, 1, NOW)
    with pytest.raises(RuntimeError), db.session() as session:
        session.add(queued_message(portal_id, "sms_a", "x"))
        session.flush()
        raise RuntimeError("rolled back")
    with db.session() as session:
        session.add(queued_message(portal_id, "sms_b", "y"))
    assert kept_counts(db) == scanned_counts(db) == {("sms_b", "queued", False): 1}


def test_a_rolled_back_savepoint_leaves_the_counts_alone(db: Database) -> None:
    with db.connection() as conn:
        (portal_id,) = add_portals(conn, 1, NOW)
    with db.session() as session:
        session.add(queued_message(portal_id, "sms_a", "kept"))
        session.flush()
        savepoint = session.begin_nested()
        session.add(queued_message(portal_id, "sms_b", "undone"))
        session.flush()
        savepoint.rollback()
    assert kept_counts(db) == scanned_counts(db) == {("sms_a", "queued", False): 1}


def test_the_migration_counts_the_messages_already_stored(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path}/old.sqlite3")
    try:
        schema.upgrade(db, "0001")
        load_history(db.engine, 3000, now=NOW, portals=3)
        schema.upgrade(db)
        assert kept_counts(db) == scanned_counts(db)
        assert sum(kept_counts(db).values()) == 3000
    finally:
        db.dispose()


def test_sqlite_gets_planner_statistics(tmp_path: Path) -> None:
    """A database that was never analyzed gets statistics from the first optimize (SQLite's
    PRAGMA optimize alone skips such tables); later runs refresh them."""
    db = migrated_database("sqlite", tmp_path)
    try:
        load_history(db.engine, 2000, now=NOW, portals=2)
        with db.connection() as conn:
            conn.exec_driver_sql("DROP TABLE sqlite_stat1")  # as the migrations leave it
        db.optimize()
        db.optimize()
        with db.read() as session:
            indexes = set(
                session.scalars(text("SELECT idx FROM sqlite_stat1 WHERE tbl = 'messages'"))
            )
        assert {"ix_messages_portal_id", "ix_messages_due"} <= indexes
    finally:
        db.dispose()


# -- keyset pages on the app page ---------------------------------------------------------------


def test_app_page_pages_by_message_id(db: Database) -> None:
    load_history(db.engine, 2 * (2 * PAGE_SIZE + 5), now=NOW, portals=2)
    with db.read() as session:
        ids = list(
            session.scalars(select(Message.id).where(Message.portal_id == 1).order_by(Message.id))
        )[::-1]

        def page(filters: Filters) -> tuple[list[int], bool, bool]:
            rows, older, newer = message_rows(session, 1, filters)
            return [r.id for r in rows], older, newer

        first = page(Filters())
        assert first == (ids[:PAGE_SIZE], True, False)
        second = page(Filters(page=2, before=first[0][-1]))
        assert second == (ids[PAGE_SIZE : 2 * PAGE_SIZE], True, True)
        third = page(Filters(page=3, before=second[0][-1]))
        assert third == (ids[2 * PAGE_SIZE :], False, True)
        # "Newer" from the third page is the second again; from the second, the first.
        assert page(Filters(page=2, after=third[0][0])) == second
        assert page(Filters(page=1, after=second[0][0])) == first
        # A filter pages the same way, within the portal.
        failed = page(Filters(status="failed"))[0]
        statuses = set(session.scalars(select(Message.status).where(Message.id.in_(failed))))
        portals = set(session.scalars(select(Message.portal_id).where(Message.id.in_(failed))))
    assert statuses == {"failed"} and portals == {1}


def _pager_form(html: str, button: str) -> dict[str, str]:
    """The hidden fields of the pager form whose button has the id ``button``."""
    for form in re.findall(r"<form[^>]*>(.*?)</form>", html, re.DOTALL):
        if f'id="{button}"' in form:
            return dict(re.findall(r'name="([^"]+)" value="([^"]*)"', form))
    raise AssertionError(f"no {button} link on the page")


def test_app_page_older_and_newer_links_walk_the_list(live_app, emulator) -> None:
    from tests.helpers import open_page

    server = live_app()
    portal = emulator.add_portal()
    portal.install(server.url)
    db = server.app.extensions["b24sms"].db
    with db.read() as session:
        portal_id = session.scalar(select(Portal.id).where(Portal.member_id == portal.member_id))
    rows = [
        message_row(
            portal_id=portal_id,
            code="smslog",
            message_id=f"{n:032x}",
            to_raw="+14155550100",
            to="+14155550100",
            body="hi",
            module_id="crm",
            context={},
            now=NOW,
        )
        for n in range(PAGE_SIZE + 5)
    ]
    with db.connection() as conn:
        insert_message_rows(conn, rows, now=NOW)

    def shown(html: str) -> list[str]:
        return re.findall(r'data-message-id="([0-9a-f]{32})"', html)

    first = open_page(server, portal.placement_auth())
    assert first.status_code == 200
    newest_first = [f"{n:032x}" for n in reversed(range(PAGE_SIZE + 5))]
    assert shown(first.text) == newest_first[:PAGE_SIZE]
    assert 'id="page-newer"' not in first.text

    older = requests.post(
        f"{server.url}/app", data=_pager_form(first.text, "page-older"), timeout=10
    )
    assert shown(older.text) == newest_first[PAGE_SIZE:]
    assert 'id="page-older"' not in older.text and "Page 2" in older.text

    newer = requests.post(
        f"{server.url}/app", data=_pager_form(older.text, "page-newer"), timeout=10
    )
    assert shown(newer.text) == newest_first[:PAGE_SIZE] and "Page 1" in newer.text
