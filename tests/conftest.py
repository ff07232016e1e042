"""Shared fixtures: configs on a temporary database, the portal emulator, the app on a socket."""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from werkzeug.serving import make_server

SECRET_KEY = "test-secret-key-0123456789abcdef"
CLIENT_ID = "local.test0000000000.00000000"
CLIENT_SECRET = "test-client-secret-XYZ"
#: the encryption key of tests that open a Database without a Service (see ``keyed``)
ENCRYPTION_KEY = "l6nA4xRVlzU7JJEbGpjlFTCMF8Wm9KQzlATdptgUwvQ="


def keyed(db: Any) -> Any:
    """``db`` (a :class:`b24sms.db.Database`) with ``ENCRYPTION_KEY`` bound for token columns,
    as :class:`b24sms.service.Service` binds its configured keys."""
    from b24sms.crypto import KeySet, bind_keys

    bind_keys(db.engine, KeySet([ENCRYPTION_KEY]))
    return db


def base_config(tmp_path, public_url: str = "http://127.0.0.1:9", **sections: Any) -> dict:
    """A whole config as a dict: SQLite in tmp_path, immediate queue, one log provider.

    ``service`` and ``bitrix24`` are merged into the defaults; other sections replace them.
    """
    config: dict[str, Any] = {
        "service": {
            "public_url": public_url,
            "secret_key": SECRET_KEY,
            "database_url": f"sqlite:///{tmp_path}/b24sms.sqlite3",
            "queue_url": "memory://",
            "default_region": "US",
        },
        "bitrix24": {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET},
        "providers": {"smslog": {"plugin": "log", "name": "Log only"}},
    }
    for key, value in sections.items():
        if key in ("service", "bitrix24"):
            config[key].update(copy.deepcopy(value))
        else:
            config[key] = copy.deepcopy(value)
    return config


def wait_until(predicate: Callable[[], Any], timeout: float = 15.0) -> Any:
    """Poll ``predicate`` until it returns something true, and return that; TimeoutError
    after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError("condition not met")


class _Dispatcher:
    """A WSGI app whose target is set after the socket exists (the app needs its own URL)."""

    app: Callable | None = None

    def __call__(self, environ: dict, start_response: Callable) -> Any:
        assert self.app is not None
        return self.app(environ, start_response)


class LiveServer:
    """The Flask app served on 127.0.0.1 by a threaded werkzeug server."""

    def __init__(self) -> None:
        self.dispatcher = _Dispatcher()
        self.server = make_server("127.0.0.1", 0, self.dispatcher, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.app: Any = None
        self._thread: threading.Thread | None = None

    def start(self, app: Any) -> None:
        self.app = app
        self.dispatcher.app = app
        # shutdown() waits for the loop's next poll: 0.05 s instead of the default 0.5 s per test
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self.app is not None:
            self.app.extensions["b24sms"].close()


@pytest.fixture
def emulator() -> Iterator[Any]:
    """A started portal emulator knowing our test app's client id and secret."""
    from b24sms.emulator import Emulator

    with Emulator(client_id=CLIENT_ID, client_secret=CLIENT_SECRET) as emu:
        yield emu


@pytest.fixture
def live_app(tmp_path, emulator) -> Iterator[Callable[..., LiveServer]]:
    """Factory: ``live_app(**config_sections)`` → a LiveServer running the app on a socket,
    configured against the emulator's OAuth server."""
    from b24sms import create_app

    servers: list[LiveServer] = []

    def start(**sections: Any) -> LiveServer:
        server = LiveServer()
        servers.append(server)
        bitrix24 = {"oauth_url": emulator.oauth_url, **sections.pop("bitrix24", {})}
        config = base_config(tmp_path, public_url=server.url, bitrix24=bitrix24, **sections)
        server.start(create_app(config))
        return server

    yield start
    for server in servers:
        server.stop()


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
