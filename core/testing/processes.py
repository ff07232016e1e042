"""Service processes for tests and benchmarks: started, watched, stopped, killed.

Shared by b24sms's own deployment tests (``tests/deployment.py``) and its benchmarks
(``bench/_harness.py``): a config file from a dict, a free port, the console scripts installed
beside this interpreter, and :class:`Process` — one process in its own process group, its
output in a log file, stopped gracefully or SIGKILLed with its children.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import requests


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def toml_value(value: Any) -> str:
    """``value`` as TOML: booleans, numbers, strings, lists and inline tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Mapping):
        pairs = (f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items())
        return "{ " + ", ".join(pairs) + " }"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string: JSON's escapes are TOML's


def write_config(path: Path, sections: Mapping[str, Mapping[str, Any]]) -> Path:
    """Write ``{"service": {...}, "providers.sms": {...}}`` as a TOML file (tables inline)."""
    lines: list[str] = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in table.items())
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def wait_for(check: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Poll ``check`` until it is true (True) or ``timeout`` seconds passed (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def console_script(name: str) -> list[str]:
    """The console script installed beside this interpreter, as a user would run it."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found:
        return [found]
    if name == "b24sms":
        return [sys.executable, "-c", "from b24sms.cli import main; main()"]
    return [sys.executable, "-m", name]


class Process:
    """One service process: started in its own process group, output in ``log_path``.

    :param graceful: the signal that asks it to finish its work and exit (gunicorn: SIGTERM;
        huey's consumer and waitress: SIGINT).
    :param ready: called until true after start (e.g. the web port answers).
    :param cwd: the working directory (default: this process's).
    """

    def __init__(
        self,
        name: str,
        argv: list[str],
        *,
        env: Mapping[str, str],
        log_path: Path,
        graceful: signal.Signals = signal.SIGINT,
        ready: Callable[[], bool] | None = None,
        cwd: str | Path | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.env = dict(env)
        self.log_path = log_path
        self.graceful = graceful
        self.ready = ready
        self.cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self, timeout: float = 30.0) -> Process:
        """Start the process (appending to its log) and wait until it is ready."""
        if self.alive:
            return self
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== start #{self.starts}: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: kill() reaches its children
            )
        ready = self.ready
        if ready is not None and not wait_for(lambda: ready() or not self.alive, timeout, 0.1):
            raise RuntimeError(f"{self.name} not ready after {timeout}s\n{self.tail()}")
        if not self.alive:
            raise RuntimeError(f"{self.name} exited at start\n{self.tail()}")
        return self

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self.popen is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)  # the group this process leads; nothing else

    def stop(self, timeout: float = 15.0) -> int | None:
        """Ask it to stop (its graceful signal), then SIGKILL after ``timeout``; exit status."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(self.graceful)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        # Children of a graceful stop are gone; a leftover (a hung gunicorn worker) is not.
        self._signal_group(signal.SIGKILL)
        return self.popen.returncode

    def kill(self) -> None:
        """SIGKILL the whole process group, at once and without warning."""
        if self.popen is None:
            return
        self._signal_group(signal.SIGKILL)
        self.popen.wait(timeout=10)

    def restart(self, timeout: float = 30.0) -> Process:
        """Stop it gracefully (if running) and start it again."""
        self.stop()
        return self.start(timeout)

    def output(self) -> str:
        """What the process wrote since its latest start."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return text.rsplit(f"===== start #{self.starts}:", 1)[-1]

    def tail(self, chars: int = 3000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return f"--- {self.name}: no log ---"
        return f"--- {self.name} ({self.log_path}) ---\n{text[-chars:]}"


def answers(url: str) -> bool:
    """Whether ``url`` answers HTTP at all (any status)."""
    try:
        requests.get(url, timeout=1)
    except requests.RequestException:
        return False
    return True
