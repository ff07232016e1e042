"""ONAPPPAYMENT proves nothing (it carries no application_token, on-app-payment.md), so a flood
of it must cost next to nothing: reconciles are coalesced per portal, spaced, and run below sends.
"""

from __future__ import annotations

import datetime as dt
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from sqlalchemy import update

from b24sms.models import Portal
from b24sms.testing.service import portal_statuses
from b24sms.web.bitrix24 import PAYMENT_RECONCILE_SPACING

FLOOD = 300


def first_status_after(portal, code: str = "smslog", timeout: float = 30.0) -> float:
    """Seconds from a HANDLER call until the portal hears the first status of that message."""
    start = time.monotonic()
    message_id, response = portal.send_sms(code, "+14155550100", "flood check")
    assert response.status_code == 200, response.text
    while not portal_statuses(portal, message_id):
        assert time.monotonic() - start < timeout, f"no status for {message_id} in {timeout}s"
        time.sleep(0.01)
    return time.monotonic() - start


def payment_fields(portal) -> dict[str, str]:
    """An ONAPPPAYMENT as anyone can post it: the portal's public member_id, no proof."""
    return {
        "event": "ONAPPPAYMENT",
        "data[CODE]": "whatever",
        "data[STATUS]": "P",
        "data[DAYS]": "30",
        "ts": str(int(time.time())),
        "auth[domain]": portal.domain,
        "auth[member_id]": portal.member_id,
    }


def reconcile_tasks(huey) -> list:
    """The reconcile_portal tasks in the queue: waiting, or delayed (in the queue with an eta
    until a consumer moves them to its schedule)."""
    tasks = list(huey.pending()) + list(huey.scheduled())
    return [task for task in tasks if task.name == "reconcile_portal"]


def queued_reconciles(huey) -> int:
    # by id: a consumer moving a delayed task from the queue to its schedule between the two
    # reads would show it twice
    return len({task.id for task in reconcile_tasks(huey)})


def age_reconcile(svc, portal, seconds: float) -> None:
    """Make the portal's last reconcile ``seconds`` old (as if it happened then)."""
    at = dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(seconds=seconds)
    with svc.db.session() as session:
        session.execute(
            update(Portal).where(Portal.member_id == portal.member_id).values(reconciled_at=at)
        )


@pytest.mark.slow
def test_payment_flood_neither_delays_other_portals_nor_queues_reconciles(
    live_app, emulator, tmp_path
):
    # The periodic reconcile off: it would also take the (aged, so due) portal now and then, and
    # the count below is about what the flood queues.
    server = live_app(
        service={"queue_url": f"sqlite:///{tmp_path}/queue.sqlite3"},
        bitrix24={"reconcile_interval": 0},
    )
    svc = server.app.extensions["b24sms"]
    # One worker thread: what the flood queues competes with the other portal's send directly.
    consumer = svc.queue.start_embedded(workers=1)
    try:
        target = emulator.add_portal()
        target.app_status = "T"  # on trial: ONAPPPAYMENT is bound to us
        assert target.install(server.url).status_code == 200
        other = server.add_portal()
        quiet = statistics.median(first_status_after(other) for _ in range(3))

        age_reconcile(svc, target, 3600)  # due: the first event may reconcile at once
        # A slow portal, as a real one across the internet: each reconcile holds a worker.
        target.rest_delays["batch"] = 0.25
        app_info_before = target.stats_snapshot()["methods"]["app.info"]
        url = server.url + "/bitrix24/events"
        with ThreadPoolExecutor(8) as pool:
            codes = list(
                pool.map(
                    lambda _: requests.post(url, data=payment_fields(target), timeout=30),
                    range(FLOOD),
                )
            )
        assert {r.status_code for r in codes} == {200}, codes[0].text
        flooded = first_status_after(other)

        ran = target.stats_snapshot()["methods"]["app.info"] - app_info_before
        waiting = queued_reconciles(svc.queue.huey)
        assert ran + waiting <= 2 and waiting <= 1, (ran, waiting)
        assert flooded <= 4 * quiet, (
            f"first status {flooded:.2f}s after the flood, {quiet:.2f}s quiet"
        )
    finally:
        consumer.stop()


def test_payment_soon_after_a_reconcile_waits_for_the_spacing(live_app, emulator, tmp_path):
    # A queue without a consumer: what the events ask for stays visible in it.
    server = live_app(service={"queue_url": f"sqlite:///{tmp_path}/queue.sqlite3"})
    svc = server.app.extensions["b24sms"]
    portal = emulator.add_portal()
    portal.app_status = "T"
    assert portal.install(server.url).status_code == 200  # the install reconciled it just now

    for _ in range(20):
        response = portal.pay()
        assert response is not None and response.status_code == 200, response.text
    assert queued_reconciles(svc.queue.huey) == 1
    # Not dropped: a real payment is read from app.info once the spacing is up.
    (task,) = reconcile_tasks(svc.queue.huey)
    wait = (task.eta - dt.datetime.now(dt.UTC).replace(tzinfo=None)).total_seconds()
    assert PAYMENT_RECONCILE_SPACING - 30 < wait <= PAYMENT_RECONCILE_SPACING


def test_reconcile_runs_below_sends(tmp_path):
    from tests.helpers import build_service

    svc = build_service(tmp_path, service={"queue_url": f"sqlite:///{tmp_path}/queue.sqlite3"})
    try:
        svc.queue.enqueue_reconcile(1)
        svc.queue.enqueue_send(7)
        svc.queue.enqueue_reconcile(2)  # coalesced per portal, not across portals
        assert svc.queue.enqueue_reconcile(1) is False
        order = [svc.queue.huey.dequeue() for _ in range(3)]
        assert [task.name for task in order] == [
            "send_message",
            "reconcile_portal",
            "reconcile_portal",
        ]
        assert svc.queue.huey.dequeue() is None
    finally:
        svc.close()


def test_a_reconcile_marker_of_a_lost_task_is_replaced(tmp_path):
    from b24sms.queue import RECONCILE_MARKER_GRACE
    from tests.helpers import build_service

    svc = build_service(tmp_path, service={"queue_url": f"sqlite:///{tmp_path}/queue.sqlite3"})
    try:
        huey = svc.queue.huey
        assert svc.queue.enqueue_reconcile(3) is True
        assert huey.dequeue().name == "reconcile_portal"  # taken, then lost with its worker
        assert svc.queue.enqueue_reconcile(3) is False  # the marker still says "pending"
        huey.put("reconcile-pending:3", time.time() - RECONCILE_MARKER_GRACE - 1)
        assert svc.queue.enqueue_reconcile(3) is True
        assert queued_reconciles(huey) == 1
    finally:
        svc.close()
