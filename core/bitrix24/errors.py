"""Typed Bitrix24 errors: one class per thing the caller has to do about it.

Every error carries Bitrix24's ``code`` and ``description``, the HTTP status it came with, and an
``action`` telling the caller what to do:

========== ==================================================================================
retry      rate limit, 5xx INTERNAL_SERVER_ERROR / ERROR_UNEXPECTED_ANSWER, network trouble
refresh    ``expired_token``: refresh the tokens once and repeat the call (the client does this)
wait       ``OPERATION_TIME_LIMIT``: the method's time budget is spent until ``reset_at``
reinstall  ``NO_AUTH_FOUND``, ``invalid_token``, ``invalid_grant``: the portal needs a re-install
configure  ``invalid_client``, ``invalid_request``, ``insufficient_scope`` / ``invalid_scope``:
           our app's configuration is wrong, not the portal; keep tokens and work, retry later
pause      ``OVERLOAD_LIMIT``, ``PORTAL_DELETED``: pause calls to the portal, keep the work
give_up    everything else: permanent for this call
========== ==================================================================================

No token ever reaches an error's text: descriptions come from Bitrix24's answer, never from our
request, and network errors are reduced to their class name and the host.
"""

from __future__ import annotations

import datetime as dt
from typing import Any
from urllib.parse import urlsplit

#: how long a text from the far side may get inside our messages and logs
_MAX_DESCRIPTION = 300


class Bitrix24Error(Exception):
    """An error answer from Bitrix24 (or no usable answer at all).

    :param code: Bitrix24's error code, e.g. ``QUERY_LIMIT_EXCEEDED``; ours for network trouble.
    :param description: Bitrix24's ``error_description``.
    :param http_status: the HTTP status of the answer; ``None`` for per-command batch errors and
        network errors.
    """

    action: str = "give_up"

    def __init__(self, code: str, description: str = "", http_status: int | None = None) -> None:
        self.code = str(code)
        self.description = str(description or "")[:_MAX_DESCRIPTION]
        self.http_status = http_status
        super().__init__(self.code, self.description, http_status)

    @property
    def retry_after(self) -> float | None:
        """Seconds to wait before trying again, when the error tells; ``None``: caller's policy."""
        return None

    def __str__(self) -> str:
        status = f" (HTTP {self.http_status})" if self.http_status else ""
        text = f": {self.description}" if self.description else ""
        return f"{self.code}{status}{text}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {self.description!r}, {self.http_status!r})"


class TransientError(Bitrix24Error):
    """Worth retrying with backoff: 5xx answers, timeouts, refused connections."""

    action = "retry"


class RateLimited(TransientError):
    """``QUERY_LIMIT_EXCEEDED``: the portal's leaky bucket is full; back off, retry later."""

    @property
    def retry_after(self) -> float | None:
        # The bucket drains 2 requests/s: one second frees room for the next call.
        return 1.0


class TokenExpired(Bitrix24Error):
    """``expired_token``: refresh the access token and repeat the call once."""

    action = "refresh"


class TokensRevoked(Bitrix24Error):
    """The portal's tokens are unusable (``NO_AUTH_FOUND``, ``invalid_token``, refresh refused
    with ``invalid_grant``): it needs a re-install; keep the work."""

    action = "reinstall"


class AppConfigRefused(Bitrix24Error):
    """The OAuth server refused *our app*, not the portal's tokens: ``invalid_client`` ("Check
    ``client_id`` and ``client_secret``"), ``invalid_request``, ``insufficient_scope`` /
    ``invalid_scope`` ("Add the missing permissions to the application card") —
    b24restdocs ``settings/oauth/error-codes.md``.

    One wrong ``client_secret`` must not cost every portal a re-install: the refresh token is
    kept (a refused exchange does not spend it), the portal stays active, the caller retries
    later with backoff, and fixing the config brings every portal back.
    """

    action = "configure"

    @property
    def hint(self) -> str:
        """What the operator has to fix, naming the config keys."""
        if self.code.lower() == "invalid_client":
            return (
                "check [bitrix24] client_id and client_secret against the application's card "
                "in Bitrix24 (a re-created local app has a new pair)"
            )
        if self.code.lower() in ("insufficient_scope", "invalid_scope"):
            return "add the missing permissions (scopes) to the application's card in Bitrix24"
        # invalid_request: a malformed OAuth request, or on REST "Https required"
        # (_includes/system-errors.md).
        return "the request was malformed: check [bitrix24] oauth_url and that calls use https"


class OperationTimeLimit(Bitrix24Error):
    """``OPERATION_TIME_LIMIT``: the method's time budget is spent until :attr:`reset_at`.

    :param reset_at: naive UTC moment the budget resets (``time.operating_reset_at`` of the
        answer); default one minute from now.
    """

    action = "wait"

    def __init__(
        self,
        code: str,
        description: str = "",
        http_status: int | None = None,
        reset_at: dt.datetime | None = None,
    ) -> None:
        super().__init__(code, description, http_status)
        self.reset_at = reset_at or _utcnow() + dt.timedelta(seconds=60)

    @property
    def retry_after(self) -> float | None:
        return max(0.0, (self.reset_at - _utcnow()).total_seconds())


class PortalBlocked(Bitrix24Error):
    """``OVERLOAD_LIMIT`` or ``PORTAL_DELETED``: pause calls to the portal for a while.

    Both are lifted by a person — Bitrix24's support ("a manual individual block; please
    contact Bitrix24 technical support to lift it") or an administrator re-opening the public
    part of an on-premise site — so they are temporary (b24restdocs
    ``_includes/system-errors.md``): the portal is paused with backoff, never given up.
    """

    action = "pause"


class PermanentError(Bitrix24Error):
    """Retrying would get the same answer: access denied, validation errors, unknown codes."""

    action = "give_up"


class MethodNotFound(PermanentError):
    """``ERROR_METHOD_NOT_FOUND``: the portal's version lacks the method."""


# Codes are compared upper-cased: Bitrix24 writes the OAuth ones in lower case.
_BY_CODE: dict[str, type[Bitrix24Error]] = {
    "QUERY_LIMIT_EXCEEDED": RateLimited,
    "INTERNAL_SERVER_ERROR": TransientError,
    "ERROR_UNEXPECTED_ANSWER": TransientError,
    "EXPIRED_TOKEN": TokenExpired,
    "NO_AUTH_FOUND": TokensRevoked,
    "INVALID_TOKEN": TokensRevoked,
    "INVALID_GRANT": TokensRevoked,
    "INVALID_CLIENT": AppConfigRefused,
    "INVALID_REQUEST": AppConfigRefused,
    "INSUFFICIENT_SCOPE": AppConfigRefused,
    "INVALID_SCOPE": AppConfigRefused,
    "OPERATION_TIME_LIMIT": OperationTimeLimit,
    "OVERLOAD_LIMIT": PortalBlocked,
    "PORTAL_DELETED": PortalBlocked,
    "ERROR_METHOD_NOT_FOUND": MethodNotFound,
}


def from_response(status: int | None, payload: Any) -> Bitrix24Error:
    """The typed error for an answer.

    :param status: the HTTP status; ``None`` for a per-command error inside a batch.
    :param payload: the decoded JSON body (``{"error": …, "error_description": …, "time": …}``),
        or ``None`` / anything else when the body was not JSON.
    :returns: the matching :class:`Bitrix24Error` subclass (not raised).
    """
    if not isinstance(payload, dict) or not payload.get("error"):
        # No Bitrix24 error document: a proxy page, an empty body, a crash.
        if status is not None and (status >= 500 or status == 429):
            return TransientError("ERROR_UNEXPECTED_ANSWER", "no JSON error in the answer", status)
        return PermanentError("ERROR_UNEXPECTED_ANSWER", "no JSON error in the answer", status)
    code = str(payload["error"])
    description = str(payload.get("error_description") or "")
    cls = _BY_CODE.get(code.upper())
    if cls is OperationTimeLimit:
        return OperationTimeLimit(code, description, status, reset_at=_reset_at(payload))
    if cls is not None:
        return cls(code, description, status)
    if status is not None and status >= 500:
        # An error document we do not know, with a server-side status: more likely a hiccup of
        # the portal than a verdict about our request, and retries are bounded by the caller.
        return TransientError(code, description, status)
    return PermanentError(code, description, status)


def network_error(exc: BaseException, url: str) -> TransientError:
    """A :class:`TransientError` for a failed request, safe to log.

    ``requests`` puts the whole URL, query string included, into its messages; an OAuth refresh
    carries the client secret and the refresh token there. Only the class name and host are kept.
    """
    host = urlsplit(url).netloc or "?"
    return TransientError("NETWORK_ERROR", f"{type(exc).__name__} talking to {host}")


def _reset_at(payload: dict[str, Any]) -> dt.datetime | None:
    time_block = payload.get("time")
    if not isinstance(time_block, dict):
        return None
    value = time_block.get("operating_reset_at")
    if value is None:
        return None
    try:
        stamp = float(value)
    except (TypeError, ValueError):
        return None
    return dt.datetime.fromtimestamp(stamp, dt.UTC).replace(tzinfo=None)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)
