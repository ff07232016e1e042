"""Logs: one structured line per message state change, JSON when asked, never a body or secret."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest

from b24sms import logs
from b24sms.config import ServiceConfig, ServiceSchema
from b24sms.event_hooks import MessageInfo
from b24sms.models import utcnow

PROVIDERS = {
    "smslog": {"plugin": "log", "name": "Log only"},
    "second": {"plugin": "log", "name": "Failing", "outcome": "failed"},
}
BODY = "Secret code 918273"


def status_lines(caplog) -> list[dict]:
    """The state-change records, as the JSON formatter writes them."""
    formatter = logs.JsonFormatter()
    return [
        json.loads(formatter.format(record))
        for record in caplog.records
        if record.name == logs.STATUS_LOGGER
    ]


@pytest.fixture
def captured(caplog):
    caplog.set_level(logging.INFO, logger="b24sms")
    return caplog


def test_one_line_per_state_change(live_app, emulator, captured):
    server = live_app(providers=PROVIDERS)
    portal = emulator.add_portal()
    portal.install(server.url)
    delivered, _ = portal.send_sms("smslog", "+14155550123", BODY)
    failed, _ = portal.send_sms("second", "+14155550124", BODY)
    portal.wait_for_status(delivered)
    portal.wait_for_status(failed)

    lines = status_lines(captured)
    by_message = {}
    for line in lines:
        by_message.setdefault(line["message_id"], []).append(line)
    # queued (stored) → sent → final; in memory:// mode delivery runs inside the HANDLER call,
    # so "stored" may be written after the later ones: compare as sets of transitions.
    assert {(line["previous"], line["status"]) for line in by_message[delivered]} == {
        (None, "queued"),
        ("queued", "sent"),
        ("sent", "delivered"),
    }
    assert len(by_message[delivered]) == 3
    assert [line["status"] for line in by_message[failed] if line["source"] == "gateway"] == [
        "sent",
        "failed",
    ]
    first = by_message[delivered][0]
    assert first["event"] == "message_status"
    assert first["code"] == "smslog"
    assert first["portal"] == portal.member_id and first["domain"] == portal.domain
    assert isinstance(first["id"], int) and first["level"] == "INFO"

    # Nothing personal or secret in any line.
    text = "\n".join(json.dumps(line) for line in lines)
    for secret in (BODY, "+14155550123", portal.access_token, portal.application_token):
        assert secret not in text


def test_a_message_failed_at_the_handler_is_logged_too(live_app, emulator, captured):
    server = live_app(providers=PROVIDERS)
    portal = emulator.add_portal()
    portal.install(server.url)
    message_id, _ = portal.send_sms("smslog", "12", BODY)
    lines = [line for line in status_lines(captured) if line["message_id"] == message_id]
    assert [(line["previous"], line["status"], line["source"]) for line in lines] == [
        (None, "queued", "handler"),
        ("queued", "failed", "handler"),
    ]


def service_settings(**keys: str) -> ServiceConfig:
    """``[service]`` with the schema's defaults (text lines, INFO) under ``keys``."""
    return ServiceSchema().load({"public_url": "http://127.0.0.1:9", "secret_key": "", **keys})


def test_json_format_writes_one_object_per_line(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    logs.configure(service_settings(log_format="json", log_level="INFO"))
    try:
        info = MessageInfo(
            id=7,
            message_id="abc",
            code="smslog",
            member_id="member-1",
            domain="x.bitrix24.com",
            to="+14155550123",
            body=BODY,
            module_id="crm",
            status="sent",
            external_id="e1",
            attempts=1,
            last_error=None,
            created_at=utcnow(),
        )
        logs.StatusLog().b24sms_status_changed(
            message=info, previous="queued", status="sent", source="gateway"
        )
    finally:
        logs.configure(service_settings())
    written = stream.getvalue().strip().splitlines()
    assert len(written) == 1
    line = json.loads(written[0])
    assert line["logger"] == "b24sms.status"
    assert {
        k: line[k] for k in ("message_id", "code", "portal", "previous", "status", "source")
    } == {
        "message_id": "abc",
        "code": "smslog",
        "portal": "member-1",
        "previous": "queued",
        "status": "sent",
        "source": "gateway",
    }
    assert BODY not in written[0] and "+14155550123" not in written[0]


def test_text_format_is_the_default(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    logs.configure(service_settings())
    logging.getLogger("b24sms.test").info("hello %s", "world")
    assert "INFO b24sms.test: hello world" in stream.getvalue()
    assert not stream.getvalue().lstrip().startswith("{")


def test_status_log_registers_once():
    import pluggy

    from b24sms import hookspecs

    pm = pluggy.PluginManager("b24sms")
    pm.add_hookspecs(hookspecs)
    logs.register_status_log(pm)
    logs.register_status_log(pm)
    assert len(pm.hook.b24sms_status_changed.get_hookimpls()) == 1


@pytest.mark.parametrize(
    ("number", "masked"),
    [
        ("+14155550123", "+1********23"),
        ("+49 30 1234567", "+49*******67"),
        ("123", "***"),
        ("", "-"),
        (None, "-"),
    ],
)
def test_mask_number(number, masked):
    assert logs.mask_number(number) == masked


FORGED = "2026-01-01 00:00:00,000 ERROR b24sms.web: forged"


def test_a_request_path_cannot_forge_a_log_line(live_app, monkeypatch):
    import requests

    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)  # the handler create_app installs writes here
    server = live_app(rate_limit={"ip_rate": 0.01, "ip_burst": 1})
    try:
        url = f"{server.url}/x%0A{FORGED.replace(' ', '%20')}%1B[2J"
        answers = [requests.post(url, timeout=10).status_code for _ in range(2)]
        assert answers[-1] == 429
    finally:
        logs.configure(service_settings())
    written = stream.getvalue()
    assert "rate limit: refused" in written
    lines = written.splitlines()
    refusal = next(line for line in lines if "rate limit: refused" in line)
    assert refusal.endswith("latest /x\\n" + FORGED + "\\x1b[2J"), refusal
    assert not [line for line in lines if line.startswith(FORGED)]
    assert "\x1b" not in written


def test_a_traceback_keeps_its_lines_indented_and_escaped(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    logs.configure(service_settings())
    try:
        try:
            raise ValueError("bad input\n" + FORGED)
        except ValueError:
            logging.getLogger("b24sms.test").exception("failed on %r", "x\ny")
    finally:
        logs.configure(service_settings())
    lines = stream.getvalue().splitlines()
    assert lines[0].endswith("ERROR b24sms.test: failed on 'x\\ny'")
    assert lines[1] == "  Traceback (most recent call last):"
    assert all(line.startswith("  ") for line in lines[1:])
    assert "  " + FORGED in lines
