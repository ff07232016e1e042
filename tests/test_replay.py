"""Replayed and re-aimed calls, over real sockets.

Forged keys, tokens and signatures are refused in tests/test_bitrix24_routes.py,
tests/test_e2e_gateways.py and tests/test_plugin_*.py. Here: genuine calls sent again, or sent
somewhere else, or with a genuine signature on another body. The HTTP gateway's delivery
reports carry a signed timestamp: a replayed report is answered 200 and changes nothing (no
history row), one outside the window is refused. Twilio's signatures carry no time: a replay
cannot move a status back (statuses only move forward), so it is recorded in the history and
Bitrix24 hears nothing new.
"""

from __future__ import annotations

import time

import pytest
import requests
from sqlalchemy import select

from b24sms.models import Message, Portal, PortalState
from tests.conftest import wait_until
from tests.fakes.http_gateway import FakeSmsApi, post_callback, signature_header
from tests.fakes.twilio_api import FakeTwilio, send_status_callback, sign_callback

SECRET_A = "replay-callback-secret-of-a-0123"
SECRET_B = "replay-callback-secret-of-b-0123"


def history(server, message_id: str) -> list[tuple[str, str, bool]]:
    """(status, source, applied) of every report about a message, oldest first."""
    with server.app.extensions["b24sms"].db.session() as session:
        message = session.scalar(select(Message).where(Message.message_id == message_id))
        return [(e.status, e.source, e.applied) for e in message.history]


def reported(portal, message_id: str) -> list[str]:
    """The statuses Bitrix24 received for a message, in order."""
    return [s["status"] for s in portal.messages[message_id]["statuses"]]


@pytest.fixture
def api():
    with FakeSmsApi() as fake:
        yield fake


def http_providers(api: FakeSmsApi) -> dict:
    common = {
        "plugin": "http",
        "url": api.json_url,
        "response_id": "messages.0.id",
        "callback_id": "id",
        "callback_status": "status",
        "statuses": {"ACCEPTED": "queued", "SENT": "sent", "DELIVRD": "delivered"},
    }
    return {
        "gw_a": {**common, "name": "A", "callback_secret": SECRET_A},
        "gw_b": {**common, "name": "B", "callback_secret": SECRET_B},
    }


def test_a_replayed_http_callback_adds_nothing(live_app, emulator, api):
    server = live_app(providers=http_providers(api))
    portal = emulator.add_portal()
    portal.install(server.url)
    message_id, _ = portal.send_sms("gw_a", "+14155550100", "hi")
    gateway_id = wait_until(lambda: api.messages and api.messages[0]["id"])
    url = f"{server.url}/gateways/gw_a/callback"
    sent = {"id": gateway_id, "status": "SENT"}
    delivered = {"id": gateway_id, "status": "DELIVRD"}
    signed_at = time.time()
    assert post_callback(url, sent, SECRET_A, timestamp=signed_at).status_code == 200
    assert post_callback(url, delivered, SECRET_A, timestamp=signed_at).status_code == 200
    assert portal.wait_for_status(message_id) == "delivered"
    before = reported(portal, message_id)
    history_before = history(server, message_id)
    # (the send's answer had made it "sent" already)
    assert [h for h in history_before if h[1] == "callback"] == [
        ("sent", "callback", False),
        ("delivered", "callback", True),
    ]

    # the same signed requests again, in any order, as often as an attacker likes: answered
    # 200 (a gateway retrying a lost answer must not see an error) and ignored
    for payload in (sent, delivered, sent, delivered):
        assert post_callback(url, payload, SECRET_A, timestamp=signed_at).status_code == 200
    time.sleep(0.3)
    assert reported(portal, message_id) == before  # Bitrix24 heard nothing new
    assert history(server, message_id) == history_before  # and nothing was recorded

    # outside the window (default 300 s) a report is refused, whatever its signature
    for skew in (-310, 310):  # margin for whole-second timestamps and a slow machine
        late = post_callback(url, delivered, SECRET_A, timestamp=signed_at + skew)
        assert late.status_code == 401
    # signed anew by the gateway (only it knows the secret): recorded, not applied
    assert post_callback(url, sent, SECRET_A, timestamp=signed_at + 1).status_code == 200
    assert history(server, message_id)[len(history_before) :] == [("sent", "callback", False)]
    with server.app.extensions["b24sms"].db.session() as session:
        assert (
            session.scalar(select(Message.status).where(Message.message_id == message_id))
            == "delivered"
        )


def test_a_genuine_http_signature_on_another_body_or_at_another_code_is_refused(
    live_app, emulator, api
):
    server = live_app(providers=http_providers(api))
    portal = emulator.add_portal()
    portal.install(server.url)
    message_id, _ = portal.send_sms("gw_a", "+14155550100", "hi")
    gateway_id = wait_until(lambda: api.messages and api.messages[0]["id"])
    genuine = f'{{"id": "{gateway_id}", "status": "SENT"}}'.encode()
    tampered = f'{{"id": "{gateway_id}", "status": "DELIVRD"}}'.encode()
    response = requests.post(
        f"{server.url}/gateways/gw_a/callback",
        data=tampered,
        timeout=10,
        headers={
            "Content-Type": "application/json",
            "X-Signature": signature_header(genuine, SECRET_A),
        },
    )
    assert response.status_code == 401
    # A's genuine report, re-aimed at B's callback URL: B's secret does not sign it
    response = post_callback(
        f"{server.url}/gateways/gw_b/callback", {"id": gateway_id, "status": "DELIVRD"}, SECRET_A
    )
    assert response.status_code == 401
    time.sleep(0.3)
    assert "delivered" not in reported(portal, message_id)
    assert [h for h in history(server, message_id) if h[1] == "callback"] == []


def test_twilio_replays_and_re_aimed_signatures(live_app, emulator):
    with FakeTwilio() as twilio:
        options = {
            "plugin": "twilio",
            "account_sid": twilio.account_sid,
            "auth_token": twilio.auth_token,
            "from": "+15005550006",
            "api_base_url": twilio.url,
        }
        server = live_app(
            providers={
                "twilio": {**options, "name": "Twilio"},
                "twilio2": {**options, "name": "Twilio 2"},
            }
        )
        portal = emulator.add_portal()
        portal.install(server.url)
        message_id, _ = portal.send_sms("twilio", "+14155550100", "hi")
        sid = wait_until(lambda: next(iter(twilio.messages), None))
        url = f"{server.url}/gateways/twilio/callback"

        def report(status: str) -> dict[str, str]:
            return {"AccountSid": twilio.account_sid, "MessageSid": sid, "MessageStatus": status}

        sent_signature = sign_callback(url, report("sent"), twilio.auth_token)
        assert send_status_callback(url, report("sent"), twilio.auth_token).status_code == 200
        assert send_status_callback(url, report("delivered"), twilio.auth_token).status_code == 200
        assert portal.wait_for_status(message_id) == "delivered"
        before = reported(portal, message_id)

        # the captured "sent" report, replayed byte for byte: accepted, not applied
        response = send_status_callback(
            url, report("sent"), twilio.auth_token, signature=sent_signature
        )
        assert response.status_code == 200
        # its signature on other fields, or at another CODE's URL (Twilio signs the URL)
        assert (
            send_status_callback(
                url, report("failed"), twilio.auth_token, signature=sent_signature
            ).status_code
            == 401
        )
        other_url = f"{server.url}/gateways/twilio2/callback"
        assert (
            send_status_callback(
                other_url,
                report("failed"),
                twilio.auth_token,
                signature=sign_callback(url, report("failed"), twilio.auth_token),
            ).status_code
            == 401
        )
        time.sleep(0.3)
        assert reported(portal, message_id) == before
        callbacks = [h for h in history(server, message_id) if h[1] == "callback"]
        assert [applied for _, _, applied in callbacks] == [True, True, False]


def test_captured_calls_die_with_the_application_token_of_a_reinstall(live_app, emulator):
    server = live_app(providers={"smslog": {"plugin": "log", "name": "Log"}})
    portal = emulator.add_portal()
    portal.install(server.url)
    handler = portal.senders["smslog"]["HANDLER"]
    old_token = portal.application_token
    captured_handler_call = {
        "type": "SMS",
        "code": "smslog",
        "message_id": "c" * 32,
        "message_to": "+14155550100",
        "message_body": "hi",
        "auth[member_id]": portal.member_id,
        "auth[application_token]": old_token,
    }
    captured_uninstall = {
        "event": "ONAPPUNINSTALL",
        "data[CLEAN]": "1",
        "auth[member_id]": portal.member_id,
        "auth[application_token]": old_token,
        "auth[domain]": portal.domain,
    }
    portal.install(server.url)  # a re-install issues a new application_token
    assert portal.application_token != old_token
    assert requests.post(handler, data=captured_handler_call, timeout=10).status_code == 401
    assert (
        requests.post(
            f"{server.url}/bitrix24/events", data=captured_uninstall, timeout=10
        ).status_code
        == 401
    )
    with server.app.extensions["b24sms"].db.session() as session:
        assert session.scalar(select(Portal.state)) == PortalState.ACTIVE
        assert session.scalar(select(Message.id)) is None


def test_a_handler_key_only_opens_its_own_code(live_app, emulator):
    server = live_app(
        providers={
            "smslog": {"plugin": "log", "name": "Log"},
            "other": {"plugin": "log", "name": "Other"},
        }
    )
    portal = emulator.add_portal()
    portal.install(server.url)
    re_aimed = portal.senders["smslog"]["HANDLER"].replace("/handler/smslog", "/handler/other")
    form = {
        "type": "SMS",
        "code": "other",
        "message_id": "b" * 32,
        "message_to": "+14155550100",
        "message_body": "hi",
    }
    assert requests.post(re_aimed, data=form, timeout=10).status_code == 401
    with server.app.extensions["b24sms"].db.session() as session:
        assert session.scalar(select(Message.id)) is None
