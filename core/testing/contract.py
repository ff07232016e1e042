"""The gateway contract as a test suite a plugin's tests subclass.

Two classes; pytest collects their tests in a subclass whose name starts with ``Test``:

:class:`GatewayTypeContract`
    What a gateway type declares (class attributes, method signatures, options schema,
    ``example_options``) and how it fails with nothing to talk to: ``send`` raises only
    :class:`~b24sms.gateway.GatewayError` subclasses without secrets in their text,
    unauthenticated callbacks are rejected. Set :attr:`~GatewayTypeContract.plugin`.

:class:`GatewayContract`
    All of that, plus the gateway against its carrier's fake API: a send is accepted with a
    status word its map knows, scripted failures raise the right error class, the carrier's
    documented status words map to what its documentation says, and one message goes from an
    emulated Bitrix24 portal through the service and the gateway to its final status at the
    portal. A subclass supplies the fake (:meth:`~GatewayContract.fake_api`) and says how to
    drive it (:meth:`~GatewayContract.options`, :meth:`~GatewayContract.fail_next_send`,
    :meth:`~GatewayContract.report_delivered`, :attr:`~GatewayContract.documented_statuses`).

b24sms checks its built-in gateways with these same classes (``tests/test_gateway_contract.py``).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import pytest
from marshmallow import RAISE, Schema, ValidationError

from b24sms.gateway import (
    CallbackRejected,
    CallbackRequest,
    Gateway,
    GatewayError,
    OutgoingMessage,
    PermanentGatewayError,
    RetryableGatewayError,
    SendResult,
    StatusReport,
)
from b24sms.statuses import STATUSES

from .service import portal_statuses, provider_table

PUBLIC_URL = "https://sms.example.com"
#: option names whose values are secrets: they must never reach an error message
SECRET_OPTION = re.compile(r"token|secret|password|key", re.IGNORECASE)
#: what the contract asks a fake to fail with: the error class the gateway must raise for it
FAILURES: dict[str, type[GatewayError]] = {
    "retryable": RetryableGatewayError,
    "permanent": PermanentGatewayError,
}


def discovered_type(plugin: str) -> Any:
    """The :class:`~b24sms.plugins.GatewayType` named ``plugin``, found the way the service
    finds it: through the installed entry points (``B24SMS_LOAD_PLUGINS`` applies)."""
    from b24sms.plugins import gateway_types, make_plugin_manager

    if not plugin:
        pytest.fail("set `plugin` on the contract class: the gateway type's name")
    types = gateway_types(make_plugin_manager())
    if plugin not in types:
        pytest.fail(
            f"no gateway type {plugin!r} among the installed plugins ({', '.join(sorted(types))});"
            " is the package installed (pip install -e .) with an entry point in the group b24sms?"
        )
    return types[plugin]


def example_options(cls: type[Gateway]) -> dict[str, Any]:
    """The type's ``example_options``; a failure when a type with options has none."""
    options = getattr(cls, "example_options", None)
    if options is None and cls.options_schema is not None:
        pytest.fail(f"{cls.__name__} has no example_options (a minimal valid configuration)")
    return dict(options or {})


def build_gateway(gateway_type: Any, options: Mapping[str, Any], code: str = "contract") -> Any:
    """One instance of the type for provider ``code``, its options loaded like the service's."""
    from b24sms.plugins import build_gateways

    providers = {code: {"plugin": gateway_type.name, "options": dict(options)}}
    return build_gateways(providers, {gateway_type.name: gateway_type}, PUBLIC_URL)[code]


def secret_values(options: Mapping[str, Any]) -> list[str]:
    """The values of the options whose names say they are secrets."""
    return [
        value
        for key, value in options.items()
        if SECRET_OPTION.search(key) and isinstance(value, str) and value
    ]


def outgoing(gateway: Gateway, to: str = "+14155550100", **fields: Any) -> OutgoingMessage:
    """A message as the core hands it to ``send``."""
    values: dict[str, Any] = {
        "id": 1,
        "message_id": "contract-1",
        "code": gateway.code,
        "member_id": "member",
        "to": to,
        "body": "contract test",
        "callback_url": gateway.callback_url,
    }
    values.update(fields)
    return OutgoingMessage(**values)


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


class GatewayTypeContract:
    """The contract of a gateway type, checked with its ``example_options`` alone.

    ``example_options`` must point at nothing real (the closed port ``http://127.0.0.1:9``),
    so ``send`` fails: cleanly, with a :class:`~b24sms.gateway.GatewayError`.
    """

    #: the gateway type's name, the value of ``plugin = "…"``
    plugin: ClassVar[str] = ""

    @pytest.fixture
    def gateway_type(self) -> Any:
        """The type under test, through discovery (override to parametrise over several)."""
        return discovered_type(self.plugin)

    @pytest.fixture
    def example_gateway(self, gateway_type: Any) -> Iterator[Any]:
        """An instance built from the type's ``example_options``."""
        gateway = build_gateway(gateway_type, example_options(gateway_type.cls))
        yield gateway
        gateway.close()

    def test_declares_the_class_attributes(self, gateway_type: Any) -> None:
        cls = gateway_type.cls
        assert issubclass(cls, Gateway)
        assert isinstance(cls.name, str) and cls.name == gateway_type.name
        assert cls.options_schema is None or (
            isinstance(cls.options_schema, type) and issubclass(cls.options_schema, Schema)
        ), "options_schema is a marshmallow Schema class, or None"
        assert isinstance(cls.statuses, Mapping)
        assert isinstance(cls.callbacks, bool)
        assert cls.poll_interval is None or cls.poll_interval > 0
        assert cls.__doc__, "a gateway type says what it is in its docstring"

    def test_status_map_speaks_only_the_five_statuses(
        self, gateway_type: Any, example_gateway: Any
    ) -> None:
        for statuses in (gateway_type.cls.statuses, example_gateway.statuses):
            assert all(isinstance(word, str) for word in statuses)
            unknown = set(statuses.values()) - set(STATUSES)
            assert not unknown, f"the status map names statuses that do not exist: {unknown}"
        for word, status in example_gateway.statuses.items():
            assert example_gateway.map_status(word) == status
        assert example_gateway.map_status("certainly-not-a-status-word") is None

    def test_method_signatures(self, gateway_type: Any) -> None:
        cls = gateway_type.cls

        def params(name: str) -> list[str]:
            return list(inspect.signature(getattr(cls, name)).parameters)

        assert params("send") == ["self", "message"]
        assert params("parse_callback") == ["self", "request"]
        assert params("poll") == ["self", "external_id"]
        assert params("map_status") == ["self", "raw_status"]
        assert params("close") == ["self"]
        assert list(inspect.signature(cls.__init__).parameters)[:3] == [
            "self",
            "options",
            "context",
        ]
        assert cls.send is not Gateway.send, "send() must be implemented"

    def test_example_options_load_and_unknown_options_are_refused(self, gateway_type: Any) -> None:
        schema = gateway_type.cls.options_schema
        if schema is None:
            pytest.skip("takes no options")
        schema(unknown=RAISE).load(example_options(gateway_type.cls))
        with pytest.raises(ValidationError):
            schema(unknown=RAISE).load({**example_options(gateway_type.cls), "no_such_option": 1})

    def test_send_answers_a_result_or_raises_only_gateway_errors(
        self, gateway_type: Any, example_gateway: Any
    ) -> None:
        try:
            result = example_gateway.send(outgoing(example_gateway))
        except GatewayError as exc:
            # Nothing listens where example_options point: a network error, worth a retry.
            assert isinstance(exc, RetryableGatewayError), (
                f"an unreachable gateway raised {type(exc).__name__} ({exc}), "
                "not RetryableGatewayError"
            )
            for secret in secret_values(example_options(gateway_type.cls)):
                assert secret not in str(exc), "a secret option reached an error message"
            return
        assert isinstance(result, SendResult)
        assert isinstance(result.raw_status, str)
        assert result.status is None or result.status in STATUSES
        assert all(isinstance(report, StatusReport) for report in result.later)

    def test_poll_answers_a_report_none_or_a_gateway_error(self, example_gateway: Any) -> None:
        try:
            report = example_gateway.poll("contract-external-id")
        except GatewayError:
            return
        assert report is None or isinstance(report, StatusReport)

    @pytest.mark.parametrize("unsigned", UNSIGNED, ids=["json", "form", "empty"])
    def test_unauthenticated_callbacks_are_rejected(
        self, example_gateway: Any, unsigned: CallbackRequest
    ) -> None:
        with pytest.raises(CallbackRejected):
            example_gateway.parse_callback(unsigned)

    def test_callback_response_shape(self, example_gateway: Any) -> None:
        body, status, headers = example_gateway.callback_response([])
        assert isinstance(body, str | bytes) and isinstance(status, int)
        assert isinstance(headers, Mapping)


class GatewayContract(GatewayTypeContract):
    """The whole contract: the type's, and the gateway against its carrier's fake API.

    Override :meth:`fake_api` (a fixture yielding the started fake, or None for a gateway
    that talks to nothing), :meth:`options`, and — where the gateway can fail or report
    later — :meth:`fail_next_send`, :meth:`report_delivered` and :attr:`documented_statuses`.
    """

    #: the carrier's status words and what its documentation says each means, written from
    #: the carrier's docs (or its fake), not copied from the gateway's map: that is what is
    #: checked. Empty: the check is skipped.
    documented_statuses: ClassVar[Mapping[str, str]] = {}
    #: the status a message ends in at the portal once the fake reported it delivered
    #: (``sent`` for a gateway that cannot know about delivery)
    final_status: ClassVar[str] = "delivered"
    #: a number the fake accepts
    to: ClassVar[str] = "+14155550100"

    @pytest.fixture
    def fake_api(self) -> Iterator[Any]:
        """The carrier's fake API, started (override); None: the gateway talks to nothing."""
        yield None

    def options(self, api: Any) -> dict[str, Any]:
        """The provider's options against the fake ``api`` (default: ``example_options``)."""
        return example_options(discovered_type(self.plugin).cls)

    def fail_next_send(self, api: Any, kind: str) -> None:
        """Make the fake fail the next send: ``retryable`` (5xx, 429, a network error…) or
        ``permanent`` (a refused number or credentials). Override; the default skips."""
        pytest.skip(f"{type(self).__name__} does not script {kind} failures")

    def report_delivered(self, api: Any, callback_url: str) -> None:
        """Make the fake report every message it accepted as delivered, the way the carrier
        does: a signed callback to ``callback_url`` (the provider's
        ``/gateways/<CODE>/callback`` on the running service; a fake that remembers each
        message's own callback URL may use that). Default: nothing to do."""

    # -- the tests ------------------------------------------------------------------------------

    @pytest.fixture
    def gateway(self, gateway_type: Any, fake_api: Any) -> Iterator[Any]:
        """An instance built with :meth:`options` against the fake."""
        gateway = build_gateway(gateway_type, self.options(fake_api))
        yield gateway
        gateway.close()

    def test_sends_through_the_fake_with_a_status_word_it_knows(self, gateway: Any) -> None:
        result = gateway.send(outgoing(gateway, self.to))
        assert isinstance(result, SendResult)
        status = result.status or gateway.map_status(result.raw_status)
        assert status in STATUSES, (
            f"send answered raw_status {result.raw_status!r}, which the status map does not know"
        )

    def test_documented_statuses_map_as_documented(self, gateway: Any) -> None:
        if not self.documented_statuses:
            pytest.skip("no documented_statuses given")
        wrong = {
            word: (gateway.map_status(word), meaning)
            for word, meaning in self.documented_statuses.items()
            if gateway.map_status(word) != meaning
        }
        assert not wrong, f"status words mapped wrongly (word: (mapped, documented)): {wrong}"

    @pytest.mark.parametrize("kind", sorted(FAILURES))
    def test_failures_raise_the_right_error_class(
        self, gateway: Any, fake_api: Any, kind: str
    ) -> None:
        self.fail_next_send(fake_api, kind)
        with pytest.raises(GatewayError) as info:
            gateway.send(outgoing(gateway, self.to))
        assert type(info.value) is not GatewayError, "raise one of the two subclasses"
        assert isinstance(info.value, FAILURES[kind]), (
            f"a {kind} failure raised {type(info.value).__name__}: {info.value}"
        )
        for secret in secret_values(gateway.options):
            assert secret not in str(info.value), "a secret option reached an error message"

    def test_a_message_reaches_its_final_status_at_the_portal(
        self, gateway_type: Any, fake_api: Any, b24sms_portal: Any
    ) -> None:
        code = "contract"
        portal = b24sms_portal(
            providers={code: provider_table(gateway_type.name, self.options(fake_api))}
        )
        message_id, response = portal.send_sms(code, self.to, "contract test")
        assert response.status_code == 200, response.text
        # The kit's service runs its queue inline (memory://): the HANDLER answered after the
        # gateway's send. Now the carrier's report, as it would come.
        service = portal.service
        self.report_delivered(fake_api, f"{service.url}/gateways/{code}/callback")
        try:
            portal.wait_for_status(message_id, statuses={self.final_status}, timeout=15)
        except TimeoutError:
            pytest.fail(
                f"the portal received {portal_statuses(portal, message_id)}, never "
                f"{self.final_status!r}"
            )
