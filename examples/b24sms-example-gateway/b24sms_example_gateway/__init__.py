"""A b24sms gateway plugin for the (fictional) Example Carrier SMS API — copy it for yours.

Everything a real integration needs is here, each part small enough to read in one go:

- :class:`CarrierOptions` — the provider's options, validated when the service starts;
- :class:`ExampleCarrierGateway` — ``send`` (one API call per message), the status map,
  error classification (retry or give up), signed delivery reports with replay protection,
  and ``poll`` for setups without a public callback URL;
- :func:`b24sms_register_gateways` — the hook that hands the type to b24sms;
- :mod:`b24sms_example_gateway.testing` — a fake Example Carrier API to test against.

The Example Carrier API::

    POST {api_url}/v1/sms        Authorization: Bearer <api_key>
         {"from": "ACME", "to": "+4915112345678", "text": "…", "client_ref": "42",
          "webhook_url": "https://sms.example.com/gateways/<CODE>/callback"}
      → 202 {"sms_id": "ec_1", "state": "accepted"}
      → 401 / 422 / 429 / 5xx  {"error": {"code": "invalid_number", "message": "…"}}
    GET  {api_url}/v1/sms/{sms_id} → 200 {"sms_id": "ec_1", "state": "delivered"}

    webhook: POST {"sms_id": "ec_1", "state": "delivered", "error_code": null}
             Example-Signature: t=<unix time>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping
from typing import Any, ClassVar

import requests
from marshmallow import Schema, fields, validate

from b24sms import hookimpl
from b24sms.gateway import (
    CallbackInvalid,
    CallbackRejected,
    CallbackRequest,
    Gateway,
    GatewayContext,
    GatewayError,
    OutgoingMessage,
    PermanentGatewayError,
    RetryableGatewayError,
    SendResult,
    StatusReport,
    retry_after_seconds,
)

__version__ = "0.1.0"

#: how old a signed webhook may be before it counts as a replay
SIGNATURE_TOLERANCE = 300


class CarrierOptions(Schema):
    """``[providers.<CODE>]`` options of ``plugin = "example-carrier"``.

    b24sms loads this with ``unknown=RAISE``: a misspelt option stops the service at start-up
    with an error naming the provider, the plugin and the option.
    """

    api_url = fields.URL(
        load_default="https://api.example-carrier.invalid",
        schemes={"http", "https"},
        require_tld=False,
    )
    api_key = fields.String(required=True, validate=validate.Length(min=1))
    sender = fields.String(
        required=True,
        validate=validate.Regexp(
            r"^(\+[0-9]{6,15}|[A-Za-z0-9 ]{1,11})$",
            error="must be a phone number in E.164 or up to 11 letters and digits",
        ),
    )
    webhook_secret = fields.String(load_default=None, validate=validate.Length(min=16))
    timeout = fields.Float(load_default=10.0, validate=validate.Range(min=0, min_inclusive=False))


class ExampleCarrierGateway(Gateway):
    """Sends through the Example Carrier API; see the module docstring for the API."""

    #: the value of ``plugin = "…"`` in a provider's config; unique among all installed plugins
    name: ClassVar[str] = "example-carrier"
    options_schema: ClassVar[type[Schema]] = CarrierOptions
    #: the carrier's words → queued | sent | delivered | undelivered | failed
    statuses: Mapping[str, str] = {
        "accepted": "queued",
        "enroute": "sent",
        "delivered": "delivered",
        "expired": "undelivered",
        "undeliverable": "undelivered",
        "rejected": "failed",
    }
    callbacks: bool = True
    #: a minimal valid configuration, used by b24sms's contract tests (a closed local port)
    example_options: ClassVar[dict[str, Any]] = {
        "api_url": "http://127.0.0.1:9",
        "api_key": "example-key",
        "sender": "ACME",
        "webhook_secret": "example-webhook-secret",
    }

    def __init__(self, options: Mapping[str, Any], context: GatewayContext) -> None:
        super().__init__(options, context)
        self.api_url = options["api_url"].rstrip("/")
        # Without a secret we cannot trust webhooks: ask for reports instead.
        self.callbacks = bool(options["webhook_secret"])
        self.poll_interval = None if self.callbacks else 30.0
        # One session per provider: connection pooling, and the key set in one place.
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {options['api_key']}"

    # sending ---------------------------------------------------------------------------------

    def send(self, message: OutgoingMessage) -> SendResult:
        payload = {
            "from": self.options["sender"],
            "to": message.to,
            "text": message.body,
            "client_ref": str(message.id),
        }
        if self.callbacks:
            payload["webhook_url"] = message.callback_url
        answer = self._request("POST", "/v1/sms", json=payload)
        # raw_status is the carrier's word; leaving status None lets the core map it
        return SendResult(external_id=answer["sms_id"], raw_status=answer["state"])

    def poll(self, external_id: str) -> StatusReport | None:
        answer = self._request("GET", f"/v1/sms/{external_id}")
        return StatusReport(
            raw_status=answer["state"], external_id=external_id, error=answer.get("error_code")
        )

    def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """One API call; every failure leaves as a retryable or a permanent GatewayError."""
        try:
            response = self.session.request(
                method, self.api_url + path, timeout=self.options["timeout"], **kwargs
            )
        except (requests.ConnectionError, requests.Timeout) as exc:
            # Never put the exception's text here blindly: some carry URLs with credentials.
            raise RetryableGatewayError(
                f"Example Carrier unreachable: {type(exc).__name__}", code="network"
            ) from None
        except requests.RequestException as exc:
            raise PermanentGatewayError(f"request failed: {type(exc).__name__}") from None
        if response.status_code < 300:
            try:
                return response.json()
            except ValueError:
                raise PermanentGatewayError("the answer is not JSON") from None
        raise self._error(response)

    def _error(self, response: requests.Response) -> GatewayError:
        try:
            error = response.json()["error"]
            code, text = str(error["code"]), str(error.get("message", ""))
        except (ValueError, KeyError, TypeError):
            code, text = str(response.status_code), response.reason or ""
        # The carrier's own words may repeat what we sent it, the API key included.
        text = text.replace(self.options["api_key"], "***")
        message = f"Example Carrier answered HTTP {response.status_code}: {text}"
        if response.status_code == 429 or response.status_code >= 500:
            return RetryableGatewayError(
                message,
                code=code,
                retry_after=retry_after_seconds(response.headers.get("Retry-After")),
            )
        # 401 (bad key), 422 (bad number)…: trying again gives the same answer
        return PermanentGatewayError(message, code=code)

    # delivery reports ------------------------------------------------------------------------

    def parse_callback(self, request: CallbackRequest) -> list[StatusReport]:
        secret = self.options["webhook_secret"]
        if not secret:
            raise CallbackRejected("no webhook_secret configured: reports are not accepted")
        header = next(
            (v for k, v in request.headers.items() if k.lower() == "example-signature"), ""
        )
        parts = dict(item.split("=", 1) for item in header.split(",") if "=" in item)
        timestamp, given = parts.get("t", ""), parts.get("v1", "")
        if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > SIGNATURE_TOLERANCE:
            raise CallbackRejected("missing or stale Example-Signature timestamp")
        expected = hmac.new(
            secret.encode(), timestamp.encode() + b"." + request.body, hashlib.sha256
        ).hexdigest()
        if not hmac.compare_digest(expected, given):  # constant time
            raise CallbackRejected("bad Example-Signature")
        data = request.json()  # raises CallbackInvalid for a body that is not JSON
        if not isinstance(data, dict) or not data.get("sms_id") or not data.get("state"):
            raise CallbackInvalid("the report needs sms_id and state")
        return [
            StatusReport(
                raw_status=str(data["state"]),
                external_id=str(data["sms_id"]),
                error=data.get("error_code"),
            )
        ]

    def close(self) -> None:
        self.session.close()


@hookimpl
def b24sms_register_gateways(register) -> None:
    """Hand the gateway type to b24sms."""
    register(ExampleCarrierGateway)
