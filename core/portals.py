"""Portals: install (event or UI form), re-install, update and uninstall.

A portal is identified by ``member_id``; its domain may change. A portal becomes known, or a
known one changes address, tokens or ``application_token``, only from an install or update that
Bitrix24's OAuth server confirmed (:func:`b24sms.bitrix24.verify.prove_install`): what is
stored comes from the OAuth server's answer. Who the portal trusts (a new portal, a portal
that is not active becoming active, a new ``application_token``) changes only when, besides,
the install's user is an administrator (:func:`changes_trust`,
:func:`b24sms.bitrix24.verify.prove_admin`). Every other event must carry the stored
``application_token``, compared in constant time.
"""

from __future__ import annotations

import datetime as dt
import hmac
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from .bitrix24 import method_limits
from .models import Portal, PortalState, utcnow

if TYPE_CHECKING:
    # Imported late at run time: the Bitrix24 client imports this module.
    from .bitrix24.verify import InstallClaim, ProvenInstall


def tokens_match(stored: str | None, given: str | None) -> bool:
    """Constant-time comparison of application tokens; a missing one never matches."""
    if not stored or not given:
        return False
    return hmac.compare_digest(stored.encode(), given.encode())


#: built once: every HANDLER call looks its portal up
_BY_MEMBER_ID = select(Portal).where(Portal.member_id == bindparam("member_id"))
_BY_MEMBER_ID_LOCKED = _BY_MEMBER_ID.with_for_update()


class AdminRequired(Exception):
    """An install would change whom a portal trusts, without an administrator's proof."""


def changes_trust(portal: Portal | None, application_token: str | None) -> bool:
    """Whether an install or update bringing ``application_token`` changes whom ``portal``
    trusts: it is unknown, not active, or the token is not the stored one. Only a re-install of
    an active portal with its stored token does not (then it needs no administrator)."""
    return (
        portal is None
        or portal.state != PortalState.ACTIVE
        or not tokens_match(portal.application_token, application_token)
    )


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


def claim_from_event(auth: Mapping[str, Any]) -> InstallClaim:
    """What an ONAPPINSTALL / ONAPPUPDATE says in ``auth[…]`` (not yet believed)."""
    from .bitrix24.verify import InstallClaim

    return InstallClaim(
        member_id=str(auth["member_id"]),
        domain=str(auth["domain"]),
        refresh_token=str(auth["refresh_token"]),
        client_endpoint=_text(auth.get("client_endpoint")) or None,
        server_endpoint=_text(auth.get("server_endpoint")) or None,
    )


def claim_from_form(form: Mapping[str, Any]) -> InstallClaim:
    """What the UI install form says: tokens in the body, the address in the query string
    (``DOMAIN``; ``PROTOCOL`` 0 means http, 1 https: b24restdocs ``settings/oauth/simple-way.md``).
    """
    from .bitrix24.verify import InstallClaim

    scheme = "http" if form["PROTOCOL"] == "0" else "https"
    return InstallClaim(
        member_id=str(form["member_id"]),
        domain=str(form["DOMAIN"]),
        refresh_token=str(form["REFRESH_ID"]),
        client_endpoint=f"{scheme}://{form['DOMAIN']}/rest/",
        server_endpoint=_text(form.get("SERVER_ENDPOINT")) or None,
    )


def save_install(
    session: Session,
    proven: ProvenInstall,
    *,
    application_token: str,
    language: str | None,
    admin: bool,
) -> tuple[Portal, bool]:
    """Create or refresh a portal from an install proven at the OAuth server; returns
    (portal, created).

    Address, member_id and tokens come from the OAuth server's answer (``proven``), never from
    the request; only the ``application_token`` and the language are the install's own. Any
    previous state (uninstalled, needs re-install, blocked) ends: the portal is active again.

    :param admin: the install's user was proven an administrator of the portal.
    :raises AdminRequired: not ``admin``, and the install :func:`changes_trust` (checked under
        the portal's row lock: the state may have changed since the caller looked).
    """
    portal = find_portal(session, proven.member_id, lock=True)
    if not admin and changes_trust(portal, application_token):
        raise AdminRequired(proven.member_id)
    created = portal is None
    if portal is None:
        portal = Portal(member_id=proven.member_id)
        session.add(portal)
    _store_proven(portal, proven)
    if not created:
        # a re-install starts afresh: no method or portal pause of the old install holds
        method_limits.clear(session, portal.id)
    portal.application_token = application_token
    portal.language = language
    portal.state = PortalState.ACTIVE
    portal.last_error = None
    portal.paused_until = None
    portal.uninstalled_at = None
    portal.installed_at = portal.installed_at or utcnow()
    session.flush()
    return portal, created


def update_from_event(
    session: Session,
    portal: Portal,
    proven: ProvenInstall | None,
    application_token: str | None,
) -> None:
    """ONAPPUPDATE: the portal stays ours; Bitrix24 deleted our providers with the update.

    :param proven: the event's tokens as the OAuth server confirmed them, or None: then the
        stored tokens and address stay as they are.
    :param application_token: the update's token when it was proven (a new one is stored:
        b24restdocs ``api-reference/common/events/on-app-update.md`` "the updated
        ``application_token``"), or None to keep the stored one.
    """
    if proven is not None:
        _store_proven(portal, proven)
        # BLOCKED is no longer set (OVERLOAD_LIMIT / PORTAL_DELETED pause the portal instead:
        # b24sms.bitrix24.method_limits.pause_portal); a portal left BLOCKED by an older
        # version comes back with a proven update like any other.
        portal.state = PortalState.ACTIVE
        portal.last_error = None
        method_limits.clear(session, portal.id)
    if application_token:
        portal.application_token = application_token
    # Bitrix24 deleted our providers with the update: forget what we registered.
    for registration in portal.registrations:
        registration.fingerprint = None


def _store_proven(portal: Portal, proven: ProvenInstall) -> None:
    portal.domain = proven.domain
    portal.client_endpoint = proven.client_endpoint
    portal.server_endpoint = proven.server_endpoint
    portal.access_token = proven.access_token
    # The exchange spent the install's refresh token: this is the pair that works now.
    portal.refresh_token = proven.refresh_token
    portal.token_expires_at = proven.expires_at
    if proven.scope:
        portal.scope = proven.scope


def uninstall(session: Session, portal: Portal, *, clean: bool) -> None:
    """ONAPPUNINSTALL: tokens are dead; with ``clean`` the portal's data is erased.

    Without ``clean`` the portal row and its messages stay (a re-install picks them up again);
    its tokens are dropped because Bitrix24 revoked them. With ``clean`` the portal stops at
    once and its data is deleted in batches (:func:`b24sms.retention.erase_portal`).
    """
    if clean:
        # Stopped now, erased in batches after the commit (b24sms.retention.erase_portal).
        from .retention import start_erasure

        start_erasure(session, portal)
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
