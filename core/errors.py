"""One JSON error shape for every error: ``{"error": "<code>", "message": "<what is wrong>"}``."""

from __future__ import annotations

import logging

from flask import Flask, jsonify
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answer: HTTP status, a short machine code, a sentence for people."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message


def error_response(status: int, error: str, message: str):
    response = jsonify({"error": error, "message": message})
    response.status_code = status
    return response


def init_app(app: Flask) -> None:
    """Register the handlers that turn every failure into the JSON shape, without tracebacks."""

    @app.errorhandler(ApiError)
    def api_error(exc: ApiError):
        return error_response(exc.status, exc.error, exc.message)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        code = (exc.name or "error").lower().replace(" ", "_")
        if exc.code == 413:
            return error_response(413, "payload_too_large", "the request body is too large")
        return error_response(exc.code or 500, code, exc.description or exc.name)

    @app.errorhandler(OperationalError)
    def database_unreachable(exc: OperationalError):
        # The portal logs a 503; it must never get a 200 for a message we did not store.
        log.error("database unavailable: %s", type(exc.orig).__name__ if exc.orig else exc)
        return error_response(503, "database_unavailable", "the database cannot be reached")

    @app.errorhandler(SQLAlchemyError)
    def database_error(exc: SQLAlchemyError):
        log.exception("database error")
        return error_response(503, "database_error", "the request could not be stored")

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.exception("unexpected error")
        return error_response(500, "internal_error", "unexpected error; see the service log")
