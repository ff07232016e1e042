"""The ``log`` gateway: masked numbers, no message text in logs, the configured outcome."""

from __future__ import annotations

import importlib
import logging

import pytest

from b24sms.gateway import CallbackRejected, CallbackRequest, OutgoingMessage
from b24sms.plugins import PluginError, build_gateways, gateway_types, make_plugin_manager

PUBLIC_URL = "https://sms.example.com"


@pytest.fixture(scope="module")
def types():
    return gateway_types(make_plugin_manager({"B24SMS_LOAD_PLUGINS": "log"}))


def make(types, **options):
    providers = {"smslog": {"plugin": "log", "options": options}}
    return build_gateways(providers, types, PUBLIC_URL)["smslog"]


def message(**overrides) -> OutgoingMessage:
    fields = {
        "id": 7,
        "message_id": "b24-abc",
        "code": "smslog",
        "member_id": "m1",
        "to": "+14155550142",
        "body": "Your code is 4711",
        "callback_url": f"{PUBLIC_URL}/gateways/smslog/callback",
    }
    fields.update(overrides)
    return OutgoingMessage(**fields)


def test_default_outcome_is_delivered(types):
    result = make(types).send(message())
    assert result.external_id == "log-7-1"
    assert (result.raw_status, result.status) == ("sent", "sent")
    assert [(r.raw_status, r.status, r.external_id) for r in result.later] == [
        ("delivered", "delivered", "log-7-1")
    ]


@pytest.mark.parametrize("outcome", ["undelivered", "failed", "delivered"])
def test_outcome_is_reported_later(types, outcome):
    result = make(types, outcome=outcome).send(message(attempt=3))
    assert result.external_id == "log-7-3"
    assert [r.status for r in result.later] == [outcome]


def test_outcome_sent_reports_nothing_later(types):
    result = make(types, outcome="sent").send(message())
    assert result.status == "sent" and result.later == ()


def test_bad_outcome_is_a_config_error(types):
    with pytest.raises(PluginError) as info:
        make(types, outcome="lost")
    assert "smslog" in str(info.value) and "outcome" in str(info.value)


def test_log_line_masks_the_number_and_never_holds_the_text(types, caplog):
    gateway = make(types)
    with caplog.at_level(logging.DEBUG, logger="b24sms.gateway.smslog"):
        gateway.send(message(body="secret one-time code 4711"))
    records = [r for r in caplog.records if r.name == "b24sms.gateway.smslog"]
    assert len(records) == 1
    line = records[0].getMessage()
    assert "+1********42" in line
    assert "4155550142" not in line
    assert "secret" not in line and "4711" not in line
    assert "25 characters" in line


@pytest.mark.parametrize(
    ("number", "masked"),
    [
        ("+14155550100", "+1********00"),
        ("+4915112345678", "+49*********78"),
        ("+79161234567", "+7********67"),
        ("+123", "***"),
    ],
)
def test_mask_number(types, number, masked):
    # the module is found through discovery, wherever the built-ins live
    module = importlib.import_module(types["log"].cls.__module__)
    assert module.mask_number(number) == masked


def test_takes_no_callbacks(types):
    request = CallbackRequest(method="POST", url=PUBLIC_URL, headers={}, body=b"{}")
    with pytest.raises(CallbackRejected):
        make(types).parse_callback(request)


def test_status_map(types):
    gateway = make(types)
    assert gateway.map_status("delivered") == "delivered"
    assert gateway.map_status("lost") is None
