"""Tests of the example plugin: b24sms's gateway contract (``b24sms.testing``) against the fake
carrier, and what is particular to this carrier (replayed webhooks, option errors).

Run them with ``pytest`` after ``pip install -e .[test]`` next to an installed b24sms; its
pytest plugin provides the fixtures the contract uses.
"""

from __future__ import annotations

import json
import time

import pytest
from b24sms_example_gateway.testing import DOCUMENTED_STATES, FakeCarrier, signature_header

from b24sms.gateway import (
    CallbackRejected,
    CallbackRequest,
    OutgoingMessage,
    PermanentGatewayError,
    RetryableGatewayError,
)
from b24sms.plugins import PluginError, build_gateways, gateway_types, make_plugin_manager
from b24sms.testing import GatewayContract

SECRET = "test-webhook-secret"


class TestExampleCarrierContract(GatewayContract):
    """What b24sms asks of every gateway, run against the fake Example Carrier."""

    plugin = "example-carrier"
    documented_statuses = DOCUMENTED_STATES
    to = "+4915112345678"

    @pytest.fixture
    def fake_api(self):
        with FakeCarrier(api_key="k", webhook_secret=SECRET) as fake:
            yield fake

    def options(self, api):
        return {"api_url": api.url, "api_key": "k", "sender": "ACME", "webhook_secret": SECRET}

    def fail_next_send(self, api, kind):
        api.fail_next(503 if kind == "retryable" else 401)

    def report_delivered(self, api, callback_url):
        for message in list(api.sent):
            assert api.report(message["sms_id"], "delivered") == 200


@pytest.fixture
def carrier():
    with FakeCarrier(api_key="k", webhook_secret=SECRET) as fake:
        yield fake


@pytest.fixture
def types():
    # through real discovery: the entry point in pyproject.toml, nothing imported by hand
    return gateway_types(make_plugin_manager({"B24SMS_LOAD_PLUGINS": "example-carrier"}))


@pytest.fixture
def gateway(types, carrier):
    options = {"api_url": carrier.url, "api_key": "k", "sender": "ACME", "webhook_secret": SECRET}
    providers = {"carrier": {"plugin": "example-carrier", "options": options}}
    gateway = build_gateways(providers, types, "https://sms.example.com")["carrier"]
    yield gateway
    gateway.close()


def message(**overrides):
    fields = {
        "id": 1,
        "message_id": "m1",
        "code": "carrier",
        "member_id": "p",
        "to": "+4915112345678",
        "body": "Hi",
        "callback_url": "https://sms.example.com/gateways/carrier/callback",
    }
    fields.update(overrides)
    return OutgoingMessage(**fields)


def test_discovered_under_its_entry_point_name(types):
    assert types["example-carrier"].plugin == "example-carrier"


def test_send(gateway, carrier):
    result = gateway.send(message())
    assert (result.external_id, result.raw_status) == ("ec_1", "accepted")
    assert gateway.map_status(result.raw_status) == "queued"
    assert carrier.sent[0]["webhook_url"] == "https://sms.example.com/gateways/carrier/callback"


def test_errors(gateway, carrier):
    carrier.fail_next(503)
    with pytest.raises(RetryableGatewayError):
        gateway.send(message())
    with pytest.raises(PermanentGatewayError, match="invalid_number"):
        gateway.send(message(to="015112345678"))


def signed(body: bytes, timestamp=None) -> CallbackRequest:
    return CallbackRequest(
        method="POST",
        url="https://sms.example.com/gateways/carrier/callback",
        headers={"Example-Signature": signature_header(SECRET, body, timestamp)},
        body=body,
        content_type="application/json",
    )


def test_webhooks(gateway):
    body = json.dumps({"sms_id": "ec_1", "state": "delivered"}).encode()
    (report,) = gateway.parse_callback(signed(body))
    assert (report.external_id, gateway.map_status(report.raw_status)) == ("ec_1", "delivered")
    with pytest.raises(CallbackRejected):
        gateway.parse_callback(signed(body, timestamp=int(time.time()) - 3600))  # a replay
    tampered = CallbackRequest(
        method="POST",
        url="https://sms.example.com/gateways/carrier/callback",
        headers=signed(body).headers,
        body=body.replace(b"delivered", b"rejected"),
    )
    with pytest.raises(CallbackRejected):
        gateway.parse_callback(tampered)


def test_bad_options(types):
    providers = {"carrier": {"plugin": "example-carrier", "options": {"api_key": "k"}}}
    with pytest.raises(PluginError, match="providers.carrier.sender"):
        build_gateways(providers, types, "https://sms.example.com")
