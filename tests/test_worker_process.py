"""End to end with a real consumer process: SQLite database, SQLite queue, the portal emulator.

The worker runs in a subprocess (``Queue.run_consumer``) built from a config file, as
``b24sms worker`` would; this process only stores messages, enqueues them and watches.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from b24sms.models import Message
from b24sms.outbox import outbox_backlog
from b24sms.service import Service
from tests.conftest import CLIENT_ID, CLIENT_SECRET, SECRET_KEY
from tests.deployment import write_config
from tests.fakes.blocking_gateway import build
from tests.helpers import add_message, add_portal, create_schema, load

pytestmark = [pytest.mark.slow, pytest.mark.deployment]

ROOT = Path(__file__).resolve().parent.parent
CODE = "blocking"


WORKER_SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.INFO,
                    format="%(asctime)s %(process)d %(threadName)s %(name)s %(message)s")
from tests.fakes.blocking_gateway import build
build(sys.argv[1]).queue.run_consumer(workers=4)
"""


class Workers:
    """Worker subprocesses started by a test; each is stopped by its own pid at the end."""

    def __init__(self, config_path: Path, log_dir: Path) -> None:
        self.config_path = config_path
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> subprocess.Popen[bytes]:
        log_file = open(self.log_dir / f"worker-{len(self.procs)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-c", WORKER_SCRIPT, str(self.config_path)],
            cwd=ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        log_file.close()
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # huey's graceful shutdown
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def logs(self) -> str:
        return "\n".join(
            p.read_text(errors="replace")[-4000:] for p in sorted(self.log_dir.glob("worker-*.log"))
        )


@pytest.fixture
def setup(tmp_path, emulator) -> Iterator[tuple[Service, Workers, Path]]:
    control = tmp_path / "control"
    control.mkdir()
    config_path = write_config(
        tmp_path / "b24sms.toml",
        {
            "service": {
                "public_url": "http://127.0.0.1:9",
                "secret_key": SECRET_KEY,
                "database_url": f"sqlite:///{tmp_path}/b24sms.sqlite3",
                "queue_url": f"sqlite:///{tmp_path}/queue.sqlite3",
                "max_attempts": 5,
                "retry_base_delay": 0.05,
                "retry_max_delay": 0.2,
                "stuck_after": 2,
                "sweep_interval": 1,
            },
            "bitrix24": {
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
                "oauth_url": emulator.oauth_url,
            },
            f"providers.{CODE}": {
                "plugin": "blocking",
                "name": "Blocking",
                "control": str(control),
            },
        },
    )
    svc = build(config_path)
    create_schema(svc)
    workers = Workers(config_path, tmp_path)
    try:
        yield svc, workers, control
    finally:
        for proc in workers.procs:
            workers.stop(proc)
        svc.close()


def wait_until(check: Callable[[], bool], timeout: float, workers: Workers, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}\n--- worker logs ---\n{workers.logs()}")
        time.sleep(0.1)


def test_burst_of_500_delivered_and_reported_by_a_worker_process(setup, emulator):
    svc, workers, _ = setup
    portal = emulator.add_portal()
    portal_id = add_portal(svc, portal)
    pks = [add_message(svc, portal_id, code=CODE, emulated=portal) for _ in range(500)]
    ids = [load(svc, pk).message_id for pk in pks]
    started = time.monotonic()
    for pk in pks:
        svc.queue.enqueue_send(pk)
    workers.start()
    wait_until(
        lambda: all(portal.final_status(m) == "delivered" for m in ids),
        60,
        workers,
        "500 final statuses at the emulator",
    )
    elapsed = time.monotonic() - started
    stats = portal.stats_snapshot()
    per_request = stats["status_updates"] / stats["batches"]
    print(
        f"worker burst: 500 messages final in {elapsed:.1f}s; {stats['status_updates']} "
        f"updates in {stats['batches']} batches ({per_request:.1f}/request), "
        f"{stats['rejected_rate_limit']} rejected"
    )
    assert stats["rejected_rate_limit"] == 0
    assert per_request >= 40
    with svc.db.session() as session:
        rows = session.execute(select(Message.status, Message.attempts)).all()
        assert {(s, a) for s, a in rows} == {("delivered", 1)}

    def outbox_empty() -> bool:
        with svc.db.session() as session:
            return not outbox_backlog(session)

    wait_until(outbox_empty, 5, workers, "an empty outbox")


def test_worker_killed_mid_send_loses_nothing(setup, emulator):
    svc, workers, control = setup
    portal = emulator.add_portal()
    portal_id = add_portal(svc, portal)
    (control / "block").write_text("")
    first = add_message(svc, portal_id, code=CODE, emulated=portal)
    worker = workers.start()
    svc.queue.enqueue_send(first)
    wait_until(lambda: (control / f"started-{first}").exists(), 20, workers, "the send to start")
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    message = load(svc, first)
    assert message.status == "queued" and message.attempts == 1
    assert message.sending_since is not None  # committed before the gateway was called
    # more work arrives while no worker runs
    second = add_message(svc, portal_id, code=CODE, emulated=portal)
    svc.queue.enqueue_send(second)
    (control / "block").unlink()
    workers.start()
    for pk in (first, second):
        mid = load(svc, pk).message_id
        wait_until(
            lambda mid=mid: portal.final_status(mid) == "delivered",
            30,
            workers,
            f"message {pk} to be reported delivered",
        )
    recovered = load(svc, first)
    assert recovered.status == "delivered"
    assert recovered.attempts == 2  # the killed attempt counts
    assert recovered.sending_since is None
    assert "cut short" in (recovered.last_error or "")
    assert load(svc, second).attempts == 1
