"""Where the time goes: py-spy samples ``b24sms serve`` while it ingests or delivers.

    python bench/hotspots.py ingest      # HANDLER calls only (serve --no-consumer), 32 clients
    python bench/hotspots.py delivery    # the embedded consumer sending and flushing 3,000 messages
    python bench/hotspots.py gunicorn    # HANDLER calls on the README's web tier (PG, Redis)

Needs ``py-spy`` (``pip install -e ".[bench]"``) and the right to attach to a child process
(root, or ``kernel.yama.ptrace_scope = 0``). By default only the thread holding the GIL is
sampled (``--gil``): in a process whose threads take turns on one core, that is where the CPU
goes. ``--all-threads`` samples every thread that is not idle, which shows where requests
*wait* as well (a lock, a busy SQLite file, an fsync).

Prints the share of samples per function of ours: inclusive (the function and what it calls),
and by the innermost frame of our code on the stack, so a cost shows where our code causes it.
The collapsed stacks
(``<mode>.txt`` in ``--out``) are the input of any flame-graph tool.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import _harness as h

_LINE = re.compile(r":\d+\)$")


def _short(frame: str) -> str:
    """``func (path:line)`` → ``func (path)``: one entry per function, not per line."""
    return _LINE.sub(")", frame)


# py-spy names files relative to their sys.path entry: ours are core/… and plugins/… in an
# editable install, b24sms/… in a regular one.
_OURS = re.compile(r"\((?:core|plugins|b24sms)/")


def _ours(frame: str) -> bool:
    return bool(_OURS.search(frame))


def summarise(collapsed: Path, top: int) -> str:
    """Inclusive and innermost-own-frame shares of the samples in ``collapsed``."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        # Idle threads (waiting in a socket accept, a queue poll, a sleep) are not cost.
        leaf = frames[-1]
        idle = any(
            word in leaf
            for word in (
                "select (",
                "poll (",
                "wait (",
                "sleep",
                "accept (",
                "_wait_for_tstate_lock",
                "readinto (socket",
            )
        )
        if idle and not any(_ours(f) for f in frames):
            continue
        total += count
        mine = [_short(f) for f in frames if _ours(f)]
        for name in set(mine):
            inclusive[name] += count
        if mine:
            own[mine[-1]] += count
    lines = [f"{total} busy samples", "", "our functions, inclusive (with what they call):"]
    for name, count in inclusive.most_common(top):
        lines.append(f"  {100.0 * count / max(1, total):5.1f}%  {name}")
    lines += ["", "innermost frame of ours (what our code spends directly or through libraries):"]
    for name, count in own.most_common(top):
        lines.append(f"  {100.0 * count / max(1, total):5.1f}%  {name}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("ingest", "delivery", "gunicorn"))
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "b24sms-profile"))
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument(
        "--all-threads",
        action="store_true",
        help="sample every busy thread, not only the one holding the GIL",
    )
    args = parser.parse_args(argv)
    pyspy = shutil.which("py-spy")
    if pyspy is None:
        parser.error("py-spy is not installed: pip install -e '.[bench]'")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prefix = f"pr{secrets.token_hex(3)}-"
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(h.scratch_dir("profile"))
        emu = stack.enter_context(h.emulator())
        workdir = Path(tmp)
        port = h.free_port()
        if args.mode == "gunicorn":
            if reason := h.unavailable_services():
                parser.error(f"gunicorn: {reason}")
            config = h.service_config(
                workdir,
                port,
                emu,
                database_url=stack.enter_context(h.scratch_postgres()),
                queue_url=stack.enter_context(h.scratch_redis()),
            )
            serve = h.start_gunicorn(config, port, workdir, h.GUNICORN_WORKERS)
        else:
            config = h.service_config(workdir, port, emu)
            extra = ("--no-consumer",) if args.mode == "ingest" else ()
            serve = h.start_serve(config, port, workdir, *extra)
        try:
            portal = h.add_installed_portal(emu, f"http://127.0.0.1:{port}", prefix)
            target = h.handler_target(portal)
            raw = out / f"{args.mode}.txt"
            if args.mode in ("ingest", "gunicorn"):
                load = threading.Thread(
                    target=h.run_loadgen,
                    args=(port, [target], workdir),
                    kwargs={"warmup": 1.0, "duration": args.seconds + 2},
                )
                load.start()
                time.sleep(1.0)
                seconds = args.seconds
            else:
                # Ingest first without the profiler, then sample the consumer's catching up.
                h.run_loadgen(port, [target], workdir, requests_total=args.messages)
                load = None
                seconds = args.seconds
            subprocess.run(
                [
                    pyspy,
                    "record",
                    "-p",
                    str(serve.pid),
                    "-d",
                    str(int(seconds)),
                    "-r",
                    str(args.rate),
                    "-f",
                    "raw",
                    "-o",
                    str(raw),
                    "--nonblocking",
                    *([] if args.all_threads else ["--gil"]),
                    *(["--subprocesses"] if args.mode == "gunicorn" else []),
                ],
                check=True,
                capture_output=True,
            )
            if load is not None:
                load.join()
        finally:
            serve.stop()
    kind = "busy threads" if args.all_threads else "the thread holding the GIL"
    server = "gunicorn's workers" if args.mode == "gunicorn" else "`b24sms serve`"
    print(f"# profile of {server} during {args.mode} ({kind}): {raw}")
    print(summarise(raw, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
