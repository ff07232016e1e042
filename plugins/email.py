"""The ``email`` gateway: email-to-SMS over SMTP.

Many carriers and SMS resellers turn an email to ``<number>@<their domain>`` into a text message.
This gateway writes one plain-text mail per message to the address made from the recipient's
number and hands it to an SMTP server with :mod:`smtplib`.

Options (``[providers.<CODE>]``):

- ``smtp_host``; ``smtp_port`` (default by ``security``: 587 for ``starttls``, 465 for ``ssl``,
  25 for ``none``); ``smtp_user`` and ``smtp_password`` (log in only when a user is set);
- ``security`` — ``starttls`` (default) | ``ssl`` | ``none``;
- ``from`` — the sender, ``sms@example.com`` or ``SMS <sms@example.com>``;
- ``address`` — the recipient template: ``{digits}`` (``4915112345678``), ``{e164}``
  (``+4915112345678``), ``{national}`` (the number as dialled inside its country, digits only:
  ``015112345678``, ``4155550100``);
- ``routes`` — a table of number prefix → address template; the longest matching prefix wins and
  ``address`` is the fallback (``routes = { "+49" = "{national}@sms.example.de" }``);
- ``subject`` — a template with the same placeholders plus ``{code}`` (default ``SMS``);
- ``timeout`` — seconds for the SMTP conversation (default 10).

The gateway never reports ``delivered``: a ``250`` from the SMTP server only says the server took
the mail. Whether the carrier's gateway turned it into a text, and whether that reached the phone,
is not something SMTP can tell, so the message stays ``sent``.
"""

from __future__ import annotations

import functools
import smtplib
import socket
import ssl
import string
from collections.abc import Mapping
from email.message import EmailMessage
from email.utils import formatdate, make_msgid, parseaddr
from typing import Any, ClassVar

import phonenumbers
from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from b24sms import hookimpl
from b24sms.gateway import (
    Gateway,
    GatewayError,
    OutgoingMessage,
    PermanentGatewayError,
    RetryableGatewayError,
    SendResult,
)
from b24sms.statuses import SENT

DEFAULT_PORTS = {"starttls": 587, "ssl": 465, "none": 25}
ADDRESS_PLACEHOLDERS = ("digits", "e164", "national")
SUBJECT_PLACEHOLDERS = (*ADDRESS_PLACEHOLDERS, "code")
_SAMPLE = {"digits": "14155550100", "e164": "+14155550100", "national": "4155550100", "code": "x"}


def _check_template(template: str, allowed: tuple[str, ...]) -> None:
    """Only the known ``{placeholders}``; literal braces are not needed in addresses."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValidationError(f"bad template: {exc}") from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in allowed or spec or conversion:
            known = ", ".join("{" + p + "}" for p in allowed)
            raise ValidationError(f"unknown placeholder {{{name}}} (known: {known})")


def _check_address(template: str) -> None:
    _check_template(template, ADDRESS_PLACEHOLDERS)
    address = template.format(**_SAMPLE)
    if address.count("@") != 1 or any(ch.isspace() or ch in '<>,;"' for ch in address):
        raise ValidationError(f"does not make an email address: {address!r}")


def _check_subject(template: str) -> None:
    _check_template(template, SUBJECT_PLACEHOLDERS)
    if "\n" in template or "\r" in template:
        raise ValidationError("must be one line")


def _check_sender(value: str) -> None:
    _, address = parseaddr(value)
    if "@" not in address or "\n" in value or "\r" in value:
        raise ValidationError("must be an email address, e.g. sms@example.com")


class EmailOptions(Schema):
    """Options of the ``email`` gateway."""

    smtp_host = fields.String(required=True, validate=validate.Length(min=1))
    smtp_port = fields.Integer(load_default=None, validate=validate.Range(min=1, max=65535))
    smtp_user = fields.String(load_default=None)
    smtp_password = fields.String(load_default=None, load_only=True)
    security = fields.String(load_default="starttls", validate=validate.OneOf(tuple(DEFAULT_PORTS)))
    from_ = fields.String(data_key="from", required=True, validate=_check_sender)
    address = fields.String(load_default=None, validate=_check_address)
    routes = fields.Dict(
        keys=fields.String(
            validate=validate.Regexp(r"^\+[0-9]+$", error="prefixes are written like +49")
        ),
        values=fields.String(validate=_check_address),
        load_default=dict,
    )
    subject = fields.String(load_default="SMS", validate=_check_subject)
    timeout = fields.Float(load_default=10.0, validate=validate.Range(min=0, min_inclusive=False))

    @validates_schema
    def _check(self, data: dict[str, Any], **kwargs: Any) -> None:
        if not data.get("address") and not data.get("routes"):
            raise ValidationError("set address (or routes) to say where the mail goes", "address")
        if data.get("smtp_password") and not data.get("smtp_user"):
            raise ValidationError("smtp_password needs smtp_user", "smtp_user")


def number_parts(e164: str) -> dict[str, str]:
    """The placeholders for one number: ``digits``, ``e164`` and ``national``."""
    digits = "".join(ch for ch in e164 if ch.isdigit())
    try:
        number = phonenumbers.parse("+" + digits)
        formatted = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.NATIONAL)
        national = "".join(ch for ch in formatted if ch.isdigit())
    except phonenumbers.NumberParseException:
        national = digits
    return {"digits": digits, "e164": "+" + digits, "national": national or digits}


class EmailGateway(Gateway):
    """Email-to-SMS: one mail per message to an address derived from the number."""

    name: ClassVar[str] = "email"
    options_schema: ClassVar[type[Schema]] = EmailOptions
    #: only the SMTP server's "taken"; never delivered (see the module docstring)
    statuses: Mapping[str, str] = {"250": SENT}
    example_options: ClassVar[dict[str, Any]] = {
        "smtp_host": "127.0.0.1",
        "smtp_port": 9,
        "security": "none",
        "from": "sms@example.com",
        "address": "{digits}@sms.example.com",
        "timeout": 2,
    }

    @property
    def port(self) -> int:
        return self.options["smtp_port"] or DEFAULT_PORTS[self.options["security"]]

    def address_for(self, to: str) -> str:
        """The recipient address for an E.164 number: the longest matching route, else
        ``address``."""
        parts = number_parts(to)
        routes = self.options["routes"]
        prefix = max((p for p in routes if parts["e164"].startswith(p)), key=len, default=None)
        template = routes[prefix] if prefix is not None else self.options["address"]
        if not template:
            raise PermanentGatewayError(
                f"no route for numbers like {parts['e164'][:4]}… and no address template",
                code="no-route",
            )
        return template.format(**parts)

    def build_mail(self, message: OutgoingMessage) -> EmailMessage:
        """The mail for one message, with a fresh Message-ID."""
        sender = self.options["from_"]
        domain = parseaddr(sender)[1].rpartition("@")[2] or None
        mail = EmailMessage()
        mail["From"] = sender
        mail["To"] = self.address_for(message.to)
        mail["Subject"] = self.options["subject"].format(**number_parts(message.to), code=self.code)
        mail["Date"] = formatdate(localtime=False, usegmt=True)
        mail["Message-ID"] = make_msgid(
            idstring=f"b24sms.{message.id}.{message.attempt}", domain=domain
        )
        # quoted-printable keeps non-ASCII text intact through servers without 8BITMIME
        mail.set_content(message.body, cte=None if message.body.isascii() else "quoted-printable")
        return mail

    @functools.cached_property
    def _tls(self) -> ssl.SSLContext:
        # Built once: a default context loads the system's certificate store.
        return ssl.create_default_context()

    def _connect(self) -> smtplib.SMTP:
        host, port, timeout = self.options["smtp_host"], self.port, self.options["timeout"]
        security = self.options["security"]
        if security == "ssl":
            return smtplib.SMTP_SSL(host, port, timeout=timeout, context=self._tls)
        smtp = smtplib.SMTP(host, port, timeout=timeout)
        try:
            if security == "starttls":
                smtp.ehlo()
                smtp.starttls(context=self._tls)
                smtp.ehlo()
        except BaseException:
            smtp.close()
            raise
        return smtp

    def send(self, message: OutgoingMessage) -> SendResult:
        """Hand the mail to the SMTP server; ``250`` is ``sent``, never more."""
        mail = self.build_mail(message)
        try:
            smtp = self._connect()
            try:
                if self.options["smtp_user"]:
                    smtp.login(self.options["smtp_user"], self.options["smtp_password"] or "")
                smtp.send_message(mail)
            finally:
                try:
                    smtp.quit()
                except (smtplib.SMTPException, OSError):
                    smtp.close()
        except Exception as exc:  # noqa: BLE001 - every failure is classified, none escapes raw
            raise self._error(exc) from None
        self.logger.debug("SMTP server %s took %s", self.options["smtp_host"], mail["Message-ID"])
        return SendResult(external_id=mail["Message-ID"], raw_status="250", status=SENT)

    def _error(self, exc: Exception) -> GatewayError:
        where = f"{self.options['smtp_host']}:{self.port}"
        if isinstance(exc, GatewayError):
            return exc
        answered = _smtp_answer_error(exc, where)
        if answered is not None:
            return answered
        if isinstance(exc, ssl.SSLCertVerificationError):
            return PermanentGatewayError(
                f"{where}: TLS certificate not trusted: {exc.verify_message}", code="tls"
            )
        if isinstance(exc, ssl.SSLError):
            return RetryableGatewayError(f"{where}: TLS failed: {exc.reason}", code="tls")
        if isinstance(exc, (TimeoutError, socket.timeout)):
            return RetryableGatewayError(f"{where} did not answer in time", code="timeout")
        if isinstance(exc, OSError):
            return RetryableGatewayError(
                f"cannot connect to {where}: {exc.strerror or type(exc).__name__}",
                code="connection",
            )
        if isinstance(exc, smtplib.SMTPException):
            return RetryableGatewayError(f"{where}: {type(exc).__name__}", code="smtp")
        return RetryableGatewayError(f"{where}: unexpected {type(exc).__name__}")


def _smtp_answer_error(exc: Exception, where: str) -> GatewayError | None:
    """The error for what the SMTP server answered or how it hung up; None for other failures
    (TLS, timeouts, connections), which :meth:`EmailGateway._error` classifies."""
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        code, text = next(iter(exc.recipients.values()), (550, b""))
        return _by_code(code, f"{where} refused the recipient: {_text(text)}")
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        return _by_code(exc.smtp_code, f"{where} refused the login: {_text(exc.smtp_error)}")
    if isinstance(exc, smtplib.SMTPResponseException):
        return _by_code(exc.smtp_code, f"{where} answered {_text(exc.smtp_error)}")
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        return PermanentGatewayError(f"{where}: {exc}", code="not-supported")
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        # smtplib reports a read timeout as a disconnection; say which it was
        if isinstance(exc.__context__, TimeoutError):
            return RetryableGatewayError(f"{where} did not answer in time", code="timeout")
        return RetryableGatewayError(f"{where} closed the connection", code="disconnected")
    return None


def _text(value: bytes | str) -> str:
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return " ".join(text.split())[:200]


def _by_code(code: int, message: str) -> GatewayError:
    """SMTP's own rule: 4xx is a temporary failure, 5xx a permanent one."""
    if 400 <= code < 500:
        return RetryableGatewayError(message, code=str(code))
    if 500 <= code < 600:
        return PermanentGatewayError(message, code=str(code))
    return RetryableGatewayError(message, code=str(code))


@hookimpl
def b24sms_register_gateways(register) -> None:
    register(EmailGateway)
