"""A whole b24sms deployment in subprocesses, for the tests of the scaled layout and of faults.

The processes are the ones a user runs, started the way the README says (the process
handling itself, :class:`~b24sms.testing.processes.Process`, is shared with ``bench/``):

- ``b24sms db upgrade`` once;
- the web app under ``gunicorn -w 2 -b 127.0.0.1:<port> wsgi:app`` (cwd = the repository,
  ``B24SMS_CONFIG`` set), or ``b24sms serve`` for the embedded default;
- any number of ``b24sms worker`` processes.

Every process writes its output to a log file under the deployment's folder (the tail of every
log is in the failure message of :meth:`Deployment.wait_until`), can be stopped gracefully,
killed with SIGKILL (its whole process group: gunicorn's workers die with their master) and
started again with the same config and port, so the HANDLER URL a portal holds stays valid.

Also here, because the fault tests share them: per-module PostgreSQL databases and Redis queue
names (:func:`postgres_database`, :func:`redis_queue_url`), the :class:`TcpProxy` that cuts a
connection on demand (the database or the gateway "down"), the HTTP gateway's config against
:class:`~tests.fakes.http_gateway.FakeSmsApi`, counting sends at the gateway, and the figures
table the fault tests print and write to ``test-artifacts/fault-figures.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import pytest
import requests

from b24sms.testing import stores as scratch
from b24sms.testing.processes import (
    Process,
    answers,
    console_script,
    free_port,
    wait_for,
    write_config,
)
from b24sms.testing.service import CLIENT_ID, CLIENT_SECRET, SECRET_KEY

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
FIGURES_FILE = ARTIFACTS / "fault-figures.json"

#: where the PostgreSQL tests create their databases (trust auth; the admin connection's db)
POSTGRES_ADMIN_URL = os.environ.get(
    "B24SMS_TEST_POSTGRES_ADMIN", "postgresql://postgres@127.0.0.1:5432/test"
)
#: the Redis the Redis-queue tests use; each test module adds its own ``queue=`` name
REDIS_URL = os.environ.get("B24SMS_TEST_REDIS_URL", "redis://127.0.0.1:6379/14")

#: the provider CODE of the HTTP gateway in the configs built here
CODE = "fakesms"

#: short delivery settings so faults resolve within seconds
FAST_SERVICE: dict[str, Any] = {
    "max_attempts": 20,
    "retry_base_delay": 0.2,
    "retry_max_delay": 1.0,
    "stuck_after": 3,
    "sweep_interval": 1,
    "workers": 4,
    "log_level": "INFO",
}


# -- small helpers ----------------------------------------------------------------------------


def http_gateway_options(url: str, timeout: float = 1.0) -> dict[str, Any]:
    """``[providers.<CODE>]`` for the ``http`` gateway against a :class:`FakeSmsApi` JSON URL.

    The fake's ``ACCEPTED`` maps to ``delivered``: a message is final as soon as the gateway took
    it, so every status the emulator sees comes from one send.
    """
    return {
        "plugin": "http",
        "name": "Fake SMS",
        "url": url,
        "encoding": "json",
        "body": {"to": "{to}", "text": "{body}"},
        "response_id": "messages.0.id",
        "response_status": "messages.0.status",
        "statuses": {"ACCEPTED": "delivered"},
        "timeout": timeout,
    }


# -- PostgreSQL and Redis ---------------------------------------------------------------------


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database ``b24sms_<random>`` for one test module; dropped after.

    Yields its URL (``postgresql://user@host:port/b24sms_…``); skips the test with the reason
    when PostgreSQL cannot be reached at ``B24SMS_TEST_POSTGRES_ADMIN``
    (default ``postgresql://postgres@127.0.0.1:5432/test``).
    """
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(scratch.postgres_database(POSTGRES_ADMIN_URL))
        except scratch.StoreUnavailable as exc:
            pytest.skip(f"needs PostgreSQL at {POSTGRES_ADMIN_URL}: {exc}")
        yield url


@contextlib.contextmanager
def redis_queue_url() -> Iterator[str]:
    """A Redis ``queue_url`` with a queue name of its own (``?queue=b24sms_<random>``).

    Skips with the reason when Redis cannot be reached at ``B24SMS_TEST_REDIS_URL`` (default
    ``redis://127.0.0.1:6379/14``); the queue's keys are deleted after.
    """
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(scratch.redis_queue_url(REDIS_URL))
        except scratch.StoreUnavailable as exc:
            pytest.skip(f"needs Redis at {REDIS_URL}: {exc}")
        yield url


def reset_schema(url: str) -> None:
    """Empty a PostgreSQL database (its ``public`` schema), so a test starts from nothing."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")


#: the layouts: database and queue
LAYOUTS = {
    "sqlite": "SQLite + SQLite queue",
    "postgresql": "PostgreSQL + PostgreSQL queue",
    "redis": "PostgreSQL + Redis queue",
}


def stores(layout: str, request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """``(database_url, queue_url)`` of a layout (see :data:`LAYOUTS`).

    The PostgreSQL ones come from the requesting module's ``postgres_url`` and ``redis_url``
    fixtures (which skip when the server is absent); the database is emptied first.
    """
    if layout == "sqlite":
        return f"sqlite:///{tmp_path}/b24sms.sqlite3", f"sqlite:///{tmp_path}/queue.sqlite3"
    database = request.getfixturevalue("postgres_url")
    reset_schema(database)
    engine_url = database.replace("postgresql://", "postgresql+psycopg://", 1)
    if layout == "postgresql":
        return engine_url, database
    if layout == "redis":
        return engine_url, request.getfixturevalue("redis_url")
    raise ValueError(f"unknown layout {layout!r}")


# -- processes --------------------------------------------------------------------------------


@dataclass
class Deployment:
    """One deployment: a config file, a web process, worker processes, all logs in ``workdir``.

    :param web: ``gunicorn`` (``-w web_workers``) or ``serve`` (``b24sms serve``: waitress and
        the embedded consumer for a SQLite queue).
    :param service: ``[service]`` keys on top of :data:`FAST_SERVICE`.
    :param providers: ``{CODE: table}``.
    """

    workdir: Path
    database_url: str
    queue_url: str
    oauth_url: str
    providers: Mapping[str, Mapping[str, Any]]
    web: str = "gunicorn"
    web_workers: int = 2
    service: Mapping[str, Any] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    processes: list[Process] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "b24sms.toml"
        self.write_config()
        self.env = {
            **os.environ,
            "B24SMS_CONFIG": str(self.config_path),
            "PYTHONUNBUFFERED": "1",
            # Only the built-in plugins: an example plugin installed in the venv stays out.
            "B24SMS_LOAD_PLUGINS": "log,http",
        }
        self.web_process: Process | None = None
        self._db: Any = None

    @property
    def url(self) -> str:
        """The public URL: where the web process listens."""
        return f"http://127.0.0.1:{self.port}"

    def write_config(self) -> None:
        sections: dict[str, Mapping[str, Any]] = {
            "service": {
                "public_url": self.url,
                "secret_key": SECRET_KEY,
                "database_url": self.database_url,
                "queue_url": self.queue_url,
                **FAST_SERVICE,
                **self.service,
            },
            "bitrix24": {
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
                "oauth_url": self.oauth_url,
                "timeout": 5,
            },
        }
        for code, table in self.providers.items():
            sections[f"providers.{code}"] = table
        write_config(self.config_path, sections)

    # -- commands -----------------------------------------------------------------------------

    def run_cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """``b24sms <args>`` with this deployment's config; raises with its output on failure."""
        done = subprocess.run(
            [*console_script("b24sms"), *args],
            check=False,
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise RuntimeError(f"b24sms {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return done

    def upgrade(self) -> str:
        """``b24sms db upgrade``; returns its output."""
        return self.run_cli("db", "upgrade").stdout

    def _process(self, name: str, argv: list[str], **kwargs: Any) -> Process:
        log_path = self.workdir / f"{name}.log"
        process = Process(name, argv, env=self.env, log_path=log_path, cwd=ROOT, **kwargs)
        self.processes.append(process)
        return process

    def start_web(self, *extra: str) -> Process:
        """Start the web process — again, after a stop or a kill — and wait for its port.

        :param extra: more command-line arguments for this start (``--no-consumer`` …).
        """
        if self.web == "gunicorn":
            argv = [
                # Threaded workers, as the README deploys them: HANDLER calls share commits.
                *console_script("gunicorn"),
                "-w",
                str(self.web_workers),
                "--threads",
                "4",
                "-b",
                f"127.0.0.1:{self.port}",
                "--graceful-timeout",
                "5",
                # Which worker served what; the path only (a HANDLER's query holds its key).
                "--access-logfile",
                "-",
                "--access-logformat",
                "access pid=%(p)s %(m)s %(U)s %(s)s",
                *extra,
                "wsgi:app",
            ]
            graceful = signal.SIGTERM
        else:
            argv = [*console_script("b24sms"), "serve", "--port", str(self.port), *extra]
            graceful = signal.SIGINT
        if self.web_process is None:
            self.web_process = self._process(
                "web", argv, graceful=graceful, ready=lambda: answers(f"{self.url}/healthz")
            )
        self.web_process.argv = argv
        return self.web_process.start()

    def start_worker(self, *extra: str) -> Process:
        """Start one more ``b24sms worker`` process; returns once it consumes the queue."""
        index = sum(1 for p in self.processes if p.name.startswith("worker"))
        process = self._process(
            f"worker-{index}",
            [*console_script("b24sms"), "worker", *extra],
            ready=lambda: "queue consumer starting" in process.output(),
        )
        return process.start()

    @property
    def workers(self) -> list[Process]:
        return [p for p in self.processes if p.name.startswith("worker")]

    def stop(self) -> None:
        """Stop every process: the workers (all at once), then the web."""
        workers = [p for p in self.processes if p is not self.web_process]
        # Together: each graceful stop mostly waits for its own running tasks.
        with ThreadPoolExecutor(max_workers=max(1, len(workers))) as pool:
            list(pool.map(lambda process: process.stop(timeout=5), workers))
        if self.web_process is not None:
            self.web_process.stop(timeout=5)
        if self._db is not None:
            self._db.dispose()
            self._db = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def logs(self, chars: int = 3000) -> str:
        """The tail of every process log, for a failure message."""
        return "\n".join(p.tail(chars) for p in self.processes)

    def log_lines(self, needle: str) -> list[str]:
        """Every line of every process log that contains ``needle``."""
        found: list[str] = []
        for process in self.processes:
            with contextlib.suppress(FileNotFoundError):
                text = process.log_path.read_text(errors="replace")
                found.extend(line for line in text.splitlines() if needle in line)
        return found

    # -- looking inside -----------------------------------------------------------------------

    @property
    def db(self) -> Any:
        """A :class:`b24sms.db.Database` on the deployment's database, for assertions."""
        if self._db is None:
            from b24sms.db import Database

            self._db = Database(
                self.database_url,
                **({} if self.database_url.startswith("sqlite") else {"pool_size": 2}),
            )
        return self._db

    def messages(self) -> dict[str, tuple[str, int, str | None]]:
        """Bitrix24 message_id → (status, attempts, last_error) of every stored message."""
        from sqlalchemy import select

        from b24sms.models import Message

        with self.db.session() as session:
            rows = session.execute(
                select(Message.message_id, Message.status, Message.attempts, Message.last_error)
            ).all()
        return {row[0]: (row[1], row[2], row[3]) for row in rows}

    def wait_until(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        """Fail the test with every process log when ``check`` is not true within ``timeout``."""
        if not wait_for(check, timeout, 0.2):
            pytest.fail(f"timed out after {timeout}s waiting for {what}\n{self.logs()}")


# -- the TCP proxy that makes things unreachable -----------------------------------------------


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target, until told otherwise.

    - :meth:`refuse`: the listening socket closes and every open connection is cut — new
      connections are refused (the server is down);
    - :meth:`blackhole`: connections are accepted and every byte is swallowed — nothing comes
      back (timeouts);
    - :meth:`forward`: back to normal, on the same port.
    """

    def __init__(self, target_host: str, target_port: int, port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.port = port or free_port()
        self.mode = "forward"
        self.connections = 0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> TcpProxy:
        self._listen()
        self._thread = threading.Thread(target=self._accept_loop, name="tcp-proxy", daemon=True)
        self._thread.start()
        return self

    def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        with self._lock:
            self._listener = listener

    def _close_listener(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()

    def cut(self) -> None:
        """Close every connection open through the proxy (both ends)."""
        with self._lock:
            sockets, self._open = self._open, set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def refuse(self) -> None:
        self.mode = "refuse"
        self._close_listener()
        self.cut()

    def blackhole(self) -> None:
        if self._listener is None:
            self._listen()
        self.mode = "blackhole"
        self.cut()

    def forward(self) -> None:
        if self._listener is None:
            self._listen()
        self.mode = "forward"

    def close(self) -> None:
        self._stop.set()
        self._close_listener()
        self.cut()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            listener = self._listener
            if listener is None:
                time.sleep(0.02)
                continue
            try:
                ready, _, _ = select.select([listener], [], [], 0.05)
                if not ready:
                    continue
                client, _ = listener.accept()
            except (OSError, ValueError):
                continue  # closed under us by refuse()
            self.connections += 1
            with self._lock:
                self._open.add(client)
            if self.mode == "blackhole":
                threading.Thread(target=self._swallow, args=(client,), daemon=True).start()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=3)
            except OSError:
                self._drop(client)
                continue
            with self._lock:
                self._open.add(upstream)
            threading.Thread(
                target=self._pump, args=(client, upstream), name="tcp-proxy-pump", daemon=True
            ).start()

    def _drop(self, *sockets: socket.socket) -> None:
        with self._lock:
            for sock in sockets:
                self._open.discard(sock)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()

    def _swallow(self, client: socket.socket) -> None:
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([client], [], [], 0.2)
                if ready and not client.recv(65536):
                    break
        except (OSError, ValueError):
            pass
        self._drop(client)

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        pair = {client: upstream, upstream: client}
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select(list(pair), [], [], 0.2)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    pair[sock].sendall(data)
        except (OSError, ValueError):
            pass
        finally:
            self._drop(client, upstream)


# -- traffic and figures -----------------------------------------------------------------------


@dataclass
class Burst:
    """What a burst of HANDLER calls got: message_id → HTTP status (0: no answer)."""

    answers: dict[str, int] = field(default_factory=dict)

    @property
    def accepted(self) -> list[str]:
        return [m for m, status in self.answers.items() if status == 200]

    @property
    def refused(self) -> list[str]:
        return [m for m, status in self.answers.items() if status != 200]

    def __add__(self, other: Burst) -> Burst:
        return Burst({**self.answers, **other.answers})


def send_burst(
    portal: Any, code: str, count: int, *, threads: int = 16, prefix: str = "m", start: int = 0
) -> Burst:
    """``count`` HANDLER calls from ``threads`` concurrent threads, as Bitrix24 makes them.

    Each body is unique (``<prefix>-<n> …``), so sends can be counted at the gateway.
    """

    def one(index: int) -> tuple[str, int]:
        body = f"{prefix}-{index} your code is {1000 + index % 9000}"
        message_id = secrets.token_hex(16)
        try:
            _, response = portal.send_sms(
                code, f"+1415555{index % 10000:04d}", body, message_id=message_id
            )
        except requests.RequestException:
            return message_id, 0  # no answer at all: Bitrix24 logs it like an error answer
        return message_id, response.status_code

    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = list(pool.map(one, range(start, start + count)))
    return Burst(dict(results))


def gateway_sends(api: Any, portal: Any) -> Counter[str]:
    """How often the fake gateway accepted each of the portal's messages (by message_id)."""
    by_body = Counter(m["text"] for m in list(api.messages))
    with portal._lock:
        bodies = {mid: record["body"] for mid, record in portal.messages.items()}
    return Counter({mid: by_body[body] for mid, body in bodies.items() if by_body[body]})


@dataclass
class Figures:
    """The figures a fault test reports: messages accepted, lost, sent twice."""

    test: str
    fault: str
    backend: str
    accepted: int = 0
    refused: int = 0
    delivered: int = 0
    lost: int = 0
    sent_twice: int = 0
    gateway_sends: int = 0
    seconds: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "fault": self.fault,
            "backend": self.backend,
            "accepted_200": self.accepted,
            "refused_non_200": self.refused,
            "delivered": self.delivered,
            "lost": self.lost,
            "sent_twice": self.sent_twice,
            "gateway_sends": self.gateway_sends,
            "seconds": round(self.seconds, 1),
            **self.notes,
        }


def count_outcome(
    figures: Figures, burst: Burst, portal: Any, api: Any | None = None
) -> tuple[list[str], list[str]]:
    """Fill ``figures`` from the emulator (and the fake gateway's log).

    A message is *lost* when it was answered 200 and the portal never heard a final status for
    it; *sent twice* when the gateway accepted it more than once.
    :returns: (lost message_ids, message_ids sent more than once).
    """
    from b24sms.emulator import FINAL_STATUSES

    accepted = burst.accepted
    figures.accepted = len(accepted)
    figures.refused = len(burst.refused)
    finals = {m: portal.final_status(m) for m in accepted}
    lost = [m for m, status in finals.items() if status not in FINAL_STATUSES]
    figures.delivered = sum(1 for status in finals.values() if status == "delivered")
    figures.lost = len(lost)
    twice: list[str] = []
    if api is not None:
        sends = gateway_sends(api, portal)
        twice = [m for m, n in sends.items() if n > 1]
        figures.sent_twice = len(twice)
        figures.gateway_sends = sum(sends.values())
    return lost, twice


def record_figures(figures: Figures) -> None:
    """Print the figures as a table and merge them into ``test-artifacts/fault-figures.json``."""
    row = figures.as_dict()
    width = max(len(k) for k in row)
    print(f"\n== {figures.test}: {figures.fault} ({figures.backend})")
    for key, value in row.items():
        print(f"   {key:<{width}}  {value}")
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        existing = json.loads(FIGURES_FILE.read_text())
    except (FileNotFoundError, ValueError):
        existing = {}
    existing[figures.test] = row
    tmp = FIGURES_FILE.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(existing, indent=2, sort_keys=True) + "\n")
    tmp.replace(FIGURES_FILE)
