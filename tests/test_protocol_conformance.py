"""What a real Bitrix24 does, through the emulator over real sockets (docs/bitrix24.md lists
each protocol point with its page in bitrix24/b24restdocs and the test here that proves it)."""

from __future__ import annotations

import datetime as dt
import logging
import threading

import pytest
from sqlalchemy import select

from b24sms.bitrix24.client import Bitrix24Client
from b24sms.bitrix24.errors import TransientError
from b24sms.bitrix24.redirects import MAX_HOPS
from b24sms.models import Message, PaymentState, Portal, PortalPacing
from b24sms.registration import public_url_problems, reconcile_due, sync_all
from tests.conftest import wait_until
from tests.helpers import open_page

LOG_PROVIDER = {"smslog": {"plugin": "log", "name": "Log only"}}
APP_EVENTS = ["ONAPPUNINSTALL", "ONAPPUPDATE"]


def bindings(portal) -> list[tuple[str, str]]:
    return sorted((b["event"], b["handler"]) for b in portal.events.get())


def stored(server, portal) -> Portal:
    svc = server.app.extensions["b24sms"]
    with svc.db.session() as session:
        row = session.scalar(select(Portal).where(Portal.member_id == portal.member_id))
        session.expunge(row)
        return row


# -- event binding (api-reference/events/event-bind.md, event-get.md, index.md) ----------------


def test_install_binds_the_app_events_once_and_unbinds_old_handlers(live_app, emulator):
    server = live_app(providers=LOG_PROVIDER)
    portal = emulator.add_portal()
    assert portal.install(server.url).status_code == 200
    ours = f"{server.url}/bitrix24/events"
    assert bindings(portal) == [(event, ours) for event in APP_EVENTS]
    assert stored(server, portal).event_bindings == ",".join(APP_EVENTS)

    # A sync changes nothing: event.get first, no duplicate.
    svc = server.app.extensions["b24sms"]
    (report,) = sync_all(svc)
    assert report.ok and report.bound == [] and bindings(portal) == [(e, ours) for e in APP_EVENTS]

    # A handler at an old public_url is unbound; one bound twice is bound once again.
    portal.events.bind(
        {"event": "ONAPPUNINSTALL", "handler": "https://old.example.com/bitrix24/events"}
    )
    portal.events.bind({"event": "ONAPPUPDATE", "handler": ours})
    (report,) = sync_all(svc)
    assert report.ok, report
    assert bindings(portal) == [(event, ours) for event in APP_EVENTS]
    assert sorted(report.unbound) == ["ONAPPUNINSTALL", "ONAPPUPDATE"]


def test_update_reaches_the_app_only_through_its_binding_and_rebinds(live_app, emulator):
    server = live_app(providers=LOG_PROVIDER)
    portal = emulator.add_portal()
    portal.install(server.url)
    assert "smslog" in portal.senders

    response = portal.update_app(version=2)
    # The update removed providers and handlers; the app registered and bound them again.
    assert response is not None and response.status_code == 200, response.text
    assert response.json()["registered"] is True
    assert "smslog" in portal.senders
    assert [e for e, _ in bindings(portal)] == APP_EVENTS

    # Without a binding, Bitrix24 sends nothing: the uninstall is never heard.
    portal.events.clear()
    assert portal.uninstall() is None
    assert stored(server, portal).state == "active"


def test_uninstall_through_the_binding_erases_with_clean(live_app, emulator):
    server = live_app(providers=LOG_PROVIDER)
    portal = emulator.add_portal()
    portal.install(server.url)
    response = portal.uninstall(clean=True)
    assert response is not None and response.json() == {"result": "uninstalled", "clean": True}
    svc = server.app.extensions["b24sms"]
    with svc.db.session() as session:
        assert session.scalar(select(Portal).where(Portal.member_id == portal.member_id)) is None


# -- self-healing: the periodic reconcile ------------------------------------------------------


def test_reconcile_restores_what_bitrix24_removed(live_app, emulator):
    server = live_app(providers=LOG_PROVIDER, bitrix24={"reconcile_interval": 60})
    svc = server.app.extensions["b24sms"]
    portal = emulator.add_portal()
    portal.install(server.url)
    assert reconcile_due(svc) == []  # reconciled by the install a moment ago

    portal.senders.clear()
    portal.events.clear()
    with svc.db.session() as session:
        row = session.scalar(select(Portal).where(Portal.member_id == portal.member_id))
        row.reconciled_at = row.reconciled_at - dt.timedelta(seconds=120)
    (report,) = reconcile_due(svc)
    assert report.ok and report.added == ["smslog"] and report.bound == APP_EVENTS
    assert "smslog" in portal.senders and [e for e, _ in bindings(portal)] == APP_EVENTS
    row = stored(server, portal)
    assert row.reconciled_at > dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(
        seconds=30
    )
    assert row.reconcile_error is None


def test_concurrent_reconciles_sync_a_portal_once(live_app, emulator):
    server = live_app(providers=LOG_PROVIDER, bitrix24={"reconcile_interval": 60})
    svc = server.app.extensions["b24sms"]
    portal = emulator.add_portal()
    portal.install(server.url)
    portal.events.clear()
    with svc.db.session() as session:
        row = session.scalar(select(Portal).where(Portal.member_id == portal.member_id))
        row.reconciled_at = row.reconciled_at - dt.timedelta(seconds=120)
    results: list[list] = []
    workers = [threading.Thread(target=lambda: results.append(reconcile_due(svc))) for _ in "ab"]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=30)
    assert sorted(len(r) for r in results) == [0, 1]  # one worker claimed it
    assert [e for e, _ in bindings(portal)] == APP_EVENTS  # bound once


def test_reconcile_waits_while_the_portal_bucket_is_full(live_app, emulator):
    # settings/performance/limits.md: a leaky bucket per portal; the reconcile spends from the
    # estimate the outbox paces by, and leaves a busy portal to the next run.
    server = live_app(providers=LOG_PROVIDER, bitrix24={"reconcile_interval": 60})
    svc = server.app.extensions["b24sms"]
    portal = emulator.add_portal()
    portal.install(server.url)
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    with svc.db.session() as session:
        row = session.scalar(select(Portal).where(Portal.member_id == portal.member_id))
        row.reconciled_at = now - dt.timedelta(seconds=120)
        pacing = session.get(PortalPacing, row.id)  # the install's flush made it
        pacing.bucket_level, pacing.bucket_at = 49.5, now
    requests_before = portal.stats["requests"]
    assert reconcile_due(svc) == []
    assert portal.stats["requests"] == requests_before
    with svc.db.session() as session:
        session.get(PortalPacing, row.id).bucket_level = 0.0
    (report,) = reconcile_due(svc)
    assert report.ok
    with svc.db.session() as session:
        assert session.get(PortalPacing, row.id).bucket_level >= 2.0  # spent, for the outbox


def test_reconcile_records_its_error(live_app, emulator):
    server = live_app(providers=LOG_PROVIDER)
    svc = server.app.extensions["b24sms"]
    portal = emulator.add_portal()
    portal.install(server.url)
    portal.inject("ACCESS_DENIED", 403, description="Access denied!")
    (report,) = sync_all(svc)
    assert not report.ok
    assert "ACCESS_DENIED" in stored(server, portal).reconcile_error


# -- moved portals (settings/how-to-call-rest-api/change-domen.md) ----------------------------


def test_a_moved_portal_is_followed_and_its_address_stored(live_app, emulator):
    server = live_app(providers=LOG_PROVIDER)
    svc = server.app.extensions["b24sms"]
    portal = emulator.add_portal()
    portal.install(server.url)
    old_endpoint = portal.client_endpoint
    new_endpoint = portal.change_domain()
    portal.senders.clear()

    (report,) = sync_all(svc)  # POSTs with a body: answered 302 at the old address
    assert report.ok and report.added == ["smslog"], report
    row = stored(server, portal)
    assert row.client_endpoint == new_endpoint != old_endpoint
    assert row.domain == portal.domain and row.state == "active"


def test_redirects_are_bounded(live_app, emulator):
    server = live_app(providers=LOG_PROVIDER)
    svc = server.app.extensions["b24sms"]
    portal = emulator.add_portal()
    portal.install(server.url)
    for _ in range(MAX_HOPS + 1):
        portal.change_domain()
    client = Bitrix24Client(svc.db, stored(server, portal).id, svc.config.bitrix24)
    with pytest.raises(TransientError) as info:
        client.call("app.info")
    assert info.value.code == "REDIRECT_REFUSED"


class _RedirectsElsewhere:
    """A REST endpoint that redirects to an address we must not send a token to."""

    def handle_http(self, request):
        return 302, {}, {"Location": "ftp://files.example.com/rest/app.info"}


def test_redirects_only_to_http_or_https(live_app, emulator):
    from b24sms.emulator.httpd import ServerThread

    server = live_app(providers=LOG_PROVIDER)
    svc = server.app.extensions["b24sms"]
    portal = emulator.add_portal()
    portal.install(server.url)
    elsewhere = ServerThread(_RedirectsElsewhere())
    try:
        with svc.db.session() as session:
            row = session.scalar(select(Portal).where(Portal.member_id == portal.member_id))
            row.client_endpoint = f"{elsewhere.base_url}/rest/"
            portal_id = row.id
        client = Bitrix24Client(svc.db, portal_id, svc.config.bitrix24)
        with pytest.raises(TransientError) as info:
            client.call("app.info")
        assert info.value.code == "REDIRECT_REFUSED" and "ftp" in str(info.value)
        assert stored(server, portal).client_endpoint == f"{elsewhere.base_url}/rest/"
    finally:
        elsewhere.stop()


# -- localized descriptions (api-reference/messageservice/messageservice-sender-add.md) -------


def test_description_goes_as_a_language_map(live_app, emulator):
    providers = {
        "one": {
            "plugin": "log",
            "name": {"en": "One", "de": "Eins"},
            "description": {"en": "First", "de": "Erste"},
        },
        "two": {"plugin": "log", "name": {"en": "Two", "de": "Zwei"}, "description": "Second"},
    }
    server = live_app(providers=providers)
    portal = emulator.add_portal()
    portal.install(server.url)
    assert portal.senders["one"]["DESCRIPTION"] == {"en": "First", "de": "Erste"}
    assert portal.senders["two"]["DESCRIPTION"] == {"en": "Second", "de": "Second"}


# -- payment (settings/oauth/error-codes.md, api-reference/common/system/app-info.md) ---------


def test_payment_required_fails_new_messages_until_bitrix24_answers_again(live_app, emulator):
    """An assumption, not a documented answer (docs/bitrix24.md): no page shows a REST method
    answering PAYMENT_REQUIRED; the documented signal is the OAuth server's, tested below."""
    server = live_app(providers=LOG_PROVIDER)
    svc = server.app.extensions["b24sms"]
    portal = emulator.add_portal()
    portal.install(server.url)

    portal.payment_required = True
    (report,) = sync_all(svc)
    assert report.error is not None and report.error.code == "PAYMENT_REQUIRED"
    assert stored(server, portal).payment_state == PaymentState.PAYMENT_REQUIRED

    message_id, response = portal.send_sms("smslog", "+14155550123", "hello")
    assert response.status_code == 200  # stored, never lost
    with svc.db.session() as session:
        message = session.scalar(select(Message).where(Message.message_id == message_id))
        assert message.status == "failed" and message.last_error.startswith("PAYMENT_REQUIRED")

    portal.payment_required = False
    (report,) = sync_all(svc)
    assert report.ok and stored(server, portal).payment_state is None


def test_payment_required_from_the_oauth_server_marks_the_portal(live_app, emulator):
    # settings/oauth/error-codes.md: "Until then, the authorization server will not issue tokens"
    server = live_app(providers=LOG_PROVIDER)
    svc = server.app.extensions["b24sms"]
    portal = emulator.add_portal()
    portal.install(server.url)
    portal.expire_tokens()
    emulator.inject("PAYMENT_REQUIRED", 400, description="Payment required")
    (report,) = sync_all(svc)
    assert report.error is not None and report.error.code == "PAYMENT_REQUIRED"
    row = stored(server, portal)
    assert row.payment_state == PaymentState.PAYMENT_REQUIRED and row.state == "active"
    (report,) = sync_all(svc)  # the next refresh works: paid again
    assert report.ok and stored(server, portal).payment_state is None


def test_payment_expired_from_app_info_and_onapppayment(live_app, emulator):
    server = live_app(providers=LOG_PROVIDER)
    svc = server.app.extensions["b24sms"]
    portal = emulator.add_portal()
    portal.app_status = "T"  # a Market app on trial: ONAPPPAYMENT is bound too
    portal.install(server.url)
    assert [e for e, _ in bindings(portal)] == ["ONAPPPAYMENT", *APP_EVENTS]

    portal.payment_expired = True
    (report,) = sync_all(svc)
    assert report.payment_state == PaymentState.PAYMENT_EXPIRED
    assert stored(server, portal).payment_state == PaymentState.PAYMENT_EXPIRED

    page = open_page(server, portal.placement_auth())
    assert page.status_code == 200
    assert 'id="payment-state">PAYMENT_EXPIRED' in page.text
    assert "ONAPPPAYMENT, ONAPPUNINSTALL, ONAPPUPDATE" in page.text
    assert 'id="reconciled-at">20' in page.text

    # The reconcile above is minutes old by now (a payment sooner after one is reconciled when
    # the spacing is up: tests/test_payment_flood.py).
    with svc.db.session() as session:
        row = session.scalars(select(Portal).where(Portal.member_id == portal.member_id)).one()
        row.reconciled_at -= dt.timedelta(hours=1)
    response = portal.pay()  # ONAPPPAYMENT → a reconcile asks app.info again
    assert response is not None and response.status_code == 200, response.text
    svc.queue.drain()
    wait_until(lambda: stored(server, portal).payment_state is None)


# -- start-up -----------------------------------------------------------------------------------


def test_public_url_problems_name_the_key():
    assert public_url_problems("https://sms.example.com") == []
    plain, dotless = public_url_problems("http://localhost:8000")
    assert "[service] public_url" in plain and "https" in plain
    assert "[service] public_url" in dotless and "ERROR_WRONG_HANDLER_URL" in dotless


def test_start_up_warns_about_public_url(tmp_path, caplog):
    from b24sms import create_app
    from tests.conftest import base_config

    with caplog.at_level(logging.WARNING, logger="b24sms.service"):
        app = create_app(base_config(tmp_path, public_url="http://localhost:8000"))
    try:
        text = caplog.text
        assert "[service] public_url 'http://localhost:8000' is not https" in text
        assert "has no dot in its host" in text
    finally:
        app.extensions["b24sms"].close()
