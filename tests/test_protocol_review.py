"""The points a check of our conformance table against bitrix24/b24restdocs found, each through
the emulator over real sockets (docs/bitrix24.md names the page for each)."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace

import pytest
from sqlalchemy import select, update

from b24sms.bitrix24.client import Bitrix24Client
from b24sms.bitrix24.errors import TransientError
from b24sms.models import Message, PaymentState, Portal
from b24sms.registration import IDLE_REFRESH_AFTER, reconcile_due, sync_all, wanted_events
from b24sms.web.security_headers import portal_origin
from tests.conftest import wait_until
from tests.helpers import stored_portal

LOG_PROVIDER = {"smslog": {"plugin": "log", "name": "Log only"}}
APP_EVENTS = ["ONAPPUNINSTALL", "ONAPPUPDATE"]


def stored(server, portal) -> Portal:
    return stored_portal(server, portal.member_id)


def bound(portal) -> list[str]:
    return sorted(b["event"] for b in portal.events.get())


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


# -- app.info PAYMENT_EXPIRED is a grace period, not a refusal (app-info.md) ---------------------


def test_payment_expired_keeps_sending_and_shows_the_state(live_app, emulator):
    server = live_app(providers=LOG_PROVIDER)
    svc = server.app.extensions["b24sms"]
    portal = emulator.add_portal()
    portal.app_status = "P"
    portal.install(server.url)
    portal.payment_expired = True
    (report,) = sync_all(svc)
    assert report.payment_state == PaymentState.PAYMENT_EXPIRED
    assert stored(server, portal).payment_state == PaymentState.PAYMENT_EXPIRED

    message_id, response = portal.send_sms("smslog", "+14155550123", "still in grace")
    assert response.status_code == 200
    svc.queue.drain()
    with svc.db.session() as session:
        message = session.scalar(select(Message).where(Message.message_id == message_id))
        assert message.status != "failed", message.last_error
        assert not (message.last_error or "").startswith("PAYMENT")


# -- the reconcile is no refresh timer (settings/oauth/auto-renewal.md) -------------------------


def test_reconcile_leaves_an_idle_portal_with_an_expired_token_alone(live_app, emulator):
    server = live_app(providers=LOG_PROVIDER, bitrix24={"reconcile_interval": 60})
    svc = server.app.extensions["b24sms"]
    portal = emulator.add_portal()
    portal.install(server.url)
    portal.expire_tokens()
    refreshes = emulator.stats["refreshes"]

    def age(token_expired_ago: dt.timedelta) -> None:
        with svc.db.session() as session:
            session.execute(
                update(Portal)
                .where(Portal.member_id == portal.member_id)
                .values(
                    reconciled_at=utcnow() - dt.timedelta(seconds=120),
                    token_expires_at=utcnow() - token_expired_ago,
                )
            )

    # Expired an hour ago, refreshed a couple of hours ago: a reconcile would only refresh.
    age(dt.timedelta(hours=1))
    assert reconcile_due(svc) == []
    assert emulator.stats["refreshes"] == refreshes
    # Unused for longer than the margin: refreshed in time, long before the 180 days.
    age(IDLE_REFRESH_AFTER + dt.timedelta(hours=1))
    (report,) = reconcile_due(svc)
    assert report.ok, report
    assert emulator.stats["refreshes"] == refreshes + 1
    assert stored(server, portal).token_expires_at > utcnow()


def test_reconcile_still_runs_for_a_portal_with_a_live_token(live_app, emulator):
    server = live_app(providers=LOG_PROVIDER, bitrix24={"reconcile_interval": 60})
    svc = server.app.extensions["b24sms"]
    portal = emulator.add_portal()
    portal.install(server.url)
    portal.senders.clear()
    with svc.db.session() as session:
        session.execute(
            update(Portal)
            .where(Portal.member_id == portal.member_id)
            .values(reconciled_at=utcnow() - dt.timedelta(seconds=120))
        )
    refreshes = emulator.stats["refreshes"]
    (report,) = reconcile_due(svc)
    assert report.ok and report.added == ["smslog"]
    assert emulator.stats["refreshes"] == refreshes


# -- a move learned from the OAuth server's answer (change-domen.md, auto-renewal.md) -----------


def test_a_move_learned_by_a_token_refresh_updates_the_domain(live_app, emulator):
    server = live_app(providers=LOG_PROVIDER)
    svc = server.app.extensions["b24sms"]
    portal = emulator.add_portal()
    portal.install(server.url)
    old_domain = portal.domain
    portal.expire_tokens()
    new_endpoint = portal.change_domain()
    row = stored(server, portal)
    client = Bitrix24Client(svc.db, row.id, svc.config.bitrix24)
    # 302 to the new address, which answers expired_token; the refresh names the new endpoint.
    assert client.call("messageservice.sender.list") == ["smslog"]
    row = stored(server, portal)
    assert row.client_endpoint == new_endpoint
    assert row.domain == portal.domain != old_domain
    # The app page's frame-ancestors is built from the stored domain.
    with svc.db.session() as session:
        assert portal_origin(session, row.id) == f"http://{portal.domain}"


# -- app.info unknown: bindings and payment state stay as they are -----------------------------


def test_a_failed_app_info_keeps_bindings_and_payment_state(live_app, emulator):
    server = live_app(providers=LOG_PROVIDER)
    svc = server.app.extensions["b24sms"]
    portal = emulator.add_portal()
    portal.app_status = "T"
    portal.install(server.url)
    portal.payment_expired = True
    (report,) = sync_all(svc)
    assert bound(portal) == ["ONAPPPAYMENT", *APP_EVENTS]
    assert stored(server, portal).payment_state == PaymentState.PAYMENT_EXPIRED

    portal.inject("INTERNAL_SERVER_ERROR", 500, methods="app.info")
    (report,) = sync_all(svc)
    assert report.error is None and report.unbound == [] and not report.app_info_read
    assert bound(portal) == ["ONAPPPAYMENT", *APP_EVENTS]
    row = stored(server, portal)
    assert row.payment_state == PaymentState.PAYMENT_EXPIRED
    assert row.event_bindings == "ONAPPPAYMENT,ONAPPUNINSTALL,ONAPPUPDATE"

    # app.info answers again and says paid: the mark goes.
    portal.payment_expired = False
    (report,) = sync_all(svc)
    assert report.app_info_read and stored(server, portal).payment_state is None


# -- ONAPPPAYMENT for any STATUS that can be paid for (on-app-payment.md, app-info.md) ----------


@pytest.mark.parametrize(
    ("status", "wanted"),
    [("P", True), ("T", True), ("D", True), ("S", True), ("F", False), ("L", False), (None, False)],
)
def test_onapppayment_is_bound_unless_free_or_local(status, wanted):
    assert ("ONAPPPAYMENT" in wanted_events(status)) is wanted


def test_the_docs_example_status_s_gets_onapppayment(live_app, emulator):
    server = live_app(providers=LOG_PROVIDER)
    svc = server.app.extensions["b24sms"]
    portal = emulator.add_portal()
    portal.app_status = "S"  # the STATUS of on-app-payment.md's own example
    portal.install(server.url)
    assert bound(portal) == ["ONAPPPAYMENT", *APP_EVENTS]
    portal.payment_expired = True
    sync_all(svc)
    # An ONAPPPAYMENT reconciles no sooner than 300 s after the last reconcile (the event proves
    # nothing, so a flood of them must cost nothing): this one reconciled long ago.
    with svc.db.session() as session:
        session.execute(
            update(Portal)
            .where(Portal.member_id == portal.member_id)
            .values(
                reconciled_at=dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(hours=1)
            )
        )
    response = portal.pay(status="S")
    assert response is not None and response.status_code == 200, response.text
    svc.queue.drain()
    wait_until(lambda: stored(server, portal).payment_state is None)


# -- a worker's REST call may take as long as Bitrix24 lets it (limits.md: 60 s) ----------------


def test_a_worker_waits_as_long_as_bitrix24_lets_a_request_run(live_app, emulator):
    server = live_app(providers=LOG_PROVIDER)
    svc = server.app.extensions["b24sms"]
    assert svc.config.bitrix24.timeout == 60.0  # the default
    portal = emulator.add_portal()
    portal.install(server.url)
    client = Bitrix24Client(svc.db, stored(server, portal).id, svc.config.bitrix24)
    assert client.timeout[1] == 60.0
    # The read timeout is the one the requests get: a slow answer under it arrives.
    portal.rest_delays["app.info"] = 1.2
    short = Bitrix24Client(
        svc.db, stored(server, portal).id, replace(svc.config.bitrix24, timeout=1)
    )
    with pytest.raises(TransientError):
        short.call("app.info")
    assert client.call("app.info")["CODE"] == emulator.client_id


# -- a re-install starts afresh (_includes/system-errors.md: OVERLOAD_LIMIT is lifted by support) -


def test_a_reinstall_lifts_the_pause_of_the_old_install(live_app, emulator):
    from b24sms.bitrix24.errors import Bitrix24Error
    from b24sms.models import MethodLimit

    server = live_app(providers=LOG_PROVIDER)
    svc = server.app.extensions["b24sms"]
    portal = emulator.add_portal()
    portal.install(server.url)
    portal.inject("OVERLOAD_LIMIT", 503)
    client = Bitrix24Client(svc.db, stored(server, portal).id, svc.config.bitrix24)
    with pytest.raises(Bitrix24Error):
        client.call("app.info")

    def limits() -> int:
        with svc.db.session() as session:
            rows = session.scalars(
                select(MethodLimit).where(MethodLimit.portal_id == stored(server, portal).id)
            )
            return len(list(rows))

    assert limits() > 0  # paused: every call is refused without a request
    answer = portal.install(server.url)
    assert answer.status_code == 200 and answer.json()["registered"] is True, answer.text
    assert limits() == 0
