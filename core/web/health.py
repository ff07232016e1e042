"""``GET /healthz``: can we reach the database and the queue, and how much waits to be reported."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    svc = current_app.extensions["b24sms"]
    checks: dict[str, str] = {}
    backlog = None
    try:
        svc.db.ping()
        checks["database"] = "ok"
        from ..outbox import outbox_backlog

        with svc.db.read() as session:
            backlog = sum(outbox_backlog(session).values())
    except Exception as exc:  # noqa: BLE001 - any failure means "unavailable"
        checks["database"] = f"unavailable ({type(exc).__name__})"
    try:
        svc.queue.ping()
        checks["queue"] = "ok"
    except Exception as exc:  # noqa: BLE001 - any failure means "unavailable"
        checks["queue"] = f"unavailable ({type(exc).__name__})"
    healthy = all(v == "ok" for v in checks.values())
    response = jsonify(
        {"status": "ok" if healthy else "unavailable", "checks": checks, "outbox_backlog": backlog}
    )
    response.status_code = 200 if healthy else 503
    return response
