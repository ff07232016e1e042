"""The service under test, plus two bare endpoints that only answer 200 (the ceilings).

- ``POST /bench/bare``: a Flask route on the service's own app — same server, same Flask app,
  same before/after-request hooks; everything the HANDLER costs beyond it is ours.
- ``POST /bench/wsgi``: answered by a WSGI wrapper before Flask sees the request — what the
  server itself can do;
- ``POST /bench/parse``: the bare route plus reading and checking the HANDLER's form, as the
  HANDLER does it, and nothing else (no key, no database, no queue);
- ``POST /bench/store``: the bare route plus the least that "store, enqueue, then answer"
  costs: one ``INSERT`` and commit through the service's own database session, and one write
  to the service's queue store. Nothing is validated, looked up, logged or hooked — what the
  HANDLER costs beyond this route is its own logic.

Used two ways, both building the app exactly as production does:

- ``python bench/bare.py [--config …] serve …`` runs the real ``b24sms serve`` command (waitress,
  the embedded consumer, the config's threads) with the two routes added;
- ``gunicorn 'bare:gunicorn_app()'`` (with ``bench/`` on ``PYTHONPATH``) serves
  ``create_app()``, as ``wsgi.py`` does, with the two routes added.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

BARE_BODY = b'{"result":"ok"}'


def add_bare_routes(app: Any) -> Any:
    """Add ``/bench/bare`` (a Flask route) and ``/bench/wsgi`` (before Flask) to ``app``."""

    @app.post("/bench/bare")
    def bench_bare() -> Any:
        return app.response_class(BARE_BODY, mimetype="application/json")

    service = app.extensions["b24sms"]
    table = _store_table(service)

    @app.post("/bench/store")
    def bench_store() -> Any:
        with service.db.session() as session:
            session.execute(table.insert(), {"body": "x" * 64})
        service.queue.huey.storage.put_data("bench-store", b"x")
        return app.response_class(BARE_BODY, mimetype="application/json")

    from b24sms.bitrix24.payloads import PayloadError, load_handler_call
    from b24sms.web.bitrix24 import read_payload

    @app.post("/bench/parse")
    def bench_parse() -> Any:
        # What every HANDLER call costs before it touches the database: read the form, check it.
        try:
            load_handler_call(read_payload())
        except PayloadError:
            return app.response_class(b'{"error":"invalid"}', status=400)
        return app.response_class(BARE_BODY, mimetype="application/json")

    inner = app.wsgi_app

    def wsgi_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/bench/wsgi":
            start_response(
                "200 OK",
                [("Content-Type", "application/json"), ("Content-Length", str(len(BARE_BODY)))],
            )
            return [BARE_BODY]
        return inner(environ, start_response)

    app.wsgi_app = wsgi_app
    return app


def _store_table(service: Any) -> Any:
    """A scratch table for ``/bench/store`` in the service's database (created if missing)."""
    from sqlalchemy import Column, Integer, MetaData, Table, Text
    from sqlalchemy.exc import SQLAlchemyError

    table = Table(
        "bench_store", MetaData(), Column("id", Integer, primary_key=True), Column("body", Text)
    )
    # another gunicorn worker may create it at the same moment
    with contextlib.suppress(SQLAlchemyError):
        table.create(service.db.engine, checkfirst=True)
    return table


def gunicorn_app() -> Any:
    """``create_app()`` as ``wsgi.py`` builds it, with the bare routes (gunicorn factory)."""
    from b24sms import create_app

    return add_bare_routes(create_app())


def serve_main() -> None:
    """The ``b24sms`` command line, with the bare routes added to the app ``serve`` builds."""
    import b24sms.app
    from b24sms.cli import main

    build_app = b24sms.app.build_app

    def build_with_bare_routes(*args: Any, **kwargs: Any) -> Any:
        return add_bare_routes(build_app(*args, **kwargs))

    b24sms.app.build_app = build_with_bare_routes
    main()


if __name__ == "__main__":
    serve_main()
