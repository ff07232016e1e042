"""Statuses only move forward, whatever order and however often gateways report them."""

from __future__ import annotations

import itertools
import logging
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from b24sms.delivery import apply_reports
from b24sms.gateway import SendResult, StatusReport
from b24sms.models import Message, PortalState
from b24sms.statuses import FINAL_STATUSES, STATUSES, moves_forward
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
def svc(tmp_path, recorder):
    service = build_service(tmp_path, recorder=recorder)
    yield service
    service.close()


@pytest.fixture
def portal_id(svc) -> int:
    return add_portal(svc, state=PortalState.UNINSTALLED)


def sent_message(svc, portal_id, external_id: str = "ext-1") -> int:
    """A message the gateway accepted (status sent, waiting for callbacks)."""
    gateway(svc).script = [SendResult(external_id=external_id, raw_status="accepted")]
    pk = add_message(svc, portal_id)
    svc.queue.enqueue_send(pk)
    assert load(svc, pk).status == "sent"
    return pk


def test_out_of_order_reports_never_move_back(svc, portal_id, recorder):
    pk = sent_message(svc, portal_id)
    assert apply_reports(svc, CODE, [StatusReport("DELIVRD", external_id="ext-1")]) == 1
    # late reports: an earlier stage, and another final word
    apply_reports(
        svc,
        CODE,
        [
            StatusReport("accepted", external_id="ext-1"),
            StatusReport("queued", external_id="ext-1"),
            StatusReport("UNDELIV", external_id="ext-1"),
        ],
    )
    message = load(svc, pk)
    assert message.status == "delivered"
    assert message.raw_status == "DELIVRD"
    assert history(svc, pk) == [
        ("sent", "gateway", True),
        ("delivered", "callback", True),
        ("sent", "callback", False),
        ("queued", "callback", False),
        ("undelivered", "callback", False),
    ]
    assert [c[2] for c in recorder.changes] == ["sent", "delivered"]  # hooks: applied only
    assert outbox(svc) == [(pk, "delivered", 2)]


def test_duplicate_reports_are_recorded_once_applied(svc, portal_id, recorder):
    pk = sent_message(svc, portal_id)
    for _ in range(3):
        apply_reports(svc, CODE, [StatusReport("DELIVRD", external_id="ext-1")])
    assert load(svc, pk).status == "delivered"
    assert [a for s, _, a in history(svc, pk) if s == "delivered"] == [True, False, False]
    assert [c[2] for c in recorder.changes].count("delivered") == 1


def test_failed_report_keeps_the_gateways_error(svc, portal_id):
    pk = sent_message(svc, portal_id)
    apply_reports(svc, CODE, [StatusReport("REJECTD", external_id="ext-1", error="30007")])
    message = load(svc, pk)
    assert message.status == "failed" and message.last_error == "30007"


def test_unknown_external_id_and_unknown_word_are_ignored(svc, portal_id, caplog):
    pk = sent_message(svc, portal_id)
    with caplog.at_level(logging.WARNING, logger="b24sms.delivery"):
        assert apply_reports(svc, CODE, [StatusReport("DELIVRD", external_id="nope")]) == 0
        assert apply_reports(svc, CODE, [StatusReport("BANANA", external_id="ext-1")]) == 0
    assert "unknown external id nope" in caplog.text and "BANANA" in caplog.text
    assert load(svc, pk).status == "sent"
    assert len(history(svc, pk)) == 1


def test_a_callback_that_overtakes_the_send_answer_still_applies(svc, portal_id):
    # The gateway posts its delivery report before send() has returned the external id.
    arrived = threading.Event()
    results: list[int] = []

    def slow_send(message):
        worker = threading.Thread(
            target=lambda: results.append(
                apply_reports(svc, CODE, [StatusReport("DELIVRD", external_id="early-1")])
            )
        )
        worker.start()
        time.sleep(0.3)  # the callback is already waiting for us
        arrived.set()
        return SendResult(external_id="early-1", raw_status="accepted")

    gateway(svc).script = [slow_send]
    pk = add_message(svc, portal_id)
    svc.queue.enqueue_send(pk)
    assert arrived.is_set()
    deadline = time.monotonic() + 5
    while not results and time.monotonic() < deadline:
        time.sleep(0.02)
    assert results == [1]
    assert load(svc, pk).status == "delivered"


def test_poll_source_and_explicit_status(svc, portal_id):
    pk = sent_message(svc, portal_id)
    apply_reports(
        svc,
        CODE,
        [StatusReport("whatever", external_id="ext-1", status="undelivered")],
        source="poll",
    )
    assert load(svc, pk).status == "undelivered"
    assert history(svc, pk)[-1] == ("undelivered", "poll", True)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    reports=st.lists(
        st.sampled_from(["queued", "sent", "delivered", "undelivered", "failed"]),
        min_size=1,
        max_size=8,
    )
)
def test_any_sequence_of_reports_only_moves_forward(svc, portal_id, reports):
    pk = add_message(svc, portal_id)
    external_id = f"hyp-{pk}"
    with svc.db.session() as session:
        message = session.get(Message, pk)
        message.external_id, message.next_attempt_at = external_id, None
    seen = ["queued"]
    for word in reports:
        apply_reports(svc, CODE, [StatusReport(word, external_id=external_id, status=word)])
        seen.append(load(svc, pk).status)
    order = {s: i for i, s in enumerate(STATUSES)}
    rank = {s: (2 if s in FINAL_STATUSES else order[s]) for s in STATUSES}
    for before, after in itertools.pairwise(seen):
        assert before == after or moves_forward(before, after)
        assert rank[after] >= rank[before]
    finals = [s for s in reports if s in FINAL_STATUSES]
    if finals:
        assert seen[-1] == finals[0]  # the first final word wins


def test_the_status_groups_are_defined_once_and_cover_every_status():
    from b24sms.statuses import ACCEPTED_STATUSES, IN_FLIGHT_STATUSES

    assert set(STATUSES) == IN_FLIGHT_STATUSES | FINAL_STATUSES
    assert not IN_FLIGHT_STATUSES & FINAL_STATUSES
    # "failed" can be decided before any send, so it alone does not say a gateway took it
    assert set(STATUSES) - {"queued", "failed"} == ACCEPTED_STATUSES
