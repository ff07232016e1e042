"""A small HTTP/1.1 load generator: N threads, one keep-alive connection each, closed loop.

Run as its own process, so it never shares a GIL with the server it measures::

    python bench/loadgen.py --port 8000 --path /bitrix24/handler/x?... --body-file body.txt \
        --concurrency 32 --warmup 2 --duration 8

The body may hold ``@ID@``, replaced by a number unique within the run (HANDLER calls need a new
``message_id`` each); ``--id-prefix`` makes it unique across runs. It prints one JSON object:
requests and their rate in the measured window (after the warm-up), latency percentiles in
milliseconds, HTTP statuses and errors.

``--canned-server PORT`` instead runs a server that answers every request with a fixed 200 at
once (asyncio, one process): the generator's own ceiling is its rate against that server.

Plain sockets instead of ``requests``: a ``requests.Session`` costs ~0.3 ms of Python per call,
which on this 2-core machine would make the generator, not the server, the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import socket
import statistics
import sys
import threading
import time
from typing import Any


def _connect(host: str, port: int) -> tuple[socket.socket, Any]:
    sock = socket.create_connection((host, port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock, sock.makefile("rb")


def _read_response(reader: Any) -> tuple[int, bool]:
    """Read one response; returns (status, whether the server closes the connection)."""
    status_line = reader.readline()
    if not status_line:
        raise ConnectionError("connection closed by the server")
    parts = status_line.split(None, 2)
    status = int(parts[1])
    close = parts[0] == b"HTTP/1.0"
    length = 0
    chunked = False
    while True:
        line = reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection":
            close = value.strip().lower() == b"close"
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        while True:
            size = int(reader.readline().split(b";")[0], 16)
            reader.read(size + 2)
            if size == 0:
                break
    elif length:
        reader.read(length)
    return status, close


def run_load(
    host: str,
    port: int,
    targets: list[tuple[str, bytes]],
    *,
    concurrency: int,
    warmup: float = 0.0,
    duration: float | None = None,
    requests: int | None = None,
    id_prefix: str = "",
    content_type: str = "application/x-www-form-urlencoded",
) -> dict[str, Any]:
    """Closed-loop load: for ``warmup + duration`` seconds, or until ``requests`` were sent.

    Request ``n`` goes to ``targets[n % len(targets)]`` with ``@ID@`` in its body replaced by
    ``{id_prefix}{n}``. Figures cover the measured window (everything after the warm-up).
    """
    counter = itertools.count()
    start = time.perf_counter()
    measure_from = start + warmup
    stop_at = measure_from + duration if duration is not None else float("inf")
    limit = requests if requests is not None else float("inf")
    heads = [
        (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
            "User-Agent: b24sms-bench\r\nContent-Length: %d\r\n\r\n"
        ).encode()
        for path, _ in targets
    ]
    bodies = [body for _, body in targets]
    templated = any(b"@ID@" in body for body in bodies)
    n_targets = len(targets)
    results: list[list[tuple[float, float, int]]] = [[] for _ in range(concurrency)]
    errors: list[str] = []
    connects = [0] * concurrency

    def client(index: int) -> None:
        out = results[index]
        sock = reader = None
        try:
            while True:
                now = time.perf_counter()
                if now >= stop_at:
                    break
                if sock is None:
                    sock, reader = _connect(host, port)
                    connects[index] += 1
                n = next(counter)
                if n >= limit:
                    break
                body = bodies[n % n_targets]
                payload = body.replace(b"@ID@", f"{id_prefix}{n}".encode()) if templated else body
                t0 = time.perf_counter()
                try:
                    sock.sendall(heads[n % n_targets] % len(payload) + payload)
                    status, close = _read_response(reader)
                except (ConnectionError, OSError) as exc:
                    errors.append(type(exc).__name__)
                    sock.close()
                    sock = reader = None
                    continue
                t1 = time.perf_counter()
                out.append((t1, t1 - t0, status))
                if close:
                    sock.close()
                    sock = reader = None
        finally:
            if sock is not None:
                sock.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    finished = time.perf_counter()
    if duration is None:
        duration = max(1e-9, finished - measure_from)
        stop_at = finished + 1.0
    measured = [r for rs in results for r in rs if measure_from <= r[0] < stop_at]
    latencies = sorted(r[1] for r in measured)
    statuses: dict[str, int] = {}
    for r in measured:
        statuses[str(r[2])] = statuses.get(str(r[2]), 0) + 1
    total = sum(len(rs) for rs in results)

    def pct(p: float) -> float:
        if not latencies:
            return float("nan")
        return latencies[min(len(latencies) - 1, int(p / 100.0 * len(latencies)))] * 1000.0

    return {
        "requests": len(measured),
        "requests_total": total,
        "rate": len(measured) / duration,
        "p50_ms": pct(50),
        "p90_ms": pct(90),
        "p99_ms": pct(99),
        "max_ms": latencies[-1] * 1000.0 if latencies else float("nan"),
        "mean_ms": statistics.fmean(latencies) * 1000.0 if latencies else float("nan"),
        "statuses": statuses,
        "errors": len(errors),
        "error_kinds": sorted(set(errors)),
        "connections": sum(connects),
        "concurrency": concurrency,
        "duration": duration,
    }


CANNED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n"
    b'{"result":"ok"}'
)


async def _canned_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if length:
                await reader.readexactly(length)
            writer.write(CANNED)
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def canned_server(port: int) -> None:
    """Answer every request with a fixed 200, as fast as one Python process can."""

    async def main() -> None:
        server = await asyncio.start_server(_canned_client, "127.0.0.1", port, backlog=512)
        print("ready", flush=True)
        async with server:
            await server.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int)
    parser.add_argument("--path", default="/")
    parser.add_argument("--body-file", help="the request body; @ID@ becomes a unique number")
    parser.add_argument(
        "--targets-file", help='JSON list of {"path": ..., "body": ...}, used round-robin'
    )
    parser.add_argument("--requests", type=int, help="stop after this many requests")
    parser.add_argument("--id-prefix", default="")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        help="seconds to measure after the warm-up (default 8, or until --requests are done)",
    )
    parser.add_argument("--canned-server", type=int, metavar="PORT")
    args = parser.parse_args(argv)
    if args.canned_server:
        canned_server(args.canned_server)
        return 0
    if args.port is None:
        parser.error("--port is required")
    if args.targets_file:
        with open(args.targets_file, encoding="utf-8") as fh:
            targets = [(t["path"], t["body"].encode()) for t in json.load(fh)]
    else:
        body = b""
        if args.body_file:
            with open(args.body_file, "rb") as fh:
                body = fh.read()
        targets = [(args.path, body)]
    duration = args.duration
    if duration is None and args.requests is None:
        duration = 8.0
    result = run_load(
        args.host,
        args.port,
        targets,
        concurrency=args.concurrency,
        warmup=args.warmup,
        duration=duration,
        requests=args.requests,
        id_prefix=args.id_prefix,
    )
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
