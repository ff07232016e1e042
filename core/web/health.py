"""``GET /healthz``: can the database and the queue take writes, and how much waits to be reported.

Reading is not enough: a database on a read-only or full disk still answers ``SELECT 1`` while
every HANDLER call fails to store its message. So each check writes: the database rewrites its
row in ``health_checks``, the queue sets a key in its store. Each probe runs in a thread and
must finish within :data:`PROBE_TIMEOUT` seconds; a probe still hanging from an
earlier request is not started again (a hung database costs one thread, not one per request),
and the check answers "unavailable" until it returns. Requests arriving while a probe runs
share its result, and a result under :data:`PROBE_FRESH` seconds old answers at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from flask import Blueprint, current_app, jsonify
from sqlalchemy import insert, text, update

from ..models import HealthCheck, utcnow

bp = Blueprint("health", __name__)

#: seconds a write probe may take before its check is reported unavailable
PROBE_TIMEOUT = 3.0
#: the queue store key the queue probe sets
QUEUE_PROBE_KEY = "b24sms-health-probe"


#: seconds a finished probe's result answers further requests without a new write
PROBE_FRESH = 1.0


class _Run:
    """One probe's thread and, once it returned, its result."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result = ""


class Probe:
    """Runs one check's probe in a thread, at most one at a time, with a timeout.

    Callers arriving while a probe runs wait for that probe's result (up to their timeout)
    instead of starting their own, and a result under ``fresh`` seconds old answers at once: a
    burst of health checks costs one write, and no caller is told "unavailable" only because
    another one asked at the same moment.
    """

    def __init__(self, name: str, fresh: float = PROBE_FRESH) -> None:
        self.name = name
        self.fresh = fresh
        self._lock = threading.Lock()
        self._current: _Run | None = None
        self._running: threading.Thread | None = None
        self._last: tuple[float, str] | None = None

    def run(self, probe: Callable[[], Any], timeout: float = PROBE_TIMEOUT) -> str:
        """``"ok"``, or ``"unavailable (…)"`` naming the failure (never its message: it may
        carry a connection string)."""
        with self._lock:
            if self._last is not None and time.monotonic() - self._last[0] < self.fresh:
                return self._last[1]
            current = self._current
            joined = current is not None and not current.done.is_set()
            if current is None or not joined:
                current = self._current = self._start(probe)
        if current.done.wait(timeout):
            return current.result
        if joined:
            return "unavailable (an earlier probe is still waiting for an answer)"
        return f"unavailable (no write within {timeout:g} s)"

    def _start(self, probe: Callable[[], Any]) -> _Run:
        run = _Run()

        def target() -> None:
            try:
                probe()
            except Exception as exc:  # noqa: BLE001 - any failure means "unavailable"
                result = f"unavailable ({type(exc).__name__})"
            else:
                result = "ok"
            with self._lock:
                self._last = (time.monotonic(), result)
            run.result = result
            run.done.set()

        # A daemon thread: a probe hanging on a dead server never holds up the exit.
        self._running = threading.Thread(target=target, name=f"healthz-{self.name}", daemon=True)
        self._running.start()
        return run


def _probes() -> dict[str, Probe]:
    return current_app.extensions.setdefault(
        "b24sms.health", {"database": Probe("database"), "queue": Probe("queue")}
    )


def write_database(svc: Any) -> None:
    """Rewrite the database's row in ``health_checks`` (insert it the first time)."""
    with svc.db.session() as session:
        if not svc.db.is_sqlite:
            # Bounded on the server too, so a probe stuck behind a lock ends by itself.
            session.execute(text(f"SET LOCAL statement_timeout = {int(PROBE_TIMEOUT * 1000)}"))
        now = utcnow()
        updated = session.execute(
            update(HealthCheck).where(HealthCheck.name == "database").values(checked_at=now)
        ).rowcount
        if not updated:
            session.execute(insert(HealthCheck).values(name="database", checked_at=now))


def write_queue(svc: Any) -> None:
    """Set a key in the queue's store (and reach it: create its tables when missing)."""
    svc.queue.ping()
    svc.queue.huey.put(QUEUE_PROBE_KEY, time.time())


@bp.get("/healthz")
def healthz():
    svc = current_app.extensions["b24sms"]
    probes = _probes()
    checks = {
        "database": probes["database"].run(lambda: write_database(svc)),
        "queue": probes["queue"].run(lambda: write_queue(svc)),
    }
    backlog = None
    if checks["database"] == "ok":
        from ..outbox import outbox_backlog

        try:
            with svc.db.read() as session:
                backlog = sum(outbox_backlog(session).values())
        except Exception as exc:  # noqa: BLE001 - any failure means "unavailable"
            checks["database"] = f"unavailable ({type(exc).__name__})"
    healthy = all(v == "ok" for v in checks.values())
    response = jsonify(
        {"status": "ok" if healthy else "unavailable", "checks": checks, "outbox_backlog": backlog}
    )
    response.status_code = 200 if healthy else 503
    return response
