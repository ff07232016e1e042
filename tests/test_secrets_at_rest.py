"""Secrets at rest: tokens encrypted in the database, private files, key rotation.

A full install and send runs over real sockets; afterwards the raw bytes of the database files
(with SQLite's WAL) and every log line are searched for every token the emulated portals issued.
Rows written before encryption (plaintext) stay readable and are encrypted by ``keys rotate``,
which is run as the real command.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from sqlalchemy import select, text

from b24sms.config import ConfigError, prepare_instance, validate_config
from b24sms.crypto import (
    PREFIX,
    InvalidKey,
    KeySet,
    KeysNotConfigured,
    UndecryptableSecret,
    generate_key,
    rotate_stored_secrets,
)
from b24sms.db import Database
from b24sms.models import Base, Portal
from b24sms.schema import upgrade
from b24sms.service import Service
from tests.conftest import ENCRYPTION_KEY, base_config, keyed
from tests.helpers import b24sms, write_config

LOG_ONLY = {"smslog": {"plugin": "log", "name": "Log"}}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def raw_database_bytes(folder: Path) -> bytes:
    """Every byte SQLite keeps for the databases in ``folder``: files, WAL and shared memory."""
    return b"".join(
        path.read_bytes() for path in sorted(folder.iterdir()) if ".sqlite3" in path.name
    )


# -- the key set ----------------------------------------------------------------------------------


def test_the_first_key_encrypts_and_every_key_decrypts():
    old, new = generate_key(), generate_key()
    under_old = KeySet([old]).encrypt("token-under-the-old-key")
    both = KeySet([new, old])
    assert under_old.startswith(PREFIX) and "token-under" not in under_old
    assert both.decrypt(under_old) == "token-under-the-old-key"
    assert not both.is_current(under_old)
    under_new = both.encrypt("token-under-the-new-key")
    assert both.is_current(under_new) and KeySet([new]).decrypt(under_new).endswith("new-key")
    with pytest.raises(UndecryptableSecret) as refused:
        KeySet([old]).decrypt(under_new)
    assert "token-under" not in str(refused.value)
    # a value from before encryption is read as it is
    assert both.decrypt("plain-token-from-before") == "plain-token-from-before"
    assert both.encrypt("same") != both.encrypt("same")  # a fresh IV every time


def test_a_bad_key_is_refused_without_being_shown(tmp_path):
    with pytest.raises(InvalidKey, match="key #2"):
        KeySet([generate_key(), "not-a-fernet-key-but-a-secret"])
    raw = base_config(tmp_path, service={"encryption_keys": ["not-a-fernet-key-but-a-secret"]})
    with pytest.raises(ConfigError, match=r"service\.encryption_keys: key #1") as stopped:
        validate_config(raw, {})
    assert "not-a-fernet-key-but-a-secret" not in str(stopped.value)


def test_an_engine_without_keys_refuses_to_write_a_token(tmp_path):
    db = Database(f"sqlite:///{tmp_path}/nokeys.sqlite3")
    try:
        upgrade(db)
        with pytest.raises(Exception) as refused, db.session() as session:
            session.add(Portal(member_id="m", domain="d", client_endpoint="e", access_token="t1"))
        assert isinstance(refused.value.orig, KeysNotConfigured)  # type: ignore[attr-defined]
        with db.session() as session:
            assert session.scalar(select(Portal.id)) is None
    finally:
        db.dispose()


# -- files ----------------------------------------------------------------------------------------


def test_database_queue_and_key_files_are_private(tmp_path):
    instance = tmp_path / "instance"
    service = {
        "database_url": f"sqlite:///{instance}/b24sms.sqlite3",
        "queue_url": f"sqlite:///{instance}/b24sms-queue.sqlite3",
    }
    previous = os.umask(0o022)  # the usual umask: files 0644 unless we say otherwise
    try:
        config = prepare_instance(validate_config(base_config(tmp_path, service=service), {}))
        svc = Service(config)
        try:
            upgrade(svc.db)
            svc.queue.ping()
        finally:
            svc.close()
    finally:
        os.umask(previous)
    assert mode(instance) == 0o700
    files = sorted(p.name for p in instance.iterdir())
    assert {"b24sms.sqlite3", "b24sms-queue.sqlite3", "encryption_key"} <= set(files)
    for path in instance.iterdir():
        assert mode(path) == 0o600, f"{path.name} is {oct(mode(path))}"
    # the generated key is the one the service uses, and stays the same on the next start
    assert config.service.encryption_keys == ((instance / "encryption_key").read_text(),)
    again = prepare_instance(validate_config(base_config(tmp_path, service=service), {}))
    assert again.service.encryption_keys == config.service.encryption_keys


def test_an_existing_database_file_and_instance_folder_are_tightened(tmp_path):
    instance = tmp_path / "instance"
    instance.mkdir(mode=0o755)
    instance.chmod(0o755)
    path = instance / "old.sqlite3"
    path.touch(mode=0o644)
    path.chmod(0o644)
    Database(f"sqlite:///{path}").dispose()
    assert mode(path) == 0o600 and mode(instance) == 0o700
    # a folder that is not ours alone keeps its mode
    elsewhere = tmp_path / "shared"
    elsewhere.mkdir()
    elsewhere.chmod(0o755)
    Database(f"sqlite:///{elsewhere}/b24sms.sqlite3").dispose()
    assert mode(elsewhere) == 0o755 and mode(elsewhere / "b24sms.sqlite3") == 0o600


# -- a full run: no token in the database files or the logs ---------------------------------------


def test_no_token_in_the_database_files_or_the_logs(
    live_app,
    emulator,
    capture,
    issued_tokens,
    tmp_path,
):
    server = live_app(providers=LOG_ONLY, service={"log_level": "DEBUG"})
    first, second = emulator.add_portal(), emulator.add_portal()
    application_tokens = []
    assert first.install(server.url).status_code == 200
    application_tokens.append(first.application_token)
    assert second.install(server.url, mode="ui").status_code == 200
    application_tokens.append(second.application_token)
    message_id, response = first.send_sms("smslog", "+14155550100", "hello at rest")
    assert response.status_code == 200
    assert first.wait_for_status(message_id) == "delivered"
    first.expire_tokens()  # the status update refreshes the pair: new tokens stored
    refreshed, _ = first.send_sms("smslog", "+14155550101", "after expiry")
    assert first.wait_for_status(refreshed) == "delivered"
    assert first.stats["refreshes"] >= 1
    server.app.extensions["b24sms"].db.engine.dispose()  # every write in the files

    secrets = [*issued_tokens, *application_tokens]
    assert len(secrets) >= 6
    raw = raw_database_bytes(tmp_path)
    assert b"hello at rest" in raw  # the scan reads what was stored (bodies are not encrypted)
    assert raw.count(PREFIX.encode()) >= 6
    found = [s[:8] for s in secrets if s.encode() in raw]
    assert not found, f"tokens stored in plaintext: {found}"
    log_text = "\n".join(capture.lines)
    assert "tokens refreshed" in log_text
    leaked = [s[:8] for s in secrets if s in log_text]
    assert not leaked, f"tokens in the log: {leaked}"
    # and the service reads them back: the portal's current tokens are the stored ones
    with server.app.extensions["b24sms"].db.session() as session:
        stored = session.scalars(select(Portal).where(Portal.member_id == first.member_id)).one()
        assert (stored.access_token, stored.refresh_token) == (
            first.access_token,
            first.refresh_token,
        )


# -- rows from before the upgrade, and rotation ---------------------------------------------------


def _plaintext_portals(db: Database, count: int) -> dict[str, str]:
    """Portals as the previous release stored them: tokens in plaintext."""
    tokens = {}
    with db.engine.begin() as conn:
        for index in range(count):
            token = f"legacy-access-token-{index:04d}-" + "x" * 40
            tokens[f"member{index:04d}"] = token
            conn.execute(
                text(
                    "INSERT INTO portals (member_id, domain, client_endpoint, access_token, "
                    "refresh_token, application_token, state, installed_at, updated_at) VALUES "
                    "(:m, 'p.example', 'https://p.example/rest/', :a, :r, :t, 'active', "
                    "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                ),
                {"m": f"member{index:04d}", "a": token, "r": "legacy-refresh", "t": "app" * 11},
            )
    return tokens


def _raw_tokens(db: Database) -> list[str]:
    with db.engine.connect() as conn:
        return [
            value
            for row in conn.execute(
                text("SELECT access_token, refresh_token, application_token FROM portals")
            )
            for value in row
        ]


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/rotate.sqlite3"
    else:
        from tests.deployment import reset_schema

        url = request.getfixturevalue("postgres_url")
        reset_schema(url)
    db = Database(url)
    upgrade(db)
    yield db
    db.dispose()


def test_plaintext_rows_are_read_and_rotation_encrypts_them_in_batches(database):
    tokens = _plaintext_portals(database, 7)
    old = KeySet([ENCRYPTION_KEY])
    keyed(database)
    with database.session() as session:
        portal = session.scalars(select(Portal).where(Portal.member_id == "member0003")).one()
        assert portal.access_token == tokens["member0003"]

    report = rotate_stored_secrets(database.engine, Base.metadata, old, batch_size=3)
    assert report.ok
    counts = {c.column: (c.rows, c.rotated, c.plaintext) for c in report.columns}
    assert counts == {name: (7, 7, 7) for name in counts} and len(counts) == 3
    assert all(value.startswith(PREFIX) for value in _raw_tokens(database))
    with database.session() as session:
        assert {p.member_id: p.access_token for p in session.scalars(select(Portal))} == tokens

    # a second run has nothing to do
    again = rotate_stored_secrets(database.engine, Base.metadata, old, batch_size=3)
    assert [c.rotated for c in again.columns] == [0, 0, 0]

    # a new key first: every row moves to it, the old key can then be dropped
    new_key = generate_key()
    both = KeySet([new_key, ENCRYPTION_KEY])
    before = _raw_tokens(database)
    moved = rotate_stored_secrets(database.engine, Base.metadata, both, batch_size=2)
    assert [c.rotated for c in moved.columns] == [7, 7, 7]
    after = _raw_tokens(database)
    assert not set(before) & set(after)
    only_new = KeySet([new_key])
    assert sorted(only_new.decrypt(v) for v in after if "legacy-access" in only_new.decrypt(v)) == (
        sorted(tokens.values())
    )
    # the old key alone opens nothing now; a rotation with it reports and changes nothing
    stale = rotate_stored_secrets(database.engine, Base.metadata, old)
    assert not stale.ok and [c.undecryptable for c in stale.columns] == [7, 7, 7]
    assert _raw_tokens(database) == after


def test_keys_commands(tmp_path):
    generated = b24sms("keys", "generate")
    assert generated.returncode == 0, generated.stderr
    new_key = generated.stdout.strip()
    KeySet([new_key])  # a valid key

    config = write_config(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9/oauth/", "")
    db = Database(f"sqlite:///{tmp_path}/cli.sqlite3")
    upgrade(db)
    tokens = _plaintext_portals(db, 3)
    check = b24sms("keys", "rotate", "--check", config=config)
    assert check.returncode == 1 and "3 stored, 3 to re-encrypt (3 were plaintext)" in check.stdout
    assert all(value in _raw_tokens(db) for value in tokens.values())  # --check wrote nothing
    rotate = b24sms("keys", "rotate", config=config)
    assert rotate.returncode == 0, rotate.stderr
    assert "portals.access_token: 3 stored, 3 re-encrypted (3 were plaintext)" in rotate.stdout
    assert b24sms("keys", "rotate", "--check", config=config).returncode == 0
    for result in (check, rotate):
        assert not any(token in result.stdout + result.stderr for token in tokens.values())
    generated_key = (tmp_path / "encryption_key").read_text()
    assert generated_key not in rotate.stdout
    db.dispose()


def test_an_encrypted_json_column_round_trips_and_rotates(tmp_path):
    """The type a later secret column (per-portal gateway options) can use."""
    from sqlalchemy import Column, Integer, MetaData, Table, insert

    from b24sms.crypto import EncryptedJSON

    metadata = MetaData()
    table = Table(
        "portal_options",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("options", EncryptedJSON()),
    )
    db = keyed(Database(f"sqlite:///{tmp_path}/json.sqlite3"))
    try:
        metadata.create_all(db.engine)
        options = {"auth_token": "twilio-token-0123456789", "from": "+15005550006"}
        with db.engine.begin() as conn:
            conn.execute(insert(table).values(id=1, options=options))
            assert conn.execute(select(table.c.options)).scalar() == options
            raw = conn.execute(text("SELECT options FROM portal_options")).scalar()
        assert raw.startswith(PREFIX) and "twilio-token" not in raw
        both = KeySet([generate_key(), ENCRYPTION_KEY])
        report = rotate_stored_secrets(db.engine, metadata, both)
        assert [(c.column, c.rotated) for c in report.columns] == [("options", 1)]
    finally:
        db.dispose()
