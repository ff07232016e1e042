"""The gateway contract: what a gateway type is, what it is given and what it answers.

A plugin contributes gateway *types* (subclasses of :class:`Gateway`) through the
``b24sms_register_gateways(register)`` hook. The core makes one instance per provider CODE that
uses the type, with that CODE's validated options, and calls it from queue workers:

- :meth:`Gateway.send` once per attempt; it returns a :class:`SendResult` or raises
  :class:`RetryableGatewayError` / :class:`PermanentGatewayError`;
- :meth:`Gateway.parse_callback` for each request to ``/gateways/<code>/callback``; it verifies the
  request (raising :class:`CallbackRejected` → 401, nothing changes) and returns status reports;
- :meth:`Gateway.poll`, optional, for gateways without callbacks.

Gateways speak their own status words (``raw_status``); :meth:`Gateway.map_status` turns them
into one of the five Bitrix24 statuses, or ``None`` for a word it does not know, which the core
logs and ignores rather than guessing.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import urlsplit

from marshmallow import Schema, ValidationError

from .statuses import STATUSES


class GatewayError(Exception):
    """A send failed. ``retryable`` says whether trying again later may succeed."""

    retryable: bool = False

    def __init__(
        self, message: str, *, code: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        #: the gateway's own error code, when it gave one (recorded on the message)
        self.code = code
        #: seconds the gateway asked us to wait (Retry-After), if any
        self.retry_after = retry_after

    def __str__(self) -> str:
        text = super().__str__()
        return f"{self.code}: {text}" if self.code else text


class RetryableGatewayError(GatewayError):
    """Network trouble, timeouts, 5xx, rate limits: the core retries with backoff."""

    retryable = True


class PermanentGatewayError(GatewayError):
    """A bad number, refused credentials, an unsubscribed recipient: the message fails at once."""

    retryable = False


class CallbackRejected(Exception):
    """The callback failed verification (bad signature, unknown sender): answered 401."""


class CallbackInvalid(Exception):
    """The callback is verified but malformed (a field missing): answered 400."""


@dataclass(frozen=True)
class OutgoingMessage:
    """What a gateway needs to send one message. Built by the core from the stored row."""

    #: our own id of the message (stable across attempts)
    id: int
    #: Bitrix24's message_id
    message_id: str
    code: str
    member_id: str
    #: the recipient in E.164 (``+14155550100``)
    to: str
    body: str
    #: where this gateway should post delivery reports for this message
    callback_url: str
    #: 1 on the first try
    attempt: int = 1


@dataclass(frozen=True)
class StatusReport:
    """One status word from a gateway about one message."""

    raw_status: str
    #: the gateway's id of the message; callbacks must set it, send results may leave it None
    external_id: str | None = None
    #: one of the five statuses; None means "map raw_status with the gateway's status map"
    status: str | None = None
    #: the gateway's error code or text, when the report is a failure
    error: str | None = None

    def __post_init__(self) -> None:
        if self.status is not None and self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, not {self.status!r}")


@dataclass(frozen=True)
class SendResult:
    """What :meth:`Gateway.send` answers when the gateway accepted the message."""

    #: the gateway's id of the message, used to match later callbacks
    external_id: str | None
    #: the gateway's status word in its answer (``queued`` for Twilio, ``250`` for SMTP…)
    raw_status: str
    #: one of the five statuses; None means "map raw_status with the status map"
    status: str | None = None
    #: further reports known at once (the log gateway reports its final outcome this way)
    later: tuple[StatusReport, ...] = ()


@dataclass(frozen=True)
class CallbackRequest:
    """A delivery report as it reached ``/gateways/<code>/callback``."""

    method: str
    #: the public URL the gateway posted to (what it signed), with the query string
    url: str
    headers: Mapping[str, str]
    body: bytes
    #: the form fields (single values) when the body is form-encoded, else empty
    form: Mapping[str, str] = field(default_factory=dict)
    args: Mapping[str, str] = field(default_factory=dict)
    content_type: str = ""

    def json(self) -> Any:
        """The body parsed as JSON; raises :class:`CallbackInvalid` when it is not JSON."""
        import json

        try:
            return json.loads(self.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise CallbackInvalid(f"body is not JSON: {exc}") from None


@dataclass(frozen=True)
class GatewayContext:
    """What the core tells a gateway instance about where it lives."""

    code: str
    public_url: str
    logger: logging.Logger

    @property
    def callback_url(self) -> str:
        return f"{self.public_url}/gateways/{self.code}/callback"


class Gateway:
    """Base class of gateway types. Subclass it, set the class attributes, implement :meth:`send`.

    Class attributes:

    - ``name`` — the gateway type name used in config (``plugin = "<name>"``); unique.
    - ``options_schema`` — a marshmallow ``Schema`` class for the provider's own options.
    - ``example_options`` — a minimal valid options table pointing at nothing real; the contract
      test (``tests/test_gateway_contract.py``) builds every registered type with it.

    Attributes with a class default that an instance may change from its options in
    ``__init__`` (the ``http`` gateway's status map, Twilio's callbacks-or-polling):

    - ``statuses`` — the gateway's status words mapped to queued/sent/delivered/undelivered/failed.
    - ``callbacks`` — True when the gateway posts delivery reports to ``callback_url``.
    - ``poll_interval`` — seconds between :meth:`poll` calls for messages not final, or None.
    """

    name: ClassVar[str] = ""
    options_schema: ClassVar[type[Schema] | None] = None
    example_options: ClassVar[Mapping[str, Any] | None] = None
    # Instance attributes (not ClassVar): a provider's options may set them per instance.
    statuses: Mapping[str, str] = {}
    callbacks: bool = False
    poll_interval: float | None = None

    def __init__(self, options: Mapping[str, Any], context: GatewayContext) -> None:
        self.options = options
        self.context = context
        self.code = context.code
        self.logger = context.logger

    @property
    def callback_url(self) -> str:
        return self.context.callback_url

    def send(self, message: OutgoingMessage) -> SendResult:
        """Hand one message to the gateway. Raise a :class:`GatewayError` subclass on failure."""
        raise NotImplementedError

    def map_status(self, raw_status: str) -> str | None:
        """The Bitrix24 status for a gateway status word, or None when the word is unknown."""
        status = self.statuses.get(raw_status)
        if status is None:
            status = self.statuses.get(str(raw_status).lower())
        return status

    def parse_callback(self, request: CallbackRequest) -> list[StatusReport]:
        """Verify a delivery report and return its status reports (with ``external_id`` set).

        Raise :class:`CallbackRejected` when verification fails, :class:`CallbackInvalid` when the
        request is malformed. The default refuses everything: a gateway without callbacks.
        """
        raise CallbackRejected(f"gateway type {self.name!r} takes no callbacks")

    def callback_response(self, reports: list[StatusReport]) -> tuple[str, int, dict[str, str]]:
        """The answer to a verified callback (body, HTTP status, headers). Default: empty 200."""
        return "", 200, {}

    def poll(self, external_id: str) -> StatusReport | None:
        """Ask the gateway for the status of one message; None when it has nothing new."""
        return None

    def close(self) -> None:
        """Release connections and clients. Called when the service stops."""


# -- helpers for gateway plugins ------------------------------------------------------------------


def retry_after_seconds(value: str | None) -> float | None:
    """An HTTP ``Retry-After`` header as seconds: a number, or an HTTP date in the future."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - dt.datetime.now(dt.UTC)).total_seconds())


def check_http_url(value: str) -> None:
    """A marshmallow validator for an option that must be an http(s) URL."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValidationError("must be an http:// or https:// URL")
