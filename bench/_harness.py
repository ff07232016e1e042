"""What the benchmark scripts share: configs, server and worker processes, the portal emulator,
HANDLER bodies, the load generator, PostgreSQL / Redis scratch space, and result tables.

Config files, free ports, the process handling and the emulator's app credentials come from
``b24sms.testing`` — the same code the deployment tests (``tests/deployment.py``) run on.

Every process the scripts start is a real one (``b24sms serve``, gunicorn, ``b24sms worker``,
the load generator), started by its own pid and stopped by it; every file lives in a temporary
directory; a PostgreSQL database or Redis keys made for a run are removed after it.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import requests

from b24sms.testing import stores
from b24sms.testing.processes import Process, free_port, write_config
from b24sms.testing.service import CLIENT_ID, CLIENT_SECRET, SECRET_KEY, emulator_for_tests

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
CODE = "b24sms_log"
PG_ADMIN_URL = os.environ.get("B24SMS_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("B24SMS_BENCH_REDIS", "redis://127.0.0.1:6379")


# -- small things -------------------------------------------------------------------------------


def machine() -> str:
    """One line about where the figures were measured."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    return (
        f"{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}, load average {load:.2f} at start"
    )


def service_config(
    workdir: Path,
    port: int,
    emulator: Any,
    *,
    database_url: str | None = None,
    queue_url: str | None = None,
    provider: dict[str, Any] | None = None,
    **service: Any,
) -> Path:
    """The production defaults (``config/default.toml``'s shape: SQLite database and queue, one
    log-only provider) pointed at ``workdir`` and the emulator's OAuth server; ``provider``
    (e.g. :func:`fake_gateway`'s) backs the provider CODE instead of the log gateway."""
    sections: dict[str, dict[str, Any]] = {
        "service": {
            "public_url": f"http://127.0.0.1:{port}",
            "secret_key": SECRET_KEY,
            "database_url": database_url or f"sqlite:///{workdir}/b24sms.sqlite3",
            "queue_url": queue_url or f"sqlite:///{workdir}/b24sms-queue.sqlite3",
            **service,
        },
        "bitrix24": {
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "oauth_url": emulator.oauth_url,
        },
        f"providers.{CODE}": provider or {"plugin": "log", "name": "Log only (b24sms)"},
    }
    if _knows_rate_limits():
        # The per-IP limit would refuse the bare endpoints' flood from one loopback client
        # within a second; raised (not switched off) so every request still pays for the check.
        # The per-portal HANDLER limit (200/s, burst 20,000) stays as it is in production.
        sections["rate_limit"] = {"ip_rate": 1e9, "ip_burst": 1_000_000_000}
    return write_config(workdir / "b24sms.toml", sections)


def _knows_rate_limits() -> bool:
    from b24sms.config import ConfigSchema

    return "rate_limit" in ConfigSchema().fields


# -- processes ----------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                found.extend(int(p) for p in fh.read().split())
        except OSError:
            pass
    return found


def _status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


class Proc(Process):
    """A process of the service started by a benchmark (at once, on construction), with what
    the benchmarks measure of it; stopped by its own process group."""

    def __init__(
        self, name: str, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None
    ) -> None:
        super().__init__(name, list(argv), env={**os.environ, **(env or {})}, log_path=log_path)
        self.cwd = ROOT
        self.start()  # no readiness check here: the callers wait for what they need

    def pids(self) -> list[int]:
        """This process and its children (gunicorn's workers)."""
        assert self.pid is not None
        return [self.pid, *_children(self.pid)]

    def peak_rss_mb(self) -> float:
        """Peak resident set (VmHWM) of the process, in MiB; for gunicorn, master + workers."""
        return sum(_status_kb(pid, "VmHWM") for pid in self.pids()) / 1024.0

    def cpu_seconds(self) -> float:
        """User + system CPU time so far of the process and its live children."""
        return sum(_cpu_seconds(pid) for pid in self.pids())


def wait_http(url: str, proc: Proc, timeout: float = 60.0) -> None:
    """Wait until ``url`` answers at all (any status), or fail with the process's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive:
            raise RuntimeError(f"{proc.name} exited early:\n{proc.tail()}")
        try:
            requests.get(url, timeout=2)
            return
        except requests.RequestException:
            time.sleep(0.1)
    raise RuntimeError(f"{proc.name} did not answer {url} in {timeout}s:\n{proc.tail()}")


def start_serve(config: Path, port: int, workdir: Path, *extra: str) -> Proc:
    """``b24sms serve`` (waitress + embedded consumer) with the bare routes added."""
    proc = Proc(
        "serve",
        [
            sys.executable,
            str(BENCH / "bare.py"),
            "--config",
            str(config),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *extra,
        ],
        workdir / "serve.log",
    )
    wait_http(f"http://127.0.0.1:{port}/healthz", proc)
    return proc


#: the README's deployment: gunicorn's threaded workers, so HANDLER calls can share commits
GUNICORN_WORKERS = 2
GUNICORN_THREADS = 16


def start_gunicorn(
    config: Path, port: int, workdir: Path, workers: int, threads: int = GUNICORN_THREADS
) -> Proc:
    """``gunicorn -w N --threads T wsgi:app`` as in the README, with the bare routes added."""
    proc = Proc(
        "gunicorn",
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-w",
            str(workers),
            "--threads",
            str(threads),
            "-b",
            f"127.0.0.1:{port}",
            "--log-level",
            "warning",
            "bare:gunicorn_app()",
        ],
        workdir / "gunicorn.log",
        env={
            "B24SMS_CONFIG": str(config),
            "PYTHONPATH": os.pathsep.join(
                [p for p in (os.environ.get("PYTHONPATH"), str(BENCH), str(ROOT)) if p]
            ),
        },
    )
    wait_http(f"http://127.0.0.1:{port}/healthz", proc)
    return proc


def start_worker(config: Path, workdir: Path, index: int, threads: int | None = None) -> Proc:
    """``b24sms worker [-w N]``."""
    argv = [
        sys.executable,
        "-c",
        "from b24sms.cli import main; main()",
        "--config",
        str(config),
        "worker",
    ]
    if threads:
        argv += ["-w", str(threads)]
    return Proc(f"worker-{index}", argv, workdir / f"worker-{index}.log")


def stop_all(procs: Sequence[Proc]) -> None:
    threads = [threading.Thread(target=p.stop) for p in procs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# -- a gateway with a real gateway's latency ------------------------------------------------------


@contextlib.contextmanager
def fake_gateway(latency_ms: float) -> Iterator[tuple[Any, dict[str, Any]]]:
    """The tests' fake SMS API (``tests/fakes/http_gateway.py``) on loopback, answering each
    send after ``latency_ms`` with the final status ``delivered``; yields the fake (its
    ``connections``, ``peak_in_flight``, ``messages``) and the ``http`` provider table that
    sends to it."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # the fakes live with the tests, not in the package
    from tests.fakes.http_gateway import FakeSmsApi

    with FakeSmsApi(initial_status="delivered", delay=latency_ms / 1000.0) as api:
        yield (
            api,
            api.provider(
                name=f"HTTP gateway ({latency_ms:g} ms, loopback)",
                response_status="messages.0.status",
            ),
        )


def gateway_latencies(text: str | None) -> list[float | None]:
    """``--gateway-latency 0,200`` → [0.0, 200.0]; none given → [None] (the log gateway)."""
    if not text:
        return [None]
    values: list[float | None] = [float(v) for v in text.split(",") if v.strip()]
    if not values or any(v is None or v < 0 for v in values):
        raise SystemExit(f"--gateway-latency: milliseconds >= 0, comma-separated, not {text!r}")
    return values


def gateway_label(latency_ms: float | None) -> str:
    return "log gateway" if latency_ms is None else f"http gateway, {latency_ms:g} ms"


# -- the portal emulator ------------------------------------------------------------------------


class KnownMessages(dict):
    """``portal.messages`` for a benchmark: every message_id starting with ``prefix`` is known,
    as if Bitrix24 had recorded it before calling the HANDLER (the load generator's bodies are
    made in another process, so the emulator cannot record them as ``send_sms`` does)."""

    def __init__(self, prefix: str, code: str) -> None:
        super().__init__()
        self.prefix = prefix
        self.code = code

    def get(self, key: Any, default: Any = None) -> Any:
        if isinstance(key, str) and key.startswith(self.prefix) and key not in self:
            self[key] = {"code": self.code, "statuses": []}
        return super().get(key, default)


@contextlib.contextmanager
def emulator(**kwargs: Any) -> Iterator[Any]:
    """The bundled portal emulator (2 requests/s, burst 50 per portal unless told otherwise)."""
    with emulator_for_tests(**kwargs) as emu:
        yield emu


def add_installed_portal(emu: Any, app_url: str, prefix: str) -> Any:
    """A portal with the app installed from ``app_url`` (ONAPPINSTALL, provider registered)."""
    portal = emu.add_portal()
    portal.messages = KnownMessages(prefix, CODE)
    response = portal.install(app_url)
    if response.status_code != 200 or CODE not in portal.senders:
        raise RuntimeError(
            f"install failed: HTTP {response.status_code} {response.text[:300]}; "
            f"senders {list(portal.senders)}"
        )
    return portal


def handler_target(portal: Any, to: str = "+14155550123") -> dict[str, str]:
    """The HANDLER call Bitrix24 makes for one CRM message, as ``{"path", "body"}``; the body's
    ``@ID@`` is where the load generator puts a unique number (the ``message_id``)."""
    url = urlsplit(portal.senders[CODE]["HANDLER"])
    fields = [
        ("type", "SMS"),
        ("code", CODE),
        ("message_id", f"{portal.messages.prefix}@ID@"),
        ("message_to", to),
        ("message_body", "Your order 12345 has shipped and arrives on Tuesday."),
        ("ts", str(int(time.time()))),
        ("module_id", "crm"),
        ("bindings[0][OWNER_TYPE_ID]", "3"),
        ("bindings[0][OWNER_ID]", "42"),
        ("properties[phone_number]", to),
        ("properties[message_text]", "Your order 12345 has shipped and arrives on Tuesday."),
        ("auth[access_token]", portal.access_token),
        ("auth[expires]", str(int(portal.access_expires_at))),
        ("auth[expires_in]", "3600"),
        ("auth[scope]", "messageservice,crm"),
        ("auth[domain]", portal.domain),
        ("auth[server_endpoint]", portal.emulator.server_endpoint),
        ("auth[status]", "L"),
        ("auth[client_endpoint]", portal.client_endpoint),
        ("auth[member_id]", portal.member_id),
        ("auth[user_id]", "1"),
        ("auth[application_token]", portal.application_token),
    ]
    # urlencode would escape the @ of @ID@; the placeholder goes in afterwards.
    body = urlencode(fields).replace("%40ID%40", "@ID@")
    return {"path": f"{url.path}?{url.query}", "body": body}


def final_count(portal: Any) -> tuple[int, float]:
    """(messages whose last reported status is final, time of the newest such report)."""
    finals = {"delivered", "undelivered", "failed"}
    count, last = 0, 0.0
    with portal._lock:
        for record in list(dict.values(portal.messages)):
            statuses = record.get("statuses")
            if statuses and statuses[-1]["status"] in finals:
                count += 1
                last = max(last, statuses[-1]["at"])
    return count, last


# -- the load generator -------------------------------------------------------------------------


def run_loadgen(
    port: int,
    targets: list[dict[str, str]],
    workdir: Path,
    *,
    concurrency: int = 32,
    warmup: float = 0.0,
    duration: float | None = None,
    requests_total: int | None = None,
    id_prefix: str = "",
) -> dict[str, Any]:
    """Run ``bench/loadgen.py`` in its own process; returns its JSON figures."""
    targets_file = workdir / f"targets-{secrets.token_hex(4)}.json"
    targets_file.write_text(json.dumps(targets))
    argv = [
        sys.executable,
        str(BENCH / "loadgen.py"),
        "--port",
        str(port),
        "--targets-file",
        str(targets_file),
        "--concurrency",
        str(concurrency),
        "--warmup",
        str(warmup),
        "--id-prefix",
        id_prefix,
    ]
    if duration is not None:
        argv += ["--duration", str(duration)]
    if requests_total is not None:
        argv += ["--requests", str(requests_total)]
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout)


@contextlib.contextmanager
def canned_server() -> Iterator[int]:
    """A server answering a fixed 200 at once (the generator's own ceiling is measured on it)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(BENCH / "loadgen.py"), "--canned-server", str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        yield port
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- PostgreSQL and Redis scratch space ---------------------------------------------------------


def unavailable_services() -> str | None:
    """Why PostgreSQL or Redis cannot be used for a run, or None when both answer."""
    try:
        admin, _ = stores.admin_connect(PG_ADMIN_URL)
        admin.close()
    except stores.StoreUnavailable as exc:
        return f"PostgreSQL at {PG_ADMIN_URL} does not answer: {exc}"
    try:
        stores.check_redis(REDIS_URL)
    except stores.StoreUnavailable as exc:
        return f"Redis at {REDIS_URL} does not answer: {exc}"
    return None


@contextlib.contextmanager
def scratch_postgres() -> Iterator[str]:
    """A new database ``b24sms_bench_<random>`` on the PostgreSQL server, dropped afterwards;
    yields its SQLAlchemy URL, schema upgraded."""
    from b24sms import schema
    from b24sms.db import Database

    with stores.postgres_database(PG_ADMIN_URL, prefix="b24sms_bench_") as plain:
        url = plain.replace("postgresql://", "postgresql+psycopg://", 1)
        db = Database(url)
        try:
            schema.upgrade(db)
        finally:
            db.dispose()
        yield url


@contextlib.contextmanager
def scratch_redis() -> Iterator[str]:
    """A queue URL on Redis database 13 with a queue name of its own
    (``?queue=b24sms_bench_<random>``); the queue's keys are removed afterwards."""
    with stores.redis_queue_url(f"{REDIS_URL}/13", prefix="b24sms_bench_") as url:
        yield url


def scratch_dir(prefix: str) -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix=f"b24sms-{prefix}-")


# -- output -------------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (readable in a terminal, pasteable into docs/benchmarks.md)."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.2f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    text_rows = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text_rows)) for i, h in enumerate(headers)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=False)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    for raw, row in zip(rows, text_rows, strict=False):
        lines.append(
            "| "
            + " | ".join(
                v.rjust(w) if isinstance(r, int | float) else v.ljust(w)
                for r, v, w in zip(raw, row, widths, strict=False)
            )
            + " |"
        )
    return "\n".join(lines)


# -- watching the database ----------------------------------------------------------------------


class DbProbe:
    """Read-only counts of messages, for timing the gateway side of a run.

    SQLite is opened read-only through the plain driver (the service's own engine starts every
    transaction with ``BEGIN IMMEDIATE``, which would compete with the service for the lock).
    """

    FINAL = ("delivered", "undelivered", "failed")

    def __init__(self, database_url: str) -> None:
        self.url = database_url
        if database_url.startswith("sqlite:///"):
            import sqlite3

            path = database_url[len("sqlite:///") :]
            self._conn: Any = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        else:
            import psycopg

            dsn = database_url.replace("postgresql+psycopg://", "postgresql://", 1)
            self._conn = psycopg.connect(dsn, autocommit=True)

    def counts(self) -> tuple[int, int]:
        """(messages stored, messages final)."""
        placeholders = ", ".join(f"'{s}'" for s in self.FINAL)
        row = self._conn.execute(
            "SELECT count(*), coalesce(sum(CASE WHEN status IN "
            f"({placeholders}) THEN 1 ELSE 0 END), 0) FROM messages"
        ).fetchone()
        return int(row[0]), int(row[1])

    def close(self) -> None:
        self._conn.close()


# -- one delivery run ---------------------------------------------------------------------------


def deliver(
    app_port: int,
    portals: Sequence[Any],
    messages: int,
    workdir: Path,
    probe: DbProbe,
    *,
    concurrency: int = 32,
    timeout: float = 150.0,
    id_prefix: str = "",
) -> dict[str, Any]:
    """Send ``messages`` HANDLER calls (round-robin over ``portals``) and wait until every one
    has its final status at its portal. Times are seconds from the first HANDLER call."""
    before = {p.member_id: (p.stats_snapshot(), len(p.request_log)) for p in portals}
    targets = [handler_target(p) for p in portals]
    result: dict[str, Any] = {}
    t0 = time.time()

    def load() -> None:
        result["ingest"] = run_loadgen(
            app_port,
            targets,
            workdir,
            concurrency=concurrency,
            requests_total=messages,
            id_prefix=id_prefix,
        )
        result["ingest_done"] = time.time() - t0

    loader = threading.Thread(target=load)
    loader.start()
    gateway_done: float | None = None
    deadline = t0 + timeout
    finals = 0
    while time.time() < deadline:
        time.sleep(0.2)
        if gateway_done is None:
            try:
                final = probe.counts()[1]
            except Exception:  # noqa: BLE001 - a busy database: ask again next round
                final = 0
            if final >= messages:
                gateway_done = time.time() - t0
        finals = sum(final_count(p)[0] for p in portals)
        if finals >= messages and not loader.is_alive():
            break
    loader.join()
    last_final = max(final_count(p)[1] for p in portals)
    batches: list[int] = []
    stats: dict[str, int] = {
        "requests": 0,
        "batches": 0,
        "status_updates": 0,
        "rejected_rate_limit": 0,
    }
    for p in portals:
        snap, log_len = before[p.member_id]
        now = p.stats_snapshot()
        for key in stats:
            stats[key] += now[key] - snap[key]
        with p._lock:
            entries = p.request_log[log_len:]
        batches.extend(n for _, method, n, status in entries if method == "batch" and status == 200)
    return {
        "messages": messages,
        "portals": len(portals),
        "final_at_portal": finals,
        "complete": finals >= messages,
        "ingest": result.get("ingest", {}),
        "ingest_seconds": result.get("ingest_done"),
        "gateway_seconds": gateway_done,
        "total_seconds": (last_final - t0) if finals else None,
        "batch_sizes": batches,
        **stats,
    }
