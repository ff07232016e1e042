"""The ``b24sms`` command, run as a real process against a config file and the emulator."""

from __future__ import annotations

import pytest

from tests.conftest import CLIENT_SECRET, SECRET_KEY
from tests.helpers import LOG_PROVIDER, b24sms, write_config

pytestmark = pytest.mark.slow


def test_commands_show_state_without_secrets(tmp_path, live_app, emulator):
    server = live_app(providers={"smslog": {"plugin": "log", "name": "Log only"}})
    portal = emulator.add_portal()
    portal.install(server.url)
    message_id, _ = portal.send_sms("smslog", "+14155550123", "secret body text")
    portal.wait_for_status(message_id)
    # The CLI reads the same database as the running app.
    db_url = server.app.extensions["b24sms"].settings.database_url
    config = write_config(tmp_path, server.url, emulator.oauth_url, LOG_PROVIDER)
    config.write_text(
        config.read_text().replace(
            f'database_url = "sqlite:///{tmp_path}/cli.sqlite3"', f'database_url = "{db_url}"'
        )
    )

    portals = b24sms("portals", "list", config=config)
    assert portals.returncode == 0, portals.stderr
    assert portal.member_id in portals.stdout and "active" in portals.stdout
    assert "messages=1" in portals.stdout
    # the app bound its events itself on install (api-reference/events/event-bind.md)
    assert "events=ONAPPUNINSTALL,ONAPPUPDATE" in portals.stdout

    providers = b24sms("providers", "list", config=config)
    assert providers.returncode == 0, providers.stderr
    assert "smslog" in providers.stdout and "registered" in providers.stdout
    assert "reconciled 20" in providers.stdout

    messages = b24sms("messages", "--status", "delivered", config=config)
    assert messages.returncode == 0, messages.stderr
    assert message_id in messages.stdout and "+1********23" in messages.stdout
    assert "+14155550123" not in messages.stdout and "secret body" not in messages.stdout
    assert b24sms("messages", "--status", "failed", config=config).stdout.strip() == ""

    # providers sync: a provider removed from the portal behind our back comes back
    # and so do event handlers
    portal.senders.pop("smslog")
    portal.events.clear()
    sync = b24sms("providers", "sync", config=config)
    assert sync.returncode == 0, sync.stderr + sync.stdout
    assert "smslog" in portal.senders
    assert sorted(portal.events.handlers("ONAPPUPDATE")) == [f"{server.url}/bitrix24/events"]
    assert "bound ONAPPUNINSTALL, ONAPPUPDATE" in sync.stdout
    only = b24sms("providers", "sync", "--portal", portal.member_id, config=config)
    assert only.returncode == 0, only.stderr
    missing = b24sms("providers", "sync", "--portal", "nope", config=config)
    assert missing.returncode != 0 and "no portal" in missing.stderr

    for result in (portals, providers, messages, sync):
        for secret in (
            portal.access_token,
            portal.refresh_token,
            portal.application_token,
            SECRET_KEY,
            CLIENT_SECRET,
        ):
            assert secret not in result.stdout + result.stderr


def test_plugins_lists_plugins_versions_types_and_codes(tmp_path):
    config = write_config(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9/oauth/", LOG_PROVIDER)
    result = b24sms("plugins", config=config)
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()}
    for name in ("log", "http", "twilio", "email"):
        assert name in lines and "b24sms" in lines[name]
    assert "log (codes: smslog)" in lines["log"]


def test_bad_config_stops_with_a_clear_error(tmp_path):
    config = write_config(
        tmp_path,
        "http://127.0.0.1:9",
        "http://127.0.0.1:9/oauth/",
        """
[providers.smslog]
plugin = "nonesuch"
name = "x"
""",
    )
    result = b24sms("portals", "list", config=config)
    assert result.returncode != 0
    assert "providers.smslog.plugin" in result.stderr and "nonesuch" in result.stderr
    assert "Traceback" not in result.stderr


def test_db_upgrade_reports_the_revision(tmp_path):
    config = write_config(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9/oauth/", LOG_PROVIDER)
    result = b24sms("db", "upgrade", config=config)
    assert result.returncode == 0, result.stderr
    assert "database at revision" in result.stdout


def test_demo_shows_the_message_delivered(tmp_path):
    result = b24sms("demo", cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "ONAPPINSTALL): HTTP 200" in out
    assert "log gateway:" in out
    assert "status.update: delivered" in out
    assert "0 rejected by the rate limit" in out


@pytest.mark.parametrize("args", [["--help"], ["serve", "--help"], ["worker", "--help"]])
def test_help_needs_no_config(tmp_path, args):
    result = b24sms(*args, cwd=tmp_path)
    assert result.returncode == 0 and "Usage" in result.stdout
