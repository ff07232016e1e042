"""Delivery reports from gateways: ``POST /gateways/<code>/callback``, verified by the plugin."""

from __future__ import annotations

import logging
from urllib.parse import parse_qsl

from flask import Blueprint, current_app, request

from ..delivery import apply_reports
from ..errors import ApiError
from ..gateway import CallbackInvalid, CallbackRejected, CallbackRequest

bp = Blueprint("gateways", __name__, url_prefix="/gateways")
log = logging.getLogger(__name__)


def callback_request(public_url: str) -> CallbackRequest:
    """The request as the gateway sent it, with the public URL it signed."""
    body = request.get_data(cache=True)
    form: dict[str, str] = {}
    if request.mimetype == "application/x-www-form-urlencoded":
        try:
            form = dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
        except UnicodeDecodeError:
            raise ApiError(400, "invalid_encoding", "the form is not UTF-8") from None
    query = request.query_string.decode("latin-1")
    return CallbackRequest(
        method=request.method,
        url=f"{public_url}{request.path}" + (f"?{query}" if query else ""),
        headers={k: v for k, v in request.headers.items()},
        body=body,
        form=form,
        args=request.args.to_dict(),
        content_type=request.mimetype,
    )


@bp.post("/<code>/callback")
def callback(code: str):
    svc = current_app.extensions["b24sms"]
    gateway = svc.gateways.get(code)
    if gateway is None or not svc.providers[code].enabled:
        raise ApiError(404, "unknown_provider", f"code: no provider {code!r} here")
    incoming = callback_request(svc.public_url)
    try:
        reports = gateway.parse_callback(incoming)
    except CallbackRejected as exc:
        log.warning("callback for %s rejected: %s", code, exc)
        raise ApiError(401, "unauthorized", "callback verification failed") from None
    except CallbackInvalid as exc:
        raise ApiError(400, "invalid_callback", str(exc)) from None
    applied = apply_reports(svc, code, reports, source="callback")
    log.info("callback for %s: %d report(s), %d applied", code, len(reports), applied)
    body, status, headers = gateway.callback_response(reports)
    return body, status, headers
