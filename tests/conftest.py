"""Shared fixtures: configs on a temporary database, the portal emulator, the app on a socket."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

# The plugin kit (b24sms.testing) is the one copy of these; tests import them from here too.
from b24sms.testing.service import (
    CLIENT_ID,
    CLIENT_SECRET,
    SECRET_KEY,
    LiveServer,
    emulator_for_tests,
    running_services,
    wait_until,
)
from b24sms.testing.service import service_config as base_config

__all__ = [
    "CLIENT_ID",
    "CLIENT_SECRET",
    "ENCRYPTION_KEY",
    "SECRET_KEY",
    "LiveServer",
    "base_config",
    "keyed",
    "wait_until",
]

#: the encryption key of tests that open a Database without a Service (see ``keyed``)
ENCRYPTION_KEY = "l6nA4xRVlzU7JJEbGpjlFTCMF8Wm9KQzlATdptgUwvQ="


def keyed(db: Any) -> Any:
    """``db`` (a :class:`b24sms.db.Database`) with ``ENCRYPTION_KEY`` bound for token columns,
    as :class:`b24sms.service.Service` binds its configured keys."""
    from b24sms.crypto import KeySet, bind_keys

    bind_keys(db.engine, KeySet([ENCRYPTION_KEY]))
    return db


@pytest.fixture
def emulator() -> Iterator[Any]:
    """A started portal emulator knowing our test app's client id and secret."""
    with emulator_for_tests() as emu:
        yield emu


@pytest.fixture
def live_app(tmp_path, emulator) -> Iterator[Callable[..., LiveServer]]:
    """Factory: ``live_app(**config_sections)`` → a LiveServer running the app on a socket,
    configured against the emulator's OAuth server."""
    yield from running_services(emulator, tmp_path)


@pytest.fixture
def config(tmp_path) -> dict[str, Any]:
    """The test config of :func:`app`: ``base_config`` (SQLite in tmp_path, the inline
    memory:// queue, one log provider ``smslog``). Change it before asking for ``app``."""
    return base_config(tmp_path)


@pytest.fixture
def app(config) -> Iterator[Any]:
    """The Flask app on :func:`config`, flaskr-style; its service is closed afterwards."""
    from b24sms import create_app

    app = create_app(config)
    yield app
    app.extensions["b24sms"].close()


@pytest.fixture
def client(app) -> Any:
    """A test client of :func:`app`."""
    return app.test_client()


@pytest.fixture
def runner(app, config, tmp_path) -> Callable[..., Any]:
    """``runner("providers", "list")`` → the ``b24sms`` command's click result, run with
    :func:`config` written as a TOML file (the app's database)."""
    from click.testing import CliRunner

    from b24sms.cli import cli
    from tests.deployment import write_config

    sections = {
        "service": config["service"],
        "bitrix24": config["bitrix24"],
        **{f"providers.{code}": table for code, table in config["providers"].items()},
    }
    path = write_config(tmp_path / "b24sms.toml", sections)

    def invoke(*args: str) -> Any:
        return CliRunner().invoke(cli, ["--config", str(path), *args], catch_exceptions=False)

    return invoke


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for the test module, dropped after it (skips with the reason
    when PostgreSQL is not running)."""
    from tests.deployment import postgres_database

    with postgres_database() as url:
        yield url


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A Redis queue URL with a queue name of the module's own (skips when Redis is absent)."""
    from tests.deployment import redis_queue_url

    with redis_queue_url() as url:
        yield url


@pytest.fixture
def gateway() -> Iterator[Any]:
    """The fake SMS API the ``http`` gateway sends to; it counts what it accepted."""
    from tests.fakes.http_gateway import FakeSmsApi

    with FakeSmsApi() as api:
        yield api


@pytest.fixture
def capture() -> Iterator[Any]:
    """Every log record of the test (every logger at DEBUG), kept by a
    :class:`tests.helpers.Capture` as text and as JSON; the levels are restored afterwards."""
    import logging

    from tests.helpers import Capture

    handler = Capture()
    root = logging.getLogger()
    names = ("", "werkzeug", "urllib3", "twilio", "b24sms", "sqlalchemy.engine")
    saved = {name: logging.getLogger(name).level for name in names}
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


@pytest.fixture
def issued_tokens(monkeypatch) -> list[str]:
    """Every access and refresh token any emulated portal issues, old and new."""
    from b24sms.emulator.portal import EmulatedPortal

    tokens: list[str] = []
    original = EmulatedPortal._issue_pair_locked

    def recording(self) -> None:
        original(self)
        tokens.extend([self.access_token, self.refresh_token])

    monkeypatch.setattr(EmulatedPortal, "_issue_pair_locked", recording)
    return tokens


@pytest.fixture(autouse=True)
def _fresh_probe_cache() -> Iterator[None]:
    """The AUTH_ID probe's answers are cached per process (b24sms.bitrix24.verify): no test sees
    another's."""
    from b24sms.bitrix24 import verify

    verify.clear_cache()
    yield
    verify.clear_cache()
