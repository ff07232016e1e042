"""Portals: install (event or UI form), re-install, update and uninstall.

A portal is identified by ``member_id``; its domain may change. Every event after the install
must carry the ``application_token`` stored at install time, compared in constant time.
"""

from __future__ import annotations

import datetime as dt
import hmac
from collections.abc import Mapping
from typing import Any

from sqlalchemy import bindparam, delete, select
from sqlalchemy.orm import Session

from .models import Message, OutboxEntry, Portal, PortalState, ProviderRegistration, utcnow


def tokens_match(stored: str | None, given: str | None) -> bool:
    """Constant-time comparison of application tokens; a missing one never matches."""
    if not stored or not given:
        return False
    return hmac.compare_digest(stored.encode(), given.encode())


#: built once: every HANDLER call looks its portal up
_BY_MEMBER_ID = select(Portal).where(Portal.member_id == bindparam("member_id"))
_BY_MEMBER_ID_LOCKED = _BY_MEMBER_ID.with_for_update()


def find_portal(session: Session, member_id: str, *, lock: bool = False) -> Portal | None:
    query = _BY_MEMBER_ID_LOCKED if lock else _BY_MEMBER_ID
    return session.scalar(query, {"member_id": member_id})


def token_expiry(expires: Any, expires_in: Any) -> dt.datetime | None:
    """When an access token Bitrix24 handed over expires: from ``expires`` (a Unix time), else
    ``expires_in`` (seconds from now); None when neither is a usable number."""
    try:
        if expires:
            return dt.datetime.fromtimestamp(float(expires), dt.UTC).replace(tzinfo=None)
    except (TypeError, ValueError, OverflowError, OSError):
        pass
    try:
        if expires_in:
            return utcnow() + dt.timedelta(seconds=float(expires_in))
    except (TypeError, ValueError, OverflowError):
        pass
    return None


def save_install(
    session: Session,
    *,
    member_id: str,
    domain: str,
    client_endpoint: str,
    server_endpoint: str | None,
    access_token: str,
    refresh_token: str,
    application_token: str,
    expires_at: dt.datetime | None,
    scope: str | None,
    language: str | None,
) -> tuple[Portal, bool]:
    """Create or refresh a portal from install data; returns (portal, created)."""
    portal = find_portal(session, member_id, lock=True)
    created = portal is None
    if portal is None:
        portal = Portal(member_id=member_id)
        session.add(portal)
    portal.domain = domain
    portal.client_endpoint = client_endpoint
    portal.server_endpoint = server_endpoint
    portal.access_token = access_token
    portal.refresh_token = refresh_token
    portal.application_token = application_token
    portal.token_expires_at = expires_at
    portal.scope = scope
    portal.language = language
    portal.state = PortalState.ACTIVE
    portal.last_error = None
    portal.paused_until = None
    portal.uninstalled_at = None
    portal.installed_at = portal.installed_at or utcnow()
    session.flush()
    return portal, created


def install_from_event(
    session: Session, auth: Mapping[str, Any], data: Mapping[str, Any]
) -> tuple[Portal, bool]:
    """ONAPPINSTALL: everything is in ``auth[…]``."""
    return save_install(
        session,
        member_id=auth["member_id"],
        domain=auth["domain"],
        client_endpoint=auth.get("client_endpoint") or f"https://{auth['domain']}/rest/",
        server_endpoint=auth.get("server_endpoint"),
        access_token=auth["access_token"],
        refresh_token=auth["refresh_token"],
        application_token=auth["application_token"],
        expires_at=token_expiry(auth.get("expires"), auth.get("expires_in")),
        scope=auth.get("scope"),
        language=_text(data.get("LANGUAGE_ID")),
    )


def install_from_form(session: Session, form: Mapping[str, Any]) -> tuple[Portal, bool]:
    """The UI install page: tokens in the POST body, the domain in the query string."""
    scheme = "http" if form["PROTOCOL"] == "0" else "https"
    return save_install(
        session,
        member_id=form["member_id"],
        domain=form["DOMAIN"],
        client_endpoint=f"{scheme}://{form['DOMAIN']}/rest/",
        server_endpoint=form.get("SERVER_ENDPOINT"),
        access_token=form["AUTH_ID"],
        refresh_token=form["REFRESH_ID"],
        application_token=form["APPLICATION_TOKEN"],
        expires_at=token_expiry(None, form.get("AUTH_EXPIRES")),
        scope=form.get("APPLICATION_SCOPE"),
        language=form.get("LANG"),
    )


def update_from_event(session: Session, portal: Portal, auth: Mapping[str, Any]) -> None:
    """ONAPPUPDATE: fresh tokens may come with it; the portal stays ours."""
    if auth.get("access_token"):
        portal.access_token = auth["access_token"]
        portal.token_expires_at = token_expiry(auth.get("expires"), auth.get("expires_in"))
    if auth.get("refresh_token"):
        portal.refresh_token = auth["refresh_token"]
    if auth.get("client_endpoint"):
        portal.client_endpoint = auth["client_endpoint"]
    if auth.get("domain"):
        portal.domain = auth["domain"]
    if portal.state != PortalState.BLOCKED:
        portal.state = PortalState.ACTIVE
    # Bitrix24 deleted our providers with the update: forget what we registered.
    for registration in portal.registrations:
        registration.fingerprint = None


def uninstall(session: Session, portal: Portal, *, clean: bool) -> None:
    """ONAPPUNINSTALL: tokens are dead; with ``clean`` the portal's data is erased.

    Without ``clean`` the portal row and its messages stay (a re-install picks them up again);
    its tokens are dropped because Bitrix24 revoked them.
    """
    if clean:
        session.execute(delete(OutboxEntry).where(OutboxEntry.portal_id == portal.id))
        session.execute(delete(Message).where(Message.portal_id == portal.id))
        session.execute(
            delete(ProviderRegistration).where(ProviderRegistration.portal_id == portal.id)
        )
        session.execute(delete(Portal).where(Portal.id == portal.id))
        session.expunge(portal)
        return
    portal.state = PortalState.UNINSTALLED
    portal.uninstalled_at = utcnow()
    portal.access_token = None
    portal.refresh_token = None
    for registration in portal.registrations:
        registration.fingerprint = None


def set_payment_state(
    session: Session, portal_id: int, state: str | None, *, only_from: str | None = None
) -> bool:
    """Mark the portal as not paid for (``PAYMENT_REQUIRED``, ``PAYMENT_EXPIRED``), or clear it
    with None. With ``only_from``, only a portal in that state changes. Returns whether it did."""
    portal = session.get(Portal, portal_id)
    if portal is None or portal.payment_state == state:
        return False
    if only_from is not None and portal.payment_state != only_from:
        return False
    portal.payment_state = state
    return True


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None
