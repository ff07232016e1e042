"""Gateway error texts lose the recipient's number and the message's text before anything keeps
them: ``last_error``, the status history, the log, the app page and ``b24sms messages``.

The fake HTTP gateway answers with errors that repeat what it was sent (the number as sent, the
text JSON-escaped, long texts cut off by the gateway's error snippet).
"""

from __future__ import annotations

import logging

import pytest
from sqlalchemy import select

from b24sms.gateway import PermanentGatewayError, RetryableGatewayError
from b24sms.models import Message, StatusEvent
from b24sms.redaction import (
    NUMBER_REDACTED,
    TEXT_REDACTED,
    redact_message_data,
    redacted_error,
)
from tests.conftest import SECRET_KEY
from tests.helpers import b24sms, open_page

NUMBER = "+14155550177"
#: longer than the gateway's 200-character error snippet, with a line break (JSON-escaped)
BODY = "Your verification code is 842913.\nDo not share it. " + "Thanks for using Acme! " * 8


def gateway_provider(api) -> dict:
    return {"gw": api.provider()}


def forms_of_the_secrets() -> list[str]:
    """What must not be found: the number as written by anyone, and pieces of the text."""
    return [
        NUMBER,
        NUMBER[1:],
        "4155550177",
        "555-0177",
        "842913",
        "Do not share it",
        "Thanks for using",
    ]


def test_errors_echoing_number_and_text_are_redacted_everywhere(
    live_app, emulator, gateway, caplog, tmp_path
):
    caplog.set_level(logging.DEBUG)
    server = live_app(
        providers=gateway_provider(gateway),
        service={"max_attempts": 2, "retry_base_delay": 0.05, "retry_max_delay": 0.1},
    )
    portal = emulator.add_portal()
    assert portal.install(server.url).status_code == 200
    gateway.echo_failures = True
    gateway.fail_next(503)  # retried: logged and kept in last_error meanwhile
    gateway.fail_next(400)  # then refused: the message fails
    message_id, response = portal.send_sms("gw", NUMBER, BODY)
    assert response.status_code == 200
    assert portal.wait_for_status(message_id) == "failed"
    assert len(gateway.requests) == 2
    assert gateway.requests[-1].json["to"] == NUMBER

    svc = server.app.extensions["b24sms"]
    with svc.db.session() as session:
        message = session.scalars(select(Message).where(Message.message_id == message_id)).one()
        stored = [message.last_error or ""] + [
            event.detail or ""
            for event in session.scalars(
                select(StatusEvent).where(StatusEvent.message_pk == message.id)
            )
        ]
    assert "HTTP 400" in stored[0] and NUMBER_REDACTED in stored[0] and TEXT_REDACTED in stored[0]
    log_text = caplog.text
    assert "HTTP 503" in log_text and "HTTP 400" in log_text

    page = open_page(server, portal.placement_auth())
    assert page.status_code == 200 and "HTTP 400" in page.text

    config = tmp_path / "cli.toml"
    config.write_text(
        f"""
[service]
public_url = "{server.url}"
secret_key = "{SECRET_KEY}"
database_url = "sqlite:///{tmp_path}/b24sms.sqlite3"
queue_url = "memory://"
"""
    )
    listed = b24sms("messages", config=config)
    assert listed.returncode == 0, listed.stderr
    assert "HTTP 400" in listed.stdout and NUMBER_REDACTED in listed.stdout

    places = {
        "last_error / history": "\n".join(stored),
        "log": log_text,
        "app page": page.text,
        "b24sms messages": listed.stdout,
    }
    found = [
        f"{piece!r} in the {where}"
        for where, text in places.items()
        for piece in forms_of_the_secrets()
        if piece in text
    ]
    assert not found, found


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("cannot send to +14155550177", f"cannot send to {NUMBER_REDACTED}"),
        ("bad number 14155550177!", f"bad number {NUMBER_REDACTED}!"),
        ("to +1 (415) 555-0177 refused", f"to {NUMBER_REDACTED} refused"),
        ("001-415-555-0177", NUMBER_REDACTED),
        ("n=4155550177&x=1", f"n={NUMBER_REDACTED}&x=1"),
        ("another +447700900123 too", f"another {NUMBER_REDACTED} too"),
        ("error 21211 at 2026-12-02 10:00:00", "error 21211 at 2026-12-02 10:00:00"),
        ('text "Hello Bob,\\nsee you" refused', f'text "{TEXT_REDACTED}" refused'),
        ("text=Hello+Bob%2C%0Asee+you", f"text={TEXT_REDACTED}"),
        ("answered: Hello Bob, see y", f"answered: {TEXT_REDACTED}"),
    ],
)
def test_redact_message_data(text, expected):
    assert redact_message_data(text, "+14155550177", "Hello Bob,\nsee you") == expected


def test_redacted_error_keeps_kind_code_and_retry_after():
    error = RetryableGatewayError("to +14155550177: Hello Bob", code="503", retry_after=7.0)
    clean = redacted_error(error, "+14155550177", "Hello Bob")
    assert type(clean) is RetryableGatewayError and clean.retryable
    assert (clean.code, clean.retry_after) == ("503", 7.0)
    assert str(clean) == f"503: to {NUMBER_REDACTED}: {TEXT_REDACTED}"
    assert "Hello" not in repr(clean.args)
    untouched = PermanentGatewayError("invalid sender id", code="21212")
    assert redacted_error(untouched, "+14155550177", "Hello Bob") is untouched
