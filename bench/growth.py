"""Cost against history: the recurring operations with 10k, 200k and 1M stored messages.

    python bench/growth.py                                  # this tree only
    python bench/growth.py --before /tmp/d-base             # and a checkout of the baseline
    python bench/growth.py --sizes 10000,200000 --databases sqlite
    python bench/growth.py --before /tmp/base --after /tmp/head   # two checkouts, frozen

For each database (SQLite, PostgreSQL) and size, a fresh database is filled with the history of
issue 18 (tests/history.py: 20 portals, 3 CODEs, 98 % final, 30 days; COPY on PostgreSQL, then
VACUUM ANALYZE / ANALYZE), ``b24sms serve`` runs on it (waitress, embedded consumer, the log
gateway delivering), and this script measures, medians in ms unless said:

- the HANDLER quiet (p50, p99 of sequential calls), and while ``/metrics`` is scraped back to
  back by another client (p50, p99; the scrapes' median too);
- ``sweep()``, ``poll_due()`` over 3 polling CODEs, the callback's in-flight check (a report
  about an unknown id, no grace), called in this process on the same database;
- ``POST /app`` (the page's first view, and page 100) and ``GET /metrics``, over HTTP.

Each (tree, database, size) is measured by a child process of this script, which imports the
``b24sms`` of that tree (``--before DIR``: a checkout of the baseline, imported through a
temporary package directory put first on PYTHONPATH), so "before" and "after" run in the same
session on the same machine. The output: per database, one Markdown table with every
operation's figures per size, its growth factor (largest size ÷ smallest), and after ÷ before.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import _harness as h  # noqa: E402

PORTALS = 20
CODES = ("sms_a", "sms_b", "sms_c")
METRICS_TOKEN = "growth-metrics-token-0123456789"
HANDLER_CALLS = 200
REPEAT = 9

OPERATIONS = (
    ("handler_quiet_p50", "HANDLER p50, quiet"),
    ("handler_quiet_p99", "HANDLER p99, quiet"),
    ("handler_scraped_p50", "HANDLER p50 while /metrics is scraped back to back"),
    ("handler_scraped_p99", "HANDLER p99 while /metrics is scraped back to back"),
    ("scrape_during", "GET /metrics, median scrape during that"),
    ("sweep", "sweep()"),
    ("poll_due", "poll_due(), 3 CODEs"),
    ("app_open", "POST /app, open"),
    ("app_page_100", "POST /app, page 100"),
    ("metrics", "GET /metrics"),
    ("in_flight", "callback in-flight check"),
)


# -- the child: one tree, one database, one size ------------------------------------------------


def _median_ms(call: Callable[[], Any], times: int = REPEAT) -> float:
    samples = []
    for _ in range(times):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def _percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


@contextlib.contextmanager
def _database(kind: str, workdir: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{workdir}/b24sms.sqlite3"
        return
    with h.scratch_postgres() as url:
        yield url


def _config(workdir: Path, port: int, database_url: str) -> dict[str, dict[str, Any]]:
    sections: dict[str, dict[str, Any]] = {
        "service": {
            "public_url": f"http://127.0.0.1:{port}",
            "secret_key": h.SECRET_KEY,
            "database_url": database_url,
            "queue_url": f"sqlite:///{workdir}/queue.sqlite3",
        },
        "bitrix24": {"client_id": h.CLIENT_ID, "client_secret": h.CLIENT_SECRET},
        "metrics": {"enabled": True, "token": METRICS_TOKEN},
    }
    for code in CODES:
        sections[f"providers.{code}"] = {"plugin": "log", "name": code}
    if h._knows_rate_limits():
        # one loopback client: the per-IP limit would refuse the scrapes and the page views
        sections["rate_limit"] = {"ip_rate": 1e9, "ip_burst": 1_000_000_000}
    return sections


class Client:
    """The HTTP side: HANDLER calls, page views and scrapes against the running server."""

    def __init__(self, app: Any, base: str, portal: tuple[int, str, str]) -> None:
        import requests

        from b24sms.registration import handler_url
        from b24sms.web.app_session import PageSession, issue_session

        self.base = base
        self.portal_id, self.member_id, self.app_token = portal
        service = app.extensions["b24sms"]
        self.handler = handler_url(service, self.member_id, CODES[0])
        with app.test_request_context():
            self.page_token = issue_session(
                PageSession(self.member_id, self.portal_id, "en", int(time.time()))
            )
        self.http = requests.Session()
        self.scraper = requests.Session()

    def send(self) -> float:
        body = {
            "type": "SMS",
            "code": CODES[0],
            "message_id": secrets.token_hex(16),
            "message_to": "+14155550123",
            "message_body": "Your order 12345 has shipped.",
            "auth[member_id]": self.member_id,
            "auth[application_token]": self.app_token,
        }
        started = time.perf_counter()
        response = self.http.post(self.handler, data=body, timeout=30)
        elapsed = (time.perf_counter() - started) * 1000
        response.raise_for_status()
        return elapsed

    def handler_run(self) -> tuple[float, float]:
        return _percentiles([self.send() for _ in range(HANDLER_CALLS)])

    def scrape(self, session: Any = None) -> None:
        response = (session or self.http).get(
            f"{self.base}/metrics",
            headers={"Authorization": f"Bearer {METRICS_TOKEN}"},
            timeout=60,
        )
        response.raise_for_status()

    def handler_while_scraped(self) -> tuple[float, float, float]:
        stop = threading.Event()
        scrapes: list[float] = []

        def scrape_back_to_back() -> None:
            while not stop.is_set():
                started = time.perf_counter()
                self.scrape(self.scraper)
                scrapes.append((time.perf_counter() - started) * 1000)

        thread = threading.Thread(target=scrape_back_to_back, daemon=True)
        thread.start()
        try:
            time.sleep(0.2)
            p50, p99 = self.handler_run()
        finally:
            stop.set()
            thread.join(60)
        return p50, p99, statistics.median(scrapes) if scrapes else float("nan")

    def app_page(self, **form: str) -> None:
        response = self.http.post(
            f"{self.base}/app", data={"s": self.page_token, **form}, timeout=60
        )
        response.raise_for_status()
        assert "messages" in response.text


def _page_100_cursor(engine: Any, portal_id: int, page_size: int) -> str:
    from sqlalchemy import text

    with engine.connect() as conn:
        value = conn.execute(
            text("SELECT id FROM messages WHERE portal_id = :p ORDER BY id DESC LIMIT 1 OFFSET :o"),
            {"p": portal_id, "o": 99 * page_size - 1},
        ).scalar()
    return str(value)


def measure(kind: str, size: int) -> dict[str, float]:
    """The child's work: load, serve, measure; returns ms per operation."""
    from b24sms import create_app
    from b24sms.delivery import apply_reports, poll_due, sweep
    from b24sms.gateway import StatusReport
    from b24sms.models import utcnow
    from b24sms.web.app_data import PAGE_SIZE
    from tests.history import load_history

    results: dict[str, float] = {}
    with (
        tempfile.TemporaryDirectory(prefix="b24sms-growth-") as tmp,
        _database(kind, Path(tmp)) as database_url,
    ):
        workdir = Path(tmp)
        port = h.free_port()
        sections = _config(workdir, port, database_url)
        config_path = h.write_config(workdir / "b24sms.toml", sections)
        app = create_app(_as_config(sections))
        service = app.extensions["b24sms"]
        started = time.monotonic()
        portal_ids = load_history(service.db.engine, size, portals=PORTALS, now=utcnow())
        results["load_seconds"] = time.monotonic() - started
        _checkpoint(service.db.engine)
        from sqlalchemy import text

        with service.db.engine.connect() as conn:
            member_id, app_token = conn.execute(
                text("SELECT member_id, application_token FROM portals WHERE id = :p"),
                {"p": portal_ids[0]},
            ).one()
        serve = h.Proc(
            "serve",
            [
                sys.executable,
                "-c",
                "from b24sms.cli import main; main()",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            workdir / "serve.log",
            env={"B24SMS_CONFIG": str(config_path)},
        )
        try:
            h.wait_http(f"http://127.0.0.1:{port}/healthz", serve)
            client = Client(app, f"http://127.0.0.1:{port}", (portal_ids[0], member_id, app_token))
            for _ in range(20):  # warm up connections, caches, the page's templates
                client.send()
            client.app_page()
            client.scrape()
            results["handler_quiet_p50"], results["handler_quiet_p99"] = client.handler_run()
            (
                results["handler_scraped_p50"],
                results["handler_scraped_p99"],
                results["scrape_during"],
            ) = client.handler_while_scraped()
            results["metrics"] = _median_ms(client.scrape)
            results["app_open"] = _median_ms(client.app_page)
            cursor = _page_100_cursor(service.db.engine, portal_ids[0], PAGE_SIZE)
            results["app_page_100"] = _median_ms(lambda: client.app_page(page="100", before=cursor))
        finally:
            serve.stop()
        results["sweep"] = _median_ms(lambda: sweep(service))
        for gateway in service.gateways.values():
            # the log gateway does not poll; as one that polls every minute, answering nothing
            gateway.poll_interval = 60
            gateway.poll = lambda external_id: None
        results["poll_due"] = _median_ms(lambda: poll_due(service))
        unknown = [StatusReport(raw_status="delivered", external_id="unknown", status="delivered")]
        results["in_flight"] = _median_ms(
            lambda: apply_reports(service, CODES[0], unknown, grace=0), times=21
        )
        service.db.dispose()
    return results


def _checkpoint(engine: Any) -> None:
    """Write the load's dirty pages out before measuring: a checkpoint of a freshly loaded
    million rows would otherwise land in the middle of the HANDLER's figures."""
    raw = engine.raw_connection()
    try:
        driver = raw.driver_connection
        if engine.dialect.name == "postgresql":
            driver.autocommit = True
            driver.execute("CHECKPOINT")
        else:
            driver.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        raw.close()


def _as_config(sections: dict[str, dict[str, Any]]) -> dict[str, Any]:
    config: dict[str, Any] = {"providers": {}}
    for name, table in sections.items():
        if name.startswith("providers."):
            config["providers"][name.split(".", 1)[1]] = table
        else:
            config[name] = table
    return config


# -- the parent: every tree, database and size --------------------------------------------------


def _package_dir(tree: Path) -> Path:
    """A directory to put first on PYTHONPATH so that ``import b24sms`` imports ``tree``'s
    package (``core/``, with ``plugins/`` as ``b24sms.default_plugins``), not this tree's."""
    target = Path(tempfile.mkdtemp(prefix="b24sms-before-"))
    package = target / "b24sms"
    package.mkdir()
    for item in (tree / "core").iterdir():
        (package / item.name).symlink_to(item)
    (package / "default_plugins").symlink_to(tree / "plugins")
    return target


def run_child(tree_path: Path | None, kind: str, size: int) -> dict[str, float]:
    env = dict(os.environ)
    if tree_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            [str(_package_dir(tree_path)), env.get("PYTHONPATH", "")]
        ).rstrip(os.pathsep)
    output = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(size)],
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )
    if output.returncode != 0:
        raise RuntimeError(f"{kind} {size}: {output.stderr[-3000:]}")
    return json.loads(output.stdout.strip().splitlines()[-1])


def report(kind: str, sizes: list[int], runs: dict[str, dict[int, dict[str, float]]]) -> str:
    labels = list(runs)
    headers = ["operation"]
    for label in labels:
        headers += [f"{label} {size:,}" for size in sizes]
        headers.append(f"{label} growth {sizes[-1] // sizes[0]}×")
    if len(labels) == 2:
        headers.append(f"{labels[1]} ÷ {labels[0]} at {sizes[-1]:,}")
    rows = []
    for key, name in OPERATIONS:
        row: list[Any] = [name]
        for label in labels:
            figures = [runs[label][size][key] for size in sizes]
            row += figures
            row.append(f"{figures[-1] / figures[0]:.2f}")
        if len(labels) == 2:
            row.append(f"{runs[labels[1]][sizes[-1]][key] / runs[labels[0]][sizes[-1]][key]:.2f}")
        rows.append(row)
    loads = ", ".join(
        f"{label} {size:,}: {runs[label][size]['load_seconds']:.0f} s"
        for label in labels
        for size in sizes
    )
    return f"### {kind}\n\n{h.table(headers, rows)}\n\nload times: {loads}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", type=Path, help="a checkout of the baseline to compare with")
    parser.add_argument(
        "--after", type=Path, help="a checkout to measure instead of the installed b24sms"
    )
    parser.add_argument("--sizes", default="10000,200000,1000000")
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument("--child", nargs=2, metavar=("DATABASE", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]))))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    kinds = args.databases.split(",")
    if "postgresql" in kinds and (missing := h.unavailable_services()):
        print(f"PostgreSQL skipped: {missing}")
        kinds.remove("postgresql")
    print(h.machine())
    trees: dict[str, Path | None] = {}
    if args.before:
        trees["before"] = args.before.resolve()
    trees["after" if args.before else "this tree"] = args.after.resolve() if args.after else None
    for kind in kinds:
        runs: dict[str, dict[int, dict[str, float]]] = {label: {} for label in trees}
        for size in sizes:
            for label, tree in trees.items():
                runs[label][size] = run_child(tree, kind, size)
                print(f"  {kind} {size:,} {label}: done", file=sys.stderr, flush=True)
        print(report(kind, sizes, runs), flush=True)


if __name__ == "__main__":
    main()
