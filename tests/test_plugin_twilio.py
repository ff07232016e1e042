"""The ``twilio`` gateway: the real ``twilio`` library against the fake Twilio API."""

from __future__ import annotations

import logging

import pytest

from b24sms.gateway import (
    CallbackInvalid,
    CallbackRejected,
    CallbackRequest,
    OutgoingMessage,
    PermanentGatewayError,
    RetryableGatewayError,
)
from b24sms.plugins import PluginError, build_gateways, gateway_types, make_plugin_manager

from .fakes.http_gateway import CallbackSink
from .fakes.twilio_api import FakeTwilio, send_status_callback, sign_callback

MG_SID = "MG" + "a" * 32


@pytest.fixture(scope="module")
def types():
    return gateway_types(make_plugin_manager({"B24SMS_LOAD_PLUGINS": "twilio"}))


@pytest.fixture
def fake():
    with FakeTwilio() as api:
        yield api


@pytest.fixture
def sink():
    """Stands in for our public callback route: Twilio posts there."""
    with CallbackSink() as server:
        yield server


@pytest.fixture
def make(types, fake, sink):
    made = []

    def make(code="tw", **overrides):
        options = {
            "account_sid": fake.account_sid,
            "auth_token": fake.auth_token,
            "from": "+15005550006",
            "api_base_url": fake.url,
            "timeout": 2,
        }
        options.update(overrides)
        options = {k: v for k, v in options.items() if v is not None}
        providers = {code: {"plugin": "twilio", "options": options}}
        gateway = build_gateways(providers, types, sink.url)[code]
        made.append(gateway)
        return gateway

    yield make
    for gateway in made:
        gateway.close()


def message(gateway, **overrides) -> OutgoingMessage:
    fields = {
        "id": 1,
        "message_id": "b24-1",
        "code": gateway.code,
        "member_id": "m",
        "to": "+14155550100",
        "body": "Hello from Bitrix24",
        "callback_url": gateway.callback_url,
    }
    fields.update(overrides)
    return OutgoingMessage(**fields)


def test_send_creates_the_message_with_a_status_callback(make, fake):
    gateway = make()
    result = gateway.send(message(gateway))
    (created,) = fake.messages.values()
    assert created["to"] == "+14155550100" and created["body"] == "Hello from Bitrix24"
    assert created["from"] == "+15005550006"
    assert created["status_callback"] == gateway.callback_url
    assert result.external_id == created["sid"] and result.external_id.startswith("SM")
    assert result.raw_status == "queued"
    assert gateway.map_status(result.raw_status) == "queued"
    request = fake.requests[-1]
    assert request.path == f"/2010-04-01/Accounts/{fake.account_sid}/Messages.json"


def test_messaging_service_and_no_callback(make, fake):
    gateway = make(**{"from": None, "messaging_service_sid": MG_SID, "status_callback": False})
    gateway.send(message(gateway))
    (created,) = fake.messages.values()
    assert created["messaging_service_sid"] == MG_SID and created["from"] is None
    assert created["status_callback"] is None
    assert gateway.callbacks is False and gateway.poll_interval


def test_initial_status_comes_from_the_answer(make, fake):
    fake.initial_status = "accepted"
    gateway = make()
    assert gateway.send(message(gateway)).raw_status == "accepted"


@pytest.mark.parametrize(
    ("word", "status"),
    [
        ("accepted", "queued"),
        ("scheduled", "queued"),
        ("queued", "queued"),
        ("sending", "queued"),
        ("sent", "sent"),
        ("delivered", "delivered"),
        ("read", "delivered"),
        ("undelivered", "undelivered"),
        ("failed", "failed"),
        ("canceled", "failed"),
        ("receiving", None),
    ],
)
def test_status_map(make, word, status):
    assert make().map_status(word) == status


@pytest.mark.parametrize(
    ("to", "code"),
    [("+15005550001", "21211"), ("+15005550004", "21610"), ("+15005550009", "21614")],
)
def test_bad_numbers_are_permanent(make, to, code):
    gateway = make()
    with pytest.raises(PermanentGatewayError) as info:
        gateway.send(message(gateway, to=to))
    assert info.value.code == code
    assert "Unable to create record" not in str(info.value)


def test_wrong_credentials_are_permanent_and_the_token_stays_secret(make, fake, caplog):
    gateway = make(auth_token="wrong-token-abcdef")
    with caplog.at_level(logging.DEBUG), pytest.raises(PermanentGatewayError) as info:
        gateway.send(message(gateway))
    assert info.value.code == "20003"
    assert "wrong-token-abcdef" not in str(info.value) + caplog.text
    assert fake.auth_token not in str(info.value) + caplog.text


def test_rate_limit_is_retryable_with_retry_after(make, fake):
    fake.inject(429, 20429, "Too Many Requests", retry_after="3")
    gateway = make()
    with pytest.raises(RetryableGatewayError) as info:
        gateway.send(message(gateway))
    assert info.value.code == "20429" and info.value.retry_after == 3
    assert gateway.send(message(gateway)).external_id  # the next one goes through


@pytest.mark.parametrize("status", [500, 503])
def test_5xx_is_retryable(make, fake, status):
    fake.inject(status, 20500, "Internal Server Error")
    gateway = make()
    with pytest.raises(RetryableGatewayError):
        gateway.send(message(gateway))


def test_other_4xx_are_permanent(make, fake):
    fake.inject(400, 21408, "Permission to send an SMS has not been enabled for the region")
    gateway = make()
    with pytest.raises(PermanentGatewayError, match="Permission to send") as info:
        gateway.send(message(gateway))
    assert info.value.code == "21408"


def test_timeout_and_connection_errors_are_retryable(make, fake):
    fake.delay = 1.0
    gateway = make(timeout=0.2)
    with pytest.raises(RetryableGatewayError) as info:
        gateway.send(message(gateway))
    assert info.value.code == "timeout"
    closed = make(api_base_url="http://127.0.0.1:9")
    with pytest.raises(RetryableGatewayError) as info:
        closed.send(message(closed))
    assert info.value.code == "connection"


def test_poll(make, fake):
    gateway = make()
    sid = gateway.send(message(gateway)).external_id
    fake.set_status(sid, "undelivered", error_code=30003)
    report = gateway.poll(sid)
    assert (report.external_id, report.raw_status, report.error) == (sid, "undelivered", "30003")
    with pytest.raises(PermanentGatewayError) as info:
        gateway.poll("SM" + "f" * 32)
    assert info.value.code == "20404"


# status callbacks ----------------------------------------------------------------------------


def test_signed_callback_through_a_socket(make, fake, sink):
    gateway = make()
    sid = gateway.send(message(gateway)).external_id
    assert fake.callback(sid, "sent").status_code == 200
    assert fake.callback(sid, "undelivered", error_code=30005).status_code == 200

    (sent,) = gateway.parse_callback(sink.callback_request(0))
    assert (sent.external_id, sent.raw_status, sent.error) == (sid, "sent", None)
    (undelivered,) = gateway.parse_callback(sink.callback_request(1))
    assert (undelivered.raw_status, undelivered.error) == ("undelivered", "30005")
    assert gateway.map_status(undelivered.raw_status) == "undelivered"


def test_auto_callbacks(make, fake, sink):
    fake.auto_callbacks = ("sent", "delivered")
    gateway = make()
    sid = gateway.send(message(gateway)).external_id
    assert [r.status_code for r in fake.wait_callbacks(2)] == [200, 200]
    reports = [gateway.parse_callback(sink.callback_request(i))[0] for i in range(2)]
    assert [(r.external_id, r.raw_status) for r in reports] == [(sid, "sent"), (sid, "delivered")]


def _callback(url, form, signature) -> CallbackRequest:
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if signature is not None:
        headers["X-Twilio-Signature"] = signature
    return CallbackRequest(
        method="POST",
        url=url,
        headers=headers,
        body=b"",
        form=form,
        content_type=headers["Content-Type"],
    )


def test_forged_or_unsigned_callbacks_are_rejected(make, fake, sink):
    gateway = make()
    url = gateway.callback_url
    form = {"MessageSid": "SM1", "MessageStatus": "delivered", "AccountSid": fake.account_sid}
    with pytest.raises(CallbackRejected):
        gateway.parse_callback(_callback(url, form, None))
    with pytest.raises(CallbackRejected):
        gateway.parse_callback(_callback(url, form, sign_callback(url, form, "another-token")))
    # signed for another URL (a replay to another provider)
    other = url.replace("/tw/", "/other/")
    with pytest.raises(CallbackRejected):
        gateway.parse_callback(_callback(url, form, sign_callback(other, form, fake.auth_token)))
    # a changed field breaks the signature
    signature = sign_callback(url, form, fake.auth_token)
    with pytest.raises(CallbackRejected):
        gateway.parse_callback(_callback(url, {**form, "MessageStatus": "failed"}, signature))
    assert gateway.parse_callback(_callback(url, form, signature))[0].raw_status == "delivered"
    # a bad signature over a real socket too
    send_status_callback(url, form, fake.auth_token, signature="Zm9yZ2Vk")
    with pytest.raises(CallbackRejected):
        gateway.parse_callback(sink.callback_request(-1))


def test_callback_for_another_account_is_rejected(make, fake):
    gateway = make()
    url = gateway.callback_url
    form = {"MessageSid": "SM1", "MessageStatus": "delivered", "AccountSid": "AC" + "9" * 32}
    with pytest.raises(CallbackRejected):
        gateway.parse_callback(_callback(url, form, sign_callback(url, form, fake.auth_token)))


def test_signed_callback_without_fields_is_invalid(make, fake):
    gateway = make()
    url = gateway.callback_url
    form = {"MessageSid": "SM1"}
    with pytest.raises(CallbackInvalid):
        gateway.parse_callback(_callback(url, form, sign_callback(url, form, fake.auth_token)))


# configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"from": None}, "from"),
        ({"messaging_service_sid": MG_SID}, "from"),
        ({"account_sid": "XX123"}, "account_sid"),
        ({"auth_token": None}, "auth_token"),
        ({"messaging_service_sid": "MG1", "from": None}, "messaging_service_sid"),
        ({"api_base_url": "localhost:1234"}, "api_base_url"),
        ({"region": "ie1"}, "region"),
    ],
)
def test_bad_options(make, fake, overrides, key):
    with pytest.raises(PluginError) as info:
        make(**overrides)
    text = str(info.value)
    assert f"providers.tw.{key}" in text and "'twilio'" in text
    assert fake.auth_token not in text
