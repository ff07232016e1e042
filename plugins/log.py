"""The ``log`` gateway: writes each message to the log instead of sending it.

For development, demos and a first install: it needs no account anywhere. The message goes to the
logger ``b24sms.gateway.<CODE>`` with the number partly masked and the body's length only (the
text itself may be personal data and never reaches a log line). It then reports the outcome set
by the ``outcome`` option, so every path of the service, including failures, can be tried.

Options (``[providers.<CODE>]``):

- ``outcome`` — ``delivered`` (default) | ``sent`` | ``undelivered`` | ``failed``: the final
  status reported after the message is written. With ``sent`` no later report follows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from marshmallow import Schema, fields, validate

from b24sms import hookimpl
from b24sms.gateway import Gateway, OutgoingMessage, SendResult, StatusReport
from b24sms.logs import mask_number
from b24sms.statuses import DELIVERED, FAILED, SENT, UNDELIVERED

OUTCOMES = (DELIVERED, SENT, UNDELIVERED, FAILED)


class LogOptions(Schema):
    """Options of the ``log`` gateway."""

    outcome = fields.String(load_default=DELIVERED, validate=validate.OneOf(OUTCOMES))


class LogGateway(Gateway):
    """Writes messages to the log and reports the configured outcome at once."""

    name: ClassVar[str] = "log"
    options_schema: ClassVar[type[Schema]] = LogOptions
    statuses: Mapping[str, str] = {word: word for word in OUTCOMES}
    example_options: ClassVar[dict[str, Any]] = {"outcome": "delivered"}

    def send(self, message: OutgoingMessage) -> SendResult:
        """Log the message (masked number, body length) and answer ``sent`` plus the outcome."""
        external_id = f"log-{message.id}-{message.attempt}"
        outcome = self.options["outcome"]
        self.logger.info(
            "message %s (Bitrix24 %s) to %s: %d characters; outcome %s",
            message.id,
            message.message_id,
            mask_number(message.to),
            len(message.body),
            outcome,
        )
        later: tuple[StatusReport, ...] = ()
        if outcome != SENT:
            later = (StatusReport(raw_status=outcome, external_id=external_id, status=outcome),)
        return SendResult(external_id=external_id, raw_status=SENT, status=SENT, later=later)


@hookimpl
def b24sms_register_gateways(register) -> None:
    register(LogGateway)
