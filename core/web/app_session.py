"""Who the app page is for: the AUTH_ID check and the signed per-portal session.

Bitrix24 opens the app's main placement in a frame with a form POST: ``AUTH_ID`` (the user's
access token), ``REFRESH_ID``, ``member_id``, ``PLACEMENT``… in the body, ``DOMAIN``, ``LANG``…
in the query. Who is asking is settled like this:

1. ``member_id`` must be an installed, active portal;
2. ``AUTH_ID`` must be alive *at that portal*: ``app.info`` is called at the portal's stored
   ``client_endpoint`` (never at the request's ``DOMAIN``, which anybody can write), must
   name our app (``CODE``), and is cached briefly (:func:`b24sms.bitrix24.verify.probe_token`).
   The check holds one of the process's few portal-call slots with short timeouts; when all
   are taken the page answers 503 rather than let slow portals take the HANDLER's threads;
3. the page then carries a short-lived session token, signed with ``secret_key`` and bound to
   the portal (member_id and row id), in every form: filters, paging and the test-message form
   are all POSTs. Cookies would not do: in Bitrix24's frame ours are third-party cookies, which
   browsers drop. Keeping the token out of URLs keeps it out of access logs, Referer headers and
   the history. Because a cross-site page cannot know the token, the forms are CSRF-safe; the
   test-message form carries a second signed token that also fixes the test message's id, so a
   form sent twice stores one message.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass

from flask import current_app, request
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer
from sqlalchemy.orm import Session

from ..bitrix24.policy import SlotsBusy
from ..bitrix24.verify import probe_token
from ..models import Portal, PortalState
from ..portals import find_portal
from ..service import Service

#: a session token unused this long (seconds) stops working; every page hands out a new one
SESSION_IDLE = 3600
#: and none works longer than this after the AUTH_ID check it descends from
SESSION_MAX = 8 * 3600
#: seconds a confirmed AUTH_ID is believed without asking the portal again
PROBE_TTL = 60.0

_SESSION_SALT = "b24sms.app-page.session"
_SEND_SALT = "b24sms.app-page.test-message"
_NONCE_RE = re.compile(r"^[0-9a-f]{32}$")


class Unauthorized(Exception):
    """The caller is not a verified user of an active portal; ``reason`` is shown to them."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PortalBusy(Exception):
    """The AUTH_ID check could not be made now (every portal-call slot is taken): 503."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class PageSession:
    """Who the page is for, as proven by AUTH_ID and carried by the signed session token."""

    member_id: str
    portal_id: int
    lang: str
    #: unix time of the AUTH_ID check this session descends from
    verified_at: int


def service() -> Service:
    """The app's :class:`~b24sms.service.Service`."""
    return current_app.extensions["b24sms"]


def _serializer(salt: str) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(service().settings.secret_key, salt=salt)


def issue_session(session: PageSession) -> str:
    """A signed token for ``session`` (not encrypted: it holds nothing secret)."""
    return _serializer(_SESSION_SALT).dumps(
        {
            "m": session.member_id,
            "p": session.portal_id,
            "l": session.lang,
            "a": session.verified_at,
        }
    )


def read_session(token: str, now: float | None = None) -> PageSession:
    """The session a token stands for.

    :raises Unauthorized: forged, expired (idle or too old), or malformed.
    """
    try:
        data = _serializer(_SESSION_SALT).loads(token, max_age=SESSION_IDLE)
    except SignatureExpired:
        raise Unauthorized("Your session has expired. Open the app again from Bitrix24.") from None
    except BadSignature:
        raise Unauthorized("The session token is not valid. Open the app from Bitrix24.") from None
    try:
        session = PageSession(str(data["m"]), int(data["p"]), str(data["l"]), int(data["a"]))
    except (KeyError, TypeError, ValueError):
        raise Unauthorized("The session token is not valid. Open the app from Bitrix24.") from None
    if (now or time.time()) - session.verified_at > SESSION_MAX:
        raise Unauthorized("Your session has expired. Open the app again from Bitrix24.")
    return session


def _active_portal(db_session: Session, member_id: str) -> Portal:
    portal = find_portal(db_session, member_id) if member_id else None
    if portal is None or portal.state != PortalState.ACTIVE:
        # One answer for "unknown" and "not active": member_ids are not to be probed.
        raise Unauthorized(
            "This Bitrix24 account has no active installation of the app. "
            "Install the app again, or ask your Bitrix24 administrator."
        )
    return portal


def authenticate() -> tuple[PageSession, str]:
    """Settle who is asking (see the module docstring); returns the session and the domain.

    :raises Unauthorized: with an explanation for the person in front of the frame.
    """
    svc = service()
    form = request.form
    if "AUTH_ID" in form:
        member_id = form.get("member_id", "")[:64]
        lang = _lang(request.args.get("LANG") or form.get("LANG"))
        with svc.db.read() as db_session:
            portal = _active_portal(db_session, member_id)
            portal_id, endpoint, domain = portal.id, portal.client_endpoint, portal.domain
        # Outside the transaction: the probe is an HTTP call and may take a while. It holds one
        # of the process's few portal-call slots, with short timeouts: slow portals must not
        # take the threads the HANDLER needs (the page answers 503 instead).
        try:
            confirmed = probe_token(
                endpoint, form.get("AUTH_ID", ""), svc.config.bitrix24, ttl=PROBE_TTL
            )
        except SlotsBusy:
            raise PortalBusy(
                "Too many sign-ins are being confirmed with Bitrix24 right now. "
                "Try again in a moment."
            ) from None
        if not confirmed:
            raise Unauthorized(
                "Bitrix24 did not confirm your sign-in for this account. "
                "Open the app again from Bitrix24."
            )
        return PageSession(member_id, portal_id, lang, int(time.time())), domain
    token = form.get("s") or ""
    if not token:
        raise Unauthorized("This page only opens inside Bitrix24: open the app from your account.")
    session = read_session(token)
    with svc.db.read() as db_session:
        portal = _active_portal(db_session, session.member_id)
        if portal.id != session.portal_id:
            # Uninstalled with its data erased and installed again: a new portal row.
            raise Unauthorized("Your session has expired. Open the app again from Bitrix24.")
        domain = portal.domain
    return session, domain


def _lang(value: str | None) -> str:
    value = (value or "en").strip().lower()
    return value if re.fullmatch(r"[a-z]{2}", value) else "en"


# -- the test-message form's token ---------------------------------------------------------------


def issue_send_token(session: PageSession) -> str:
    """A signed token for one test-message form: bound to the portal, and carrying the nonce
    that becomes the test message's id (a form sent twice stores one message)."""
    nonce = secrets.token_hex(16)
    return _serializer(_SEND_SALT).dumps({"m": session.member_id, "n": nonce})


def read_send_token(token: str, session: PageSession) -> str:
    """The nonce of a test-message form's token.

    :raises Unauthorized: forged, expired, or issued to another portal.
    """
    try:
        data = _serializer(_SEND_SALT).loads(token, max_age=SESSION_IDLE)
    except BadSignature:  # SignatureExpired included
        raise Unauthorized("The form has expired. Open the app again from Bitrix24.") from None
    nonce = data.get("n") if isinstance(data, dict) else None
    if (
        not isinstance(data, dict)
        or data.get("m") != session.member_id
        or not isinstance(nonce, str)
        or not _NONCE_RE.match(nonce)
    ):
        raise Unauthorized("The form does not belong to this account.")
    return nonce
