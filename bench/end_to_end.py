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
"""

from __future__ import annotations

import argparse
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
        "--timeout",
        type=float,
        default=170.0,
        help="give up waiting for final statuses after this many seconds",
    )
    args = parser.parse_args(argv)

    print(
        f"# end to end: {args.messages:,} messages, log-only gateway, 1 portal "
        "(2 requests/s, burst 50)"
    )
    print(h.machine())
    prefix = f"e2e{secrets.token_hex(3)}-"
    with h.scratch_dir("e2e") as tmp, h.emulator() as emu:
        workdir = Path(tmp)
        port = h.free_port()
        extra = {"workers": args.consumer_threads} if args.consumer_threads else {}
        config = h.service_config(workdir, port, emu, **extra)
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
    rows += [
        ("peak RSS of `b24sms serve` (VmHWM, MiB)", rss),
        ("CPU time of `b24sms serve` (s)", cpu),
    ]
    print(h.table(["figure", "value"], rows))
    ok = run["complete"] and run["rejected_rate_limit"] == 0
    if not ok:
        print(
            "\nFAILED: not every message reached its final status, or the limit rejected "
            f"requests; the service's log was in {workdir}/serve.log",
            file=sys.stderr,
        )
        print(serve.tail(), file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
