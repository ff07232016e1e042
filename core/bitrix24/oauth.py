"""Refreshing a portal's OAuth tokens, serialised per portal across processes and machines.

Bitrix24 rotates refresh tokens: the answer carries a new one and the old one is spent, so two
refreshes of one portal at once make one of them fail with ``invalid_grant`` — which would look
exactly like a revoked app. The refresh therefore runs inside one database transaction that locks
the portal's row (``SELECT … FOR UPDATE`` on PostgreSQL; on SQLite every transaction of
:meth:`b24sms.db.Database.session` is ``BEGIN IMMEDIATE``, a database-wide write lock). Whoever
waited on the lock finds a newer access token stored and uses it without calling OAuth.

Refresh only on ``expired_token``, never on a timer: Bitrix24 may block apps that refresh
needlessly.

An answer that blames our app (``invalid_client``, ``invalid_request``, ``insufficient_scope``:
:class:`~.errors.AppConfigRefused`) leaves the portal active and its refresh token stored: it is
logged loudly, naming the config keys, and fixing the config brings every portal back.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any
from urllib.parse import urlsplit

import requests
from sqlalchemy import select

from .. import metrics
from ..config import Bitrix24Config
from ..db import Database
from ..models import Portal, PortalState, utcnow
from ..portals import token_expiry
from .errors import (
    AppConfigRefused,
    Bitrix24Error,
    PermanentError,
    PortalBlocked,
    TokensRevoked,
    TransientError,
    from_response,
    network_error,
)
from .policy import check_url, refuse_redirect

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
#: read timeout of a worker's call: a cloud Bitrix24 request may run 60 s
#: (settings/performance/limits.md); web requests pass policy.WEB_TIMEOUT instead
DEFAULT_TIMEOUT = 60.0


def refresh_tokens(
    db: Database,
    portal_id: int,
    failed_access_token: str | None,
    settings: Bitrix24Config,
    http: requests.Session | None = None,
    *,
    timeout: float | tuple[float, float] | None = None,
) -> str:
    """Get a working access token for a portal whose token ``failed_access_token`` expired.

    In one transaction holding the portal's row lock: when the stored access token is no longer
    ``failed_access_token``, another thread or process refreshed meanwhile and its token is
    returned without calling OAuth; otherwise the refresh token is exchanged at
    ``settings.oauth_url`` and the new tokens and endpoints are stored before the lock is
    released.

    :param db: the database holding the portal.
    :param portal_id: primary key of the :class:`~b24sms.models.Portal`.
    :param failed_access_token: the access token the failed call used.
    :param settings: ``[bitrix24]`` of the config (``client_id``, ``client_secret``,
        ``oauth_url``, ``timeout``, ``user_agent``).
    :param http: the session to send with; default the process-wide one.
    :param timeout: as for :func:`exchange_refresh_token`.
    :returns: the access token to use.
    :raises TokensRevoked: OAuth refused the refresh token (``invalid_grant``) or there is
        nothing to refresh with; the portal is then marked ``needs_reinstall`` (committed).
    :raises AppConfigRefused: OAuth refused our app (``invalid_client``…); the portal stays
        active with its refresh token: retry later, after the operator fixed the config.
    :raises TransientError: OAuth could not be reached or answered garbage; retry later.
    :raises Bitrix24Error: any other refusal (``invalid_scope``, ``PAYMENT_REQUIRED``…).
    """
    revoked: TokensRevoked | None = None
    with db.session() as session:
        # The lock is the point: it is held until the new tokens are committed.
        portal = session.scalars(
            select(Portal).where(Portal.id == portal_id).with_for_update()
        ).one_or_none()
        if portal is None:
            raise TokensRevoked("PORTAL_NOT_FOUND", f"no portal with id {portal_id}")
        if portal.access_token and portal.access_token != failed_access_token:
            log.debug("portal %s: tokens already refreshed by someone else", portal.domain)
            metrics.count_token_refresh("reused")
            return portal.access_token
        if portal.state != PortalState.ACTIVE:
            raise inactive_portal_error(portal)
        if not portal.refresh_token:
            revoked = TokensRevoked("NO_REFRESH_TOKEN", "no refresh token stored")
        else:
            try:
                answer = exchange_refresh_token(
                    portal.refresh_token, settings, http, timeout=timeout
                )
            except TokensRevoked as exc:
                revoked = exc
            except AppConfigRefused:
                # Logged loudly by exchange_refresh_token; nothing about the portal changes.
                metrics.count_token_refresh("failed")
                raise
            except Bitrix24Error as exc:
                log.warning("portal %s: token refresh failed: %s", portal.domain, exc)
                metrics.count_token_refresh("failed")
                raise
            else:
                _store(portal, answer)
                log.info("portal %s: tokens refreshed", portal.domain)
                metrics.count_token_refresh("refreshed")
                return portal.access_token  # type: ignore[return-value]
        # Tokens are gone for good: say so on the portal. Committed when the block ends, so the
        # state survives the exception raised below.
        portal.state = PortalState.NEEDS_REINSTALL
        portal.last_error = f"token refresh refused: {revoked}"
        log.warning(
            "portal %s: token refresh refused (%s); needs re-install", portal.domain, revoked.code
        )
    metrics.count_token_refresh("refused")
    raise revoked


def inactive_portal_error(portal: Portal) -> Bitrix24Error:
    """The error for calling a portal we stopped using (blocked, needing re-install, gone)."""
    text = f"portal {portal.domain} is {portal.state}"
    if portal.state == PortalState.BLOCKED:
        return PortalBlocked("PORTAL_BLOCKED", text)
    return TokensRevoked("PORTAL_NOT_ACTIVE", text)


def exchange_refresh_token(
    refresh_token: str,
    settings: Bitrix24Config,
    http: requests.Session | None = None,
    *,
    timeout: float | tuple[float, float] | None = None,
) -> dict[str, Any]:
    """Exchange a refresh token at ``settings.oauth_url``: one GET, no redirect followed.

    Bitrix24's OAuth server answers a new pair and names the portal (``member_id``,
    ``client_endpoint``, ``server_endpoint``; its ``domain`` is the OAuth server's own) —
    b24restdocs ``settings/oauth/auto-renewal.md``. The refresh token is spent: store the new one.

    :param refresh_token: the token to exchange.
    :param settings: ``[bitrix24]`` of the config (``client_id``, ``client_secret``,
        ``oauth_url``, ``timeout``, ``user_agent``).
    :param http: the session to send with; default the process-wide one.
    :param timeout: ``(connect, read)`` seconds; default the connect timeout and
        ``settings.timeout`` (a web request passes :data:`~.policy.WEB_TIMEOUT`).
    :returns: the decoded answer, with ``access_token`` and ``refresh_token``.
    :raises TokensRevoked: ``invalid_grant``.
    :raises AppConfigRefused: ``invalid_client``, ``invalid_request``, ``insufficient_scope``
        (logged at ERROR, naming the keys to fix).
    :raises TransientError: unreachable, a redirect, a 5xx or an answer without tokens.
    :raises Bitrix24Error: any other refusal (``invalid_scope``, ``PAYMENT_REQUIRED``…).
    """
    from .client import shared_session, user_agent

    url = check_url(settings.oauth_url)
    params = {
        "grant_type": "refresh_token",
        "client_id": settings.client_id,
        "client_secret": settings.client_secret,
        "refresh_token": refresh_token,
    }
    try:
        response = (http or shared_session()).get(
            url,
            params=params,
            headers={"User-Agent": user_agent(settings), "Accept": "application/json"},
            timeout=timeout or (CONNECT_TIMEOUT, settings.timeout),
            allow_redirects=False,
        )
    except requests.RequestException as exc:
        raise network_error(exc, url) from None
    refuse_redirect(response)
    try:
        payload = response.json()
    except ValueError:
        payload = None
    if isinstance(payload, dict) and payload.get("error"):
        error = from_response(response.status_code, payload)
        if isinstance(error, AppConfigRefused):
            # Every portal's refresh fails the same way until an operator acts: say what to fix.
            log.error(
                "Bitrix24's OAuth server refused this app (%s): %s; portals stay active and "
                "keep their tokens, calls are retried later",
                error.code,
                error.hint,
            )
        raise error
    if response.status_code != 200 or not isinstance(payload, dict):
        raise from_response(response.status_code, None)
    if not payload.get("access_token") or not payload.get("refresh_token"):
        raise TransientError(
            "ERROR_UNEXPECTED_ANSWER", "OAuth answer without tokens", response.status_code
        )
    return payload


def _store(portal: Portal, answer: dict[str, Any]) -> None:
    member_id = answer.get("member_id")
    if member_id and member_id != portal.member_id:
        # Storing another portal's tokens here would send its messages' statuses to the wrong
        # portal; refuse rather than guess.
        raise PermanentError("MEMBER_ID_MISMATCH", "OAuth answered for another portal")
    portal.access_token = answer["access_token"]
    portal.refresh_token = answer["refresh_token"]
    portal.token_expires_at = _expires_at(answer)
    endpoint = answer.get("client_endpoint")
    if endpoint and endpoint != portal.client_endpoint:
        # The portal moved (settings/how-to-call-rest-api/change-domen.md); the OAuth server's
        # answer names its new REST address, and the domain is that address's host — the
        # app page's frame-ancestors is built from the domain. The answer's own ``domain`` is
        # the OAuth server's (auto-renewal.md), never the portal's.
        host = urlsplit(str(endpoint)).netloc
        if host:
            portal.domain = host
        portal.client_endpoint = endpoint
    if answer.get("server_endpoint"):
        portal.server_endpoint = answer["server_endpoint"]
    if answer.get("scope"):
        portal.scope = answer["scope"]


def _expires_at(answer: dict[str, Any]) -> dt.datetime:
    # An answer without a usable expiry: Bitrix24's tokens live an hour.
    return token_expiry(answer.get("expires"), answer.get("expires_in")) or (
        utcnow() + dt.timedelta(seconds=3600)
    )
