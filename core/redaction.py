"""Keeping secrets out of log lines: query strings of other libraries' request lines, and the
numbers and texts of messages in gateway error texts (:func:`redacted_error`).

Some secrets have to be in a query string: the HANDLER key Bitrix24 calls us with
(``/bitrix24/handler/<code>?member_id=…&key=…``), and the client secret and refresh token of
an OAuth refresh (a GET, as Bitrix24 documents it). Libraries log whole request lines:

- werkzeug's development server logs every request line (``b24sms``'s tests serve with it);
- urllib3 logs every request line at DEBUG;
- gunicorn's access log (off unless ``--access-logfile`` is given) logs it with ``%(r)s``.

:func:`install_log_filters` puts :class:`QueryRedactingFilter` on exactly those loggers: the
values of query parameters whose names look secret (``key``, ``*token*``, ``*secret*``,
``*pass*``, ``*auth*``…) become ``***``. waitress (``b24sms serve``) logs no requests; proxies
in front of the service keep their own access logs (see docs/operations.md).
"""

from __future__ import annotations

import logging
import re
from typing import Any, TypeVar

E = TypeVar("E", bound=BaseException)

#: a name (query parameter, option, field) whose value is a secret
SECRET_NAME = re.compile(r"key|token|secret|pass|auth|sign|credential", re.IGNORECASE)
#: a query parameter whose value is withheld, by its name
_SECRET_PARAM = rf"[^=&\s\"'#?]*(?:{SECRET_NAME.pattern})[^=&\s\"'#?]*"
_QUERY_SECRET_RE = re.compile(rf"([?&;]{_SECRET_PARAM}=)[^&\s\"'#]*", re.IGNORECASE)
#: the loggers that write request lines with their query strings
REQUEST_LINE_LOGGERS = ("werkzeug", "urllib3.connectionpool", "gunicorn.access")
REDACTED = "***"


def redact_query(text: str) -> str:
    """``/h?member_id=1&key=abc`` → ``/h?member_id=1&key=***`` wherever a URL is in ``text``."""
    return _QUERY_SECRET_RE.sub(rf"\g<1>{REDACTED}", text)


def _redact_value(value: Any) -> Any:
    return redact_query(value) if isinstance(value, str) else value


class QueryRedactingFilter(logging.Filter):
    """Rewrites a record's arguments so no secret query parameter value survives formatting."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple):
            record.args = tuple(_redact_value(arg) for arg in args)
        elif isinstance(args, dict):
            # gunicorn's access log passes its atoms as a mapping of its own (SafeAtoms: "-" for
            # a missing atom, header atoms in any case): changed in place, not replaced
            for key, value in list(args.items()):
                args[key] = _redact_value(value)
        elif not args and isinstance(record.msg, str):
            # Only a message without arguments: redacting a format string could unbalance it.
            record.msg = redact_query(record.msg)
        return True


def install_log_filters(names: tuple[str, ...] = REQUEST_LINE_LOGGERS) -> None:
    """Put :class:`QueryRedactingFilter` on the request-line loggers (once each)."""
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, QueryRedactingFilter) for f in logger.filters):
            logger.addFilter(QueryRedactingFilter())


# -- gateway error texts --------------------------------------------------------------------------
# Gateways repeat what they were sent in their errors ("cannot deliver 'Your code 1234' to
# +1 415 555 0100"). Those texts are stored (last_error, history), logged and shown on the app
# page and by the CLI, none of which may show a recipient's number or a message's text.

NUMBER_REDACTED = "[number]"
TEXT_REDACTED = "[message text]"
#: a message text shorter than this is not searched for (it would match ordinary words)
MIN_TEXT = 4
#: the shortest start of a message text taken for the text cut off at the end of an error
MIN_CUT_TEXT = 12
#: separators gateways write inside phone numbers
_NUMBER_SEPARATOR = r"[\s().\-/]{0,2}"
#: anything else that looks like an international number
_ANY_E164 = re.compile(r"(?<![\w+])\+\d(?:[\s().\-/]{0,2}\d){6,16}(?!\d)")


def _number_pattern(number: str) -> re.Pattern[str] | None:
    """The number in any of its usual spellings: E.164, digits only, 00 or trunk 0 prefix,
    spaces, dashes, dots or parentheses between the digits."""
    import phonenumbers

    try:
        parsed = phonenumbers.parse(number, None)
        national = phonenumbers.national_significant_number(parsed)
        country = str(parsed.country_code)
    except phonenumbers.NumberParseException:
        national, country = re.sub(r"\D", "", number), ""
    if len(national) < 5:
        return None
    sep = _NUMBER_SEPARATOR
    digits = sep.join(national)
    prefix = rf"(?:(?:(?:\+|00){sep})?{country}{sep}|0{sep})?" if country else ""
    return re.compile(rf"(?<!\d){prefix}\(?{digits}(?!\d)")


def _text_variants(text: str) -> list[str]:
    """How a message text comes back inside an error: as sent, JSON-escaped, URL-encoded, and
    each with its whitespace collapsed (as gateway error snippets are)."""
    import json
    from urllib.parse import quote, quote_plus

    variants = {
        text,
        json.dumps(text)[1:-1],
        json.dumps(text, ensure_ascii=False)[1:-1],
        quote_plus(text),
        quote(text),
    }
    variants |= {" ".join(v.split()) for v in variants}
    return sorted((v for v in variants if len(v) >= MIN_TEXT), key=len, reverse=True)


def redact_message_data(text: str, number: str | None, body: str | None) -> str:
    """``text`` without the recipient ``number`` and the message ``body`` in any spelling.

    Also removes a start of the body cut off at the end of ``text`` (errors are truncated) and
    any other international (+…) number.
    """
    if body and len(body) >= MIN_TEXT:
        for variant in _text_variants(body):
            text = text.replace(variant, TEXT_REDACTED)
        text = _redact_cut_text(text, body)
    pattern = _number_pattern(number) if number else None
    if pattern is not None:
        text = pattern.sub(NUMBER_REDACTED, text)
    return _ANY_E164.sub(NUMBER_REDACTED, text)


def _redact_cut_text(text: str, body: str) -> str:
    for variant in _text_variants(body):
        if len(variant) < MIN_CUT_TEXT:
            continue
        start = text.rfind(variant[:MIN_CUT_TEXT])
        if start >= 0 and variant.startswith(text[start:]):
            return text[:start] + TEXT_REDACTED
    return text


def redacted_error(error: E, number: str | None, body: str | None) -> E:
    """A copy of a gateway error whose text and code are cleared of the message's number and
    body (:func:`redact_message_data`): what is stored, logged and shown from then on."""
    import copy

    text = str(error.args[0]) if error.args else ""
    clean = redact_message_data(text, number, body)
    code = getattr(error, "code", None)
    clean_code = redact_message_data(code, number, body) if isinstance(code, str) else code
    if clean == text and clean_code == code:
        return error
    try:
        redacted = copy.copy(error)
    except Exception:  # noqa: BLE001 - a plugin's exception that cannot be copied
        redacted = type(error).__new__(type(error))
        redacted.__dict__.update(error.__dict__)
    redacted.args = (clean, *error.args[1:])
    if clean_code is not code:
        redacted.code = clean_code  # type: ignore[attr-defined]
    redacted.__cause__ = redacted.__context__ = None  # the original would carry the text again
    redacted.__traceback__ = error.__traceback__
    return redacted
