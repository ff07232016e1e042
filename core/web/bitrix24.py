"""Routes Bitrix24 calls: install, events, and the HANDLER of every provider CODE."""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Mapping
from typing import Any

from flask import Blueprint, current_app, jsonify, render_template_string, request
from marshmallow import Schema, ValidationError

from ..bitrix24.client import Bitrix24Client
from ..bitrix24.payloads import (
    EventSchema,
    InstallFormSchema,
    PayloadError,
    check_text,
    load_handler_call,
    parse_bracketed,
    parse_json,
    parse_urlencoded,
)
from ..bitrix24.policy import WEB_TIMEOUT, SlotsBusy, web_slots
from ..bitrix24.verify import (
    InstallClaim,
    InstallRefused,
    ProvenInstall,
    host_of,
    prove_admin,
    prove_install,
)
from ..config import first_error
from ..errors import ApiError, error_response
from ..handler_keys import check_key, key_version
from ..ingest import Refused, accept_message
from ..models import PortalState
from ..portals import (
    AdminRequired,
    changes_trust,
    claim_from_event,
    claim_from_form,
    find_portal,
    save_install,
    tokens_match,
    uninstall,
    update_from_event,
)
from ..queue import enqueue_or_log
from ..registration import sync_portal
from ..service import Service
from .rate_limits import limit_handler_call

bp = Blueprint("bitrix24", __name__, url_prefix="/bitrix24")
log = logging.getLogger(__name__)

INSTALL_FINISH_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>b24sms installed</title>
<script src="https://api.bitrix24.com/api/v1/"></script></head>
<body style="font-family: sans-serif">
<p>{% if registered %}The app is installed and its SMS providers are registered.
{% else %}The app is installed, but {% if failed %}{{ failed }} of its SMS providers
{% else %}its SMS providers {% endif %}could not be registered yet: the administrator of
this b24sms service registers them with <code>b24sms providers sync</code>.{% endif %}</p>
<script>if (window.BX24) { BX24.init(function () { BX24.installFinish(); }); }</script>
</body></html>"""
#: seconds an install waits for a free portal-call slot before its provider sync is left to
#: `providers sync` (installs are proven and rare; the app page waits far less)
INSTALL_SLOT_WAIT = 2.0


@bp.app_errorhandler(Refused)
def refused(exc: Refused):
    """Storage refused a message for its portal (unknown, or a wrong application_token): the
    caller is not who it says it is, so 401 (app-wide: the app page stores messages too)."""
    return error_response(401, "unauthorized", str(exc))


def service() -> Service:
    return current_app.extensions["b24sms"]


def read_payload() -> dict[str, Any]:
    """The request body as nested fields: a bracketed form, or a JSON object (for tools).

    Read in time linear in its size, within the caps of :mod:`b24sms.bitrix24.payloads`, and
    every key and text value checked (no NUL, no lone surrogate): 400 naming the field.
    """
    try:
        payload, checked = _parse_body()
        if not checked:
            check_text(payload)
    except PayloadError as exc:
        raise ApiError(400, "invalid_payload", f"{exc.field}: {exc}") from None
    return payload


def _parse_body() -> tuple[dict[str, Any], bool]:
    """The body's fields, and whether they are known clean already (see :func:`read_payload`)."""
    if request.mimetype == "application/json":
        try:
            data = parse_json(_body_text())
        except PayloadError as exc:
            raise ApiError(400, "invalid_json", f"{exc.field}: {exc}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "invalid_json", "the body must be a JSON object")
        return data, False
    if request.mimetype == "application/x-www-form-urlencoded":
        # What request.form does for this type (werkzeug: parse_qsl of the whole body, limited
        # to MAX_CONTENT_LENGTH), without its MultiDict and at half parse_qsl's cost.
        text = _body_text()
        # The parsers enforce the caps, strict UTF-8 decoding leaves no lone surrogate, so only
        # a NUL (literal or %00) is left to look for: the HANDLER's form skips the tree walk.
        clean = "\x00" not in text and "%00" not in text
        return parse_bracketed(parse_urlencoded(text)), clean
    return parse_bracketed(request.form.items(multi=True)), False


def _body_text() -> str:
    try:
        return request.get_data().decode()
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_payload", "the body is not UTF-8") from None


def load(schema: Schema, payload: Mapping[str, Any]) -> dict[str, Any]:
    try:
        return schema.load(payload)
    except ValidationError as exc:
        field, problem = first_error(exc.messages, brackets=True)
        raise ApiError(400, "invalid_field", f"{field}: {problem}") from None


def _sync_after_commit(portal_id: int, client_endpoint: str) -> dict[str, Any]:
    """Register the portal's providers, inside the web request but bounded: short timeouts and
    one of the process's portal-call slots (the one of the portal's host). A failure is
    recorded and repeated by `providers sync`; the answer says what happened."""
    svc = service()
    client = Bitrix24Client(svc.db, portal_id, svc.config.bitrix24, timeout=WEB_TIMEOUT)
    try:
        with web_slots.hold(wait=INSTALL_SLOT_WAIT, host=host_of(client_endpoint)):
            report = sync_portal(svc, portal_id, client)
    except SlotsBusy:
        log.warning("provider registration for portal %s skipped: portal calls busy", portal_id)
        return {"registered": False, "error": "busy"}
    except Exception as exc:  # noqa: BLE001 - the install is stored; registration can be repeated
        log.warning("provider registration for portal %s failed: %s", portal_id, exc)
        return {"registered": False, "error": type(exc).__name__}
    return {"registered": report.ok, "failed": len(report.failed) or (0 if report.ok else 1)}


def _prove(claim: InstallClaim) -> ProvenInstall:
    """The install as Bitrix24's OAuth server confirms it, or the JSON error answer."""
    try:
        return prove_install(claim, service().config.bitrix24)
    except InstallRefused as exc:
        raise ApiError(exc.status, exc.error, exc.message) from None


@bp.post("/install")
def install():
    """ONAPPINSTALL (form with ``event``) or the UI install form (``AUTH_ID`` …)."""
    return _install(read_payload())


def _install(payload: dict[str, Any], event: dict[str, Any] | None = None):
    """Install from a read body (``event``: already loaded by ``/events``).

    New portal or re-install, whatever the stored state (active, uninstalled, needs re-install,
    blocked): the install's refresh token is exchanged at the OAuth server first, and the
    portal is stored as the OAuth server names it. Unless it re-installs an active portal with
    its stored application_token, the installing user must also be an administrator of the
    portal (:func:`~b24sms.bitrix24.verify.prove_admin`): any user can read their own tokens
    in the app's frame. A refused install changes nothing.
    """
    svc = service()
    ui = event is None and "event" not in payload
    if ui:
        form = load(InstallFormSchema(), {**request.args.to_dict(), **payload})
        claim, app_token, language = claim_from_form(form), form["APPLICATION_TOKEN"], form["LANG"]
    else:
        event = event or load(EventSchema(), payload)
        if event["event"].upper() != "ONAPPINSTALL":
            raise ApiError(400, "unsupported_event", f"event: {event['event']} is not ONAPPINSTALL")
        auth = _require_install_auth(event["auth"])
        language = event["data"].get("LANGUAGE_ID")
        claim, app_token = claim_from_event(auth), auth["application_token"]
        language = language if isinstance(language, str) else None
    # Outside any transaction: the OAuth server may take a while, and a SQLite transaction
    # would hold every writer (HANDLER calls included) meanwhile.
    proven = _prove(claim)
    with svc.db.read() as session:
        admin = changes_trust(find_portal(session, proven.member_id), app_token)
    if admin:
        _prove_admin(proven)
    with svc.db.session() as session:
        try:
            portal, created = save_install(
                session, proven, application_token=app_token, language=language, admin=admin
            )
        except AdminRequired:
            # The portal changed since we looked (an uninstall meanwhile): ask again.
            raise ApiError(409, "conflict", "the portal changed meanwhile; send again") from None
        portal_id, domain, endpoint = portal.id, portal.domain, portal.client_endpoint
    log.info(
        "portal %s %s (member %s)",
        domain,
        "installed" if created else "re-installed",
        claim.member_id,
    )
    registration = _sync_after_commit(portal_id, endpoint)
    # Statuses that waited while the portal's tokens were dead can go now.
    enqueue_or_log(svc.queue.enqueue_flush, portal_id)
    if ui:
        return render_template_string(
            INSTALL_FINISH_PAGE,
            registered=registration["registered"],
            failed=registration.get("failed", 0),
        )
    return jsonify({"result": "installed", "portal": domain, **registration})


def _prove_admin(proven: ProvenInstall) -> None:
    try:
        prove_admin(proven, service().config.bitrix24)
    except InstallRefused as exc:
        raise ApiError(exc.status, exc.error, exc.message) from None


def _require_install_auth(auth: Mapping[str, Any]) -> Mapping[str, Any]:
    for key in ("member_id", "domain", "access_token", "refresh_token", "application_token"):
        if not auth.get(key):
            raise ApiError(400, "invalid_field", f"auth[{key}]: missing")
    return auth


@bp.post("/events")
def events():
    """ONAPPUPDATE re-registers providers; ONAPPUNINSTALL stops (and with CLEAN erases)."""
    svc = service()
    payload = read_payload()
    event = load(EventSchema(), payload)
    name = event["event"].upper()
    auth = event["auth"]
    if name == "ONAPPINSTALL":
        return _install(payload, event)
    if name == "ONAPPPAYMENT":
        return _payment(auth)
    if name not in ("ONAPPUPDATE", "ONAPPUNINSTALL"):
        raise ApiError(400, "unsupported_event", f"event: {event['event']} is not handled")
    member_id = auth.get("member_id")
    if not member_id:
        raise ApiError(400, "invalid_field", "auth[member_id]: missing")
    if name == "ONAPPUPDATE":
        return _update(member_id, auth)
    with svc.db.session() as session:
        portal = find_portal(session, member_id, lock=True)
        # The uninstall brings no working token: its application_token is the only proof
        # (b24restdocs api-reference/events/safe-event-handlers.md).
        if portal is None or not tokens_match(
            portal.application_token, auth.get("application_token")
        ):
            raise ApiError(401, "unauthorized", "unknown portal or application_token mismatch")
        portal_id, domain = portal.id, portal.domain
        clean = str(event["data"].get("CLEAN", "0")) == "1"
        uninstall(session, portal, clean=clean)
    log.info("portal %s uninstalled (clean=%s)", domain, clean)
    if clean:
        from ..retention import erase_now

        erase_now(svc, portal_id)
    return jsonify({"result": "uninstalled", "clean": clean})


def _update(member_id: str, auth: Mapping[str, Any]):
    """ONAPPUPDATE: Bitrix24 hands over a new ``application_token`` and fresh tokens
    (b24restdocs ``api-reference/common/events/on-app-update.md``;
    ``settings/cloud-and-on-premise/security-recommendations.md``: "Update the saved value
    during the OnAppUpdate event if Bitrix24 has provided a new application_token").

    With the stored token the event is Bitrix24's; a new token is believed only once proven
    with Bitrix24 itself (:func:`_prove_update`). Tokens and address change only when the OAuth
    server confirmed the event's refresh token.
    """
    svc = service()
    with svc.db.session() as session:
        portal = find_portal(session, member_id)
        if portal is None:
            raise ApiError(401, "unauthorized", "unknown portal or application_token mismatch")
        given = auth.get("application_token")
        known = tokens_match(portal.application_token, given)
    # Outside any transaction, like the install's proof.
    proven = _prove_update(auth, known)
    with svc.db.session() as session:
        portal = find_portal(session, member_id, lock=True)
        if portal is None:
            raise ApiError(401, "unauthorized", "unknown portal or application_token mismatch")
        update_from_event(session, portal, proven, None if known else given)
        portal_id, domain, endpoint = portal.id, portal.domain, portal.client_endpoint
    if not known:
        log.info("portal %s: application_token rotated by an administrator's update", domain)
    log.info("portal %s updated; registering providers again", domain)
    return jsonify({"result": "updated", **_sync_after_commit(portal_id, endpoint)})


def _prove_update(auth: Mapping[str, Any], known: bool) -> ProvenInstall | None:
    """What of an update Bitrix24 confirms: the OAuth answer for its refresh token (or None).

    A new ``application_token`` needs the OAuth server's word on the event's refresh token
    *and* an administrator behind it (:func:`_prove_admin`). An access token alone proves
    nothing: every user of the portal can read their own in the app's frame.

    :raises ApiError: 401 when the update brings an unknown ``application_token`` that the
        OAuth server does not confirm; 403 when the tokens are not an administrator's; 503
        when the OAuth server or the portal could not be asked.
    """
    proven = None
    if auth.get("refresh_token") and auth.get("domain"):
        try:
            proven = prove_install(claim_from_event(auth), service().config.bitrix24)
        except InstallRefused as exc:
            if not known:
                raise ApiError(exc.status, exc.error, exc.message) from None
            log.warning("update of %s: tokens not confirmed (%s)", auth["member_id"], exc.error)
    if known:
        return proven
    if proven is None or not auth.get("application_token"):
        raise ApiError(401, "unauthorized", "new application_token not confirmed by Bitrix24")
    _prove_admin(proven)
    return proven


#: seconds between two reconciles an ONAPPPAYMENT asks for: anyone can post the event, so a
#: flood of it costs one reconcile per portal in this time, and a real payment is seen in it
PAYMENT_RECONCILE_SPACING = 300.0


def _payment(auth: Mapping[str, Any]):
    """ONAPPPAYMENT carries no application_token (on-app-payment.md), so it proves nothing: it
    only makes us ask the portal at its stored address (app.info, in a reconcile). Requests are
    coalesced, and a portal reconciled less than PAYMENT_RECONCILE_SPACING ago is reconciled
    when that time is up, not now."""
    svc = service()
    with svc.db.session() as session:
        portal = find_portal(session, str(auth.get("member_id") or ""))
        if portal is None or portal.state != PortalState.ACTIVE:
            raise ApiError(401, "unauthorized", "unknown portal")
        portal_id, done = portal.id, portal.reconciled_at
    last_done = None if done is None else done.replace(tzinfo=dt.UTC).timestamp()
    enqueue_or_log(
        svc.queue.enqueue_reconcile,
        portal_id,
        spacing=PAYMENT_RECONCILE_SPACING,
        last_done=last_done,
    )
    return jsonify({"result": "payment noted"})


@bp.post("/handler/<code>")
def handler(code: str):
    """A message from Bitrix24: verify, store durably, hand to delivery, answer at once."""
    svc = service()
    # 1. The key in the URL proves which portal sent the call; the rate limit counts the call
    #    against that portal, or against the address when the key proves nothing. Neither
    #    needs the body, so a refused call costs no parsing.
    member_id = request.args.get("member_id", "")
    version = key_version(request.args.get("kv"))
    key_valid = check_key(svc.settings, member_id, code, request.args.get("key"), version)
    too_many = limit_handler_call(member_id if key_valid else None)
    if too_many is not None:
        return too_many
    provider = svc.providers.get(code)
    if provider is None or not provider.enabled:
        raise ApiError(404, "unknown_provider", f"code: no provider {code!r} here")

    # 2. The form: read, then every field checked.
    try:
        data = load_handler_call(read_payload())
    except PayloadError as exc:
        raise ApiError(400, "invalid_field", f"{exc.field}: {exc}") from None
    if data["code"] != code:
        raise ApiError(400, "invalid_field", "code: does not match the provider in the URL")
    auth = data.get("auth") or {}
    if not member_id and auth.get("member_id"):
        # A URL without member_id: the key may still be the one of auth[member_id].
        member_id = auth["member_id"]
        key_valid = check_key(svc.settings, member_id, code, request.args.get("key"), version)
    if not key_valid:
        raise ApiError(401, "unauthorized", "handler key missing or not valid")
    if auth.get("member_id") and auth["member_id"] != member_id:
        raise ApiError(401, "unauthorized", "auth[member_id] does not match the handler key")
    if provider.portals is not None and member_id not in provider.portals:
        # Narrowed by [providers.CODE] portals: an old HANDLER URL of another portal stays
        # registered until `providers sync` removes it, and must not reach the gateway.
        raise ApiError(403, "provider_not_for_portal", f"code: {code!r} is not for this portal")

    # 3. Stored durably (a portal that refuses it: Refused, answered 401), then answered.
    accepted = accept_message(svc, member_id, code, data, auth=auth, key_version=version)
    # Not jsonify: the same JSON for a fraction of its cost, on the busiest route.
    return current_app.response_class(json.dumps(accepted.answer()), mimetype="application/json")
