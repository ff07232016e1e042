"""The ``http`` gateway's delivery reports: a timestamp inside the signature, a window, replays
that add nothing, and what an old-style (body-only) signature gets.

Over real sockets with the fake HTTP gateway; replays of the timestamped kind are in
tests/test_replay.py.
"""

from __future__ import annotations

import json
import logging
import time

import pytest
from sqlalchemy import select

from b24sms.default_plugins.http import ReplayGuard, parse_signature_header
from b24sms.gateway import CallbackRejected, CallbackRequest
from b24sms.models import Message
from tests.conftest import wait_until
from tests.fakes.http_gateway import post_callback, signature_header

SECRET = "http-callback-secret-0123456789"


def provider(api, **extra) -> dict:
    statuses = {"DELIVRD": "delivered", "UNDELIV": "undelivered"}
    callbacks = {"callback_id": "id", "callback_status": "status", "callback_secret": SECRET}
    return {"gw": api.provider(**callbacks, statuses=statuses, **extra)}


def sent_message(server, emulator, api) -> tuple[object, str, str]:
    portal = emulator.add_portal()
    assert portal.install(server.url).status_code == 200
    message_id, _ = portal.send_sms("gw", "+14155550100", "hi")
    gateway_id = wait_until(lambda: api.messages and api.messages[-1]["id"])
    return portal, message_id, gateway_id


def callback_rows(server, message_id: str) -> int:
    with server.app.extensions["b24sms"].db.session() as session:
        message = session.scalar(select(Message).where(Message.message_id == message_id))
        return sum(1 for event in message.history if event.source == "callback")


def test_an_old_style_signature_is_refused_by_default(live_app, emulator, gateway, caplog):
    server = live_app(providers=provider(gateway))
    portal, message_id, gateway_id = sent_message(server, emulator, gateway)
    url = f"{server.url}/gateways/gw/callback"
    caplog.set_level(logging.WARNING)
    old = post_callback(url, {"id": gateway_id, "status": "DELIVRD"}, SECRET, legacy=True)
    assert old.status_code == 401 and old.json()["error"] == "unauthorized"
    assert "carries no timestamp" in caplog.text  # the operator sees why
    assert callback_rows(server, message_id) == 0
    new = post_callback(url, {"id": gateway_id, "status": "DELIVRD"}, SECRET)
    assert new.status_code == 200
    assert portal.wait_for_status(message_id) == "delivered"


def test_old_style_signatures_when_allowed_are_deduplicated(live_app, emulator, gateway):
    server = live_app(providers=provider(gateway, callback_legacy_signatures=True))
    portal, message_id, gateway_id = sent_message(server, emulator, gateway)
    url = f"{server.url}/gateways/gw/callback"
    payload = {"id": gateway_id, "status": "DELIVRD"}
    for _ in range(3):
        assert post_callback(url, payload, SECRET, legacy=True).status_code == 200
    assert portal.wait_for_status(message_id) == "delivered"
    time.sleep(0.2)
    assert callback_rows(server, message_id) == 1
    # the timestamped kind keeps working beside it
    assert post_callback(url, payload, SECRET).status_code == 200
    assert post_callback(url, payload, SECRET, legacy=True, signature="0" * 64).status_code == 401


def test_the_window_is_configurable(live_app, emulator, gateway):
    server = live_app(providers=provider(gateway, callback_max_age=30))
    portal, message_id, gateway_id = sent_message(server, emulator, gateway)
    url = f"{server.url}/gateways/gw/callback"
    payload = {"id": gateway_id, "status": "DELIVRD"}
    assert post_callback(url, payload, SECRET, timestamp=time.time() - 60).status_code == 401
    assert callback_rows(server, message_id) == 0
    assert post_callback(url, payload, SECRET, timestamp=time.time() - 20).status_code == 200
    assert portal.wait_for_status(message_id) == "delivered"


def test_a_report_that_was_not_applied_stays_acceptable(live_app, gateway):
    """The signature is remembered only once the core applied the reports (it then asks for
    ``callback_response``): a gateway retrying after our error is not turned away."""
    server = live_app(providers=provider(gateway))
    gw = server.app.extensions["b24sms"].gateways["gw"]
    body = json.dumps({"id": "x-1", "status": "DELIVRD"}).encode()
    request = CallbackRequest(
        method="POST",
        url=f"{server.url}/gateways/gw/callback",
        headers={"X-Signature": signature_header(body, SECRET)},
        body=body,
        content_type="application/json",
    )
    assert len(gw.parse_callback(request)) == 1  # … and the core failed before answering
    reports = gw.parse_callback(request)  # the gateway's retry
    assert len(reports) == 1
    gw.callback_response(reports)  # applied this time
    assert gw.parse_callback(request) == []  # a replay from now on


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("t=1733112000,v1=ABCD", ("1733112000", ["abcd"])),
        ("t=1733112000, v1=ab, v1=cd", ("1733112000", ["ab", "cd"])),
        ("t=1733112000,v0=ab,v1=cd", ("1733112000", ["cd"])),
        ("abcdef0123", None),
        ("sha256=abcdef0123", None),
        ("t=soon,v1=ab", None),
        ("t=1733112000", None),
        ("v1=ab", None),
    ],
)
def test_parse_signature_header(header, expected):
    assert parse_signature_header(header) == expected


def test_a_tampered_timestamp_breaks_the_signature(live_app, gateway):
    server = live_app(providers=provider(gateway))
    gw = server.app.extensions["b24sms"].gateways["gw"]
    body = b'{"id": "x", "status": "DELIVRD"}'
    genuine = signature_header(body, SECRET, time.time() - 3600)
    moved = genuine.replace(genuine.split(",")[0], f"t={int(time.time())}")
    request = CallbackRequest("POST", "u", {"X-Signature": moved}, body, {}, {}, "application/json")
    with pytest.raises(CallbackRejected, match="bad X-Signature signature"):
        gw.parse_callback(request)


def test_replay_guard_forgets_expired_and_oldest_keys():
    guard = ReplayGuard(limit=2)
    guard.remember("a", 60)
    guard.remember("b", 60)
    guard.remember("c", 60)
    assert not guard.seen("a") and guard.seen("b") and guard.seen("c")
    guard.remember("d", 0.01)
    time.sleep(0.02)
    assert not guard.seen("d")


def test_the_example_for_gateway_vendors_is_right():
    from pathlib import Path

    docs = (Path(__file__).resolve().parent.parent / "docs" / "plugins.md").read_text()
    body = b'{"id": "42", "status": "DELIVRD"}'
    header = signature_header(body, "example-secret-0123456789", 1733112000)
    assert f"X-Signature: {header}\n" in docs
