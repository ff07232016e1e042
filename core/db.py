"""The database: engine, session factory, and the SQLite settings that make it safe to share.

One :class:`Database` per app (``app.extensions["b24sms"].db``). Callers own their sessions:
one per request, one per task (``with db.session() as session``). Work that only reads (the app
page, ``/metrics``, ``/healthz``, the CLI's listings) uses ``with db.read() as session``: on
SQLite a deferred read transaction outside the writer lock, which WAL lets run beside the
writers without waiting for them or holding them up.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

from . import counts
from .config import resolve_sqlite_path
from .instance import private_file, sqlite_file

#: seconds a SQLite writer waits for the lock before the transaction fails ("database is locked")
SQLITE_BUSY_TIMEOUT = 30
#: rows of each index that SQLite's ANALYZE samples (PRAGMA analysis_limit)
SQLITE_ANALYSIS_LIMIT = 1000


class Database:
    """Owns the engine and hands out sessions."""

    def __init__(self, url: str, **engine_options: Any) -> None:
        url = resolve_sqlite_path(url)
        if url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url[len("postgresql://") :]
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        database_file = sqlite_file(url)
        if database_file is not None:
            # Tokens live in this file: created 0600 before SQLite creates it with the umask.
            private_file(database_file)
        if self.is_sqlite:
            engine_options.setdefault(
                "connect_args", {"timeout": SQLITE_BUSY_TIMEOUT, "check_same_thread": False}
            )
        else:
            engine_options.setdefault("pool_pre_ping", True)
            engine_options.setdefault("pool_size", 10)
            engine_options.setdefault("max_overflow", 20)
        # Statement parameters are tokens as often as not: keep them out of SQL logging and out
        # of error messages (which reach the log through log.exception).
        engine_options.setdefault("hide_parameters", True)
        self.engine: Engine = create_engine(url, **engine_options)
        if self.is_sqlite:
            _configure_sqlite(self.engine)
        else:
            _configure_postgresql(self.engine)
        counts.install(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # SQLite has one writer at a time, and every transaction here is a writer (BEGIN
        # IMMEDIATE). Threads of one process that find the file locked would sleep in SQLite's
        # busy handler (1, 2, 5, 10 … 100 ms steps) and miss the moment it frees; taking turns
        # on a lock in the process hands the database over at once, in order. Other processes
        # still wait in the busy handler.
        self._write_lock = threading.RLock() if self.is_sqlite else None

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A session in a transaction: committed when the block ends, rolled back on error."""
        lock = self._write_lock
        # Bounded like SQLite's busy timeout: past it, go on and let SQLite decide.
        locked = lock is not None and lock.acquire(timeout=SQLITE_BUSY_TIMEOUT)
        try:
            with self._sessions() as session, session.begin():
                yield session
        finally:
            if lock is not None and locked:
                lock.release()

    @contextlib.contextmanager
    def connection(self) -> Iterator[Connection]:
        """A Core connection in a transaction, committed when the block ends: for the hot
        paths that need no ORM (a :class:`Session` can still be bound to it: ``Session(conn)``)."""
        lock = self._write_lock
        locked = lock is not None and lock.acquire(timeout=SQLITE_BUSY_TIMEOUT)
        try:
            with self.engine.begin() as conn:
                yield conn
                counts.apply(conn)
        finally:
            if lock is not None and locked:
                lock.release()

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reading only: a consistent snapshot, never the writer lock.

        On SQLite the transaction starts deferred (``BEGIN``, not ``BEGIN IMMEDIATE``) and the
        connection is ``query_only``, so it neither waits for the process's writers nor makes
        them wait, and a write by mistake fails loudly instead of taking the lock unseen. On
        PostgreSQL it is a ``READ ONLY`` transaction.
        """
        with self.engine.connect() as conn:
            conn.info[_READ_ONLY] = True
            try:
                with conn.begin(), Session(conn) as session:
                    yield session
            finally:
                conn.info.pop(_READ_ONLY, None)
                if self.is_sqlite and not conn.invalidated:
                    # On the driver's connection: through SQLAlchemy it would begin a
                    # transaction first, and a write transaction cannot begin while query_only.
                    driver = conn.connection.driver_connection
                    assert driver is not None  # a checked-out, valid connection
                    driver.execute("PRAGMA query_only=0")
                    conn.info.pop(_QUERY_ONLY, None)

    def optimize(self) -> None:
        """Let SQLite refresh its planner statistics where they are stale (``PRAGMA optimize``,
        cheap when nothing changed); at start-up and from the periodic retention task. A no-op
        on PostgreSQL, whose autovacuum runs ANALYZE."""
        if not self.is_sqlite:
            return
        with self.connection() as conn:
            # Statistics from a sample of each index: seconds saved on a large database, and
            # as good for choosing between our indexes.
            conn.exec_driver_sql(f"PRAGMA analysis_limit={SQLITE_ANALYSIS_LIMIT}")
            analyzed = (
                conn.exec_driver_sql(
                    "SELECT 1 FROM sqlite_master WHERE name = 'sqlite_stat1'"
                ).first()
                and conn.exec_driver_sql(
                    "SELECT 1 FROM sqlite_stat1 WHERE tbl = 'messages' LIMIT 1"
                ).first()
            )
            # PRAGMA optimize only refreshes statistics that exist (SQLite before 3.46 leaves
            # a table that was never analyzed alone): the first time, ANALYZE.
            conn.exec_driver_sql("PRAGMA optimize" if analyzed else "ANALYZE")

    def ping(self) -> None:
        """Raise when the database cannot be reached."""
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()


#: ``Connection.info`` flag: this transaction only reads (see :meth:`Database.read`)
_READ_ONLY = "b24sms_read_only"
#: ``Connection.info`` flag: the SQLite connection is still ``query_only``
_QUERY_ONLY = "b24sms_query_only"


def _configure_sqlite(engine: Engine) -> None:
    # pysqlite's own transaction handling defers BEGIN and never takes the write lock up front;
    # with it off, every transaction starts BEGIN IMMEDIATE, which serialises writers across
    # processes (our row lock on SQLite) instead of failing them with "database is locked".
    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, connection_record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT * 1000}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(conn: Any) -> None:
        if conn.info.get(_READ_ONLY):
            # Deferred: a reader takes no lock up front, and in WAL mode never waits for one.
            conn.info[_QUERY_ONLY] = True
            conn.exec_driver_sql("PRAGMA query_only=1")
            conn.exec_driver_sql("BEGIN")
        else:
            if conn.info.pop(_QUERY_ONLY, False):
                # A read that could not switch its connection back (it failed midway).
                conn.exec_driver_sql("PRAGMA query_only=0")
            conn.exec_driver_sql("BEGIN IMMEDIATE")


def _configure_postgresql(engine: Engine) -> None:
    @event.listens_for(engine, "begin")
    def on_begin(conn: Any) -> None:
        if conn.info.get(_READ_ONLY):
            conn.exec_driver_sql("SET TRANSACTION READ ONLY")
