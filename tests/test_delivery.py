"""Sending through gateways: attempts, retries with backoff, permanent errors, the sweep.

Immediate mode (``memory://``): tasks run inline, so each test reads the outcome right after
enqueueing. The helpers (a scripted gateway, an event recorder, a service factory, rows) live in
``tests/helpers.py``, shared with the other delivery-engine test modules.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import time
from collections.abc import Iterator

import pytest

from b24sms.delivery import deliver, retry_delay, sweep
from b24sms.gateway import (
    PermanentGatewayError,
    RetryableGatewayError,
    SendResult,
)
from b24sms.models import (
    Message,
    PortalState,
    utcnow,
)
from b24sms.service import Service
from tests.helpers import (
    CODE,
    Recorder,
    add_message,
    add_portal,
    build_service,
    gateway,
    history,
    load,
    outbox,
)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def svc(tmp_path, recorder) -> Iterator[Service]:
    service = build_service(tmp_path, recorder=recorder)
    yield service
    service.close()


@pytest.fixture
def portal_id(svc) -> int:
    # Not active: these tests look at the outbox; nothing calls Bitrix24.
    return add_portal(svc, state=PortalState.UNINSTALLED)


# -- the tests ----------------------------------------------------------------------------------


def test_success_records_external_id_statuses_and_outbox(svc, portal_id, recorder):
    pk = add_message(svc, portal_id)
    svc.queue.enqueue_send(pk)
    message = load(svc, pk)
    assert message.status == "delivered"
    assert message.attempts == 1
    assert message.external_id == f"ext-{pk}"
    assert message.sending_since is None and message.next_attempt_at is None
    assert history(svc, pk) == [("sent", "gateway", True), ("delivered", "gateway", True)]
    # coalesced: one outbox row with the newest status, written once for the whole send
    assert outbox(svc) == [(pk, "delivered", 1)]
    assert recorder.changes == [
        (pk, "queued", "sent", "gateway"),
        (pk, "sent", "delivered", "gateway"),
    ]
    sent = gateway(svc).calls[0]
    assert sent.callback_url.endswith(f"/gateways/{CODE}/callback")
    assert sent.to == "+14155550100" and sent.attempt == 1


def test_fails_twice_then_succeeds_ends_delivered_with_three_attempts(svc, portal_id, recorder):
    gateway(svc).script = [
        RetryableGatewayError("timeout"),
        RetryableGatewayError("HTTP 503", code="503"),
    ]
    pk = add_message(svc, portal_id)
    svc.queue.enqueue_send(pk)
    svc.queue.drain(max_wait=5)
    message = load(svc, pk)
    assert message.status == "delivered"
    assert message.attempts == 3
    assert message.last_error == "503: HTTP 503"
    assert [c.attempt for c in gateway(svc).calls] == [1, 2, 3]
    assert [(f[2], f[3]) for f in recorder.failures] == [(True, 1), (True, 2)]


def test_permanent_error_fails_at_once(svc, portal_id, recorder):
    gateway(svc).script = [PermanentGatewayError("number is blacklisted", code="21610")]
    pk = add_message(svc, portal_id)
    svc.queue.enqueue_send(pk)
    svc.queue.drain(max_wait=5)
    message = load(svc, pk)
    assert message.status == "failed"
    assert message.attempts == 1
    assert message.last_error == "21610: number is blacklisted"
    assert len(gateway(svc).calls) == 1
    assert recorder.failures[0][2] is False
    assert outbox(svc) == [(pk, "failed", 1)]


def test_retry_limit_ends_failed(svc, portal_id, recorder):
    gateway(svc).script = [RetryableGatewayError(f"down {i}") for i in range(10)]
    pk = add_message(svc, portal_id)
    svc.queue.enqueue_send(pk)
    svc.queue.drain(max_wait=5)
    message = load(svc, pk)
    assert message.status == "failed"
    assert message.attempts == 5  # max_attempts
    assert message.last_error == "down 4"
    assert [f[2] for f in recorder.failures] == [True, True, True, True, False]


def test_retry_after_is_honoured_and_waits_for_its_time(svc, portal_id):
    gateway(svc).script = [RetryableGatewayError("slow down", retry_after=30)]
    pk = add_message(svc, portal_id)
    before = utcnow()
    svc.queue.enqueue_send(pk)
    message = load(svc, pk)
    assert message.status == "queued" and message.attempts == 1
    assert message.next_attempt_at >= before + dt.timedelta(seconds=29)
    # the retry task waits in the immediate queue; run early, deliver declines: not due
    assert svc.queue.pending_inline() == 1
    outcome = deliver(svc, pk)
    assert outcome.action == "skipped" and outcome.detail == "not due"
    assert len(gateway(svc).calls) == 1


def test_retry_delay_full_jitter_with_cap_and_floor():
    rng = random.Random(7)
    delays = [retry_delay(n, 2.0, 600.0, rng=rng) for n in range(1, 12)]
    for n, delay in enumerate(delays, start=1):
        assert 0 <= delay <= min(600.0, 2.0 * 2 ** (n - 1))
    assert retry_delay(1, 2.0, 600.0, retry_after=900, rng=rng) == 900
    assert retry_delay(100, 2.0, 5.0, rng=rng) <= 5.0


def test_unparseable_number_fails_without_calling_the_gateway(svc, portal_id):
    pk = add_message(svc, portal_id, to=None)
    svc.queue.enqueue_send(pk)
    message = load(svc, pk)
    assert message.status == "failed"
    assert "could not be parsed" in message.last_error
    assert gateway(svc).calls == []


def test_code_without_gateway_fails_with_clear_error(svc, portal_id):
    pk = add_message(svc, portal_id, code="removed-code")
    svc.queue.enqueue_send(pk)
    message = load(svc, pk)
    assert message.status == "failed"
    assert "'removed-code'" in message.last_error and "no gateway" in message.last_error


def test_unexpected_exception_is_retried_and_logged(svc, portal_id, caplog):
    gateway(svc).script = [ZeroDivisionError("boom")]
    pk = add_message(svc, portal_id)
    with caplog.at_level(logging.ERROR, logger="b24sms.delivery"):
        svc.queue.enqueue_send(pk)
        svc.queue.drain(max_wait=5)
    message = load(svc, pk)
    assert message.status == "delivered" and message.attempts == 2
    assert any(r.exc_info and r.exc_info[0] is ZeroDivisionError for r in caplog.records)


def test_unknown_gateway_status_is_ignored_not_guessed(svc, portal_id, caplog):
    gateway(svc).script = [SendResult(external_id="x1", raw_status="WEIRD")]
    pk = add_message(svc, portal_id)
    with caplog.at_level(logging.WARNING, logger="b24sms.delivery"):
        svc.queue.enqueue_send(pk)
    message = load(svc, pk)
    assert message.status == "queued"
    assert message.external_id == "x1" and message.next_attempt_at is None
    assert "WEIRD" in caplog.text
    # handed to the gateway: a second trigger sends nothing
    assert deliver(svc, pk).detail == "handed to the gateway"


def test_secrets_and_bodies_stay_out_of_logs(svc, portal_id, caplog):
    gateway(svc).script = [RetryableGatewayError("down")]
    pk = add_message(svc, portal_id)
    with caplog.at_level(logging.DEBUG):
        svc.queue.enqueue_send(pk)
        svc.queue.drain(max_wait=5)
    assert load(svc, pk).status == "delivered"
    assert "secret body text" not in caplog.text
    assert "a" * 70 not in caplog.text


def test_final_and_in_flight_messages_are_skipped(svc, portal_id):
    pk = add_message(svc, portal_id)
    with svc.db.session() as session:
        session.get(Message, pk).sending_since = utcnow()
    assert deliver(svc, pk).detail == "in flight"
    svc.queue.enqueue_send(pk)
    assert gateway(svc).calls == []
    with svc.db.session() as session:
        message = session.get(Message, pk)
        message.sending_since = None
        message.status = "delivered"
    assert deliver(svc, pk).detail == "already delivered"
    assert gateway(svc).calls == []


def test_sweep_requeues_lost_and_stuck_messages(tmp_path, recorder):
    svc = build_service(tmp_path, service={"stuck_after": 5}, recorder=recorder)
    try:
        portal_id = add_portal(svc, state=PortalState.UNINSTALLED)
        lost = add_message(svc, portal_id)
        stuck = add_message(svc, portal_id)
        fresh = add_message(svc, portal_id)
        long_ago = utcnow() - dt.timedelta(seconds=60)
        with svc.db.session() as session:
            session.get(Message, lost).next_attempt_at = long_ago
            m = session.get(Message, stuck)
            m.sending_since, m.attempts = long_ago, 1
            session.get(Message, fresh).sending_since = utcnow()  # in flight elsewhere
        report = sweep(svc)
        assert set(report.requeued) == {lost} and set(report.stuck) == {stuck}
        assert load(svc, lost).status == "delivered"
        assert load(svc, stuck).status == "delivered"
        assert load(svc, stuck).attempts == 2  # the cut-short attempt counts
        assert load(svc, fresh).status == "queued"
        assert len(gateway(svc).calls) == 2
    finally:
        svc.close()


def test_sweep_fails_a_message_whose_attempts_ran_out(tmp_path):
    svc = build_service(tmp_path, service={"stuck_after": 5, "max_attempts": 2})
    try:
        portal_id = add_portal(svc, state=PortalState.UNINSTALLED)
        pk = add_message(svc, portal_id)
        with svc.db.session() as session:
            m = session.get(Message, pk)
            m.sending_since, m.attempts = utcnow() - dt.timedelta(seconds=60), 2
        sweep(svc)
        message = load(svc, pk)
        assert message.status == "failed" and "gave up after 2 attempts" in message.last_error
        assert gateway(svc).calls == []
    finally:
        svc.close()


def test_a_flush_enqueued_from_inside_a_send_runs_after_it(svc, portal_id):
    # Immediate mode must neither recurse nor lose the flush a send asks for.
    pks = [add_message(svc, portal_id) for _ in range(3)]
    for pk in pks:
        svc.queue.enqueue_send(pk)
    assert [load(svc, pk).status for pk in pks] == ["delivered"] * 3
    assert svc.queue.pending_inline() == 0


# -- the queue's stores --------------------------------------------------------------------------


def test_queue_url_selects_the_store(tmp_path):
    from huey import MemoryHuey, PostgresHuey, RedisHuey, SqliteHuey

    from b24sms.queue import QueueError, make_huey

    assert isinstance(make_huey("memory://"), MemoryHuey)
    assert make_huey("memory://").immediate
    sqlite = make_huey(f"sqlite:///{tmp_path}/sub/dir/queue.sqlite3")
    assert isinstance(sqlite, SqliteHuey) and (tmp_path / "sub" / "dir").is_dir()
    # neither connects when built: a store that is down must not stop the service starting
    assert isinstance(make_huey("postgresql://nobody@127.0.0.1:1/none"), PostgresHuey)
    assert isinstance(make_huey("postgresql+psycopg://nobody@127.0.0.1:1/none"), PostgresHuey)
    assert isinstance(make_huey("redis://127.0.0.1:1/0"), RedisHuey)
    with pytest.raises(QueueError):
        make_huey("amqp://x")


def test_ping_raises_when_the_store_is_down(tmp_path):
    import redis

    svc = build_service(tmp_path, service={"queue_url": "redis://127.0.0.1:1/0"})
    try:
        with pytest.raises(redis.exceptions.ConnectionError):
            svc.queue.ping()
        assert svc.queue.describe() == "redis://127.0.0.1:1/0"
    finally:
        svc.close()


def test_the_queue_is_described_without_credentials(tmp_path):
    url = "redis://:pw-in-userinfo@127.0.0.1:1/0?password=pw-in-query"
    svc = build_service(tmp_path, service={"queue_url": url})
    try:
        assert svc.queue.describe() == "redis://127.0.0.1:1/0?password=***"
    finally:
        svc.close()


def test_memory_queue_has_no_consumer(svc):
    from b24sms.queue import QueueError

    with pytest.raises(QueueError, match="memory://"):
        svc.queue.run_consumer(workers=1)
    handle = svc.queue.start_embedded(2)
    assert not handle.running
    handle.stop()


@pytest.mark.parametrize(
    "store",
    [
        "sqlite",
        pytest.param("postgresql", marks=pytest.mark.deployment),
        pytest.param("redis", marks=pytest.mark.deployment),
    ],
)
def test_embedded_consumer_delivers_on_every_store(tmp_path, store, request):
    """PostgreSQL and Redis: a scratch database and a queue name of this module's own (the
    conftest fixtures; skipped with the reason when the server is not running)."""
    url = {
        "sqlite": lambda: f"sqlite:///{tmp_path}/queue.sqlite3",
        "postgresql": lambda: request.getfixturevalue("postgres_url"),
        "redis": lambda: request.getfixturevalue("redis_url"),
    }[store]()
    svc = build_service(tmp_path, service={"queue_url": url})
    handle = None
    try:
        svc.queue.ping()
        svc.queue.huey.flush()  # leftovers of an earlier run would name rows of another database
        portal_id = add_portal(svc, state=PortalState.UNINSTALLED)
        pks = [add_message(svc, portal_id) for _ in range(3)]
        handle = svc.queue.start_embedded(workers=2)
        for pk in pks:
            svc.queue.enqueue_send(pk)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if all(load(svc, pk).status == "delivered" for pk in pks):
                break
            time.sleep(0.05)
        assert [load(svc, pk).status for pk in pks] == ["delivered"] * 3
    finally:
        if handle is not None:
            handle.stop()
        svc.queue.huey.flush()
        svc.close()


def test_a_large_send_batch_is_handed_on_in_chunks_for_other_threads(tmp_path):
    """A HANDLER batch is one send_messages task; the worker that takes it sends SEND_CHUNK
    itself and hands the rest on, so a slow gateway's sends run on many threads at once."""
    from b24sms.queue import SEND_CHUNK

    svc = build_service(tmp_path, service={"queue_url": f"sqlite:///{tmp_path}/queue.sqlite3"})
    try:
        portal_id = add_portal(svc, state=PortalState.UNINSTALLED)
        pks = [add_message(svc, portal_id) for _ in range(2 * SEND_CHUNK + 2)]
        huey = svc.queue.huey

        def sends_pending() -> list[list[int]]:
            return [task.args[0] for task in huey.pending() if task.name == "send_messages"]

        svc.queue.enqueue_sends(pks)
        assert sends_pending() == [pks]  # what the web process wrote: one task

        huey.execute(huey.dequeue())
        sent_here = [pk for pk in pks if load(svc, pk).status == "delivered"]
        assert sent_here == pks[:SEND_CHUNK]
        # The rest wait as two tasks, for any thread of any worker.
        assert sends_pending() == [pks[SEND_CHUNK : 2 * SEND_CHUNK], pks[2 * SEND_CHUNK :]]
        while (task := huey.dequeue()) is not None:
            huey.execute(task)
        assert [load(svc, pk).status for pk in pks] == ["delivered"] * len(pks)
    finally:
        svc.queue.huey.flush()
        svc.close()
