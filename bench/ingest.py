"""Ingest: HANDLER calls per second and latency, against the bare endpoints of the same server.

32 clients (threads with one keep-alive connection each, in a separate process: see
``loadgen.py``) post Bitrix24's HANDLER form over loopback for ``--duration`` seconds after a
warm-up. In the same run and on the same server process, the same clients post the same body
to two endpoints that only answer 200:

- ``/bench/wsgi``: answered before Flask (the server's own ceiling);
- ``/bench/bare``: a Flask route on the service's app (the ceiling for anything in Flask);

and, for scale, ``/bench/parse``: the bare route plus reading and checking the HANDLER's form
as the HANDLER does (no database), and ``/bench/store``: the bare route plus one ``INSERT`` +
commit through the
service's database session and one write to its queue store — the least any "store durably,
enqueue, answer" endpoint costs on this stack (see ``bare.py``).

``HANDLER ÷ bare route`` is the figure the target (≥ 60%) is about. The load generator's own
ceiling is measured first, against a server that answers at once, so it can be seen not to be
the bottleneck.

Servers (``--servers``, default all three):

- ``serve``: ``b24sms serve`` as it runs by default: waitress (32 threads), SQLite database and
  queue, the embedded queue consumer sending what comes in (log-only gateway);
- ``serve-web``: the same with ``--no-consumer`` (only the web side: verify, store, enqueue);
- ``gunicorn``: the README's deployment: ``gunicorn -w 2 --threads 16 wsgi:app``,
  PostgreSQL database,
  Redis queue (no worker running: the web tier alone).

    python bench/ingest.py                       # about 3.5 minutes
    python bench/ingest.py --servers serve --duration 5
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _harness as h

SERVERS = ("serve", "serve-web", "gunicorn")


@contextlib.contextmanager
def running(
    kind: str,
    workdir: Path,
    emu: Any,
    gunicorn_workers: int,
    threads: int | None = None,
    gunicorn_threads: int = h.GUNICORN_THREADS,
) -> Iterator[h.Proc]:
    port = h.free_port()
    if kind in ("serve", "serve-web"):
        config = h.service_config(workdir, port, emu, **({"threads": threads} if threads else {}))
        extra = ("--no-consumer",) if kind == "serve-web" else ()
        proc = h.start_serve(config, port, workdir, *extra)
        proc.port = port  # type: ignore[attr-defined]
        try:
            yield proc
        finally:
            proc.stop()
        return
    with h.scratch_postgres() as db_url, h.scratch_redis() as queue_url:
        config = h.service_config(workdir, port, emu, database_url=db_url, queue_url=queue_url)
        proc = h.start_gunicorn(config, port, workdir, gunicorn_workers, gunicorn_threads)
        proc.port = port  # type: ignore[attr-defined]
        try:
            yield proc
        finally:
            proc.stop()


def measure(kind: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    prefix = f"in{secrets.token_hex(3)}-"
    results = []
    with h.scratch_dir(f"ingest-{kind}") as tmp, h.emulator() as emu:
        workdir = Path(tmp)
        with running(
            kind, workdir, emu, args.gunicorn_workers, args.threads, args.gunicorn_threads
        ) as proc:
            port = proc.port  # type: ignore[attr-defined]
            portal = h.add_installed_portal(emu, f"http://127.0.0.1:{port}", prefix)
            handler = h.handler_target(portal)
            # The same body everywhere: only the path differs.
            for name, path in (
                ("bare WSGI", "/bench/wsgi"),
                ("bare route", "/bench/bare"),
                ("read form", "/bench/parse"),
                ("store + enqueue", "/bench/store"),
                ("HANDLER", handler["path"]),
            ):
                cpu_before = proc.cpu_seconds()
                figures = h.run_loadgen(
                    port,
                    [{"path": path, "body": handler["body"]}],
                    workdir,
                    concurrency=args.concurrency,
                    warmup=args.warmup,
                    duration=args.duration,
                    id_prefix=f"{name[0]}{secrets.token_hex(2)}-",
                )
                # CPU per request, warm-up included: steadier than the rate on a busy machine.
                figures["cpu_ms"] = (
                    1000.0 * (proc.cpu_seconds() - cpu_before) / max(1, figures["requests_total"])
                )
                figures["server"], figures["endpoint"] = kind, name
                results.append(figures)
            if "200" not in results[-1]["statuses"]:
                raise RuntimeError(
                    f"the HANDLER answered {results[-1]['statuses']}:\n{proc.tail()}"
                )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--servers", default=",".join(SERVERS), help=f"comma-separated, of {', '.join(SERVERS)}"
    )
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--gunicorn-workers", type=int, default=h.GUNICORN_WORKERS)
    parser.add_argument("--gunicorn-threads", type=int, default=h.GUNICORN_THREADS)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="waitress threads of serve (default: the config's default)",
    )
    args = parser.parse_args(argv)
    kinds = [k.strip() for k in args.servers.split(",") if k.strip()]
    unknown = set(kinds) - set(SERVERS)
    if unknown:
        parser.error(f"unknown servers: {', '.join(sorted(unknown))}")

    print(
        f"# ingest: {args.concurrency} clients, {args.warmup:g} s warm-up, "
        f"{args.duration:g} s measured per endpoint"
    )
    print(h.machine())
    with h.scratch_dir("ingest-gen") as tmp, h.canned_server() as cport:
        body = "x=@ID@&" + "f=" + "x" * 900
        ceiling = h.run_loadgen(
            cport,
            [{"path": "/", "body": body}],
            Path(tmp),
            concurrency=args.concurrency,
            warmup=1.0,
            duration=min(4.0, args.duration),
        )
    print(
        f"load generator ceiling (a server that answers at once): {ceiling['rate']:,.0f} "
        f"requests/s, p50 {ceiling['p50_ms']:.2f} ms"
    )

    rows = []
    handler_vs_route = {}
    for kind in kinds:
        if kind == "gunicorn" and (reason := h.unavailable_services()):
            print(f"gunicorn: skipped, {reason}")
            continue
        results = measure(kind, args)
        by_name = {r["endpoint"]: r for r in results}
        wsgi, route = by_name["bare WSGI"]["rate"], by_name["bare route"]["rate"]
        for r in results:
            rows.append(
                (
                    r["server"],
                    r["endpoint"],
                    r["rate"],
                    r["p50_ms"],
                    r["p99_ms"],
                    r["cpu_ms"],
                    f"{r['rate'] / route:.0%}",
                    f"{r['rate'] / wsgi:.0%}",
                    ", ".join(f"{k}: {v:,}" for k, v in sorted(r["statuses"].items()))
                    + (f"; {r['errors']} errors" if r["errors"] else ""),
                )
            )
        handler_vs_route[kind] = by_name["HANDLER"]["rate"] / route
    print(
        h.table(
            [
                "server",
                "endpoint",
                "requests/s",
                "p50 ms",
                "p99 ms",
                "server CPU ms/request",
                "÷ bare route",
                "÷ bare WSGI",
                "answers",
            ],
            rows,
        )
    )
    print(
        "HANDLER ÷ bare route (target ≥ 60%): "
        + ", ".join(f"{k} {v:.0%}" for k, v in handler_vs_route.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
