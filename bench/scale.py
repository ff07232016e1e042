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
    python bench/scale.py --portals 8 --gateway-latency 0,200   # a gateway answering in 200 ms

``--gateway-latency MS[,MS…]`` sends through the ``http`` gateway to the tests' fake SMS API on
loopback (answering after MS milliseconds, final status ``delivered``) instead of the log
gateway; each latency runs with each worker count, and the ratios compare every column with
the first worker count (same gateway) and with the first latency (same workers).
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


@contextlib.contextmanager
def gateway(latency_ms: float | None) -> Iterator[tuple[Any, dict[str, Any] | None]]:
    """The log gateway (None), or the loopback fake answering after ``latency_ms``."""
    if latency_ms is None:
        yield None, None
    else:
        with h.fake_gateway(latency_ms) as (fake, provider):
            yield fake, provider


def run(workers: int, latency_ms: float | None, args: argparse.Namespace) -> dict[str, Any]:
    prefix = f"sc{secrets.token_hex(3)}-"
    with (
        h.scratch_dir(f"scale-{workers}") as tmp,
        h.emulator() as emu,
        h.scratch_postgres() as db_url,
        queue_url(args.queue, db_url) as q_url,
        gateway(latency_ms) as (fake, provider),
    ):
        workdir = Path(tmp)
        port = h.free_port()
        config = h.service_config(
            workdir, port, emu, database_url=db_url, queue_url=q_url, provider=provider
        )
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
            if fake is not None:
                result["gateway_connections"] = fake.connections
                result["gateway_peak_in_flight"] = fake.peak_in_flight
            for p in worker_procs:
                if not p.alive:
                    raise RuntimeError(f"{p.name} died:\n{p.tail()}")
        finally:
            probe.close()
            h.stop_all(procs)
    result["workers"] = workers
    result["latency"] = latency_ms
    if not result["complete"]:
        print(
            f"warning: {workers} worker(s), {h.gateway_label(latency_ms)}: only "
            f"{result['final_at_portal']:,} of {args.messages:,} final at the portal "
            f"within {args.timeout:g}s",
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
    parser.add_argument(
        "--gateway-latency",
        metavar="MS[,MS…]",
        default=None,
        help="send through the http gateway to a loopback fake answering after MS "
        "milliseconds instead of the log gateway; several values: each with every worker count",
    )
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.workers.split(",") if c.strip()]
    latencies = h.gateway_latencies(args.gateway_latency)
    reason = h.unavailable_services()
    if reason:
        print(f"scale: cannot run, {reason}", file=sys.stderr)
        return 2

    print(
        f"# scale: {args.messages:,} messages over {args.portals} portal(s) (2 requests/s, "
        f"burst 50 each); PostgreSQL, {args.queue} queue, gunicorn -w {args.web_workers} "
        f"--threads {args.web_threads}, "
        f"b24sms worker × {', '.join(map(str, counts))}; "
        f"{' / '.join(h.gateway_label(v) for v in latencies)}"
    )
    print(h.machine())
    results = [run(n, latency, args) for latency in latencies for n in counts]
    by_key = {(r["latency"], r["workers"]): r for r in results}

    def rate(r: dict[str, Any], key: str) -> float:
        seconds = r.get(key)
        return r["messages"] / seconds if seconds else float("nan")

    def ratios(key: str) -> None:
        """Each column's rate ÷ the first worker count's with the same gateway, and ÷ the
        first gateway's with the same worker count (when several were run)."""
        add(
            f"  ÷ {counts[0]} worker(s), same gateway",
            [
                f"{rate(r, key) / rate(by_key[(r['latency'], counts[0])], key):.2f}×"
                for r in results
            ],
        )
        if len(latencies) > 1:
            add(
                f"  ÷ {h.gateway_label(latencies[0])}, same workers",
                [
                    f"{rate(r, key) / rate(by_key[(latencies[0], r['workers'])], key):.2f}×"
                    for r in results
                ],
            )

    def column(r: dict[str, Any]) -> str:
        label = f"{r['workers']} worker(s)"
        return label if len(latencies) == 1 else f"{label}, {h.gateway_label(r['latency'])}"

    headers = ["figure"] + [column(r) for r in results]
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
    ratios("gateway_seconds")
    add("total time to the last final status (s)", [r["total_seconds"] or "-" for r in results])
    add("messages per second, end to end", [rate(r, "total_seconds") for r in results])
    ratios("total_seconds")
    if latencies != [None]:
        add(
            "connections the gateway accepted / most sends in flight at once",
            [
                f"{r.get('gateway_connections', '-')} / {r.get('gateway_peak_in_flight', '-')}"
                for r in results
            ],
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
