"""HANDLER keys: signed for one portal and CODE, checked in constant time, never a 500."""

from __future__ import annotations

import requests

from b24sms.config import ServiceSchema
from b24sms.handler_keys import check_key, handler_key, handler_url, verify_handler_key

SECRET = "a-secret-key-of-some-length-0123"
PREVIOUS = "the-previous-secret-key-01234567"
SETTINGS = ServiceSchema().load(
    {"public_url": "https://sms.example", "secret_key": SECRET, "previous_secret_keys": [PREVIOUS]}
)


def test_the_url_carries_the_key_of_its_portal_and_code():
    url = handler_url("https://sms.example", SECRET, "m1", "sms1")
    key = handler_key(SECRET, "m1", "sms1")
    assert url == f"https://sms.example/bitrix24/handler/sms1?member_id=m1&key={key}"
    assert check_key(SETTINGS, "m1", "sms1", key)
    assert not check_key(SETTINGS, "m2", "sms1", key)
    assert not check_key(SETTINGS, "", "sms1", key)


def test_a_previous_secret_keys_key_is_accepted_and_logged(caplog):
    caplog.set_level("INFO", logger="b24sms.handler_keys")
    old = handler_key(PREVIOUS, "m1", "sms1")
    assert check_key(SETTINGS, "m1", "sms1", old)
    assert any("previous secret_key" in r.getMessage() for r in caplog.records)
    assert not verify_handler_key(SECRET, "m1", "sms1", old)


def test_keys_nobody_issued_are_refused_not_errors():
    good = handler_key(SECRET, "m1", "sms1")
    for key in ("é" * 32, "\udc00" * 32, "\x00" * 32, good[:-1] + "ü", "", None, good + " "):
        assert not check_key(SETTINGS, "m1", "sms1", key), key


def test_a_non_ascii_key_on_the_handler_is_401_not_500(live_app, emulator):
    server = live_app(providers={"smslog": {"plugin": "log", "name": "Log only"}})
    portal = emulator.add_portal()
    portal.install(server.url)
    handler = portal.senders["smslog"]["HANDLER"].rsplit("key=", 1)[0]
    form = {"code": "smslog", "message_id": "m1", "message_to": "+14155550100", "message_body": "x"}
    response = requests.post(handler + "key=%C3%A9%C3%A9", data=form, timeout=10)
    assert response.status_code == 401 and response.json()["error"] == "unauthorized"


def test_a_provider_narrowed_to_other_portals_refuses_this_portals_calls(live_app, emulator):
    from tests.conftest import SECRET_KEY

    providers = {
        "everyone": {"plugin": "log", "name": "Log for all"},
        "narrow": {"plugin": "log", "name": "Log for one", "portals": ["some-other-portal"]},
    }
    server = live_app(providers=providers)
    portal = emulator.add_portal()
    portal.install(server.url)
    assert "narrow" not in portal.senders  # provider sync honours the list already
    form = {"message_to": "+14155550100", "message_body": "x"}
    for code, expected in (("everyone", 200), ("narrow", 403)):
        # the URL an earlier sync registered, before the provider was narrowed
        url = handler_url(server.url, SECRET_KEY, portal.member_id, code)
        response = requests.post(url, data={**form, "code": code, "message_id": code}, timeout=10)
        assert response.status_code == expected, response.text
    assert response.json()["error"] == "provider_not_for_portal"


def test_rotating_one_portals_keys_refuses_its_old_urls_after_the_sync(
    tmp_path, live_app, emulator
):
    from b24sms.models import Portal
    from tests.conftest import SECRET_KEY
    from tests.helpers import LOG_PROVIDER, b24sms, write_config

    server = live_app(providers={"smslog": {"plugin": "log", "name": "Log only"}})
    portal, other = emulator.add_portal(), emulator.add_portal()
    portal.install(server.url)
    other.install(server.url)
    old_url, others_url = portal.senders["smslog"]["HANDLER"], other.senders["smslog"]["HANDLER"]
    db_url = server.app.extensions["b24sms"].settings.database_url
    config = write_config(tmp_path, server.url, emulator.oauth_url, LOG_PROVIDER)
    config.write_text(
        config.read_text().replace(
            f'database_url = "sqlite:///{tmp_path}/cli.sqlite3"', f'database_url = "{db_url}"'
        )
    )

    def post(url: str, message_id: str) -> int:
        form = {"code": "smslog", "message_id": message_id, "message_to": "+14155550100"}
        return requests.post(url, data={**form, "message_body": "x"}, timeout=10).status_code

    assert post(old_url, "before") == 200
    rotated = b24sms("portals", "rotate-key", portal.member_id, config=config)
    assert rotated.returncode == 0, rotated.stderr + rotated.stdout
    assert SECRET_KEY not in rotated.stdout + rotated.stderr
    new_url = portal.senders["smslog"]["HANDLER"]
    assert new_url != old_url and new_url.endswith("&kv=1")
    assert post(old_url, "after-old") == 401
    assert post(new_url, "after-new") == 200
    assert post(others_url, "other-portal") == 200  # another portal's keys are its own

    # A version stored but not yet synced (a sync that failed): the current keys keep working
    # until a sync succeeds, then only the new ones do.
    db = server.app.extensions["b24sms"].db
    with db.session() as session:
        row = session.query(Portal).filter_by(member_id=portal.member_id).one()
        row.handler_key_version += 1
    assert post(new_url, "pending-rotation") == 200
    synced = b24sms("providers", "sync", "--portal", portal.member_id, config=config)
    assert synced.returncode == 0, synced.stderr
    assert post(new_url, "retired") == 401
    assert post(portal.senders["smslog"]["HANDLER"], "newest") == 200
    missing = b24sms("portals", "rotate-key", "nope", config=config)
    assert missing.returncode != 0 and "no portal" in missing.stderr
