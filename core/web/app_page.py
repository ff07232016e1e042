"""The app page: what a portal's users see when they open the app inside Bitrix24.

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

Everything shown is read with the portal's own id from the verified session: a portal never
sees another portal's data.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from flask import Blueprint, Response, current_app, render_template, request
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer
from sqlalchemy import select
from sqlalchemy.orm import Session

from .. import queries
from ..bitrix24.policy import SlotsBusy
from ..bitrix24.verify import probe_token
from ..errors import ApiError
from ..ingest import accept_message
from ..logs import mask_number
from ..messages import TEST_MESSAGE_PREFIX
from ..models import Message, Portal, PortalState, ProviderRegistration, utcnow
from ..portals import find_portal
from ..registration import wanted_codes
from ..service import Service
from ..statuses import DELIVERED, FINAL_STATUSES, STATUSES

bp = Blueprint("app_page", __name__)

#: a session token unused this long (seconds) stops working; every page hands out a new one
SESSION_IDLE = 3600
#: and none works longer than this after the AUTH_ID check it descends from
SESSION_MAX = 8 * 3600
#: seconds a confirmed AUTH_ID is believed without asking the portal again
PROBE_TTL = 60.0
#: messages per page
PAGE_SIZE = 20
#: test messages get message ids Bitrix24 never issues (its own are 32 hex characters)
TEST_MODULE_ID = "app_page"
MAX_TEST_BODY = 1000
DEFAULT_TEST_BODY = "Test message from b24sms"
WINDOWS = (("24 hours", dt.timedelta(hours=24)), ("7 days", dt.timedelta(days=7)))

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


def _wants_json() -> bool:
    best = request.accept_mimetypes.best_match(["text/html", "application/json"])
    return best == "application/json" and not request.accept_mimetypes.accept_html


def unauthorized(reason: str) -> Response:
    """401: JSON for API clients, a plain page for the frame."""
    if _wants_json():
        raise ApiError(401, "unauthorized", reason)
    return _html(render_template("app_unauthorized.html", reason=reason), 401)


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


def busy(reason: str) -> Response:
    """503 with ``Retry-After``: JSON for API clients, a plain page for the frame."""
    if _wants_json():
        response = current_app.response_class(
            json.dumps({"error": "busy", "message": reason}), 503, mimetype="application/json"
        )
    else:
        response = _html(render_template("app_busy.html", reason=reason), 503)
    response.headers["Retry-After"] = "5"
    return response


def _html(
    body: str, status: int = 200, nonce: str | None = None, framed_by: str | None = None
) -> Response:
    response = Response(body, status=status, mimetype="text/html")
    # The page is framed by the portal, so no X-Frame-Options but CSP frame-ancestors, which
    # Bitrix24 documents for app pages: only the portal's own address may frame it
    # (b24restdocs local-integrations/site-does-not-allow-connection.md). A page for nobody
    # known (not signed in) holds one sentence and no form or link: any page may show it, so
    # a user whose session ran out reads why inside the portal.
    script = f"'nonce-{nonce}' " if nonce else ""
    response.headers["Content-Security-Policy"] = (
        f"default-src 'self'; script-src {script}https://api.bitrix24.com "
        "http://api.bitrix24.com; style-src 'self'; img-src 'self' data:; "
        "form-action 'self'; base-uri 'none'; object-src 'none'; "
        f"frame-ancestors {framed_by or '*'}"
    )
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Content-Type-Options"] = "nosniff"
    # The body holds a session token: no cache may keep it.
    response.headers["Cache-Control"] = "no-store"
    return response


# -- what the page shows -------------------------------------------------------------------------


@dataclass
class ProviderRow:
    code: str
    name: str
    plugin: str
    state: str
    last_error: str | None
    #: the test form may use it: enabled and meant for this portal
    usable: bool


@dataclass
class StatsRow:
    code: str
    total: int = 0
    #: accepted by the gateway (sent, or a later status with the gateway's id)
    sent: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUSES, 0))

    @property
    def finished(self) -> int:
        return sum(self.counts[s] for s in FINAL_STATUSES)

    @property
    def rate(self) -> float | None:
        """Delivered share of the messages that reached a final status."""
        return self.counts[DELIVERED] / self.finished if self.finished else None


@dataclass
class HistoryItem:
    status: str
    at: dt.datetime
    source: str
    applied: bool
    detail: str | None


@dataclass
class MessageRow:
    id: int
    message_id: str
    created_at: dt.datetime
    code: str
    number: str
    status: str
    attempts: int
    last_error: str | None
    history: list[HistoryItem]

    @property
    def is_test(self) -> bool:
        return self.message_id.startswith(TEST_MESSAGE_PREFIX)


def provider_name(name: Any, lang: str) -> str:
    """A provider's name in the page's language (``name`` is a string or a language table)."""
    if isinstance(name, Mapping):
        return str(name.get(lang) or name.get("en") or next(iter(name.values()), ""))
    return str(name)


def provider_rows(svc: Service, db_session: Session, session: PageSession) -> list[ProviderRow]:
    """The providers of this portal: those the config wants here, and any registered earlier."""
    wanted = wanted_codes(svc, session.member_id)
    registrations = {
        r.code: r
        for r in db_session.scalars(
            select(ProviderRegistration).where(ProviderRegistration.portal_id == session.portal_id)
        )
    }
    rows = []
    for code in sorted(set(wanted) | set(registrations)):
        provider = svc.providers.get(code)
        registration = registrations.get(code)
        if registration is not None:
            state, error = registration.state, registration.last_error
        else:
            state, error = "pending", None
        if provider is None:
            state = f"{state} (no longer configured)"
        elif not provider.enabled:
            state = f"{state} (disabled)"
        rows.append(
            ProviderRow(
                code=code,
                name=provider_name(provider.name, session.lang) if provider else code,
                plugin=provider.plugin if provider else "-",
                state=state,
                last_error=error,
                usable=code in wanted,
            )
        )
    return rows


def provider_stats(
    db_session: Session, portal_id: int, codes: list[str], now: dt.datetime
) -> list[tuple[str, list[StatsRow], int]]:
    """Per window: (label, one row per CODE, the largest total, to scale the chart by)."""
    windows = []
    for label, span in WINDOWS:
        rows = {code: StatsRow(code) for code in codes}
        found = db_session.execute(queries.portal_stats(portal_id, now - span)).all()
        for code, status, was_accepted, count in found:
            row = rows.setdefault(code, StatsRow(code))
            row.total += count
            row.counts[status] = row.counts.get(status, 0) + count
            if was_accepted:
                row.sent += count
        ordered = [rows[c] for c in sorted(rows)]
        windows.append((label, ordered, max((r.total for r in ordered), default=0)))
    return windows


@dataclass(frozen=True)
class Filters:
    """What the list shows: a status and a CODE (empty: all), and where the page is.

    Pages are found by message id (keyset), not by counting rows from the newest (OFFSET):
    ``before`` lists what is older than a message (the "Older" link), ``after`` what is newer
    (the "Newer" link), so every page costs the same however deep. ``page`` is only the
    number shown.
    """

    status: str = ""
    code: str = ""
    page: int = 1
    before: int | None = None
    after: int | None = None


def message_rows(
    db_session: Session, portal_id: int, filters: Filters
) -> tuple[list[MessageRow], bool, bool]:
    """One page of the portal's messages, newest first, with their histories; whether there
    are older ones, and whether there are newer ones."""
    status, code = filters.status, filters.code
    found: list[Message] = []
    newer = False
    if filters.after is not None:
        # Newer than a message: the oldest PAGE_SIZE of those, shown newest first.
        found = list(
            db_session.scalars(
                queries.page_of_messages(
                    portal_id, status, code, None, PAGE_SIZE + 1, after_id=filters.after
                )
            ).all()
        )
        newer = len(found) > PAGE_SIZE
        found = found[:PAGE_SIZE][::-1] if newer else []
        more = True  # the page the reader came from is older
    if not found:
        # The first page (or what was newer than a message fills less than a page: the first
        # page, then, in full).
        before = filters.before if filters.after is None else None
        found = list(
            db_session.scalars(
                queries.page_of_messages(portal_id, status, code, before, PAGE_SIZE + 1)
            ).all()
        )
        more = len(found) > PAGE_SIZE
        found = found[:PAGE_SIZE]
        newer = before is not None
    history: dict[int, list[HistoryItem]] = {m.id: [] for m in found}
    if found:
        for event in db_session.scalars(queries.history_of(list(history))):
            history[event.message_pk].append(
                HistoryItem(
                    event.status, event.created_at, event.source, event.applied, event.detail
                )
            )
    rows = [
        MessageRow(
            id=m.id,
            message_id=m.message_id,
            created_at=m.created_at,
            code=m.code,
            number=mask_number(m.to or m.to_raw),
            status=m.status,
            attempts=m.attempts,
            last_error=m.last_error,
            history=history[m.id],
        )
        for m in found
    ]
    return rows, more, newer


def _cursor(value: str | None) -> int | None:
    try:
        number = int(value or "")
    except ValueError:
        return None
    return number if number > 0 else None


def read_filters(form: Mapping[str, str], codes: list[str]) -> Filters:
    """Filters from the form; anything unknown is ignored rather than trusted."""
    status = form.get("status", "")
    code = form.get("code", "")
    before, after = _cursor(form.get("before")), _cursor(form.get("after"))
    try:
        page = min(max(int(form.get("page", "1")), 1), 10_000)
    except ValueError:
        page = 1
    if before is None and after is None:
        page = 1  # without a place in the list, the list starts at the newest
    return Filters(
        status=status if status in STATUSES else "",
        code=code if code in codes else "",
        page=page,
        before=before,
        after=None if before is not None else after,
    )


def render_page(
    session: PageSession,
    domain: str,
    filters: Filters | None = None,
    notice: tuple[str, str] | None = None,
    test_form: Mapping[str, str] | None = None,
    status: int = 200,
) -> Response:
    """The whole page for ``session``'s portal."""
    svc = service()
    now = utcnow()
    # Reads only: outside the writer lock, beside the HANDLER's writes (Database.read).
    with svc.db.read() as db_session:
        providers = provider_rows(svc, db_session, session)
        codes = [p.code for p in providers]
        known_codes = sorted(
            set(codes) | set(db_session.scalars(queries.known_codes(session.portal_id)))
        )
        filters = filters or read_filters(request.form, known_codes)
        messages, more, newer = message_rows(db_session, session.portal_id, filters)
        if not newer:
            filters = replace(filters, page=1)
        stats = provider_stats(db_session, session.portal_id, codes, now)
        framed_by = portal_origin(db_session, session.portal_id)
        connection = connection_state(db_session, session.portal_id)
    nonce = secrets.token_hex(16)
    send_token = _serializer(_SEND_SALT).dumps({"m": session.member_id, "n": nonce})
    csp_nonce = secrets.token_urlsafe(16)
    body = render_template(
        "app_page.html",
        domain=domain,
        session_token=issue_session(session),
        providers=providers,
        usable=[p for p in providers if p.usable],
        stats=stats,
        messages=messages,
        more=more,
        newer=newer,
        filters=filters,
        statuses=STATUSES,
        codes=known_codes,
        notice=notice,
        send_token=send_token,
        test_form=test_form or {},
        default_test_body=DEFAULT_TEST_BODY,
        max_test_body=MAX_TEST_BODY,
        csp_nonce=csp_nonce,
        now=now,
        connection=connection,
    )
    return _html(body, status, csp_nonce, framed_by)


def connection_state(db_session: Session, portal_id: int) -> dict[str, Any]:
    """The portal's link with Bitrix24: events bound to us, payment state, last reconcile."""
    portal = db_session.get(Portal, portal_id)
    if portal is None:
        return {}
    return {
        "events": [e for e in (portal.event_bindings or "").split(",") if e],
        "payment_state": portal.payment_state,
        "reconciled_at": portal.reconciled_at,
        "reconcile_error": portal.reconcile_error,
    }


# -- routes --------------------------------------------------------------------------------------


@bp.route("/app", methods=["GET", "POST"])
def page() -> Response:
    """The app page: opened by Bitrix24 (POST with AUTH_ID), then navigated with the session."""
    try:
        session, domain = authenticate()
    except Unauthorized as exc:
        return unauthorized(exc.reason)
    except PortalBusy as exc:
        return busy(exc.reason)
    return render_page(session, domain)


@bp.post("/app/test-message")
def test_message() -> Response:
    """Send a test message through the same path as a message from Bitrix24.

    It is stored, queued and sent by the provider's gateway like any other; its message_id is
    ``test-`` and 32 hex digits, which Bitrix24 never issues, and its statuses are not reported
    to Bitrix24, which does not know it.
    """
    try:
        if "AUTH_ID" in request.form:
            raise Unauthorized("Open the app from Bitrix24 first, then use the form.")
        session, domain = authenticate()
        nonce = _read_send_token(request.form.get("t", ""), session)
    except Unauthorized as exc:
        return unauthorized(exc.reason)
    svc = service()
    wanted = wanted_codes(svc, session.member_id)
    code = request.form.get("code", "")
    to = request.form.get("to", "").strip()
    text = request.form.get("body", "").strip()
    form = {"code": code, "to": to, "body": text}
    problem = None
    if code not in wanted:
        problem = "Choose one of this account's providers."
    elif not to or len(to) > 32:
        problem = "Enter the phone number to send the test message to."
    elif not text or len(text) > MAX_TEST_BODY:
        problem = f"Enter a text of 1 to {MAX_TEST_BODY} characters."
    if problem is not None:
        return render_page(session, domain, Filters(), ("error", problem), form, status=400)
    message_id = TEST_MESSAGE_PREFIX + nonce
    accepted = accept_message(
        svc,
        session.member_id,
        code,
        {
            "message_id": message_id,
            "message_to": to,
            "message_body": text,
            "module_id": TEST_MODULE_ID,
        },
        report=False,
    )
    if accepted.result == "duplicate":
        notice = ("info", f"Test message {message_id} was sent already (the form was sent twice).")
    else:
        notice = (
            "ok",
            (
                f"Test message {message_id} stored and handed to {code}; it is listed below "
                "(marked “test”). Its statuses are not reported to Bitrix24."
            ),
        )
    # The provider stays chosen, for a second try; number and text start afresh.
    return render_page(session, domain, Filters(), notice, {"code": code})


def _read_send_token(token: str, session: PageSession) -> str:
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
