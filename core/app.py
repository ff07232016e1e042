"""The Flask app factory's body (see :func:`b24sms.create_app`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Flask
from flask.json.provider import DefaultJSONProvider

from . import errors, logs, schema
from .config import load_config, prepare_instance, validate_config
from .service import Service


class _JSONProvider(DefaultJSONProvider):
    # Answers keep their keys in the order the code wrote them (error, then message).
    sort_keys = False


def build_app(
    test_config: Mapping[str, Any] | None = None,
    *,
    config_path: str | None = None,
    environ: Mapping[str, str] | None = None,
    service: Service | None = None,
) -> Flask:
    """Config → service → Flask app with the blueprints registered."""
    if service is None:
        if test_config is not None:
            config = validate_config(dict(test_config), environ)
        else:
            config = load_config(config_path, environ)
        # Start-up, not validation, creates the instance folder and the generated secret key.
        config = prepare_instance(config)
        logs.configure(config.service)
        service = Service(config, environ=environ)
    if service.db.is_sqlite:
        # The embedded database upgrades itself; a shared server is upgraded by `b24sms db upgrade`.
        schema.upgrade(service.db)

    app = Flask(__name__, instance_relative_config=False)
    app.config["SECRET_KEY"] = service.settings.secret_key
    app.config["MAX_CONTENT_LENGTH"] = service.settings.max_body_bytes
    app.json = _JSONProvider(app)
    app.extensions["b24sms"] = service

    errors.init_app(app)
    from . import metrics
    from .web import app_page, bitrix24, gateways, health, rate_limits

    app.register_blueprint(bitrix24.bp)
    app.register_blueprint(gateways.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(app_page.bp)
    metrics.init_app(app, service)
    rate_limits.init_app(app, service)
    return app
