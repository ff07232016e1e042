"""The gateway contract, checked with the plugin kit's own suite (``b24sms.testing``).

- :class:`TestEveryInstalledGatewayType` runs :class:`~b24sms.testing.GatewayTypeContract`
  over every type discovery finds: the built-ins and any third-party one (install
  ``examples/b24sms-example-gateway`` and it is checked too), with their ``example_options``.
- One :class:`~b24sms.testing.GatewayContract` subclass per built-in gateway drives it against
  its fake (``tests/fakes``), exactly as a plugin package's tests drive theirs.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

from b24sms.plugins import gateway_types, make_plugin_manager
from b24sms.testing import GatewayContract, GatewayTypeContract
from tests.fakes.http_gateway import FakeSmsApi, post_callback
from tests.fakes.smtp_server import LoopbackController, Recorder
from tests.fakes.twilio_api import FakeTwilio

TYPES = gateway_types(make_plugin_manager())


class TestEveryInstalledGatewayType(GatewayTypeContract):
    @pytest.fixture(params=sorted(TYPES))
    def gateway_type(self, request: pytest.FixtureRequest) -> Any:
        """Each discovered gateway type in turn."""
        return TYPES[request.param]


class TestLogContract(GatewayContract):
    plugin = "log"
    documented_statuses = {status: status for status in ("delivered", "sent", "failed")}

    def options(self, api: Any) -> dict[str, Any]:
        return {"outcome": "delivered"}


CALLBACK_SECRET = "contract-callback-secret-0123"


class TestHttpContract(GatewayContract):
    plugin = "http"
    # FakeSmsApi's words, as its module docstring describes its API
    documented_statuses = {"ACCEPTED": "queued", "DELIVRD": "delivered", "UNDELIV": "undelivered"}

    @pytest.fixture
    def fake_api(self) -> Iterator[FakeSmsApi]:
        with FakeSmsApi() as api:
            yield api

    def options(self, api: FakeSmsApi) -> dict[str, Any]:
        return {
            "url": api.json_url,
            "body": {"to": "{to}", "text": "{body}"},
            "response_id": "messages.0.id",
            "response_status": "messages.0.status",
            "callback_id": "id",
            "callback_status": "status",
            "callback_secret": CALLBACK_SECRET,
            # the operator's table, written out as a provider's config holds it (not copied from
            # documented_statuses, which the contract checks the gateway's mapping against)
            "statuses": {"ACCEPTED": "queued", "DELIVRD": "delivered", "UNDELIV": "undelivered"},
            "timeout": 2,
        }

    def fail_next_send(self, api: FakeSmsApi, kind: str) -> None:
        api.fail_next(503 if kind == "retryable" else 400)

    def report_delivered(self, api: FakeSmsApi, callback_url: str) -> None:
        for message in list(api.messages):
            report = {"id": message["id"], "status": "DELIVRD"}
            response = post_callback(callback_url, report, CALLBACK_SECRET)
            assert response.status_code == 200, response.text


class TestTwilioContract(GatewayContract):
    plugin = "twilio"
    # https://www.twilio.com/docs/messaging/api/message-resource#message-status-values
    documented_statuses = {
        "queued": "queued",
        "sent": "sent",
        "delivered": "delivered",
        "read": "delivered",
        "undelivered": "undelivered",
        "failed": "failed",
        "canceled": "failed",
    }

    @pytest.fixture
    def fake_api(self) -> Iterator[FakeTwilio]:
        with FakeTwilio() as api:
            yield api

    def options(self, api: FakeTwilio) -> dict[str, Any]:
        return {
            "account_sid": api.account_sid,
            "auth_token": api.auth_token,
            "from": "+15005550006",
            "api_base_url": api.url,
            "timeout": 2,
        }

    def fail_next_send(self, api: FakeTwilio, kind: str) -> None:
        if kind == "retryable":
            api.inject(503, 20503, "Service Unavailable")
        else:
            api.inject(400, 21211, "The 'To' number is not a valid phone number.")

    def report_delivered(self, api: FakeTwilio, callback_url: str) -> None:
        for sid in list(api.messages):
            response = api.callback(sid, "delivered")
            assert response.status_code == 200, response.text


class TestEmailContract(GatewayContract):
    plugin = "email"
    # an SMTP server's 250 says it took the mail, no more (RFC 5321, 4.2.3)
    documented_statuses = {"250": "sent"}
    final_status = "sent"

    @pytest.fixture
    def fake_api(self) -> Iterator[Recorder]:
        recorder = Recorder()
        controller = LoopbackController(recorder, hostname="127.0.0.1", port=0)
        controller.start()
        recorder.port = controller.port
        try:
            yield recorder
        finally:
            controller.stop()

    def options(self, api: Recorder) -> dict[str, Any]:
        return {
            "smtp_host": "127.0.0.1",
            "smtp_port": api.port,
            "security": "none",
            "from": "sms@b24sms.test",
            "address": "{digits}@sms.b24sms.test",
            "timeout": 5,
        }

    def fail_next_send(self, api: Recorder, kind: str) -> None:
        api.rcpt_answer = "451 4.3.0 try again later" if kind == "retryable" else "550 no such user"


def test_nothing_listens_where_the_examples_point():
    """The examples rely on 127.0.0.1:9 being closed; say so plainly if it is not."""
    with socket.socket() as sock:
        sock.settimeout(1)
        assert sock.connect_ex(("127.0.0.1", 9)) != 0, (
            "something listens on 127.0.0.1:9, where the example options point: sends there "
            "would not fail fast"
        )
