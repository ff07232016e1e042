"""The plugin kit itself (``b24sms.testing``): registered with pytest, light to load, and its
helpers say what the portal received. Its contract suite is exercised by
``tests/test_gateway_contract.py`` and ``tests/test_scaffold.py``."""

from __future__ import annotations

import subprocess
import sys

from b24sms.testing import send_and_wait


def test_the_pytest_plugin_is_registered_under_its_entry_point(pytestconfig):
    plugin = pytestconfig.pluginmanager.get_plugin("b24sms")
    assert plugin is not None and plugin.__name__ == "b24sms.testing.plugin"


def test_loading_the_kit_starts_nothing_and_imports_no_flask():
    probe = (
        "import sys, threading\n"
        "import b24sms.testing, b24sms.testing.plugin\n"
        "heavy = [m for m in ('flask', 'werkzeug', 'sqlalchemy', 'b24sms.emulator',"
        " 'b24sms.testing.contract') if m in sys.modules]\n"
        "print(heavy, threading.active_count())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]", "1"]


def test_send_and_wait_returns_the_statuses_the_portal_received(b24sms_portal):
    portal = b24sms_portal(
        providers={"smslog": {"plugin": "log", "name": "Log", "outcome": "undelivered"}}
    )
    delivery = send_and_wait(portal, "smslog", "+14155550100", "hello")
    assert delivery.http_status == 200
    assert delivery.last == "undelivered" and delivery.statuses[-1] == "undelivered"
    assert portal.messages[delivery.message_id]["code"] == "smslog"


def test_send_and_wait_answers_at_once_when_the_handler_refuses(b24sms_portal):
    portal = b24sms_portal(providers={"smslog": {"plugin": "log", "name": "Log"}})
    delivery = send_and_wait(portal, "smslog", extra={"message_body": None, "message_to": None})
    assert delivery.http_status == 400 and delivery.statuses == []


def test_the_runner_fixture_runs_the_command_on_the_apps_config(runner):
    result = runner("providers", "list")
    assert result.exit_code == 0, result.output
    assert "smslog" in result.output
