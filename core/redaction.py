"""Keeping secrets that travel in URLs out of other libraries' log lines.

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
from typing import Any

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
        elif isinstance(args, dict):  # gunicorn's access log passes its atoms as a mapping
            record.args = {key: _redact_value(value) for key, value in args.items()}
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
