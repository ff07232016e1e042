"""End to end: N messages from the HANDLER to their final status at the portal.

``b24sms serve`` (waitress + embedded consumer, SQLite database and queue: the default
configuration) with the log-only gateway, against one emulated portal with Bitrix24's REST
limit on (2 requests/s, burst 50). 32 clients post the HANDLER calls as fast as the service
takes them; the run ends when the portal has the final status of every message.

Prints: total time and messages per second; the HANDLER rate while the burst came in; when the
gateway had sent the last message; REST requests, status updates per request and per batch
request, requests rejected by the limit (must be 0); peak RSS (VmHWM) and CPU time of the
``serve`` process.

    python bench/end_to_end.py                 # 5,000 messages, about a minute
    python bench/end_to_end.py --messages 1000
    python bench/end_to_end.py --messages 300 --gateway-latency 0,200

``--gateway-latency MS`` sends through the ``http`` gateway to the tests' fake SMS API on
loopback, which answers every send after MS milliseconds with the final status ``delivered``
(a real SMS API answers in 100–400 ms); several comma-separated values run one after the
other, and a last table gives each run's rates as a ratio of the first's.
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import statistics
import sys
from pathlib import Path
from typing import Any

import _harness as h


def summarise(run: dict[str, Any]) -> list[tuple[str, Any]]:
    """The figures of one :func:`_harness.deliver` run, as (label, value) rows."""
    n = run["messages"]
    ingest = run["ingest"]
    total = run["total_seconds"]
    batches = run["batch_sizes"]
    full = [b for b in batches if b == 50]
    # "During the burst": every batch request but the last, which takes whatever is left.
    burst = batches[:-1] if len(batches) > 1 else batches
    rows: list[tuple[str, Any]] = [
        ("messages", n),
        ("final status at the portal", f"{run['final_at_portal']:,} of {n:,}"),
        (
            "total time, first HANDLER call to last final status (s)",
            total if total is not None else "-",
        ),
        ("messages per second, end to end", n / total if total else "-"),
        ("HANDLER calls per second (32 clients)", ingest.get("rate", 0.0)),
        (
            "HANDLER p50 / p99 latency (ms)",
            f"{ingest.get('p50_ms', 0):.1f} / {ingest.get('p99_ms', 0):.1f}",
        ),
        (
            "HANDLER answers",
            ", ".join(f"{k}: {v:,}" for k, v in sorted(ingest.get("statuses", {}).items())) or "-",
        ),
        ("all HANDLER calls answered after (s)", run["ingest_seconds"]),
        (
            "all messages sent by the gateway after (s)",
            run["gateway_seconds"] if run["gateway_seconds"] is not None else "-",
        ),
        ("REST requests to the portal", run["requests"]),
        ("  of which batch requests", run["batches"]),
        ("status updates", run["status_updates"]),
        ("status updates per REST request", run["status_updates"] / max(1, run["requests"])),
        (
            "status updates per batch request during the burst (all but the last)",
            statistics.fmean(burst) if burst else "-",
        ),
        ("batch requests with 50 updates", f"{len(full)} of {len(batches)}"),
        ("REST requests rejected by the limit (QUERY_LIMIT_EXCEEDED)", run["rejected_rate_limit"]),
    ]
    return rows


def run_once(args: argparse.Namespace, latency_ms: float | None) -> tuple[dict[str, Any], bool]:
    """One run on a fresh service, through the log gateway (``latency_ms`` None) or the http
    gateway to a loopback fake answering after ``latency_ms``; prints its table."""
    prefix = f"e2e{secrets.token_hex(3)}-"
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(h.scratch_dir("e2e"))
        emu = stack.enter_context(h.emulator())
        gateway, provider = None, None
        if latency_ms is not None:
            gateway, provider = stack.enter_context(h.fake_gateway(latency_ms))
        workdir = Path(tmp)
        port = h.free_port()
        extra = {"workers": args.consumer_threads} if args.consumer_threads else {}
        config = h.service_config(workdir, port, emu, provider=provider, **extra)
        serve = h.start_serve(config, port, workdir)
        probe = h.DbProbe(f"sqlite:///{workdir}/b24sms.sqlite3")
        try:
            portal = h.add_installed_portal(emu, f"http://127.0.0.1:{port}", prefix)
            run = h.deliver(
                port,
                [portal],
                args.messages,
                workdir,
                probe,
                concurrency=args.concurrency,
                timeout=args.timeout,
            )
            rss = serve.peak_rss_mb()
            cpu = serve.cpu_seconds()
        finally:
            probe.close()
            serve.stop()
        rows = summarise(run)
        if gateway is not None:
            rows += [
                ("sends the fake gateway took", len(gateway.messages)),
                ("connections the gateway accepted", gateway.connections),
                ("most sends in flight at the gateway at once", gateway.peak_in_flight),
            ]
        rows += [
            ("peak RSS of `b24sms serve` (VmHWM, MiB)", rss),
            ("CPU time of `b24sms serve` (s)", cpu),
        ]
        print(f"\n## {h.gateway_label(latency_ms)}")
        print(h.table(["figure", "value"], rows))
        ok = run["complete"] and run["rejected_rate_limit"] == 0
        if not ok:
            print(
                "\nFAILED: not every message reached its final status, or the limit rejected "
                f"requests; the service's log was in {workdir}/serve.log",
                file=sys.stderr,
            )
            print(serve.tail(), file=sys.stderr)
    return run, ok


def compare(latencies: list[float | None], runs: list[dict[str, Any]]) -> str:
    """The runs side by side, each as a ratio of the first (the baseline)."""

    def rate(run: dict[str, Any], key: str) -> float:
        seconds = run.get(key)
        return run["messages"] / seconds if seconds else float("nan")

    rows: list[list[Any]] = []
    for label, key in (
        ("gateway messages per second (all sent)", "gateway_seconds"),
        ("messages per second, end to end (final at the portal)", "total_seconds"),
    ):
        base = rate(runs[0], key)
        rows.append([label, *(rate(r, key) for r in runs)])
        rows.append(["  ÷ first column", *(f"{rate(r, key) / base:.2f}×" for r in runs)])
    return h.table(["figure", *(h.gateway_label(v) for v in latencies)], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--consumer-threads",
        type=int,
        default=None,
        help="the embedded consumer's threads (default: the config's workers)",
    )
    parser.add_argument(
        "--gateway-latency",
        metavar="MS[,MS…]",
        default=None,
        help="send through the http gateway to a loopback fake answering after MS "
        "milliseconds instead of the log gateway; several values: one run each, compared "
        "with the first",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=170.0,
        help="give up waiting for final statuses after this many seconds",
    )
    args = parser.parse_args(argv)
    latencies = h.gateway_latencies(args.gateway_latency)

    print(
        f"# end to end: {args.messages:,} messages, "
        f"{' / '.join(h.gateway_label(v) for v in latencies)}, 1 portal (2 requests/s, burst 50)"
    )
    print(h.machine())
    results = [run_once(args, latency) for latency in latencies]
    if len(results) > 1:
        print("\n## compared")
        print(compare(latencies, [run for run, _ in results]))
    return 0 if all(ok for _, ok in results) else 1


if __name__ == "__main__":
    sys.exit(main())
