"""Retention: old final messages are redacted, then deleted, in small batches; an uninstall with
CLEAN erases a portal the same way; nothing that is not final is ever deleted or redacted.

On SQLite and PostgreSQL (skipped with the reason when PostgreSQL is not running), against a
database made by the migrations; ``b24sms purge`` runs as a real process.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from b24sms import counts, retention, schema
from b24sms.config import ConfigError, RetentionConfig, RetentionSchema, validate_config
from b24sms.db import Database
from b24sms.messages import insert_message_rows, message_row, record_status
from b24sms.models import Message, Portal, PortalState, StatusEvent, utcnow
from b24sms.portals import find_portal, uninstall
from tests.conftest import base_config
from tests.helpers import b24sms
from tests.history import add_portals, each_database

NOW = dt.datetime(2026, 12, 1, 12, 0)
#: (status, age in days) of the messages every test starts with, per portal
SHAPE = [
    ("delivered", 200),
    ("failed", 200),
    ("undelivered", 200),
    ("queued", 200),  # never final: waiting out retries forever must not lose it
    ("sent", 200),  # a gateway that never reported a final status
    ("delivered", 60),
    ("failed", 60),
    ("sent", 60),
    ("delivered", 1),
    ("queued", 1),
]


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    yield from each_database(request, tmp_path)


def store(
    db: Database, portal_id: int, shape: list[tuple[str, int]], tag: str, now: dt.datetime = NOW
) -> list[int]:
    """Messages of ``shape`` (status, age in days before ``now``) through the service's own
    paths (the HANDLER's insert, record_status)."""
    rows = [
        message_row(
            portal_id=portal_id,
            code="sms_a",
            message_id=f"{tag}-{n}",
            to_raw="+14155550100",
            to="+14155550100",
            body=f"secret body {n}",
            module_id="crm",
            context={"bindings": [{"OWNER_TYPE_ID": 3, "OWNER_ID": n}]},
            now=now - dt.timedelta(days=age),
        )
        for n, (_, age) in enumerate(shape)
    ]
    with db.connection() as conn:
        stored = insert_message_rows(conn, rows, now=now)
    ids = [stored[(portal_id, f"{tag}-{n}")] for n in range(len(shape))]
    with db.session() as session:
        for message_pk, (status, _) in zip(ids, shape, strict=True):
            message = session.get(Message, message_pk)
            assert message is not None
            if status != "queued":
                message.external_id = f"ext-{message_pk}"
                record_status(session, message, "sent", source="gateway")
            if status not in ("queued", "sent"):
                record_status(session, message, status, source="callback")
    return ids


def by_id(db: Database) -> dict[int, Message]:
    with db.read() as session:
        return {m.id: m for m in session.scalars(select(Message))}


def assert_counts_match(db: Database) -> None:
    """The counts table says what a scan of the messages says."""
    with db.read() as session:
        scanned: dict[tuple[str, str, bool], int] = {}
        for m in session.scalars(select(Message)):
            key = (m.code, m.status, counts.is_accepted(m.status, m.external_id))
            scanned[key] = scanned.get(key, 0) + 1
        kept = {k[:3]: k[3] for k in counts.totals(session) if k[3]}
    assert kept == scanned


def test_retention_redacts_then_deletes_final_messages_only(db: Database) -> None:
    with db.connection() as conn:
        (portal_id,) = add_portals(conn, 1, NOW)
    ids = store(db, portal_id, SHAPE, "m")
    settings = RetentionConfig(redact_after_days=30, delete_after_days=180, batch_size=2)

    dry = retention.pending(db, settings, now=NOW)
    assert (dry.deleted, dry.redacted) == (3, 2)
    assert len(by_id(db)) == len(SHAPE)  # a dry run changes nothing

    report = retention.run(db, settings, now=NOW)
    assert (report.deleted, report.redacted, report.finished) == (3, 2, True)

    left = by_id(db)
    shape = dict(zip(ids, SHAPE, strict=True))
    for message_pk, (status, age) in shape.items():
        final = status not in ("queued", "sent")
        if final and age > 180:
            assert message_pk not in left
            continue
        message = left[message_pk]
        assert message.status == status
        if final and age > 30:
            assert (message.body, message.to, message.to_raw) == ("", None, "")
            assert message.context == {} and message.redacted_at == NOW
        else:
            # not final, or young: untouched, whatever its age
            assert message.body.startswith("secret body") and message.to == "+14155550100"
            assert message.redacted_at is None
    with db.read() as session:
        orphans = session.scalar(
            select(func.count())
            .select_from(StatusEvent)
            .where(StatusEvent.message_pk.not_in(select(Message.id)))
        )
        removed = sum(row[4] for row in counts.totals(session))
    assert orphans == 0  # the history went with its message
    assert removed == 3  # the counters keep counting what was deleted
    assert_counts_match(db)

    again = retention.run(db, settings, now=NOW)
    assert (again.deleted, again.redacted) == (0, 0)


def test_the_deletion_path_never_deletes_a_message_that_is_not_final(db: Database) -> None:
    """Even when the selection hands it every message (a bug in a query), only final ones go:
    the condition is in the deleting statements themselves."""
    with db.connection() as conn:
        (portal_id,) = add_portals(conn, 1, NOW)
    store(db, portal_id, SHAPE, "m")
    everything = select(Message.id)
    with db.session() as session:
        deleted = retention._delete_batch(session, everything)
    left = by_id(db)
    assert deleted == sum(1 for status, _ in SHAPE if status not in ("queued", "sent"))
    assert sorted(m.status for m in left.values()) == sorted(
        status for status, _ in SHAPE if status in ("queued", "sent")
    )
    with db.read() as session:
        history = session.scalar(select(func.count()).select_from(StatusEvent))
    assert history == sum(
        1 if status == "queued" else 2
        for status, _ in SHAPE
        if status
        in (
            "queued",
            "sent",
        )
    )
    assert_counts_match(db)


def test_uninstall_with_clean_fails_in_flight_messages_and_erases_in_batches(db: Database) -> None:
    with db.connection() as conn:
        gone_id, kept_id = add_portals(conn, 2, NOW)
    store(db, gone_id, SHAPE, "gone")
    store(db, kept_id, SHAPE, "kept")
    with db.session() as session:
        portal = session.get(Portal, gone_id)
        assert portal is not None
        member_id = portal.member_id
        uninstall(session, portal, clean=True)

    with db.read() as session:
        portal = session.get(Portal, gone_id)
        assert portal is not None and portal.state == PortalState.ERASING
        assert portal.access_token is None and portal.application_token is None
        # its member_id is free: a re-install makes a new row, the erasure goes on
        assert find_portal(session, member_id) is None
        statuses = set(session.scalars(select(Message.status).where(Message.portal_id == gone_id)))
    assert statuses <= {"delivered", "undelivered", "failed"}

    # One batch, then the deadline: the rest is left for the periodic task.
    assert not retention.erase_portal(db, gone_id, batch_size=3, deadline=0.0)
    with db.read() as session:
        remaining = session.scalar(
            select(func.count()).select_from(Message).where(Message.portal_id == gone_id)
        )
    assert remaining == len(SHAPE) - 3

    report = retention.run(db, RetentionSchema().load({"batch_size": 3}), now=NOW)
    assert report.erased_portals == 1 and report.erased_messages == remaining
    with db.read() as session:
        assert session.get(Portal, gone_id) is None
        assert session.get(Portal, kept_id) is not None
        kept = session.scalar(
            select(func.count()).select_from(Message).where(Message.portal_id == kept_id)
        )
    assert kept == len(SHAPE) - 3  # the other portal only lost what retention deletes anyway
    assert_counts_match(db)


@pytest.mark.slow
def test_purge_command_dry_run_then_purge(tmp_path: Path) -> None:
    database = tmp_path / "purge.sqlite3"
    db = Database(f"sqlite:///{database}")
    schema.upgrade(db)
    with db.connection() as conn:
        (portal_id,) = add_portals(conn, 1, NOW)
    # Dated from the real clock: the command's retention runs at "now".
    ids = store(db, portal_id, SHAPE, "m", now=utcnow())
    db.dispose()
    config = tmp_path / "b24sms.toml"
    config.write_text(
        f"""
[service]
public_url = "http://127.0.0.1:9"
secret_key = "purge-secret-key-0123456789"
database_url = "sqlite:///{database}"
queue_url = "memory://"

[retention]
redact_after_days = 30
delete_after_days = 180
batch_size = 2
"""
    )
    dry = b24sms("purge", "--dry-run", config=config)
    assert dry.returncode == 0, dry.stderr
    assert "would have: redacted 2, deleted 3" in dry.stdout
    db = Database(f"sqlite:///{database}")
    try:
        assert len(by_id(db)) == len(SHAPE)
    finally:
        db.dispose()

    done = b24sms("purge", config=config)
    assert done.returncode == 0, done.stderr
    assert "done: redacted 2, deleted 3" in done.stdout
    db = Database(f"sqlite:///{database}")
    try:
        left = by_id(db)
    finally:
        db.dispose()
    expected_gone = {
        pk
        for pk, (s, age) in zip(ids, SHAPE, strict=True)
        if age > 180 and s not in ("queued", "sent")
    }
    assert set(ids) - set(left) == expected_gone
    redacted = {pk for pk, m in left.items() if m.redacted_at is not None}
    assert {left[pk].status for pk in redacted} <= {"delivered", "undelivered", "failed"}
    assert len(redacted) == 2


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"redact_after_days": -1}, "retention.redact_after_days"),
        ({"delete_after_days": "soon"}, "retention.delete_after_days"),
        ({"batch_size": 0}, "retention.batch_size"),
        ({"keep_forever": True}, "retention.keep_forever"),
    ],
)
def test_a_bad_retention_setting_names_its_key(tmp_path: Path, table: dict, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        validate_config(base_config(tmp_path, retention=table), {})
    assert key in str(caught.value)


def test_retention_defaults(tmp_path: Path) -> None:
    config = validate_config(base_config(tmp_path), {})
    assert config.retention == RetentionConfig(30, 180, 500)
