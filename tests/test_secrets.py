"""No secret ever reaches a log line or an answer.

One full run over real sockets with every logger at DEBUG (werkzeug's request lines and
urllib3's included, SQLAlchemy's statements at INFO): install (event and UI), update, messages
through the log, HTTP, Twilio and email gateways, signed callbacks, a token refresh, an
``invalid_grant``, forged calls of every kind, gateways failing with their credentials in the
error text, the app page, metrics, and a HANDLER URL from before a secret key rotation. Then
every log record (text with traceback, and JSON with extra fields) and every answer (body and
headers) is searched for every configured secret and every token the portals ever issued.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from aiosmtpd.smtp import AuthResult
from sqlalchemy import select, text
from sqlalchemy.exc import SQLAlchemyError

from b24sms.config import ConfigError, validate_config
from b24sms.db import Database
from b24sms.models import Portal, PortalState
from b24sms.redaction import QueryRedactingFilter, install_log_filters, redact_query
from b24sms.registration import handler_key, sync_all
from tests.conftest import CLIENT_SECRET, SECRET_KEY, base_config, wait_until
from tests.fakes.http_gateway import FakeSmsApi, post_callback
from tests.fakes.smtp_server import LoopbackController, Recorder
from tests.fakes.twilio_api import FakeTwilio, send_status_callback

PREVIOUS_SECRET_KEY = "previous-secret-key-before-rotation"
CALLBACK_SECRET = "http-callback-secret-0123456789"
BEARER_TOKEN = "http-gateway-bearer-token-abcdef"
API_KEY = "http-gateway-api-key-in-the-body"
SMTP_USER = "b24sms-smtp-user"
SMTP_PASSWORD = "smtp-password-s3cr3t-value"
SMTP_BAD_PASSWORD = "smtp-wrong-password-0000"
TWILIO_BAD_TOKEN = "twilio-wrong-auth-token-0000"
METRICS_TOKEN = "metrics-bearer-token-0123456789"


class AnswerRecorder:
    """WSGI middleware keeping every answer of the app: path, status, headers, body."""

    def __init__(self, app) -> None:
        self.inner = app.wsgi_app
        self.answers: list[str] = []
        app.wsgi_app = self

    def __call__(self, environ, start_response):
        seen: dict = {}

        def recording_start(status, headers, exc_info=None):
            seen.update(status=status, headers=headers)
            return start_response(status, headers, exc_info)

        result = self.inner(environ, recording_start)
        try:
            body = b"".join(result)
        finally:
            if hasattr(result, "close"):
                result.close()
        headers = "\n".join(f"{k}: {v}" for k, v in seen.get("headers", []))
        self.answers.append(
            f"{environ['PATH_INFO']} {seen.get('status')}\n{headers}\n"
            + body.decode("utf-8", "replace")
        )
        return [body]


def all_loggers_to_debug() -> None:
    """After the app is built: its logging set-up raises urllib3 to INFO; undo that here."""
    for name in ("werkzeug", "urllib3", "twilio", "b24sms"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    # INFO: every statement with its parameters (DEBUG would add result rows: a database dump)
    logging.getLogger("sqlalchemy.engine").setLevel(logging.INFO)


@pytest.fixture
def smtp() -> Iterator[tuple[LoopbackController, Recorder]]:
    def authenticate(server, session, envelope, mechanism, auth_data):
        ok = auth_data.login == SMTP_USER.encode() and auth_data.password == SMTP_PASSWORD.encode()
        return AuthResult(success=ok, handled=False)

    recorder = Recorder()
    controller = LoopbackController(
        recorder, hostname="127.0.0.1", port=0, authenticator=authenticate, auth_require_tls=False
    )
    controller.start()
    try:
        yield controller, recorder
    finally:
        controller.stop()


def providers(twilio: FakeTwilio, api: FakeSmsApi, smtp_port: int) -> dict:
    mail = {
        "plugin": "email",
        "smtp_host": "127.0.0.1",
        "smtp_port": smtp_port,
        "security": "none",
        "from": "sms@b24sms.test",
        "address": "{digits}@sms.b24sms.test",
        "smtp_user": SMTP_USER,
    }
    return {
        "smslog": {"plugin": "log", "name": "Log"},
        "gw": {
            "plugin": "http",
            "name": "HTTP",
            "url": api.json_url,
            "headers": {"Authorization": f"Bearer {BEARER_TOKEN}"},
            "body": {"to": "{to}", "text": "{body}", "api_key": API_KEY},
            "response_id": "messages.0.id",
            "callback_id": "id",
            "callback_status": "status",
            "callback_secret": CALLBACK_SECRET,
            "statuses": {"ACCEPTED": "queued", "DELIVRD": "delivered"},
        },
        "twilio": {
            "plugin": "twilio",
            "name": "Twilio",
            "account_sid": twilio.account_sid,
            "auth_token": twilio.auth_token,
            "from": "+15005550006",
            "api_base_url": twilio.url,
        },
        "twilio_bad": {
            "plugin": "twilio",
            "name": "Twilio (wrong token)",
            "account_sid": twilio.account_sid,
            "auth_token": TWILIO_BAD_TOKEN,
            "from": "+15005550006",
            "api_base_url": twilio.url,
        },
        "mail": {**mail, "name": "Email", "smtp_password": SMTP_PASSWORD},
        "mail_bad": {**mail, "name": "Email (wrong password)", "smtp_password": SMTP_BAD_PASSWORD},
    }


def handler_key_of(portal, code: str) -> str:
    return parse_qs(urlsplit(portal.senders[code]["HANDLER"]).query)["key"][0]


def test_no_secret_in_any_log_line_or_answer(live_app, emulator, smtp, capture, issued_tokens):
    controller, mailbox = smtp
    with FakeTwilio() as twilio, FakeSmsApi() as api:
        twilio.auto_callbacks = ("sent", "delivered")
        twilio.callback_delay = 0.05
        server = live_app(
            providers=providers(twilio, api, controller.port),
            service={"log_level": "DEBUG", "previous_secret_keys": [PREVIOUS_SECRET_KEY]},
            metrics={"enabled": True, "token": METRICS_TOKEN},
        )
        all_loggers_to_debug()
        recorder = AnswerRecorder(server.app)
        app_tokens: list[str] = []

        # install: by event, by the UI form, and a re-install (a new application_token)
        first, second = emulator.add_portal(), emulator.add_portal()
        assert first.install(server.url).status_code == 200
        app_tokens.append(first.application_token)
        assert first.install(server.url).status_code == 200
        app_tokens.append(first.application_token)
        assert second.install(server.url, mode="ui").status_code == 200
        app_tokens.append(second.application_token)
        assert first.update_app().status_code == 200

        # messages through every gateway, and their callbacks
        log_id, _ = first.send_sms("smslog", "+14155550100", "via log")
        gw_id, _ = first.send_sms("gw", "+14155550101", "via http")
        twilio_id, _ = first.send_sms("twilio", "+14155550102", "via twilio")
        mail_id, _ = first.send_sms("mail", "+14155550103", "via email")
        gateway_id = wait_until(lambda: api.messages and api.messages[0]["id"])
        callback_url = f"{server.url}/gateways/gw/callback"
        assert (
            post_callback(
                callback_url, {"id": gateway_id, "status": "DELIVRD"}, CALLBACK_SECRET
            ).status_code
            == 200
        )
        for message_id in (log_id, gw_id, twilio_id):
            assert first.wait_for_status(message_id) == "delivered"
        assert first.wait_for_status(mail_id, {"sent"}) == "sent" and mailbox.mails

        # gateways refusing us, with our credentials echoed in their error text (the message
        # texts are not words of those errors: error texts lose the message's text)
        api.fail_next(401, body=json.dumps({"error": f"bad key {API_KEY} / Bearer {BEARER_TOKEN}"}))
        failed_gw, _ = first.send_sms("gw", "+14155550104", "to be refused")
        bad_twilio, _ = first.send_sms("twilio_bad", "+14155550105", "to be refused")
        bad_mail, _ = first.send_sms("mail_bad", "+14155550106", "to be refused")
        for message_id in (failed_gw, bad_twilio, bad_mail):
            assert first.wait_for_status(message_id) == "failed"

        # a token refresh (expired_token on the status update), then an invalid_grant
        first.expire_tokens()
        refreshed, _ = first.send_sms("smslog", "+14155550107", "after expiry")
        assert first.wait_for_status(refreshed) == "delivered"
        assert first.stats["refreshes"] >= 1
        second.expire_tokens()
        emulator.inject("invalid_grant", 400, count=5, description="refresh token expired")
        second.send_sms("smslog", "+14155550108", "tokens gone")
        with server.app.extensions["b24sms"].db.session() as session:
            state = wait_until(
                lambda: (
                    session.scalar(select(Portal.state).where(Portal.member_id == second.member_id))
                    == PortalState.NEEDS_REINSTALL
                    and "yes"
                )
            )
        assert state

        # forged and replayed calls of every kind
        handler = first.senders["smslog"]["HANDLER"]
        form = {
            "type": "SMS",
            "code": "smslog",
            "message_id": "e" * 32,
            "message_to": "+14155550109",
            "message_body": "forged",
            "auth[member_id]": first.member_id,
            "auth[application_token]": "forged-token",
        }
        assert requests.post(handler, data=form, timeout=10).status_code == 401
        bad_key = handler.replace(handler_key_of(first, "smslog"), "0" * 32)
        assert (
            requests.post(
                bad_key, data={**form, "auth[application_token]": None}, timeout=10
            ).status_code
            == 401
        )
        assert (
            requests.post(
                f"{server.url}/bitrix24/events",
                data={
                    "event": "ONAPPUNINSTALL",
                    "auth[member_id]": first.member_id,
                    "auth[application_token]": app_tokens[0],
                },
                timeout=10,
            ).status_code
            == 401
        )
        assert (
            requests.post(
                f"{server.url}/bitrix24/install",
                data={
                    "event": "ONAPPINSTALL",
                    "auth[member_id]": first.member_id,
                    "auth[domain]": "evil.example",
                    "auth[access_token]": "forged-access",
                    "auth[refresh_token]": "forged-refresh",
                    "auth[application_token]": "forged-app",
                },
                timeout=10,
            ).status_code
            == 401
        )
        assert (
            post_callback(
                callback_url, {"id": gateway_id, "status": "DELIVRD"}, "wrong-secret-wrong-secret"
            ).status_code
            == 401
        )
        assert (
            send_status_callback(
                f"{server.url}/gateways/twilio/callback",
                {"MessageSid": "SM" + "1" * 32, "MessageStatus": "failed"},
                TWILIO_BAD_TOKEN,
            ).status_code
            == 401
        )
        assert (
            requests.get(
                f"{server.url}/metrics", timeout=10, headers={"Authorization": "Bearer wrong"}
            ).status_code
            == 401
        )
        assert requests.get(
            f"{server.url}/metrics",
            timeout=10,
            headers={"Authorization": f"Bearer {METRICS_TOKEN}"},
        ).ok

        # the app page, opened the way Bitrix24's frame opens it
        auth = first.placement_auth()
        query = {k: auth[k] for k in ("DOMAIN", "PROTOCOL", "LANG", "APP_SID")}
        body = {k: v for k, v in auth.items() if k not in query}
        assert requests.post(f"{server.url}/app", params=query, data=body, timeout=10).ok

        # a HANDLER URL issued before the secret key was rotated still works
        old_key = handler_key(PREVIOUS_SECRET_KEY, first.member_id, "smslog")
        old_url = handler.replace(handler_key_of(first, "smslog"), old_key)
        old_form = {
            **form,
            "message_id": "d" * 32,
            "auth[application_token]": first.application_token,
        }
        assert requests.post(old_url, data=old_form, timeout=10).status_code == 200

        # the uninstall of the portal whose tokens died
        assert second.uninstall().status_code == 200

    secrets = {
        "secret_key": SECRET_KEY,
        "previous_secret_key": PREVIOUS_SECRET_KEY,
        "client_secret": CLIENT_SECRET,
        "http callback_secret": CALLBACK_SECRET,
        "http header (bearer token)": BEARER_TOKEN,
        "http body api_key": API_KEY,
        "twilio auth_token": twilio.auth_token,
        "twilio wrong auth_token": TWILIO_BAD_TOKEN,
        "smtp_password": SMTP_PASSWORD,
        "wrong smtp_password": SMTP_BAD_PASSWORD,
        "metrics token": METRICS_TOKEN,
        "handler key under the previous secret_key": old_key,
    }
    for portal in (first, second):
        for code in ("smslog", "gw", "twilio", "mail"):
            if code in portal.senders:
                secrets[f"handler key {portal.member_id[:6]}/{code}"] = handler_key_of(portal, code)
    for index, token in enumerate(app_tokens):
        secrets[f"application_token #{index}"] = token
    for index, token in enumerate(issued_tokens):
        secrets[f"{'access' if index % 2 == 0 else 'refresh'} token #{index // 2}"] = token
    assert len(issued_tokens) >= 10  # installs, update, refresh, app page: old and new pairs

    log_text = "\n".join(capture.lines)
    # the run did what it claims (so finding nothing means something)
    for evidence in (
        "key=***",
        "tokens refreshed",
        "invalid_grant",
        "refused the login",
        "callback for gw rejected",
        "callback for twilio rejected",
        "previous secret_key",
        "Twilio answered HTTP 401",
        "SQL parameters hidden",
        "/oauth/token/?grant_type=refresh_token",
    ):
        assert evidence in log_text, f"the run left no log line with {evidence!r}"
    leaks = []
    for name, value in secrets.items():
        line = next((line for line in capture.lines if value in line), None)
        if line is not None:
            leaks.append(f"{name} in the log: {line[:300]}")
        answer = next((a for a in recorder.answers if value in a), None)
        if answer is not None:
            leaks.append(f"{name} in an answer: {answer[:300]}")
    assert not leaks, "\n".join(leaks)
    print(
        f"searched {len(capture.lines) // 2} log records and {len(recorder.answers)} answers "
        f"for {len(secrets)} secrets"
    )


def test_request_line_redaction():
    line = '"POST /bitrix24/handler/sms?member_id=abc&key=0123abcd HTTP/1.1" 200 -'
    assert redact_query(line) == '"POST /bitrix24/handler/sms?member_id=abc&key=*** HTTP/1.1" 200 -'
    oauth = (
        "/oauth/token/?grant_type=refresh_token&client_id=local.1&client_secret=S3&refresh_token=R4"
    )
    assert redact_query(oauth) == (
        "/oauth/token/?grant_type=refresh_token&client_id=local.1&"
        "client_secret=***&refresh_token=***"
    )
    assert redact_query("/send?to=1&api_key=K&auth%5Baccess_token%5D=T&text=hi") == (
        "/send?to=1&api_key=***&auth%5Baccess_token%5D=***&text=hi"
    )
    assert redact_query("no query here: key=value") == "no query here: key=value"


def test_gunicorn_access_log_lines_are_redacted_too():
    install_log_filters()
    access = logging.getLogger("gunicorn.access")
    assert any(isinstance(f, QueryRedactingFilter) for f in access.filters)
    record = logging.LogRecord(
        "gunicorn.access", logging.INFO, __file__, 1, '%(h)s "%(r)s"', None, None
    )
    # gunicorn passes its atoms as one mapping
    record.args = {"h": "10.0.0.1", "r": "POST /bitrix24/handler/x?member_id=m&key=SECRET HTTP/1.1"}
    for log_filter in access.filters:
        log_filter.filter(record)
    assert "SECRET" not in record.getMessage() and "key=***" in record.getMessage()


def test_database_errors_never_carry_the_parameters(tmp_path):
    """A failed statement's message (which reaches the log through ``log.exception``) holds no
    parameter values: a token being written is one of them."""
    db = Database(f"sqlite:///{tmp_path}/x.sqlite3")
    try:
        with pytest.raises(SQLAlchemyError) as failure, db.engine.connect() as conn:
            conn.execute(text("INSERT INTO nowhere VALUES (:token)"), {"token": "tok-SECRET-1"})
        assert "tok-SECRET-1" not in str(failure.value)
    finally:
        db.dispose()


# -- rotating the secret key ----------------------------------------------------------------------

NEW_SECRET_KEY = "the-new-secret-key-after-rotation"
LOG_ONLY = {"smslog": {"plugin": "log", "name": "Log"}}


def test_rotating_the_secret_key_keeps_old_handler_urls_working_until_synced(live_app, emulator):
    before = live_app(providers=LOG_ONLY)  # the conftest's SECRET_KEY
    portal = emulator.add_portal()
    portal.install(before.url)
    old_handler = portal.senders["smslog"]["HANDLER"]
    old_key = handler_key_of(portal, "smslog")

    # step 1: the new key, the old one still accepted (same database, restarted processes)
    during = live_app(
        providers=LOG_ONLY,
        service={"secret_key": NEW_SECRET_KEY, "previous_secret_keys": [SECRET_KEY]},
    )
    old_url_now = old_handler.replace(before.url, during.url)
    portal.senders["smslog"]["HANDLER"] = old_url_now  # Bitrix24 still calls the old URL
    message_id, response = portal.send_sms("smslog", "+14155550100", "during rotation")
    assert response.status_code == 200, response.text
    assert portal.wait_for_status(message_id) == "delivered"

    # step 2: `b24sms providers sync` gives the portal its new URL
    reports = sync_all(during.app.extensions["b24sms"])
    assert [r.ok for r in reports] == [True] and reports[0].updated == ["smslog"]
    new_key = handler_key_of(portal, "smslog")
    assert new_key != old_key and new_key == handler_key(NEW_SECRET_KEY, portal.member_id, "smslog")
    message_id, response = portal.send_sms("smslog", "+14155550101", "after sync")
    assert response.status_code == 200

    # step 3: the old key dropped — the old URL is refused, the new one works
    after = live_app(providers=LOG_ONLY, service={"secret_key": NEW_SECRET_KEY})
    form = {
        "type": "SMS",
        "code": "smslog",
        "message_id": "a" * 32,
        "message_to": "+14155550102",
        "message_body": "x",
    }
    stale = old_handler.replace(before.url, after.url)
    assert requests.post(stale, data=form, timeout=10).status_code == 401
    fresh = portal.senders["smslog"]["HANDLER"].replace(during.url, after.url)
    assert requests.post(fresh, data=form, timeout=10).status_code == 200


@pytest.mark.parametrize(
    ("previous", "expected"),
    [([], []), (["", "an-old-secret-key-0001"], ["an-old-secret-key-0001"])],
)
def test_previous_secret_keys_drop_empty_entries(tmp_path, previous, expected):
    config = validate_config(base_config(tmp_path, service={"previous_secret_keys": previous}), {})
    assert config.service.previous_secret_keys == tuple(expected)


def test_a_short_previous_secret_key_stops_the_start(tmp_path):
    with pytest.raises(ConfigError, match=r"service\.previous_secret_keys"):
        validate_config(base_config(tmp_path, service={"previous_secret_keys": ["short"]}), {})


def test_the_redacting_filter_keeps_gunicorns_atoms_mapping():
    """gunicorn formats its access line from a dict of its own that answers "-" for an atom it
    lacks (a header the request did not send): redacted in place, it still does."""
    import logging

    class Atoms(dict):  # what gunicorn.glogging.SafeAtoms does for a missing key
        def __getitem__(self, key):
            return super().__getitem__(key) if key in self else "-"

    atoms = Atoms({"r": "POST /bitrix24/handler/x?member_id=m&key=0123456789abcdef HTTP/1.1"})
    fmt = "%(r)s %({x-forwarded-for}i)s"  # gunicorn's access_log_format, a header it lacks
    record = logging.LogRecord("gunicorn.access", logging.INFO, __file__, 1, fmt, (), None)
    record.args = atoms  # as gunicorn passes it
    QueryRedactingFilter().filter(record)
    assert record.args is atoms
    line = record.getMessage()
    assert "0123456789abcdef" not in line and line.endswith(" -")
