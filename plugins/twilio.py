"""The ``twilio`` gateway: Programmable Messaging through the official ``twilio`` library.

Options (``[providers.<CODE>]``):

- ``account_sid``, ``auth_token`` — the account's credentials (the token also signs callbacks);
- ``from`` (a Twilio number or sender id) or ``messaging_service_sid`` — exactly one;
- ``status_callback`` (default true) — ask Twilio to post status changes to this provider's
  callback URL; each one is verified with ``X-Twilio-Signature``. With false the gateway polls;
- ``api_base_url`` — send API requests there instead of ``https://api.twilio.com`` (a proxy, or
  a local fake in tests);
- ``timeout`` — seconds for one API request (default 10).

Connections are pooled: the library's :class:`TwilioHttpClient` keeps one ``requests`` session
per provider, and its pool is sized here to the number of sends the core runs at once
(``GatewayContext.concurrency`` when the core sets it, else 32) for ``https`` and ``http``
alike. The library's own default is ``min(32, CPUs + 4)`` connections for ``https`` only (6 on
a 2-core machine) and requests' 10 for anything else: more concurrent sends than that would
open a connection each and throw it away after.

Twilio's status words map to Bitrix24's: accepted, scheduled, queued, sending → queued;
sent → sent; delivered, read → delivered; undelivered → undelivered; failed, canceled → failed.

Errors: 429 (20429), 5xx, timeouts and connection errors are retried; invalid or unsubscribed
numbers (21211, 21610, 21612, 21614, 21408…), refused credentials (20003) and every other 4xx
fail the message at once. A timeout after the request left may mean Twilio created the
message anyway — Twilio has no idempotency key for messages, so a retry can duplicate it.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from typing import Any, ClassVar

import requests
from marshmallow import Schema, ValidationError, fields, validate, validates_schema
from requests.adapters import HTTPAdapter
from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.http.http_client import TwilioHttpClient
from twilio.http.response import Response
from twilio.request_validator import RequestValidator
from twilio.rest import Client

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
    check_http_url,
    retry_after_seconds,
)
from b24sms.statuses import DELIVERED, FAILED, QUEUED, SENT, UNDELIVERED

TWILIO_STATUSES: dict[str, str] = {
    "accepted": QUEUED,
    "scheduled": QUEUED,
    "queued": QUEUED,
    "sending": QUEUED,
    "sent": SENT,
    "delivered": DELIVERED,
    "read": DELIVERED,
    "undelivered": UNDELIVERED,
    "failed": FAILED,
    "canceled": FAILED,
}

#: Twilio error codes worth another try although their HTTP status says otherwise
RETRYABLE_CODES = frozenset({20429, 20500, 20503, 30001})
_LIBRARY_PREFIX = re.compile(r"^Unable to \w+ (record|page)s?: ")
#: sends in flight at once through one gateway when the core does not say
DEFAULT_CONCURRENCY = 32


class TwilioOptions(Schema):
    """Options of the ``twilio`` gateway."""

    account_sid = fields.String(
        required=True,
        validate=validate.Regexp(
            r"^AC[0-9a-fA-F]{32}$", error="must be AC followed by 32 hex digits"
        ),
    )
    auth_token = fields.String(required=True, load_only=True, validate=validate.Length(min=1))
    from_ = fields.String(data_key="from", load_default=None, validate=validate.Length(min=1))
    messaging_service_sid = fields.String(
        load_default=None,
        validate=validate.Regexp(
            r"^MG[0-9a-fA-F]{32}$", error="must be MG followed by 32 hex digits"
        ),
    )
    status_callback = fields.Boolean(load_default=True)
    api_base_url = fields.String(load_default=None, validate=check_http_url)
    timeout = fields.Float(load_default=10.0, validate=validate.Range(min=0, min_inclusive=False))

    @validates_schema
    def _one_sender(self, data: dict[str, Any], **kwargs: Any) -> None:
        if bool(data.get("from_")) == bool(data.get("messaging_service_sid")):
            raise ValidationError("set exactly one of from and messaging_service_sid", "from")


class _HttpClient(TwilioHttpClient):
    """The library's client with a connection pool of ``pool_size``, remembering each
    thread's last answer headers (for Retry-After).

    Safe to share between threads: the library's ``request`` keeps no state between calls that
    it reads back (only ``_test_only_last_*``, which nothing here reads), and the answer headers
    are kept per thread.
    """

    def __init__(self, timeout: float, pool_size: int) -> None:
        super().__init__(timeout=timeout)
        adapter = HTTPAdapter(pool_maxsize=pool_size)
        self.session.mount("https://", adapter)
        self.session.mount("http://", adapter)
        self._last = threading.local()

    def request(self, *args: Any, **kwargs: Any) -> Response:
        self._last.headers = {}
        response = super().request(*args, **kwargs)
        self._last.headers = response.headers or {}
        return response

    def last_header(self, name: str) -> str | None:
        headers = getattr(self._last, "headers", {}) or {}
        return next((v for k, v in headers.items() if k.lower() == name.lower()), None)


class TwilioGateway(Gateway):
    """Sends through Twilio's Messages API; status callbacks are checked with the auth token."""

    name: ClassVar[str] = "twilio"
    options_schema: ClassVar[type[Schema]] = TwilioOptions
    statuses: Mapping[str, str] = TWILIO_STATUSES
    callbacks: bool = True
    example_options: ClassVar[dict[str, Any]] = {
        "account_sid": "AC" + "0" * 32,
        "auth_token": "example-auth-token",
        "from": "+15005550006",
        "api_base_url": "http://127.0.0.1:9",
        "timeout": 2,
    }

    def __init__(self, options: Mapping[str, Any], context: GatewayContext) -> None:
        super().__init__(options, context)
        self.callbacks = options["status_callback"]
        # without callbacks nothing tells us about delivery: ask Twilio now and then
        self.poll_interval = None if options["status_callback"] else 60.0
        #: sends the core may run at once through this instance: the pool keeps as many
        self.concurrency = max(1, int(getattr(context, "concurrency", 0) or DEFAULT_CONCURRENCY))
        self._http = _HttpClient(timeout=options["timeout"], pool_size=self.concurrency)
        self.client = Client(options["account_sid"], options["auth_token"], http_client=self._http)
        if options["api_base_url"]:
            self.client.api.base_url = options["api_base_url"].rstrip("/")
            # TWILIO_EDGE / TWILIO_REGION in the environment would rewrite the host
            self.client.edge = None
            self.client.region = None
        self._validator = RequestValidator(options["auth_token"])

    @property
    def _account(self) -> Any:
        return self.client.api.v2010.accounts(self.options["account_sid"])

    def send(self, message: OutgoingMessage) -> SendResult:
        """Create the message; its ``sid`` and first status come from Twilio's answer."""
        params: dict[str, Any] = {"to": message.to, "body": message.body}
        if self.options["from_"]:
            params["from_"] = self.options["from_"]
        else:
            params["messaging_service_sid"] = self.options["messaging_service_sid"]
        if self.options["status_callback"]:
            params["status_callback"] = message.callback_url
        try:
            created = self._account.messages.create(**params)
        except Exception as exc:  # noqa: BLE001 - every failure is classified, none escapes raw
            raise self._error(exc, "sending") from None
        return SendResult(external_id=created.sid, raw_status=str(created.status))

    def poll(self, external_id: str) -> StatusReport | None:
        """Fetch one message's current status."""
        try:
            fetched = self._account.messages(external_id).fetch()
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, "polling") from None
        return StatusReport(
            raw_status=str(fetched.status),
            external_id=external_id,
            error=str(fetched.error_code) if fetched.error_code else None,
        )

    def _error(self, exc: Exception, doing: str) -> GatewayError:
        """Turn whatever the library raised into a retryable or permanent gateway error."""
        if isinstance(exc, TwilioRestException) or hasattr(exc, "status"):
            status = int(getattr(exc, "status", 0) or 0)
            code = getattr(exc, "code", None)
            text = (
                getattr(exc, "msg", None)
                or getattr(exc, "detail", None)
                or getattr(exc, "title", "")
            )
            # the library prefixes "Unable to create record: "; keep Twilio's own words
            text = _LIBRARY_PREFIX.sub("", str(text))
            message = f"Twilio answered HTTP {status} while {doing}: {text}"
            code_text = str(code) if code is not None else str(status)
            if status == 429 or code in RETRYABLE_CODES or status >= 500:
                return RetryableGatewayError(
                    message,
                    code=code_text,
                    retry_after=retry_after_seconds(self._http.last_header("Retry-After")),
                )
            return PermanentGatewayError(message, code=code_text)
        if isinstance(exc, (requests.Timeout,)):
            return RetryableGatewayError(
                f"Twilio did not answer within {self.options['timeout']:g} s while {doing}",
                code="timeout",
            )
        if isinstance(exc, (requests.ConnectionError, requests.exceptions.ChunkedEncodingError)):
            return RetryableGatewayError(
                f"cannot reach Twilio while {doing}: {type(exc).__name__}", code="connection"
            )
        if isinstance(exc, (requests.RequestException, TwilioException, ValueError)):
            return PermanentGatewayError(
                f"Twilio request failed while {doing}: {type(exc).__name__}"
            )
        return RetryableGatewayError(f"unexpected {type(exc).__name__} while {doing}")

    def parse_callback(self, request: CallbackRequest) -> list[StatusReport]:
        """Verify ``X-Twilio-Signature`` over the public URL and the form, then read the status."""
        signature = next(
            (v for k, v in request.headers.items() if k.lower() == "x-twilio-signature"), None
        )
        if not signature:
            raise CallbackRejected("no X-Twilio-Signature header")
        if not self._validator.validate(request.url, dict(request.form), signature):
            raise CallbackRejected("bad X-Twilio-Signature")
        form = request.form
        account = form.get("AccountSid")
        if account and account != self.options["account_sid"]:
            raise CallbackRejected("the callback is about another Twilio account")
        sid = form.get("MessageSid") or form.get("SmsSid")
        status = form.get("MessageStatus") or form.get("SmsStatus")
        if not sid or not status:
            raise CallbackInvalid("the callback has no MessageSid or MessageStatus")
        return [
            StatusReport(raw_status=status, external_id=sid, error=form.get("ErrorCode") or None)
        ]

    def close(self) -> None:
        """Close the library's pooled HTTP session."""
        session = getattr(self._http, "session", None)
        if session is not None:
            session.close()


@hookimpl
def b24sms_register_gateways(register) -> None:
    register(TwilioGateway)
