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
- ``timeout`` — seconds for the SMTP conversation (default 10);
- ``max_connections`` — SMTP connections open at once (default 8): sends from more threads
  wait up to ``timeout`` for one to come free. Many servers limit connections per client;
- ``connection_max_age`` — seconds a connection is reused before it is closed and replaced
  (default 60).

Connections are reused between sends (:class:`SmtpPool`): one is opened (TLS, login) only when
none is free; one idle for a few seconds is checked with ``NOOP`` first, and one the server has
closed meanwhile is replaced. A mail is sent again on a fresh connection only when the server
dropped the old one before it took anything: at ``MAIL FROM``, never once the mail's data went
out, so this never sends a mail twice.

The gateway never reports ``delivered``: a ``250`` from the SMTP server only says the server took
the mail. Whether the carrier's gateway turned it into a text, and whether that reached the phone,
is not something SMTP can tell, so the message stays ``sent``.
"""

from __future__ import annotations

import smtplib
import socket
import ssl
import string
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid, parseaddr
from typing import Any, ClassVar

import phonenumbers
from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from b24sms import hookimpl
from b24sms.gateway import (
    Gateway,
    GatewayContext,
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
    max_connections = fields.Integer(load_default=8, validate=validate.Range(min=1, max=1000))
    connection_max_age = fields.Float(
        load_default=60.0, validate=validate.Range(min=0, min_inclusive=False)
    )

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


class _StaleConnection(Exception):
    """The server dropped (or refused with 421) a connection at ``MAIL FROM``: it took nothing
    of the mail, so the mail may go out on a fresh connection. The cause is the error."""


class PoolBusy(Exception):
    """Every connection of a :class:`SmtpPool` stayed lent out for as long as a send waits."""


class _ReusableMixin:
    """``MAIL FROM`` failing on a dead connection raises :class:`_StaleConnection`."""

    def mail(self, sender: str, options: Sequence[str] = ()) -> tuple[int, bytes]:
        try:
            code, text = super().mail(sender, options)  # type: ignore[misc]
        except OSError as exc:  # SMTPServerDisconnected, resets, timeouts: all OSErrors
            raise _StaleConnection from exc
        if code == 421:  # "closing the channel": RFC 5321 4.2.3
            self.close()  # type: ignore[attr-defined]
            raise _StaleConnection from smtplib.SMTPSenderRefused(code, text, sender)
        return code, text


class _SMTP(_ReusableMixin, smtplib.SMTP):
    pass


class _SMTPSSL(_ReusableMixin, smtplib.SMTP_SSL):
    pass


@dataclass
class PooledConnection:
    """One SMTP session of a :class:`SmtpPool`."""

    smtp: smtplib.SMTP
    opened: float = field(default_factory=time.monotonic)
    used: float = field(default_factory=time.monotonic)
    #: True when it served a send before (it may have been dropped since)
    reused: bool = False


def _quit(smtp: smtplib.SMTP) -> None:
    try:
        smtp.quit()
    except (smtplib.SMTPException, OSError):
        smtp.close()


class SmtpPool:
    """Up to ``size`` SMTP connections to one server, lent to one sending thread at a time.

    ``acquire`` lends an idle connection (the most recently used first; checked with NOOP when
    idle longer than ``noop_after``; replaced when older than ``max_age``) or opens one with
    ``connect`` while fewer than ``size`` are open, else waits up to ``wait`` seconds.
    ``release`` takes it back, or closes it when the send left it in an unknown state.
    """

    #: seconds idle after which a connection is checked with NOOP before it is lent again
    noop_after = 5.0

    def __init__(
        self, connect: Callable[[], smtplib.SMTP], size: int, max_age: float, wait: float
    ) -> None:
        self.connect = connect
        self.size = size
        self.max_age = max_age
        self.wait = wait
        self._idle: list[PooledConnection] = []
        self._open = 0
        self._closed = False
        self._changed = threading.Condition()

    def acquire(self) -> PooledConnection:
        """A connection for one send; raises :class:`PoolBusy` when all stayed lent out for
        ``wait`` seconds."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._idle or self._open < self.size, self.wait):
                raise PoolBusy(f"all {self.size} SMTP connections stayed busy")
            conn = self._idle.pop() if self._idle else None
            if conn is None:
                self._open += 1  # the slot is taken now; the connection is opened unlocked
        if conn is None:
            return self._new_in_slot()
        if time.monotonic() - conn.opened >= self.max_age:
            return self.replace(conn, polite=True)
        if not self._alive(conn):
            return self.replace(conn)
        return conn

    def _alive(self, conn: PooledConnection) -> bool:
        if time.monotonic() - conn.used < self.noop_after:
            return True
        try:
            return conn.smtp.noop()[0] == 250
        except (smtplib.SMTPException, OSError):
            return False

    def _new_in_slot(self) -> PooledConnection:
        """Open a connection in a slot already counted in ``_open``; gives the slot back on
        failure."""
        try:
            return PooledConnection(self.connect())
        except BaseException:
            with self._changed:
                self._open -= 1
                self._changed.notify()
            raise

    def replace(self, conn: PooledConnection, *, polite: bool = False) -> PooledConnection:
        """Close ``conn`` (with QUIT when ``polite``: it still works) and open a fresh
        connection in its place."""
        if polite:
            _quit(conn.smtp)
        else:
            conn.smtp.close()
        return self._new_in_slot()

    def release(self, conn: PooledConnection, *, reusable: bool) -> None:
        """Take ``conn`` back for the next send, or close it when it is not ``reusable``
        (without QUIT: after a timeout that would wait as long again)."""
        if reusable:
            conn.used, conn.reused = time.monotonic(), True
            with self._changed:
                if not self._closed:
                    self._idle.append(conn)
                    self._changed.notify()
                    return
        conn.smtp.close()
        with self._changed:
            self._open -= 1
            self._changed.notify()

    def close(self) -> None:
        """Close the idle connections; those lent out are closed when they come back."""
        with self._changed:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._changed.notify_all()
        for conn in idle:
            _quit(conn.smtp)


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

    def __init__(self, options: Mapping[str, Any], context: GatewayContext) -> None:
        super().__init__(options, context)
        # Built once: a default context loads the system's certificate store.
        self._tls = ssl.create_default_context() if options["security"] != "none" else None
        self._pool = SmtpPool(
            self._connect,
            size=options["max_connections"],
            max_age=options["connection_max_age"],
            wait=options["timeout"],
        )

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

    def _connect(self) -> smtplib.SMTP:
        """A new connection, TLS on and logged in when a user is set."""
        host, port, timeout = self.options["smtp_host"], self.port, self.options["timeout"]
        security = self.options["security"]
        smtp: smtplib.SMTP
        if security == "ssl":
            smtp = _SMTPSSL(host, port, timeout=timeout, context=self._tls)
        else:
            smtp = _SMTP(host, port, timeout=timeout)
        try:
            if security == "starttls":
                smtp.ehlo()
                smtp.starttls(context=self._tls)
                smtp.ehlo()
            if self.options["smtp_user"]:
                smtp.login(self.options["smtp_user"], self.options["smtp_password"] or "")
        except BaseException:
            smtp.close()
            raise
        return smtp

    def send(self, message: OutgoingMessage) -> SendResult:
        """Hand the mail to the SMTP server; ``250`` is ``sent``, never more.

        Safe from several threads at once: each send has a pooled connection to itself.
        """
        mail = self.build_mail(message)
        try:
            self._send_pooled(mail)
        except PoolBusy as exc:
            raise RetryableGatewayError(
                f"{self.options['smtp_host']}:{self.port}: {exc} for {self.options['timeout']:g} s",
                code="busy",
            ) from None
        except Exception as exc:  # noqa: BLE001 - every failure is classified, none escapes raw
            raise self._error(exc) from None
        self.logger.debug("SMTP server %s took %s", self.options["smtp_host"], mail["Message-ID"])
        return SendResult(external_id=mail["Message-ID"], raw_status="250", status=SENT)

    def _send_pooled(self, mail: EmailMessage) -> None:
        conn = self._pool.acquire()
        #: the connection to give back to the pool at the end (None: replace() failed and
        #: gave its slot back itself)
        held: PooledConnection | None = conn
        reusable = False
        try:
            try:
                conn.smtp.send_message(mail)
            except _StaleConnection as stale:
                if not conn.reused:
                    raise stale.__cause__ or stale from None
                # Dropped while idle, before it took anything: once more on a fresh one.
                self.logger.debug("SMTP connection was closed by the server; reconnecting")
                held = None  # replace() gives the slot back if it fails
                conn = held = self._pool.replace(conn)
                try:
                    conn.smtp.send_message(mail)
                except _StaleConnection as again:
                    raise again.__cause__ or again from None
            reusable = True
        except smtplib.SMTPResponseException as exc:
            # sendmail reset the transaction (RSET) after a refusal: the connection goes on,
            # unless the server said it is closing it (421).
            reusable = exc.smtp_code != 421
            raise
        except smtplib.SMTPRecipientsRefused:
            reusable = True
            raise
        finally:
            if held is not None:
                self._pool.release(held, reusable=reusable)

    def close(self) -> None:
        """Close the pooled SMTP connections."""
        self._pool.close()

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
