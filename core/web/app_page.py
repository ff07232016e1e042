"""The app page's routes: what a portal's users see when they open the app inside Bitrix24.

``POST /app`` is opened by Bitrix24's frame with an ``AUTH_ID`` and navigated afterwards with a
signed session token; ``POST /app/test-message`` sends a test message through the same path as
a message from Bitrix24. The rest of the page lives beside this module, one concern each:

- :mod:`.app_session`: who is asking (the AUTH_ID check, the signed per-portal session, the
  test-message form's token);
- :mod:`.app_data`: what the page shows of that portal (providers, delivery statistics, the
  message list), read with the portal's own id from the verified session, so a portal never
  sees another portal's data (the SQL is in :mod:`b24sms.queries`);
- :mod:`.security_headers`: the Content-Security-Policy, with the portal as the only page
  that may frame it, and the headers that keep the session token out of caches.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import replace

from flask import Blueprint, Response, current_app, render_template, request
from sqlalchemy import func, select

from ..bitrix24.payloads import PayloadError, check_text
from ..errors import ApiError
from ..ingest import accept_message
from ..messages import TEST_MESSAGE_PREFIX
from ..models import Message, utcnow
from ..registration import wanted_codes
from ..statuses import STATUSES
from .app_data import (
    Filters,
    connection_state,
    filter_codes,
    message_rows,
    provider_rows,
    provider_stats,
    read_filters,
)
from .app_session import (
    PageSession,
    PortalBusy,
    Unauthorized,
    authenticate,
    issue_send_token,
    issue_session,
    read_send_token,
    service,
)
from .security_headers import html_response, portal_origin, script_nonce

bp = Blueprint("app_page", __name__)

#: test messages get message ids Bitrix24 never issues (its own are 32 hex characters)
TEST_MODULE_ID = "app_page"
MAX_TEST_BODY = 1000
DEFAULT_TEST_BODY = "Test message from b24sms"


# -- routes --------------------------------------------------------------------------------------


@bp.before_request
def refuse_hostile_text() -> None:
    """The same text hygiene as the Bitrix24 routes (b24sms.bitrix24.payloads.check_text): a
    NUL or lone surrogate in the page's form or query is a 400 naming the field, before any of it
    reaches a query (PostgreSQL refuses NUL with an error, not an empty result)."""
    fields = {key: request.form.getlist(key) for key in request.form}
    fields.update({f"?{key}": request.args.getlist(key) for key in request.args})
    try:
        check_text(fields)
    except PayloadError as exc:
        raise ApiError(400, "invalid_payload", f"{exc.field}: {exc}") from None


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
        nonce = read_send_token(request.form.get("t", ""), session)
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
    over_cap = test_message_cap(session, domain, form)
    if over_cap is not None:
        return over_cap
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


def test_message_cap(session: PageSession, domain: str, form: Mapping[str, str]) -> Response | None:
    """429 when the portal sent ``[app_page] test_messages_per_hour`` test messages in the last
    hour, else None.

    Any user of a portal may use the form, and each test message is paid for on the operator's
    gateway, to any number. Counted in the database (test messages are the portal's messages
    whose id starts with TEST_MESSAGE_PREFIX), so every process and worker shares one count;
    requests racing each other may pass it by a few.
    """
    svc = service()
    cap = svc.config.app_page.test_messages_per_hour
    since = utcnow() - dt.timedelta(hours=1)
    with svc.db.read() as db_session:
        count, oldest = db_session.execute(
            select(func.count(), func.min(Message.created_at)).where(
                Message.portal_id == session.portal_id,
                Message.created_at > since,
                Message.message_id.startswith(TEST_MESSAGE_PREFIX, autoescape=True),
            )
        ).one()
    if count < cap:
        return None
    retry_after = 3600 if oldest is None else max(1, int((oldest - since).total_seconds()) + 1)
    if cap == 0:
        reason = "Test messages are turned off here ([app_page] test_messages_per_hour = 0)."
    else:
        reason = (
            f"This account sent {count} test messages in the last hour; "
            f"at most {cap} are allowed ([app_page] test_messages_per_hour). "
            f"Try again in {(retry_after + 59) // 60} minutes."
        )
    if _wants_json():
        response = current_app.response_class(
            json.dumps({"error": "too_many_test_messages", "message": reason}),
            429,
            mimetype="application/json",
        )
    else:
        response = render_page(session, domain, Filters(), ("error", reason), form, status=429)
    response.headers["Retry-After"] = str(retry_after)
    return response


# -- the page and its answers ----------------------------------------------------------------------


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
        known_codes = filter_codes(db_session, session.portal_id, codes)
        filters = filters or read_filters(request.form, known_codes)
        messages, more, newer = message_rows(db_session, session.portal_id, filters)
        if not newer:
            filters = replace(filters, page=1)
        stats = provider_stats(db_session, session.portal_id, codes, now)
        framed_by = portal_origin(db_session, session.portal_id)
        connection = connection_state(db_session, session.portal_id)
    send_token = issue_send_token(session)
    csp_nonce = script_nonce()
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
    return html_response(body, status, csp_nonce, framed_by)


def _wants_json() -> bool:
    best = request.accept_mimetypes.best_match(["text/html", "application/json"])
    return best == "application/json" and not request.accept_mimetypes.accept_html


def unauthorized(reason: str) -> Response:
    """401: JSON for API clients, a plain page for the frame."""
    if _wants_json():
        raise ApiError(401, "unauthorized", reason)
    return html_response(render_template("app_unauthorized.html", reason=reason), 401)


def busy(reason: str) -> Response:
    """503 with ``Retry-After``: JSON for API clients, a plain page for the frame."""
    if _wants_json():
        response = current_app.response_class(
            json.dumps({"error": "busy", "message": reason}), 503, mimetype="application/json"
        )
    else:
        response = html_response(render_template("app_busy.html", reason=reason), 503)
    response.headers["Retry-After"] = "5"
    return response
