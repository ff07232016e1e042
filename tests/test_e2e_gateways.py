"""One deployment, five CODEs, two portals: every message reaches the right gateway and its
final status reaches the right portal under the right CODE — all over real sockets."""

from __future__ import annotations

import time

import pytest

from tests.conftest import wait_until
from tests.fakes.http_gateway import FakeSmsApi, post_callback
from tests.fakes.smtp_server import LoopbackController, Recorder
from tests.fakes.twilio_api import FakeTwilio

CALLBACK_SECRET_A = "callback-secret-for-gateway-a"
CALLBACK_SECRET_B = "callback-secret-for-gateway-b"


@pytest.fixture
def smtp():
    recorder = Recorder()
    controller = LoopbackController(recorder, hostname="127.0.0.1", port=0)
    controller.start()
    try:
        yield controller, recorder
    finally:
        controller.stop()


def five_providers(twilio: FakeTwilio, api: FakeSmsApi, smtp_port: int) -> dict:
    return {
        "log": {"plugin": "log", "name": "Log", "outcome": "delivered"},
        "gw_json": {
            "plugin": "http",
            "name": "Gateway JSON",
            "url": api.json_url,
            "encoding": "json",
            "body": {"to": "{to}", "text": "{body}", "ref": "{message_id}"},
            "response_id": "messages.0.id",
            "response_status": "messages.0.status",
            "callback_id": "id",
            "callback_status": "status",
            "callback_secret": CALLBACK_SECRET_A,
            "statuses": {"ACCEPTED": "queued", "DELIVRD": "delivered", "UNDELIV": "undelivered"},
        },
        "gw_form": {
            "plugin": "http",
            "name": "Gateway form",
            "url": api.form_url,
            "encoding": "form",
            "body": {"to": "{to}", "text": "{body}"},
            "response_id": "result.msg_id",
            "response_status": "state",
            "callback_id": "msg_id",
            "callback_status": "state",
            "callback_secret": CALLBACK_SECRET_B,
            "callback_signature_header": "X-Hub-Signature",
            "statuses": {"ENROUTE": "sent", "2": "delivered", "3": "undelivered"},
        },
        "twilio": {
            "plugin": "twilio",
            "name": "Twilio",
            "account_sid": twilio.account_sid,
            "auth_token": twilio.auth_token,
            "from": "+15005550006",
            "api_base_url": twilio.url,
        },
        "mail": {
            "plugin": "email",
            "name": "Email",
            "smtp_host": "127.0.0.1",
            "smtp_port": smtp_port,
            "security": "none",
            "from": "sms@b24sms.test",
            "address": "{digits}@sms.b24sms.test",
        },
    }


def test_five_codes_on_two_portals(live_app, emulator, smtp):
    controller, mailbox = smtp
    with FakeTwilio() as twilio, FakeSmsApi() as api:
        twilio.auto_callbacks = ("sent", "delivered")
        twilio.callback_delay = 0.1
        server = live_app(providers=five_providers(twilio, api, controller.port))
        portals = [emulator.add_portal(), emulator.add_portal()]
        for portal in portals:
            assert portal.install(server.url).status_code == 200
            assert set(portal.senders) == {"log", "gw_json", "gw_form", "twilio", "mail"}

        sent: dict[tuple[int, str], str] = {}
        for index, portal in enumerate(portals):
            for code_index, code in enumerate(["log", "gw_json", "gw_form", "twilio", "mail"]):
                number = f"+1415555{index}{code_index:03d}"
                message_id, response = portal.send_sms(code, number, f"{code} from portal {index}")
                assert response.status_code == 200, response.text
                sent[(index, code)] = message_id

        # The HTTP gateways report through signed callbacks, as real ones do.
        json_ids = wait_until(
            lambda: (
                [m["id"] for m in api.messages if m["shape"] == "json"]
                if len([m for m in api.messages if m["shape"] == "json"]) == 2
                else None
            )
        )
        form_ids = [m["id"] for m in api.messages if m["shape"] == "form"]
        assert len(form_ids) == 2
        for gateway_id in json_ids:
            response = post_callback(
                f"{server.url}/gateways/gw_json/callback",
                {"id": gateway_id, "status": "DELIVRD"},
                CALLBACK_SECRET_A,
            )
            assert response.status_code == 200, response.text
        for gateway_id in form_ids:
            response = post_callback(
                f"{server.url}/gateways/gw_form/callback",
                {"msg_id": gateway_id, "state": "2"},
                CALLBACK_SECRET_B,
                encoding="form",
                header="X-Hub-Signature",
            )
            assert response.status_code == 200, response.text

        expected_final = {
            "log": "delivered",
            "gw_json": "delivered",
            "gw_form": "delivered",
            "twilio": "delivered",
        }
        for (index, code), message_id in sent.items():
            portal = portals[index]
            record = portal.messages[message_id]
            assert record["code"] == code
            if code == "mail":
                # SMTP acceptance is all email can tell: it never claims "delivered".
                wait_until(lambda r=record: [s for s in r["statuses"] if s["status"] == "sent"])
            else:
                assert portal.wait_for_status(message_id, timeout=15) == expected_final[code]

        # Each gateway got exactly its own messages, from both portals.
        assert sorted(m["to"] for m in twilio.messages.values()) == ["+14155550003", "+14155551003"]
        assert sorted(m["to"] for m in api.messages if m["shape"] == "json") == [
            "+14155550001",
            "+14155551001",
        ]
        rcpts = sorted(r for mail in mailbox.mails for r in mail.rcpt_tos)
        assert rcpts == ["14155550004@sms.b24sms.test", "14155551004@sms.b24sms.test"]
        assert all(b"mail from portal" in mail.content for mail in mailbox.mails)
        # A status never went to the other portal: each portal only heard about its own ids.
        for index, portal in enumerate(portals):
            own = {mid for (i, _), mid in sent.items() if i == index}
            reported = {mid for mid, rec in portal.messages.items() if rec["statuses"]}
            assert reported == own


def test_forged_gateway_callbacks_are_refused(live_app, emulator, smtp):
    controller, _ = smtp
    with FakeTwilio() as twilio, FakeSmsApi() as api:
        server = live_app(providers=five_providers(twilio, api, controller.port))
        portal = emulator.add_portal()
        portal.install(server.url)
        message_id, _ = portal.send_sms("gw_json", "+14155550100", "hi")
        gateway_id = wait_until(lambda: api.messages and api.messages[0]["id"])
        url = f"{server.url}/gateways/gw_json/callback"
        payload = {"id": gateway_id, "status": "UNDELIV"}
        assert post_callback(url, payload, "wrong-secret-wrong-secret").status_code == 401
        assert post_callback(url, payload, None).status_code == 401
        from tests.fakes.twilio_api import send_status_callback

        response = send_status_callback(
            f"{server.url}/gateways/twilio/callback",
            {
                "MessageSid": "SM" + "0" * 32,
                "MessageStatus": "failed",
                "AccountSid": twilio.account_sid,
            },
            "not-the-auth-token",
        )
        assert response.status_code == 401
        time.sleep(0.3)
        statuses = [s["status"] for s in portal.messages[message_id]["statuses"]]
        assert "undelivered" not in statuses and "failed" not in statuses
