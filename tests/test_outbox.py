"""Reporting statuses to the emulated portal: coalescing, batching, pacing, errors, the lease."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import time
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import delete, select

from b24sms.bitrix24 import method_limits
from b24sms.bitrix24.client import Bitrix24Client
from b24sms.bitrix24.errors import PortalBlocked
from b24sms.delivery import sweep
from b24sms.messages import record_status
from b24sms.models import (
    Message,
    MethodLimit,
    OutboxEntry,
    Portal,
    PortalPacing,
    PortalState,
    utcnow,
)
from b24sms.outbox import STATUS_UPDATE, flush_portal, outbox_backlog
from b24sms.queue import FLUSH_MARKER_GRACE
from tests.helpers import add_message, add_portal, build_service, load, outbox


@pytest.fixture
def make_svc(tmp_path, emulator):
    """Factory for a service whose Bitrix24 settings point at the emulator."""
    services = []

    def make(service: dict[str, Any] | None = None, bitrix24: dict[str, Any] | None = None):
        svc = build_service(
            tmp_path,
            service=service,
            bitrix24={"oauth_url": emulator.oauth_url, **(bitrix24 or {})},
        )
        services.append(svc)
        return svc

    yield make
    for svc in services:
        svc.close()


@pytest.fixture
def svc(make_svc):
    return make_svc()


@pytest.fixture
def portal(emulator):
    return emulator.add_portal()


@pytest.fixture
def portal_id(svc, portal):
    return add_portal(svc, portal)


def queue_statuses(
    svc, portal_id: int, portal: Any, statuses: list[str], count: int = 1
) -> list[int]:
    """``count`` messages, each given ``statuses`` in turn (not flushed yet)."""
    pks = [add_message(svc, portal_id, emulated=portal) for _ in range(count)]
    with svc.db.session() as session:
        for pk in pks:
            message = session.get(Message, pk)
            message.next_attempt_at = None
            for status in statuses:
                record_status(session, message, status, source="gateway")
    return pks


def emulated_statuses(svc, portal, pk: int) -> list[str]:
    message_id = load(svc, pk).message_id
    return [s["status"] for s in portal.messages[message_id]["statuses"]]


class SpyClient:
    """The real client, with a hook run before each batch."""

    def __init__(self, svc, portal_id: int, before_batch=None) -> None:
        self.inner = Bitrix24Client(svc.db, portal_id, settings=svc.config.bitrix24)
        self.before_batch = before_batch
        self.batches = 0

    def batch(self, commands, halt=False):
        self.batches += 1
        if self.before_batch is not None:
            self.before_batch(self.batches, commands)
        return self.inner.batch(commands, halt=halt)


def test_coalesced_newest_status_only_in_one_request(svc, portal, portal_id):
    pks = queue_statuses(svc, portal_id, portal, ["sent", "delivered"], count=3)
    report = flush_portal(svc, portal_id, hold=False)
    assert (report.requests, report.updates, report.delivered) == (1, 3, 3)
    assert report.remaining == 0 and report.retry_in is None
    for pk in pks:
        assert emulated_statuses(svc, portal, pk) == ["delivered"]
    assert portal.stats["batches"] == 1 and portal.stats["status_updates"] == 3


def test_a_newer_status_arriving_during_the_batch_is_kept_and_sent(svc, portal, portal_id):
    (pk,) = queue_statuses(svc, portal_id, portal, ["sent"])

    def deliver_meanwhile(n, commands):
        if n == 1:
            with svc.db.session() as session:
                record_status(session, session.get(Message, pk), "delivered", source="callback")

    report = flush_portal(svc, portal_id, SpyClient(svc, portal_id, deliver_meanwhile), hold=False)
    assert report.superseded == 1 and report.delivered == 1 and report.requests == 2
    assert emulated_statuses(svc, portal, pk) == ["sent", "delivered"]
    assert outbox(svc) == []


def test_message_not_found_is_dropped_the_rest_delivered(svc, portal, portal_id, caplog):
    (known,) = queue_statuses(svc, portal_id, portal, ["delivered"])
    (unknown,) = queue_statuses(svc, portal_id, portal, ["failed"])
    del portal.messages[load(svc, unknown).message_id]
    report = flush_portal(svc, portal_id, hold=False)
    assert report.delivered == 1 and report.dropped == 1
    assert report.errors == {"ERROR_MESSAGE_NOT_FOUND": 1}
    assert outbox(svc) == []
    assert emulated_statuses(svc, portal, known) == ["delivered"]
    assert "ERROR_MESSAGE_NOT_FOUND" in caplog.text


def test_transient_command_error_is_retried_later(svc, portal, portal_id):
    pks = queue_statuses(svc, portal_id, portal, ["delivered"], count=2)
    portal.inject(
        "INTERNAL_SERVER_ERROR", 500, count=1, methods=["messageservice.message.status.update"]
    )
    report = flush_portal(svc, portal_id, hold=False)
    assert report.retried == 1 and report.dropped == 0
    assert report.delivered + report.remaining == 2
    if report.remaining:
        # The retry's delay (full jitter, under 0.1 s in this config) had not passed before the
        # flush ended; on a loaded machine it may have, and the same flush sent it again.
        assert report.retry_in is not None and 0 < report.retry_in <= 1
        with svc.db.session() as session:
            entry = session.scalars(select(OutboxEntry)).one()
            assert entry.attempts == 1 and entry.not_before is not None
            assert "INTERNAL_SERVER_ERROR" in entry.last_error
        time.sleep(report.retry_in)
        again = flush_portal(svc, portal_id, hold=False)
        assert again.delivered == 1 and again.remaining == 0
    assert outbox(svc) == []
    assert [emulated_statuses(svc, portal, pk) for pk in pks] == [["delivered"]] * 2


def test_expired_token_mid_flush_is_refreshed_and_the_flush_completes(
    svc, portal, portal_id, emulator
):
    pks = queue_statuses(svc, portal_id, portal, ["delivered"], count=120)

    def expire_after_first(n, commands):
        if n == 2:
            portal.expire_tokens()

    client = SpyClient(svc, portal_id, expire_after_first)
    report = flush_portal(svc, portal_id, client, hold=False)
    assert report.requests == 3 and report.delivered == 120 and report.remaining == 0
    assert portal.stats["refreshes"] == 1
    assert portal.stats["status_updates"] == 120
    assert all(emulated_statuses(svc, portal, pk) == ["delivered"] for pk in pks)
    with svc.db.session() as session:
        assert session.get(Portal, portal_id).access_token == portal.access_token


def test_operation_time_limit_pauses_the_portal_until_reset(svc, portal, portal_id):
    queue_statuses(svc, portal_id, portal, ["delivered"], count=5)
    portal.inject("OPERATION_TIME_LIMIT", 429, count=1)
    report = flush_portal(svc, portal_id, hold=False)
    assert report.stopped == "paused" and report.delivered == 0 and report.remaining == 5
    assert report.errors == {"OPERATION_TIME_LIMIT": 1}
    assert 50 < report.retry_in <= 60  # no operating_reset_at in the answer: one minute
    with svc.db.session() as session:
        paused = session.get(Portal, portal_id).paused_until
        assert paused > utcnow() + dt.timedelta(seconds=50)
    # while paused nothing is sent
    assert flush_portal(svc, portal_id, hold=False).requests == 0
    with svc.db.session() as session:
        session.get(Portal, portal_id).paused_until = None
        # The batch method itself stays blocked until its reset, in every process.
        assert method_limits.wait_seconds(session, portal_id, "batch") > 50
        session.execute(delete(MethodLimit))
    assert flush_portal(svc, portal_id, hold=False).delivered == 5


def test_operation_time_limit_of_status_update_pauses_that_method_only(svc, portal, portal_id):
    # settings/performance/limits.md: each command inside a batch has its own budget; a 429
    # OPERATION_TIME_LIMIT blocks that method until its operating_reset_at, other methods go on.
    # The error tells no reset time: "for the first retry, refer to operating_reset_at from
    # the last successful response" of that method — here a single status.update whose budget
    # window the emulator shortens to 30 s (batch answers carry no operating fields).
    queue_statuses(svc, portal_id, portal, ["delivered"], count=5)
    portal.operating_window = 30.0
    client = Bitrix24Client(svc.db, portal_id, svc.config.bitrix24)
    message_id, record = next(iter(portal.messages.items()))
    client.call(STATUS_UPDATE, {"CODE": record["code"], "MESSAGE_ID": message_id, "STATUS": "sent"})
    portal.limit_method(STATUS_UPDATE, 30)
    report = flush_portal(svc, portal_id, client, hold=False)
    assert report.requests == 1 and report.delivered == 0 and report.remaining == 5
    assert report.errors == {"OPERATION_TIME_LIMIT": 5}
    with svc.db.session() as session:
        assert 25 < method_limits.wait_seconds(session, portal_id, STATUS_UPDATE) <= 31
        assert session.get(Portal, portal_id).paused_until is None  # the portal is not paused
        # entries due again: only the method's block holds the flush back
        for entry in session.scalars(select(OutboxEntry)):
            entry.not_before = None
    again = flush_portal(svc, portal_id, hold=False)
    assert again.requests == 0 and again.remaining == 5 and 25 < again.retry_in <= 31
    # Another method of the same portal is called as usual.
    assert client.call("app.info")["STATUS"] == "L"
    portal.method_blocks.clear()
    with svc.db.session() as session:
        session.execute(delete(MethodLimit))
    assert flush_portal(svc, portal_id, hold=False).delivered == 5


def test_query_limit_exceeded_pauses_briefly_and_retries(svc, portal, portal_id):
    queue_statuses(svc, portal_id, portal, ["delivered"], count=5)
    portal.inject("QUERY_LIMIT_EXCEEDED", 503, count=1)
    started = time.monotonic()
    report = flush_portal(svc, portal_id, hold=False)
    assert report.delivered == 5 and report.requests == 2
    assert report.errors == {"QUERY_LIMIT_EXCEEDED": 1}
    assert time.monotonic() - started >= 0.9


def test_revoked_tokens_stop_calls_and_keep_the_work(svc, portal, portal_id):
    queue_statuses(svc, portal_id, portal, ["delivered"], count=3)
    portal.revoke_tokens()
    report = flush_portal(svc, portal_id, hold=False)
    assert report.stopped == "inactive" and report.retry_in is None and report.remaining == 3
    with svc.db.session() as session:
        assert session.get(Portal, portal_id).state == PortalState.NEEDS_REINSTALL
    requests = portal.stats["requests"]
    again = flush_portal(svc, portal_id, hold=False)
    assert again.requests == 0 and again.stopped == "inactive"
    assert portal.stats["requests"] == requests
    # the sweep leaves an inactive portal alone too
    assert sweep(svc).flushes == ()


def test_invalid_client_keeps_the_portal_and_the_outbox_retries(svc, portal, portal_id):
    # settings/oauth/error-codes.md: invalid_client -> "Check client_id and client_secret".
    # Our config, not the portal: the outbox waits with backoff, nothing is marked or lost.
    queue_statuses(svc, portal_id, portal, ["delivered"], count=3)
    portal.expire_tokens()
    wrong = replace(svc.config.bitrix24, client_secret="not-the-secret")
    client = Bitrix24Client(svc.db, portal_id, wrong)
    report = flush_portal(svc, portal_id, client, hold=False)
    assert report.errors == {"invalid_client": 1} and report.remaining == 3
    assert report.stopped == "paused" and report.retry_in is not None and report.retry_in > 0
    with svc.db.session() as session:
        row = session.get(Portal, portal_id)
        assert row.state == PortalState.ACTIVE and row.refresh_token == portal.refresh_token
        assert "invalid_client" in row.last_error
        row.paused_until = None  # the backoff has passed; the operator fixed the config
    fixed = flush_portal(svc, portal_id, hold=False)
    assert fixed.delivered == 3 and fixed.remaining == 0


def test_overload_limit_pauses_with_backoff_until_bitrix24_answers(svc, portal, portal_id):
    # _includes/system-errors.md: OVERLOAD_LIMIT and PORTAL_DELETED are lifted by support or an
    # administrator: a pause (10 minutes, then longer), not a block for good.
    queue_statuses(svc, portal_id, portal, ["delivered"], count=3)
    portal.inject("OVERLOAD_LIMIT", 503)
    report = flush_portal(svc, portal_id, hold=False)
    assert report.errors == {"OVERLOAD_LIMIT": 1} and report.remaining == 3
    assert 590 < report.retry_in <= 600
    with svc.db.session() as session:
        row = session.get(Portal, portal_id)
        assert row.state == PortalState.ACTIVE
        assert row.last_error.startswith("paused until") and "OVERLOAD_LIMIT" in row.last_error
    requests = portal.stats["requests"]
    assert flush_portal(svc, portal_id, hold=False).requests == 0
    # Every process obeys: a client refuses without a request while the pause lasts.
    client = Bitrix24Client(svc.db, portal_id, svc.config.bitrix24)
    with pytest.raises(PortalBlocked):
        client.call("app.info")
    assert portal.stats["requests"] == requests

    def time_passes(blocked_for: dt.timedelta) -> None:
        # The pause ended; the portal has been refusing since ``blocked_for`` ago.
        with svc.db.session() as session:
            session.get(Portal, portal_id).paused_until = None
            for row in session.scalars(select(MethodLimit)):
                row.blocked_until = utcnow() - (
                    blocked_for if row.method.endswith("since") else dt.timedelta(seconds=1)
                )

    time_passes(dt.timedelta(hours=1))
    portal.inject("PORTAL_DELETED", 500)
    again = flush_portal(svc, portal_id, hold=False)
    assert again.errors == {"PORTAL_DELETED": 1}
    assert 3590 < again.retry_in <= 3605  # backoff: as long as it has been refusing
    time_passes(dt.timedelta(hours=2))
    done = flush_portal(svc, portal_id, hold=False)
    assert done.delivered == 3 and done.remaining == 0
    with svc.db.session() as session:
        row = session.get(Portal, portal_id)
        assert row.last_error is None and row.state == PortalState.ACTIVE
        assert method_limits.portal_pause(session, portal_id) is None


@pytest.mark.slow
def test_pacing_keeps_under_a_small_bucket(make_svc, emulator):
    svc = make_svc(bitrix24={"requests_per_second": 5, "burst": 4})
    portal = emulator.add_portal()
    portal.requests_per_second, portal.burst = 5, 4
    portal_id = add_portal(svc, portal)
    queue_statuses(svc, portal_id, portal, ["delivered"], count=400)
    started = time.monotonic()
    report = flush_portal(svc, portal_id, hold=False)
    elapsed = time.monotonic() - started
    assert report.delivered == 400 and report.requests == 8
    assert portal.stats["rejected_rate_limit"] == 0
    # 3 at once (a slice of the burst left for others), then one per 1/5 s
    assert elapsed >= 0.9


def test_one_flusher_per_portal(svc, portal, portal_id):
    queue_statuses(svc, portal_id, portal, ["delivered"], count=2)
    with svc.db.session() as session:
        session.add(
            PortalPacing(
                portal_id=portal_id,
                bucket_level=0.0,
                failures=0,
                lease_owner=f"elsewhere:{os.getpid()}:1:abc",
                lease_until=utcnow() + dt.timedelta(seconds=60),
            )
        )
    report = flush_portal(svc, portal_id, hold=False)
    assert report.stopped == "locked" and report.retry_in and report.requests == 0
    # a holder on this machine whose process is gone loses the lease at once
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    with svc.db.session() as session:
        session.get(PortalPacing, portal_id).lease_owner = f"{socket.gethostname()}:{dead.pid}:1:x"
    report = flush_portal(svc, portal_id, hold=False)
    assert report.delivered == 2
    with svc.db.session() as session:
        assert session.get(PortalPacing, portal_id).lease_owner is None


def test_sweep_flushes_a_backlog_nobody_asked_for(svc, portal, portal_id):
    pks = queue_statuses(svc, portal_id, portal, ["delivered"], count=4)
    with svc.db.session() as session:
        assert outbox_backlog(session) == {portal_id: 4}
    report = sweep(svc)
    assert report.flushes == (portal_id,)
    with svc.db.session() as session:
        assert outbox_backlog(session) == {}
    assert all(emulated_statuses(svc, portal, pk) == ["delivered"] for pk in pks)


def test_flush_requests_are_deduplicated_until_the_flush_starts(make_svc, tmp_path, portal):
    svc = make_svc(service={"queue_url": f"sqlite:///{tmp_path}/queue.sqlite3"})
    queue = svc.queue
    assert queue.enqueue_flush(7) is True
    assert queue.enqueue_flush(7) is False
    assert queue.enqueue_flush(8) is True
    assert queue.huey.pending_count() == 2  # delayed tasks wait in the queue
    # a paused portal's flush holds back requests until the pause ends; a wake-up does not
    assert queue.enqueue_flush(9, delay=120) is True
    assert queue.enqueue_flush(9) is False
    assert queue.enqueue_flush(9, delay=60, coalesce=False) is True
    assert queue.huey.pending_count() == 4
    # a marker whose flush never started is stale
    queue.huey.put("flush-pending:7", time.time() - FLUSH_MARKER_GRACE - 1)
    assert queue.enqueue_flush(7) is True
    queue.ping()


@pytest.mark.slow
def test_burst_of_500_through_an_embedded_consumer(make_svc, tmp_path, emulator):
    svc = make_svc(service={"queue_url": f"sqlite:///{tmp_path}/queue.sqlite3"})
    portal = emulator.add_portal()
    portal_id = add_portal(svc, portal)
    pks = [add_message(svc, portal_id, emulated=portal) for _ in range(500)]
    consumer = svc.queue.start_embedded(workers=4)
    try:
        for pk in pks:
            svc.queue.enqueue_send(pk)
        ids = [load(svc, pk).message_id for pk in pks]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if all(portal.final_status(mid) == "delivered" for mid in ids):
                break
            time.sleep(0.2)
    finally:
        consumer.stop()
    stats = portal.stats_snapshot()
    assert all(portal.final_status(mid) == "delivered" for mid in ids)
    per_request = stats["status_updates"] / stats["batches"]
    print(
        f"embedded burst: {stats['status_updates']} updates in {stats['batches']} batches "
        f"({per_request:.1f}/request), {stats['rejected_rate_limit']} rejected"
    )
    assert stats["rejected_rate_limit"] == 0
    assert per_request >= 40
    with svc.db.session() as session:
        assert outbox_backlog(session) == {}
