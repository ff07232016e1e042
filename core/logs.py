"""Logging set-up: text or one JSON object per line, masking of phone numbers, and the one log
line per message state change (:class:`StatusLog`, an internal plugin on the event hooks)."""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import TYPE_CHECKING, Any

from . import redaction
from .hookspecs import hookimpl
from .statuses import QUEUED

if TYPE_CHECKING:
    import pluggy

    from .config import ServiceConfig
    from .event_hooks import MessageInfo

_RESERVED = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``extra={...}`` fields become keys."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                payload[key] = value
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


#: characters a terminal or log viewer may take for the end of a line, or for a command
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text: str) -> str:
    """``text`` with every control character written as an escape (``\\n``, ``\\x1b``…)."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


class TextFormatter(logging.Formatter):
    """The text format, one record a line whatever the record holds.

    Messages carry text from requests (paths, form fields, errors quoting them): a newline in it
    would start a line that looks like a record of its own (``POST /x%0A2026-… ERROR …``), so
    control characters in the line are escaped. A traceback keeps its lines, each indented, so
    a line starting in the first column is always the start of a record.
    """

    def format(self, record: logging.LogRecord) -> str:
        """The record's line, then its traceback and stack, if any, indented."""
        record.message = record.getMessage()
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        text = escape_controls(self.formatMessage(record))
        # exc_text may come from another handler's formatter (logging caches it on the record):
        # indented here, at output, so it is indented whoever made it.
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        for part in (record.exc_text, record.stack_info and self.formatStack(record.stack_info)):
            if part:
                text += "\n" + _indented(part)
        return text


def _indented(text: str) -> str:
    return "\n".join("  " + escape_controls(line) for line in text.splitlines())


def configure(settings: ServiceConfig) -> None:
    """Install one handler on the root logger (idempotent: tests build many apps).

    On the root, so the lines of waitress, gunicorn and huey come out in the same format (and as
    JSON when asked) — and so ``waitress.serve`` does not add a second handler of its own
    (it calls ``logging.basicConfig()`` when the root has none) that would print every line twice.
    """
    logging.getLogger("b24sms").setLevel(settings.log_level)
    logger = logging.getLogger()
    for handler in list(logger.handlers):
        if getattr(handler, "_b24sms", False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._b24sms = True  # type: ignore[attr-defined]
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    # urllib3 logs whole URLs (query strings can hold API keys) at DEBUG: keep it quieter.
    logging.getLogger("urllib3").setLevel(max(logging.INFO, logging.getLogger("urllib3").level))
    # At any level, request lines (werkzeug, urllib3, gunicorn) lose secret query values.
    redaction.install_log_filters()


def mask_number(number: str | None) -> str:
    """``+14155550100`` → ``+1********00``: the country code and the last two digits stay.

    Enough to tell messages apart in a log without writing a whole phone number down. The one
    masking used everywhere, so one number looks the same in every log line.
    """
    import phonenumbers

    if not number:
        return "-"
    digits = "".join(ch for ch in number if ch.isdigit())
    if len(digits) <= 4:
        return "*" * len(digits)
    try:
        country = str(phonenumbers.parse("+" + digits).country_code)
    except phonenumbers.NumberParseException:
        country = ""
    hidden = len(digits) - len(country) - 2
    return f"+{country}{'*' * hidden}{digits[-2:]}"


#: the logger of the state-change lines, so operators can route or silence them on their own
STATUS_LOGGER = "b24sms.status"
STATUS_LOG_PLUGIN_NAME = "b24sms.status_log"


class StatusLog:
    """Writes one structured line per message state change: stored (queued), then every applied
    status. The fields (``extra``) become JSON keys with ``log_format = "json"``: ``event``,
    ``id`` (ours), ``message_id`` (Bitrix24's), ``code``, ``portal`` (member_id), ``domain``,
    ``previous``, ``status``, ``source``, ``attempts``. Never the body, the number or a token.
    """

    def __init__(self) -> None:
        self.log = logging.getLogger(STATUS_LOGGER)

    @staticmethod
    def _fields(message: MessageInfo) -> dict[str, Any]:
        return {
            "id": message.id,
            "message_id": message.message_id,
            "code": message.code,
            "portal": message.member_id,
            "domain": message.domain,
            "attempts": message.attempts,
        }

    @hookimpl
    def b24sms_message_stored(self, message: MessageInfo) -> None:
        # Every message starts queued; a failure decided while storing it (an unusable number)
        # is a change of its own, logged by b24sms_status_changed.
        self.log.info(
            "message %s (%s, %s): stored, status %s",
            message.message_id,
            message.code,
            message.domain,
            QUEUED,
            extra={
                "event": "message_status",
                **self._fields(message),
                "previous": None,
                "status": QUEUED,
                "source": "handler",
            },
        )

    @hookimpl
    def b24sms_status_changed(
        self, message: MessageInfo, previous: str | None, status: str, source: str
    ) -> None:
        self.log.info(
            "message %s (%s, %s): %s -> %s (%s)",
            message.message_id,
            message.code,
            message.domain,
            previous or "-",
            status,
            source,
            extra={
                "event": "message_status",
                **self._fields(message),
                "previous": previous,
                "status": status,
                "source": source,
            },
        )


def register_status_log(pm: pluggy.PluginManager) -> None:
    """Register :class:`StatusLog` on ``pm`` once (idempotent: apps may share a service)."""
    if pm.get_plugin(STATUS_LOG_PLUGIN_NAME) is None:
        pm.register(StatusLog(), name=STATUS_LOG_PLUGIN_NAME)
