"""Scale: the end-to-end run on the README's deployment, with 1 and then 2 worker processes.

PostgreSQL database (a scratch ``b24sms_bench_<random>`` database, dropped afterwards), a Redis
queue (or ``--queue postgresql``), ``gunicorn -w 2 --threads 16 wsgi:app`` storing and
enqueueing, and
``b24sms worker`` processes (2 threads each, the default) sending through the log-only gateway
and flushing statuses to the emulated portal (2 requests/s, burst 50).

For each worker count it prints the same figures as ``end_to_end.py`` plus the gateway side
alone (messages per second from the first HANDLER call until every message was sent: what
more workers can speed up; the portal's REST limit bounds only the reporting afterwards), and
the ratio of each figure to the 1-worker run.

    python bench/scale.py                        # 5,000 messages, 1 portal, about 2.5 minutes
    python bench/scale.py --portals 4            # spread over 4 portals (4 REST buckets)
    python bench/scale.py --queue postgresql --workers 1,2
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _harness as h


@contextlib.contextmanager
def queue_url(kind: str, database_url: str) -> Iterator[str]:
    if kind == "redis":
        with h.scratch_redis() as url:
            yield url
    else:
        # PostgresHuey's tables live in the scratch database too, so they go with it.
        yield database_url.replace("postgresql+psycopg://", "postgresql://", 1)


def run(workers: int, args: argparse.Namespace) -> dict[str, Any]:
    prefix = f"sc{secrets.token_hex(3)}-"
    with (
        h.scratch_dir(f"scale-{workers}") as tmp,
        h.emulator() as emu,
        h.scratch_postgres() as db_url,
        queue_url(args.queue, db_url) as q_url,
    ):
        workdir = Path(tmp)
        port = h.free_port()
        config = h.service_config(workdir, port, emu, database_url=db_url, queue_url=q_url)
        procs: list[h.Proc] = []
        probe = h.DbProbe(db_url)
        try:
            web = h.start_gunicorn(config, port, workdir, args.web_workers, args.web_threads)
            procs.append(web)
            worker_procs = [
                h.start_worker(config, workdir, i, args.threads) for i in range(workers)
            ]
            procs += worker_procs
            portals = [
                h.add_installed_portal(emu, f"http://127.0.0.1:{port}", prefix)
                for _ in range(args.portals)
            ]
            result = h.deliver(
                port,
                portals,
                args.messages,
                workdir,
                probe,
                concurrency=args.concurrency,
                timeout=args.timeout,
            )
            result["rss_web"] = web.peak_rss_mb()
            result["rss_workers"] = [p.peak_rss_mb() for p in worker_procs]
            result["cpu_web"] = web.cpu_seconds()
            result["cpu_workers"] = sum(p.cpu_seconds() for p in worker_procs)
            for p in worker_procs:
                if not p.alive:
                    raise RuntimeError(f"{p.name} died:\n{p.tail()}")
        finally:
            probe.close()
            h.stop_all(procs)
    result["workers"] = workers
    if not result["complete"]:
        print(
            f"warning: {workers} worker(s): only {result['final_at_portal']:,} of "
            f"{args.messages:,} final at the portal within {args.timeout:g}s",
            file=sys.stderr,
        )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--portals", type=int, default=1)
    parser.add_argument("--workers", default="1,2", help="worker process counts to run")
    parser.add_argument("--web-workers", type=int, default=h.GUNICORN_WORKERS, help="gunicorn -w")
    parser.add_argument(
        "--web-threads", type=int, default=h.GUNICORN_THREADS, help="gunicorn --threads"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="b24sms worker -w (default: the config's workers)"
    )
    parser.add_argument("--queue", choices=("redis", "postgresql"), default="redis")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.workers.split(",") if c.strip()]
    reason = h.unavailable_services()
    if reason:
        print(f"scale: cannot run, {reason}", file=sys.stderr)
        return 2

    print(
        f"# scale: {args.messages:,} messages over {args.portals} portal(s) (2 requests/s, "
        f"burst 50 each); PostgreSQL, {args.queue} queue, gunicorn -w {args.web_workers} "
        f"--threads {args.web_threads}, "
        f"b24sms worker × {', '.join(map(str, counts))}"
    )
    print(h.machine())
    results = [run(n, args) for n in counts]
    base = results[0]

    def rate(r: dict[str, Any], key: str) -> float:
        seconds = r.get(key)
        return r["messages"] / seconds if seconds else float("nan")

    headers = ["figure"] + [f"{r['workers']} worker(s)" for r in results]
    rows: list[list[Any]] = []

    def add(label: str, values: list[Any]) -> None:
        rows.append([label, *values])

    add("final status at the portal", [f"{r['final_at_portal']:,}" for r in results])
    add("HANDLER calls per second (32 clients)", [r["ingest"].get("rate", 0.0) for r in results])
    add(
        "HANDLER p50 / p99 (ms)",
        [
            f"{r['ingest'].get('p50_ms', 0):.0f} / {r['ingest'].get('p99_ms', 0):.0f}"
            for r in results
        ],
    )
    add("all sent by the gateway after (s)", [r["gateway_seconds"] or "-" for r in results])
    add("gateway messages per second", [rate(r, "gateway_seconds") for r in results])
    add(
        "  ÷ 1 worker",
        [f"{rate(r, 'gateway_seconds') / rate(base, 'gateway_seconds'):.2f}×" for r in results],
    )
    add("total time to the last final status (s)", [r["total_seconds"] or "-" for r in results])
    add("messages per second, end to end", [rate(r, "total_seconds") for r in results])
    add(
        "  ÷ 1 worker",
        [f"{rate(r, 'total_seconds') / rate(base, 'total_seconds'):.2f}×" for r in results],
    )
    add("REST requests", [r["requests"] for r in results])
    add(
        "status updates per REST request",
        [r["status_updates"] / max(1, r["requests"]) for r in results],
    )
    add(
        "status updates per batch request, all but the last",
        [statistics.fmean(r["batch_sizes"][:-1] or r["batch_sizes"] or [0]) for r in results],
    )
    add("REST requests rejected by the limit", [r["rejected_rate_limit"] for r in results])
    add("peak RSS, gunicorn master + workers (MiB)", [r["rss_web"] for r in results])
    add(
        "peak RSS per `b24sms worker` (MiB)",
        [" / ".join(f"{v:.0f}" for v in r["rss_workers"]) for r in results],
    )
    add(
        "CPU s: gunicorn / workers",
        [f"{r['cpu_web']:.1f} / {r['cpu_workers']:.1f}" for r in results],
    )
    print(h.table(headers, rows))
    ok = all(r["complete"] and r["rejected_rate_limit"] == 0 for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
