"""Logging set-up: text or one JSON object per line, and masking of phone numbers."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from typing import Any

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


def configure(settings: Mapping[str, Any]) -> None:
    """Install one handler on the ``b24sms`` logger (idempotent: tests build many apps)."""
    logger = logging.getLogger("b24sms")
    logger.setLevel(settings.get("log_level", "INFO"))
    for handler in list(logger.handlers):
        if getattr(handler, "_b24sms", False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._b24sms = True  # type: ignore[attr-defined]
    if settings.get("log_format") == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
    logger.addHandler(handler)
    # urllib3 logs whole URLs (query strings can hold API keys) at DEBUG: keep it quieter.
    logging.getLogger("urllib3").setLevel(max(logging.INFO, logging.getLogger("urllib3").level))


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
