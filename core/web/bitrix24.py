"""Routes Bitrix24 calls: install, events, and the HANDLER of every provider CODE."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from flask import Blueprint, current_app, jsonify, render_template_string, request
from marshmallow import Schema, ValidationError

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
from ..config import first_error
from ..errors import ApiError, error_response
from ..handler_keys import check_key, key_version
from ..ingest import Refused, accept_message
from ..models import Portal, PortalState
from ..portals import (
    find_portal,
    install_from_event,
    install_from_form,
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
<script src="//api.bitrix24.com/api/v1/"></script></head>
<body style="font-family: sans-serif">
<p>The SMS providers are installed{% if failed %} ({{ failed }} could not be registered yet;
they will be retried){% endif %}.</p>
<script>if (window.BX24) { BX24.init(function () { BX24.installFinish(); }); }</script>
</body></html>"""


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
        payload = _parse_body()
        check_text(payload)
    except PayloadError as exc:
        raise ApiError(400, "invalid_payload", f"{exc.field}: {exc}") from None
    return payload


def _parse_body() -> dict[str, Any]:
    if request.mimetype == "application/json":
        try:
            data = parse_json(_body_text())
        except PayloadError as exc:
            raise ApiError(400, "invalid_json", f"{exc.field}: {exc}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "invalid_json", "the body must be a JSON object")
        return data
    if request.mimetype == "application/x-www-form-urlencoded":
        # What request.form does for this type (werkzeug: parse_qsl of the whole body, limited
        # to MAX_CONTENT_LENGTH), without its MultiDict and at half parse_qsl's cost.
        return parse_bracketed(parse_urlencoded(_body_text()))
    return parse_bracketed(request.form.items(multi=True))


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


def _sync_after_commit(portal_id: int) -> dict[str, Any]:
    """Register the portal's providers; a failure is recorded and retried by `providers sync`."""
    try:
        report = sync_portal(service(), portal_id)
    except Exception as exc:  # noqa: BLE001 - the install is stored; registration can be repeated
        log.warning("provider registration for portal %s failed: %s", portal_id, exc)
        return {"registered": False, "error": type(exc).__name__}
    return {"registered": report.ok, "failed": len(report.failed) or (0 if report.ok else 1)}


def _reinstall_allowed(portal: Portal, application_token: str | None, access_token: str) -> bool:
    """A re-install must prove itself: the stored application_token, or a token that works at
    the portal we already know (so a forged install cannot take over a portal's messages)."""
    if tokens_match(portal.application_token, application_token):
        return True
    from ..bitrix24.verify import probe_token

    return probe_token(portal.client_endpoint, access_token, service().config["bitrix24"])


@bp.post("/install")
def install():
    """ONAPPINSTALL (form with ``event``) or the UI install form (``AUTH_ID`` …)."""
    return _install(read_payload())


def _install(payload: dict[str, Any], event: dict[str, Any] | None = None):
    """Install from a read body (``event``: already loaded by ``/events``)."""
    svc = service()
    ui = event is None and "event" not in payload
    if ui:
        form = load(InstallFormSchema(), {**request.args.to_dict(), **payload})
        member_id, app_token, access = form["member_id"], form["APPLICATION_TOKEN"], form["AUTH_ID"]
    else:
        event = event or load(EventSchema(), payload)
        if event["event"].upper() != "ONAPPINSTALL":
            raise ApiError(400, "unsupported_event", f"event: {event['event']} is not ONAPPINSTALL")
        auth = _require_install_auth(event["auth"])
        member_id, app_token, access = (
            auth["member_id"],
            auth["application_token"],
            auth["access_token"],
        )

    # A re-install of an active portal must prove itself first, outside any transaction: the
    # proof may be a call to the portal, and a SQLite transaction would hold every writer.
    with svc.db.session() as session:
        existing = find_portal(session, member_id)
        verified = existing.application_token if existing is not None else None
        active = existing is not None and existing.state == PortalState.ACTIVE
    if active and not _reinstall_allowed(existing, app_token, access):
        raise ApiError(401, "unauthorized", "re-install of a known portal not verified")
    with svc.db.session() as session:
        current = find_portal(session, member_id, lock=True)
        if (
            current is not None
            and current.state == PortalState.ACTIVE
            and current.application_token != verified
            and not tokens_match(current.application_token, app_token)
        ):
            # Installed or re-installed by another call while we checked: check again.
            raise ApiError(409, "conflict", "the portal changed during the install; send again")
        if ui:
            portal, created = install_from_form(session, form)
        else:
            portal, created = install_from_event(session, auth, event["data"])
        portal_id, domain = portal.id, portal.domain
    log.info(
        "portal %s %s (member %s)", domain, "installed" if created else "re-installed", member_id
    )
    registration = _sync_after_commit(portal_id)
    # Statuses that waited while the portal's tokens were dead can go now.
    enqueue_or_log(svc.queue.enqueue_flush, portal_id)
    if ui:
        return render_template_string(INSTALL_FINISH_PAGE, failed=registration.get("failed", 0))
    return jsonify({"result": "installed", "portal": domain, **registration})


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
    if name not in ("ONAPPUPDATE", "ONAPPUNINSTALL"):
        raise ApiError(400, "unsupported_event", f"event: {event['event']} is not handled")
    member_id = auth.get("member_id")
    if not member_id:
        raise ApiError(400, "invalid_field", "auth[member_id]: missing")
    with svc.db.session() as session:
        portal = find_portal(session, member_id, lock=True)
        if portal is None or not tokens_match(
            portal.application_token, auth.get("application_token")
        ):
            raise ApiError(401, "unauthorized", "unknown portal or application_token mismatch")
        portal_id, domain = portal.id, portal.domain
        if name == "ONAPPUNINSTALL":
            clean = str(event["data"].get("CLEAN", "0")) == "1"
            uninstall(session, portal, clean=clean)
        else:
            update_from_event(session, portal, auth)
    if name == "ONAPPUNINSTALL":
        log.info("portal %s uninstalled (clean=%s)", domain, clean)
        return jsonify({"result": "uninstalled", "clean": clean})
    log.info("portal %s updated; registering providers again", domain)
    return jsonify({"result": "updated", **_sync_after_commit(portal_id)})


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
    if provider is None or not provider["enabled"]:
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
    if provider.get("portals") is not None and member_id not in provider["portals"]:
        # Narrowed by [providers.CODE] portals: an old HANDLER URL of another portal stays
        # registered until `providers sync` removes it, and must not reach the gateway.
        raise ApiError(403, "provider_not_for_portal", f"code: {code!r} is not for this portal")

    # 3. Stored durably (a portal that refuses it: Refused, answered 401), then answered.
    accepted = accept_message(svc, member_id, code, data, auth=auth, key_version=version)
    # Not jsonify: the same JSON for a fraction of its cost, on the busiest route.
    return current_app.response_class(json.dumps(accepted.answer()), mimetype="application/json")
