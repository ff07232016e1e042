"""The gateway contract, checked for every gateway type that discovery finds.

Parametrised over the types of all installed plugins — the built-ins and any third-party one
(install ``examples/b24sms-example-gateway`` and it is checked too). Each type supplies a minimal
valid configuration in its ``example_options`` class attribute, pointing at nothing real (a
closed local port), so ``send`` must fail cleanly with a :class:`GatewayError`.
"""

from __future__ import annotations

import inspect
import re
import socket
from collections.abc import Mapping
from typing import Any

import pytest
from marshmallow import Schema

from b24sms.gateway import (
    CallbackRejected,
    CallbackRequest,
    Gateway,
    GatewayError,
    OutgoingMessage,
    SendResult,
    StatusReport,
)
from b24sms.plugins import build_gateways, gateway_types, make_plugin_manager
from b24sms.statuses import STATUSES

TYPES = gateway_types(make_plugin_manager())
PUBLIC_URL = "https://sms.example.com"
SECRET_KEY_RE = re.compile(r"token|secret|password|key", re.IGNORECASE)


@pytest.fixture(params=list(TYPES.values()), ids=list(TYPES))
def gtype(request) -> Any:
    """Each discovered gateway type in turn."""
    return request.param


def example_options(cls: type[Gateway]) -> dict[str, Any]:
    options = getattr(cls, "example_options", None)
    if options is None and cls.options_schema is not None:
        pytest.fail(f"{cls.__name__} has no example_options (a minimal valid configuration)")
    return dict(options or {})


@pytest.fixture
def gateway(gtype) -> Any:
    providers = {"contract": {"plugin": gtype.name, "options": example_options(gtype.cls)}}
    instance = build_gateways(providers, TYPES, PUBLIC_URL)["contract"]
    yield instance
    instance.close()


def secrets_of(cls: type[Gateway]) -> list[str]:
    return [
        str(value)
        for key, value in example_options(cls).items()
        if SECRET_KEY_RE.search(key) and isinstance(value, str)
    ]


def test_declares_the_class_attributes(gtype):
    cls = gtype.cls
    assert issubclass(cls, Gateway)
    assert isinstance(cls.name, str) and cls.name == gtype.name
    assert cls.options_schema is None or (
        isinstance(cls.options_schema, type) and issubclass(cls.options_schema, Schema)
    )
    assert isinstance(cls.statuses, Mapping)
    assert isinstance(cls.callbacks, bool)
    assert cls.poll_interval is None or cls.poll_interval > 0
    assert cls.__doc__, "a gateway type says what it is in its docstring"


def test_status_map_speaks_only_the_five_statuses(gtype, gateway):
    for statuses in (gtype.cls.statuses, gateway.statuses):
        assert all(isinstance(word, str) for word in statuses)
        assert set(statuses.values()) <= set(STATUSES)
    for word, status in gateway.statuses.items():
        assert gateway.map_status(word) == status
    assert gateway.map_status("certainly-not-a-status-word") is None


def test_method_signatures(gtype):
    cls = gtype.cls

    def params(name: str) -> list[str]:
        return list(inspect.signature(getattr(cls, name)).parameters)

    assert params("send") == ["self", "message"]
    assert params("parse_callback") == ["self", "request"]
    assert params("poll") == ["self", "external_id"]
    assert params("map_status") == ["self", "raw_status"]
    assert params("close") == ["self"]
    assert list(inspect.signature(cls.__init__).parameters)[:3] == ["self", "options", "context"]
    assert cls.send is not Gateway.send, "send() must be implemented"


def test_example_options_load_and_unknown_options_are_refused(gtype):
    schema = gtype.cls.options_schema
    if schema is None:
        pytest.skip("takes no options")
    from marshmallow import RAISE, ValidationError

    schema(unknown=RAISE).load(example_options(gtype.cls))
    with pytest.raises(ValidationError):
        schema(unknown=RAISE).load({**example_options(gtype.cls), "no_such_option": 1})


def message(gateway: Gateway) -> OutgoingMessage:
    return OutgoingMessage(
        id=1,
        message_id="contract-1",
        code=gateway.code,
        member_id="member",
        to="+14155550100",
        body="contract test",
        callback_url=gateway.callback_url,
    )


def test_send_answers_a_result_or_raises_only_gateway_errors(gtype, gateway):
    try:
        result = gateway.send(message(gateway))
    except GatewayError as exc:
        assert isinstance(exc.retryable, bool)
        text = str(exc)
        for secret in secrets_of(gtype.cls):
            assert secret not in text, "a secret option reached an error message"
        return
    assert isinstance(result, SendResult)
    assert isinstance(result.raw_status, str)
    assert result.status is None or result.status in STATUSES
    assert all(isinstance(report, StatusReport) for report in result.later)


def test_poll_answers_a_report_none_or_a_gateway_error(gateway):
    try:
        report = gateway.poll("contract-external-id")
    except GatewayError:
        return
    assert report is None or isinstance(report, StatusReport)


UNSIGNED = [
    CallbackRequest(
        method="POST",
        url=f"{PUBLIC_URL}/gateways/contract/callback",
        headers={"Content-Type": "application/json"},
        body=b'{"id": "1", "status": "delivered", "sms_id": "1", "state": "delivered"}',
        content_type="application/json",
    ),
    CallbackRequest(
        method="POST",
        url=f"{PUBLIC_URL}/gateways/contract/callback",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        body=b"MessageSid=SM1&MessageStatus=delivered&id=1&status=delivered",
        form={"MessageSid": "SM1", "MessageStatus": "delivered", "id": "1", "status": "delivered"},
        content_type="application/x-www-form-urlencoded",
    ),
    CallbackRequest(
        method="GET", url=f"{PUBLIC_URL}/gateways/contract/callback", headers={}, body=b""
    ),
]


@pytest.mark.parametrize("request_", UNSIGNED, ids=["json", "form", "empty"])
def test_unauthenticated_callbacks_are_rejected(gateway, request_):
    with pytest.raises(CallbackRejected):
        gateway.parse_callback(request_)


def test_callback_response_shape(gateway):
    body, status, headers = gateway.callback_response([])
    assert isinstance(body, str | bytes) and isinstance(status, int)
    assert isinstance(headers, Mapping)


def test_nothing_listens_where_the_examples_point():
    """The examples rely on 127.0.0.1:9 being closed; say so plainly if it is not."""
    with socket.socket() as sock:
        sock.settimeout(1)
        assert sock.connect_ex(("127.0.0.1", 9)) != 0, (
            "something listens on 127.0.0.1:9, where the example options point: sends there "
            "would not fail fast"
        )
