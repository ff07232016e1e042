"""The app page's security headers: its Content-Security-Policy (with the nonce of its one
script and ``frame-ancestors``, the portal that may frame it) and the headers that keep its
session token out of caches and Referer headers.
"""

from __future__ import annotations

import re
import secrets

from flask import Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from ..models import Portal

#: a host name or address, with an optional port: what a CSP source may hold of a domain
_HOST_RE = re.compile(r"[A-Za-z0-9.-]{1,253}(?::[0-9]{1,5})?")


def portal_origin(db_session: Session, portal_id: int) -> str:
    """``scheme://domain`` of a portal, from what is stored (never from the request): the
    only page allowed to frame its app page. The scheme is that of its REST endpoint (https on
    Bitrix24's cloud; a self-hosted portal may serve http)."""
    domain, endpoint = db_session.execute(
        select(Portal.domain, Portal.client_endpoint).where(Portal.id == portal_id)
    ).one()
    if not _HOST_RE.fullmatch(domain or ""):
        return "'none'"  # nothing a header could misread as another directive or source
    scheme = "http" if endpoint.startswith("http://") else "https"
    return f"{scheme}://{domain}"


def script_nonce() -> str:
    """A fresh CSP nonce for the one inline script of a page."""
    return secrets.token_urlsafe(16)


def html_response(
    body: str, status: int = 200, nonce: str | None = None, framed_by: str | None = None
) -> Response:
    """An HTML answer with the app page's headers: scripts only with ``nonce`` (and Bitrix24's
    library), framed only by ``framed_by`` (a :func:`portal_origin`; None: any page)."""
    response = Response(body, status=status, mimetype="text/html")
    # The page is framed by the portal, so no X-Frame-Options but CSP frame-ancestors, which
    # Bitrix24 documents for app pages: only the portal's own address may frame it
    # (b24restdocs local-integrations/site-does-not-allow-connection.md). A page for nobody
    # known (not signed in) holds one sentence and no form or link: any page may show it, so
    # a user whose session ran out reads why inside the portal.
    script = f"'nonce-{nonce}' " if nonce else ""
    # Bitrix24's library over https only: a script fetched over http could be swapped on the way
    # by anyone on the network, and would run with the page's session token in reach.
    response.headers["Content-Security-Policy"] = (
        f"default-src 'self'; script-src {script}https://api.bitrix24.com; "
        "style-src 'self'; img-src 'self' data:; "
        "form-action 'self'; base-uri 'none'; object-src 'none'; "
        f"frame-ancestors {framed_by or '*'}"
    )
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Content-Type-Options"] = "nosniff"
    # The body holds a session token: no cache may keep it.
    response.headers["Cache-Control"] = "no-store"
    return response
