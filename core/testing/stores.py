"""Scratch PostgreSQL databases and Redis queues, made for one run and removed after it.

Shared by b24sms's tests (``tests/deployment.py``, which skips when a server is absent) and its
benchmarks (``bench/_harness.py``, which says why it cannot run). ``psycopg`` and ``redis`` are
imported only when a store is asked for.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit


class StoreUnavailable(Exception):
    """The server cannot be reached (or its client library is missing); the text says why."""


def with_database(url: str, database: str) -> str:
    """``url`` pointing at another database on the same server."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, ""))


def admin_connect(admin_url: str) -> tuple[Any, str]:
    """An autocommit connection for CREATE / DROP DATABASE, and the URL it used: ``admin_url``,
    else the same server as ``root`` (trust auth), else either in database ``postgres``.

    :raises StoreUnavailable: naming the last error.
    """
    try:
        import psycopg
    except ImportError as exc:
        raise StoreUnavailable(f"{exc.name} is not installed") from None
    candidates = [admin_url, admin_url.replace("postgres@", "root@", 1)]
    candidates += [with_database(url, "postgres") for url in candidates]
    last: Exception | None = None
    for url in dict.fromkeys(candidates):
        try:
            return psycopg.connect(url, autocommit=True, connect_timeout=3), url
        except psycopg.Error as exc:
            last = exc
    raise StoreUnavailable(f"{type(last).__name__}: {last}")


@contextlib.contextmanager
def postgres_database(admin_url: str, prefix: str = "b24sms_") -> Iterator[str]:
    """A new database ``<prefix><random>`` on the server of ``admin_url``, dropped after.

    Yields its URL (``postgresql://user@host:port/<name>``).

    :raises StoreUnavailable: when the server cannot be reached (before anything is made).
    """
    admin, url = admin_connect(admin_url)
    name = f"{prefix}{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield with_database(url, name)
        finally:
            try:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except Exception:  # noqa: BLE001 - PostgreSQL before 13 has no FORCE
                admin.execute(f'DROP DATABASE IF EXISTS "{name}"')


def check_redis(redis_url: str) -> None:
    """Return when the Redis of ``redis_url`` answers a PING.

    :raises StoreUnavailable: naming the error.
    """
    try:
        import redis
    except ImportError as exc:
        raise StoreUnavailable(f"{exc.name} is not installed") from None
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from None
    finally:
        client.close()


@contextlib.contextmanager
def redis_queue_url(redis_url: str, prefix: str = "b24sms_") -> Iterator[str]:
    """A ``queue_url`` on the Redis of ``redis_url`` with a queue name of its own
    (``?queue=<prefix><random>``); the queue's keys are deleted after.

    :raises StoreUnavailable: when Redis does not answer.
    """
    check_redis(redis_url)
    sep = "&" if "?" in redis_url else "?"
    url = f"{redis_url}{sep}queue={prefix}{uuid.uuid4().hex[:12]}"
    try:
        yield url
    finally:
        from b24sms.queue import make_huey

        with contextlib.suppress(Exception):
            make_huey(url).flush()
