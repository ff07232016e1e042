"""Install, events and the HANDLER, driven by the portal emulator over real sockets."""

from __future__ import annotations

import time

import requests
from sqlalchemy import func, select

from b24sms.models import Message, OutboxEntry, Portal, PortalState, ProviderRegistration

LOG = {"smslog": {"plugin": "log", "name": "Log only"}}
TWO = {
    "smslog": {"plugin": "log", "name": "Log only"},
    "second": {"plugin": "log", "name": {"en": "Second", "de": "Zweite"}, "outcome": "failed"},
}


def db_of(server):
    return server.app.extensions["b24sms"].db


def count(server, model) -> int:
    with db_of(server).session() as session:
        return session.scalar(select(func.count()).select_from(model))


def portal_row(server, member_id) -> Portal | None:
    with db_of(server).session() as session:
        return session.scalar(select(Portal).where(Portal.member_id == member_id))


def test_event_install_stores_portal_and_registers_providers(live_app, emulator):
    server = live_app(providers=TWO)
    portal = emulator.add_portal()
    response = portal.install(server.url, mode="event")
    assert response.status_code == 200, response.text
    stored = portal_row(server, portal.member_id)
    assert stored.domain == portal.domain and stored.state == PortalState.ACTIVE
    assert stored.client_endpoint == portal.client_endpoint
    assert set(portal.senders) == {"smslog", "second"}
    handler = portal.senders["smslog"]["HANDLER"]
    assert handler.startswith(f"{server.url}/bitrix24/handler/smslog?")
    assert portal.senders["second"]["NAME"] == {"en": "Second", "de": "Zweite"}
    # the answer never echoes a token
    assert (
        portal.access_token not in response.text and portal.application_token not in response.text
    )


def test_ui_install_answers_a_page_that_finishes_the_install(live_app, emulator):
    server = live_app(providers=LOG)
    portal = emulator.add_portal()
    response = portal.install(server.url, mode="ui")
    assert response.status_code == 200
    assert "BX24.installFinish()" in response.text
    assert "api.bitrix24.com/api/v1/" in response.text
    stored = portal_row(server, portal.member_id)
    # PROTOCOL=0 → http; the REST endpoint is derived from DOMAIN
    assert stored.client_endpoint == f"http://{portal.domain}/rest/"
    assert set(portal.senders) == {"smslog"}


def test_reinstall_updates_the_portal_in_place(live_app, emulator):
    server = live_app(providers=LOG)
    portal = emulator.add_portal()
    portal.install(server.url)
    first_token = portal.application_token
    assert portal.install(server.url).status_code == 200
    assert portal.application_token != first_token
    assert count(server, Portal) == 1
    stored = portal_row(server, portal.member_id)
    assert stored.application_token == portal.application_token


def test_forged_reinstall_of_a_known_portal_is_refused(live_app, emulator):
    server = live_app(providers=LOG)
    portal = emulator.add_portal()
    portal.install(server.url)
    before = portal_row(server, portal.member_id)
    forged = {
        "event": "ONAPPINSTALL",
        "auth[member_id]": portal.member_id,
        "auth[domain]": "evil.example.com",
        "auth[client_endpoint]": "https://evil.example.com/rest/",
        "auth[access_token]": "forged-access",
        "auth[refresh_token]": "forged-refresh",
        "auth[application_token]": "forged-app-token",
    }
    response = requests.post(f"{server.url}/bitrix24/install", data=forged, timeout=10)
    assert response.status_code == 401
    assert response.json()["error"] == "unauthorized"
    after = portal_row(server, portal.member_id)
    assert (after.domain, after.access_token, after.application_token) == (
        before.domain,
        before.access_token,
        before.application_token,
    )


def test_a_reinstall_checked_at_a_slow_oauth_server_holds_no_other_call(live_app, emulator):
    """The re-install's proof (the OAuth exchange) runs outside any transaction: on SQLite a
    transaction would hold every writer, HANDLER calls included, for as long as it takes."""
    import threading

    server = live_app(providers=LOG)
    portal = emulator.add_portal()
    portal.install(server.url)
    emulator.refresh_delay = 1.5  # what the re-install's proof asks
    finished: list[str] = []

    def forged_reinstall():
        forged = {
            "event": "ONAPPINSTALL",
            "auth[member_id]": portal.member_id,
            "auth[domain]": portal.domain,
            "auth[access_token]": "forged-access",
            "auth[refresh_token]": "forged-refresh",
            "auth[application_token]": "forged-app-token",
        }
        answer = requests.post(f"{server.url}/bitrix24/install", data=forged, timeout=10)
        finished.append(f"install {answer.status_code}")

    thread = threading.Thread(target=forged_reinstall)
    thread.start()
    time.sleep(0.3)  # the install is asking the portal now
    _, response = portal.send_sms("smslog", "+14155550100", "hi")
    finished.append(f"handler {response.status_code}")
    thread.join(10)
    assert finished == ["handler 200", "install 401"]


def test_update_registers_the_providers_again(live_app, emulator):
    server = live_app(providers=TWO)
    portal = emulator.add_portal()
    portal.install(server.url)
    response = portal.update_app()  # Bitrix24 deletes the app's providers on update
    assert response.status_code == 200, response.text
    assert set(portal.senders) == {"smslog", "second"}


def test_uninstall_without_clean_keeps_data(live_app, emulator):
    server = live_app(providers=LOG)
    portal = emulator.add_portal()
    portal.install(server.url)
    portal.send_sms("smslog", "+14155550100", "hello")
    assert portal.uninstall(clean=False).status_code == 200
    stored = portal_row(server, portal.member_id)
    assert stored.state == PortalState.UNINSTALLED and stored.access_token is None
    assert count(server, Message) == 1


def test_uninstall_with_clean_erases_the_portal(live_app, emulator):
    server = live_app(providers=LOG)
    portal = emulator.add_portal()
    other = emulator.add_portal()
    portal.install(server.url)
    other.install(server.url)
    portal.send_sms("smslog", "+14155550100", "hello")
    other.send_sms("smslog", "+14155550101", "hello")
    assert portal.uninstall(clean=True).status_code == 200
    assert portal_row(server, portal.member_id) is None
    assert portal_row(server, other.member_id) is not None
    with db_of(server).session() as session:
        assert session.scalar(select(func.count()).select_from(Message)) == 1
        assert (
            session.scalar(
                select(func.count())
                .select_from(ProviderRegistration)
                .join(Portal)
                .where(Portal.member_id == portal.member_id)
            )
            == 0
        )


def test_forged_event_token_is_refused_and_changes_nothing(live_app, emulator):
    server = live_app(providers=LOG)
    portal = emulator.add_portal()
    portal.install(server.url)
    for event in ("ONAPPUNINSTALL", "ONAPPUPDATE"):
        response = requests.post(
            f"{server.url}/bitrix24/events",
            data={
                "event": event,
                "data[CLEAN]": "1",
                "auth[member_id]": portal.member_id,
                "auth[application_token]": "not-the-token",
                "auth[domain]": portal.domain,
            },
            timeout=10,
        )
        assert response.status_code == 401
    assert portal_row(server, portal.member_id).state == PortalState.ACTIVE


def test_handler_stores_and_delivers_through_the_log_gateway(live_app, emulator):
    server = live_app(providers=LOG)
    portal = emulator.add_portal()
    portal.install(server.url)
    message_id, response = portal.send_sms("smslog", "(415) 555-0100", "Your code: 1234")
    assert response.status_code == 200, response.text
    assert portal.wait_for_status(message_id) == "delivered"
    with db_of(server).session() as session:
        message = session.scalar(select(Message))
        assert message.to == "+14155550100" and message.to_raw == "(415) 555-0100"
        assert message.module_id == "crm"
        assert message.context["bindings"]["0"]["OWNER_TYPE_ID"] == "3"
        assert [e.status for e in message.history] == ["queued", "sent", "delivered"]


def test_handler_without_auth_is_accepted_by_its_key(live_app, emulator):
    server = live_app(providers=LOG)
    portal = emulator.add_portal()
    portal.install(server.url)
    message_id, response = portal.send_sms("smslog", "+14155550100", "hi", with_auth=False)
    assert response.status_code == 200, response.text
    assert portal.wait_for_status(message_id) == "delivered"


def test_bizproc_message_keeps_workflow_data(live_app, emulator):
    server = live_app(providers=LOG)
    portal = emulator.add_portal()
    portal.install(server.url)
    _, response = portal.send_sms("smslog", "+14155550100", "hi", module_id="bizproc")
    assert response.status_code == 200
    with db_of(server).session() as session:
        message = session.scalar(select(Message))
    assert message.module_id == "bizproc"
    assert message.context["workflow_id"] and message.context["document_id"]


def test_duplicate_message_id_is_answered_200_and_sent_once(live_app, emulator):
    server = live_app(providers=LOG)
    portal = emulator.add_portal()
    portal.install(server.url)
    message_id, first = portal.send_sms("smslog", "+14155550100", "hi")
    _, second = portal.send_sms("smslog", "+14155550100", "hi", message_id=message_id)
    assert first.status_code == second.status_code == 200
    assert second.json()["result"] == "duplicate"
    assert portal.wait_for_status(message_id) == "delivered"
    assert count(server, Message) == 1
    with db_of(server).session() as session:
        message = session.scalar(select(Message))
        assert message.attempts == 1


def test_unparseable_number_is_stored_and_reported_failed(live_app, emulator):
    server = live_app(providers=LOG)
    portal = emulator.add_portal()
    portal.install(server.url)
    message_id, response = portal.send_sms("smslog", "not a number", "hi")
    assert response.status_code == 200
    assert portal.wait_for_status(message_id) == "failed"
    with db_of(server).session() as session:
        message = session.scalar(select(Message))
        assert message.status == "failed" and message.attempts == 0
        assert "not a valid phone number" in message.last_error


def _handler_form(portal, code="smslog", **overrides):
    form = {
        "type": "SMS",
        "code": code,
        "message_id": "a" * 32,
        "message_to": "+14155550100",
        "message_body": "hello",
        "ts": "1742895600",
        "module_id": "crm",
        "auth[member_id]": portal.member_id,
        "auth[application_token]": portal.application_token,
    }
    form.update(overrides)
    return {k: v for k, v in form.items() if v is not None}


def test_unknown_code_is_404(live_app, emulator):
    server = live_app(providers=LOG)
    portal = emulator.add_portal()
    portal.install(server.url)
    handler = portal.senders["smslog"]["HANDLER"]
    url = handler.replace("/handler/smslog", "/handler/nope")
    response = requests.post(url, data=_handler_form(portal, code="nope"), timeout=10)
    assert response.status_code == 404 and response.json()["error"] == "unknown_provider"
    assert count(server, Message) == 0


def test_each_missing_or_invalid_field_is_named(live_app, emulator):
    server = live_app(providers=LOG)
    portal = emulator.add_portal()
    portal.install(server.url)
    handler = portal.senders["smslog"]["HANDLER"]
    cases = {
        "message_id": {"message_id": None},
        "message_to": {"message_to": None},
        "message_body": {"message_body": None},
        "code": {"code": "other"},
        "type": {"type": "MMS"},
        "message_id ": {"message_id": "bad id with spaces"},
    }
    for field, overrides in cases.items():
        response = requests.post(handler, data=_handler_form(portal, **overrides), timeout=10)
        assert response.status_code == 400, (field, response.text)
        body = response.json()
        assert body["error"] in ("invalid_field", "invalid_payload")
        assert field.strip() in body["message"], (field, body)
    # a table where a text value belongs
    form = _handler_form(portal, message_to=None)
    form["message_to[x]"] = "1"
    response = requests.post(handler, data=form, timeout=10)
    assert response.status_code == 400 and "message_to" in response.json()["message"]
    assert count(server, Message) == 0


def test_bad_key_or_application_token_is_401_and_stores_nothing(live_app, emulator):
    server = live_app(providers=LOG)
    portal = emulator.add_portal()
    portal.install(server.url)
    handler = portal.senders["smslog"]["HANDLER"]
    bad_key = handler.rsplit("key=", 1)[0] + "key=" + "0" * 32
    assert requests.post(bad_key, data=_handler_form(portal), timeout=10).status_code == 401
    no_key = handler.split("?", 1)[0]
    assert requests.post(no_key, data=_handler_form(portal), timeout=10).status_code == 401
    forged = _handler_form(portal, **{"auth[application_token]": "forged"})
    response = requests.post(handler, data=forged, timeout=10)
    assert response.status_code == 401 and response.json()["error"] == "unauthorized"
    other_portal = _handler_form(portal, **{"auth[member_id]": "f" * 32})
    assert requests.post(handler, data=other_portal, timeout=10).status_code == 401
    assert count(server, Message) == 0 and count(server, OutboxEntry) == 0
    assert portal.stats["status_updates"] == 0


def test_json_body_is_accepted_for_tools(live_app, emulator):
    server = live_app(providers=LOG)
    portal = emulator.add_portal()
    portal.install(server.url)
    handler = portal.senders["smslog"]["HANDLER"]
    mid = "b" * 32
    portal.messages[mid] = {"code": "smslog", "to": "+14155550100", "body": "x", "statuses": []}
    payload = {
        "type": "SMS",
        "code": "smslog",
        "message_id": mid,
        "message_to": "+14155550100",
        "message_body": "hello",
        "auth": {"member_id": portal.member_id},
    }
    response = requests.post(handler, json=payload, timeout=10)
    assert response.status_code == 200, response.text
    assert portal.wait_for_status(mid) == "delivered"


def test_errors_are_json_without_tracebacks(live_app, emulator):
    server = live_app(providers=LOG)
    response = requests.get(f"{server.url}/nope", timeout=10)
    assert response.status_code == 404 and response.json()["error"] == "not_found"
    response = requests.post(
        f"{server.url}/bitrix24/events",
        data="event=x&auth=1",
        timeout=10,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 400 and "Traceback" not in response.text
    huge = {"message_body": "x" * 400_000}
    response = requests.post(f"{server.url}/bitrix24/handler/smslog", data=huge, timeout=10)
    assert response.status_code == 413 and response.json()["error"] == "payload_too_large"


def test_healthz_reports_database_and_queue(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    body = response.json
    assert body["checks"] == {"database": "ok", "queue": "ok"} and body["outbox_backlog"] == 0
