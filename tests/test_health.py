"""``GET /healthz`` proves the database and the queue take writes, not only reads.

The service runs on a real file system that is made read-only, then full: as root, a small
tmpfs mounted for the test, remounted read-only or filled up; otherwise (root ignores file
modes) the files and their folder are made read-only. For read-only, the service's connections
are closed first and opened anew by the probe, as after a restart.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from b24sms.web.health import PROBE_FRESH, Probe


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 4 MB tmpfs of the test's own (skips without the right to mount one)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system for the test needs root")
    try:
        _mount("-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder))
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    try:
        yield folder
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            _mount("-o", "remount,rw", str(folder))
        subprocess.run(["umount", "-l", str(folder)], check=False, capture_output=True)


def on_disk(folder: Path) -> dict:
    return {
        "database_url": f"sqlite:///{folder}/b24sms.sqlite3",
        "queue_url": f"sqlite:///{folder}/b24sms-queue.sqlite3",
    }


_last_check = [0.0]


def health(server) -> tuple[int, dict]:
    # A result under PROBE_FRESH seconds old answers without a new write: wait it out, so each
    # call sees the disk as it is now.
    time.sleep(max(0.0, _last_check[0] + PROBE_FRESH - time.monotonic()))
    response = requests.get(f"{server.url}/healthz", timeout=30)
    _last_check[0] = time.monotonic()
    return response.status_code, response.json()["checks"]


def reopen_files(server) -> None:
    """Close the service's database and queue connections: the next use opens them anew."""
    svc = server.app.extensions["b24sms"]
    svc.db.engine.dispose()
    svc.queue.huey.storage.close()


def test_a_read_only_disk_is_not_healthy(live_app, small_disk):
    server = live_app(service=on_disk(small_disk))
    assert health(server) == (200, {"database": "ok", "queue": "ok"})
    # Linux refuses to remount a file system read-only while files on it are open for writing:
    # the service's connections are closed first, as a restarted process would have none.
    reopen_files(server)
    _mount("-o", "remount,ro", str(small_disk))
    try:
        status, checks = health(server)
        assert status == 503
        assert checks["database"].startswith("unavailable") and checks["queue"].startswith(
            "unavailable"
        ), checks
    finally:
        _mount("-o", "remount,rw", str(small_disk))
    assert health(server) == (200, {"database": "ok", "queue": "ok"})


def test_a_full_disk_is_not_healthy(live_app, small_disk):
    server = live_app(service=on_disk(small_disk))
    assert health(server)[0] == 200
    filler = small_disk / "filler"
    with filler.open("wb") as fh, contextlib.suppress(OSError):
        while True:  # until ENOSPC
            fh.write(b"\0" * 65536)
            fh.flush()
    try:
        status, checks = health(server)
        assert status == 503, checks
        assert checks["database"].startswith("unavailable"), checks
    finally:
        filler.unlink()
    assert health(server) == (200, {"database": "ok", "queue": "ok"})


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only files: see small_disk")
def test_read_only_files_are_not_healthy(live_app, tmp_path):
    folder = tmp_path / "data"
    server = live_app(service=on_disk(folder))
    assert health(server)[0] == 200
    for path in folder.iterdir():
        path.chmod(0o400)
    folder.chmod(0o500)
    try:
        reopen_files(server)
        status, checks = health(server)
        assert status == 503
        assert checks["database"].startswith("unavailable") and checks["queue"].startswith(
            "unavailable"
        ), checks
    finally:
        folder.chmod(0o700)
        for path in folder.iterdir():
            path.chmod(0o600)


def test_a_hanging_probe_times_out_and_is_not_started_twice():
    import threading

    release = threading.Event()
    started: list[int] = []

    def hanging() -> None:
        started.append(1)
        release.wait(10)

    probe = Probe("test", fresh=0.0)  # no reuse of results: each run below probes anew
    assert probe.run(hanging, timeout=0.2) == "unavailable (no write within 0.2 s)"
    assert probe.run(hanging, timeout=0.2).startswith("unavailable (an earlier probe")
    assert started == [1]
    release.set()
    probe._running.join(5)  # type: ignore[union-attr]
    assert probe.run(lambda: None) == "ok"
    assert probe.run(lambda: 1 / 0) == "unavailable (ZeroDivisionError)"


def test_callers_during_a_probe_share_its_result_and_a_fresh_one_is_reused():
    import threading
    from concurrent.futures import ThreadPoolExecutor

    release = threading.Event()
    calls: list[int] = []

    def slow() -> None:
        calls.append(1)
        release.wait(5)

    probe = Probe("test", fresh=60.0)
    with ThreadPoolExecutor(4) as pool:
        answers = [pool.submit(probe.run, slow, 5.0) for _ in range(4)]
        time.sleep(0.2)  # every caller is waiting on the one probe
        release.set()
        assert [a.result() for a in answers] == ["ok"] * 4
    assert calls == [1]
    assert probe.run(lambda: 1 / 0) == "ok"  # under `fresh` seconds old: no new write
    assert calls == [1]
    assert Probe("other", fresh=0.0).run(lambda: 1 / 0) == "unavailable (ZeroDivisionError)"


def test_concurrent_health_checks_on_a_healthy_service_all_answer_200(live_app, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    server = live_app(service=on_disk(tmp_path))
    barrier = threading.Barrier(8)

    def check(_: int) -> int:
        barrier.wait(10)
        return requests.get(f"{server.url}/healthz", timeout=30).status_code

    for _ in range(2):
        time.sleep(PROBE_FRESH + 0.1)  # each round probes anew, not from the last result
        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(check, range(8))) == [200] * 8


def test_the_probes_write_on_postgresql_and_redis(live_app, postgres_url, redis_url):
    """Needs PostgreSQL and Redis on 127.0.0.1 (skipped with the reason when absent)."""
    from sqlalchemy import select

    from b24sms import schema
    from b24sms.db import Database
    from b24sms.models import HealthCheck
    from tests.deployment import reset_schema

    reset_schema(postgres_url)
    database = Database(postgres_url)
    schema.upgrade(database)
    database.dispose()
    server = live_app(service={"database_url": postgres_url, "queue_url": redis_url})
    svc = server.app.extensions["b24sms"]
    stamps = []
    for _ in range(2):
        assert health(server) == (200, {"database": "ok", "queue": "ok"})
        with svc.db.session() as session:
            stamps.append(session.scalar(select(HealthCheck.checked_at)))
        assert svc.queue.huey.get("b24sms-health-probe", peek=True) is not None
    assert stamps[0] is not None and stamps[1] > stamps[0]
