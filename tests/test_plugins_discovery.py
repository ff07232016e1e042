"""Finding plugins: entry points, the B24SMS_LOAD_PLUGINS switch, name clashes, provider errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pluggy
import pytest
from marshmallow import Schema, fields

from b24sms import hookimpl, hookspecs
from b24sms.config import validate_config
from b24sms.gateway import Gateway, OutgoingMessage, SendResult
from b24sms.plugins import (
    DEFAULT_PLUGINS,
    LOAD_ENV,
    PluginError,
    build_gateways,
    gateway_types,
    make_plugin_manager,
    register_default_plugins,
)

BUILT_INS = {"log", "http", "twilio", "email"}


# real discovery through the entry points of installed distributions ------------------------


def test_built_ins_are_discovered_through_entry_points():
    pm = make_plugin_manager({})
    types = gateway_types(pm)
    assert set(types) >= BUILT_INS
    for name in BUILT_INS:
        # each built-in is its own plugin, loaded from the "b24sms" entry-point group
        assert types[name].plugin == name
        assert pm.has_plugin(name)
    # …of an installed distribution, exactly like a third-party plugin
    from_distributions = {pm.get_name(plugin) for plugin, _ in pm.list_plugin_distinfo()}
    assert from_distributions >= BUILT_INS


def test_allowlist_loads_only_the_named_plugins():
    pm = make_plugin_manager({LOAD_ENV: "log, twilio"})
    assert set(gateway_types(pm)) == {"log", "twilio"}
    assert {name for name, _ in pm.list_name_plugin()} == {"log", "twilio"}


def test_an_empty_allowlist_loads_nothing():
    pm = make_plugin_manager({LOAD_ENV: ""})
    assert gateway_types(pm) == {}
    assert pm.get_plugins() == set()


def test_an_unknown_name_in_the_allowlist_is_ignored():
    assert set(gateway_types(make_plugin_manager({LOAD_ENV: "log,nosuch"}))) == {"log"}


def test_make_plugin_manager_reads_os_environ_when_not_given(monkeypatch):
    monkeypatch.setenv(LOAD_ENV, "http")
    assert set(gateway_types(make_plugin_manager())) == {"http"}


# a fresh PluginManager per test, with small test plugins (pluggy's own style) ---------------


class Options(Schema):
    greeting = fields.String(required=True)


def gateway_class(type_name: str, schema: type[Schema] | None = Options) -> type[Gateway]:
    class TestGateway(Gateway):
        name = type_name
        options_schema = schema
        statuses: ClassVar[dict[str, str]] = {"ok": "delivered"}

        def send(self, message: OutgoingMessage) -> SendResult:
            return SendResult(external_id="1", raw_status="ok")

    return TestGateway


class AlphaPlugin:
    @hookimpl
    def b24sms_register_gateways(self, register):
        register(gateway_class("dup"))
        register(gateway_class("alpha-only"))


class SchemalessPlugin:
    @hookimpl
    def b24sms_register_gateways(self, register):
        register(gateway_class("schemaless", schema=None))


class BetaPlugin:
    @hookimpl
    def b24sms_register_gateways(self, register):
        register(gateway_class("dup"))


class NotAGatewayPlugin:
    @hookimpl
    def b24sms_register_gateways(self, register):
        register(object)


class NamelessPlugin:
    @hookimpl
    def b24sms_register_gateways(self, register):
        register(gateway_class(""))


@pytest.fixture
def pm() -> pluggy.PluginManager:
    manager = pluggy.PluginManager("b24sms")
    manager.add_hookspecs(hookspecs)
    return manager


@pytest.fixture
def register(pm) -> Iterator:
    """``register(plugin_object, name)``; every plugin is unregistered after the test."""
    added = []

    def register(plugin: object, name: str) -> None:
        pm.register(plugin, name=name)
        added.append(plugin)

    try:
        yield register
    finally:
        for plugin in added:
            pm.unregister(plugin)


def test_two_plugins_claiming_one_name_is_an_error_naming_both(pm, register):
    register(AlphaPlugin(), "alpha-plugin")
    register(BetaPlugin(), "beta-plugin")
    with pytest.raises(PluginError) as info:
        gateway_types(pm)
    text = str(info.value)
    assert "'dup'" in text and "alpha-plugin" in text and "beta-plugin" in text


def test_types_remember_their_plugin(pm, register):
    register(AlphaPlugin(), "alpha-plugin")
    types = gateway_types(pm)
    assert set(types) == {"dup", "alpha-only"}
    assert types["alpha-only"].plugin == "alpha-plugin"


def test_registering_something_else_than_a_gateway_is_an_error(pm, register):
    register(NotAGatewayPlugin(), "odd")
    with pytest.raises(PluginError, match="'odd'.*not a Gateway subclass"):
        gateway_types(pm)


def test_a_gateway_type_needs_a_name(pm, register):
    register(NamelessPlugin(), "nameless")
    with pytest.raises(PluginError, match="'nameless'.*without a name"):
        gateway_types(pm)


def test_check_pending_catches_an_implementation_without_a_spec(pm, register):
    class Typo:
        @hookimpl
        def b24sms_register_gateway(self, register):  # missing "s"
            pass

    register(Typo(), "typo")
    with pytest.raises(pluggy.PluginValidationError):
        pm.check_pending()


# providers → instances ----------------------------------------------------------------------


@pytest.fixture
def types(pm, register):
    register(AlphaPlugin(), "alpha-plugin")
    return gateway_types(pm)


def test_build_gateways_validates_and_instantiates(types):
    providers = {"hello": {"plugin": "alpha-only", "options": {"greeting": "hi"}}}
    gateways = build_gateways(providers, types, "https://sms.example.com")
    gateway = gateways["hello"]
    assert gateway.options == {"greeting": "hi"}
    assert gateway.code == "hello"
    assert gateway.callback_url == "https://sms.example.com/gateways/hello/callback"
    assert gateway.logger.name == "b24sms.gateway.hello"


def test_gateways_of_the_config_get_their_options_as_a_dict_of_their_own(pm, register):
    register(AlphaPlugin(), "alpha-plugin")
    register(SchemalessPlugin(), "schemaless-plugin")
    providers = {
        "hello": {"plugin": "alpha-only", "name": "Hello", "greeting": "hi"},
        "raw": {"plugin": "schemaless", "name": "Raw", "table": {"list": [1, 2]}},
    }
    service = {"public_url": "https://sms.example.com", "secret_key": ""}
    config = validate_config({"service": service, "providers": providers}, environ={})
    gateways = build_gateways(config.providers, gateway_types(pm), config.service.public_url)
    # what plugins got before the config was typed: a dict (the schema's, or the table's)
    assert type(gateways["hello"].options) is dict
    assert gateways["hello"].options == {"greeting": "hi"}
    assert type(gateways["raw"].options) is dict
    assert gateways["raw"].options == {"table": {"list": [1, 2]}}
    assert gateways["raw"].callback_url == "https://sms.example.com/gateways/raw/callback"
    # a plugin that changes its dict changes nothing in the config
    gateways["raw"].options["table"] = "changed"
    assert config.providers["raw"].options == {"table": {"list": [1, 2]}}


def test_an_unknown_plugin_names_the_code_and_the_plugin(types):
    with pytest.raises(PluginError) as info:
        build_gateways({"sms1": {"plugin": "nosuch"}}, types, "https://x", "app.toml")
    text = str(info.value)
    assert "sms1" in text and "'nosuch'" in text and "app.toml" in text
    assert "alpha-only" in text  # the known ones are listed


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"greeting": "hi", "colour": "red"}, "colour"),
        ({}, "greeting"),
        ({"greeting": 5}, "greeting"),
    ],
)
def test_a_bad_option_names_code_plugin_and_option(types, options, option):
    with pytest.raises(PluginError) as info:
        build_gateways({"sms2": {"plugin": "alpha-only", "options": options}}, types, "https://x")
    text = str(info.value)
    assert f"providers.sms2.{option}" in text and "'alpha-only'" in text


def test_a_bad_option_of_a_built_in_through_real_discovery():
    types = gateway_types(make_plugin_manager({LOAD_ENV: "twilio"}))
    options = {"account_sid": "AC" + "0" * 32, "auth_token": "t", "from": "+1", "bogus": 1}
    with pytest.raises(PluginError) as info:
        build_gateways({"tw": {"plugin": "twilio", "options": options}}, types, "https://x")
    text = str(info.value)
    assert "providers.tw.bogus" in text and "'twilio'" in text


# a third-party plugin, installed the way users install one ----------------------------------

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "b24sms-example-gateway"

CHECK_INSTALLED = """
import json, sys
import b24sms_example_gateway
from b24sms.gateway import CallbackRequest, OutgoingMessage
from b24sms.plugins import build_gateways, gateway_types, make_plugin_manager
from b24sms_example_gateway.testing import FakeCarrier, signature_header

pm = make_plugin_manager()
types = gateway_types(pm)
dists = {pm.get_name(p): d.project_name for p, d in pm.list_plugin_distinfo()}
secret = "webhook-secret-0123456789"
with FakeCarrier(api_key="k", webhook_secret=secret) as carrier:
    options = {"api_url": carrier.url, "api_key": "k", "sender": "ACME", "webhook_secret": secret}
    providers = {"carrier": {"plugin": "example-carrier", "options": options}}
    gateway = build_gateways(providers, types, "https://sms.example.com")["carrier"]
    result = gateway.send(OutgoingMessage(
        id=1, message_id="m1", code="carrier", member_id="p", to="+4915112345678",
        body="hello", callback_url=gateway.callback_url))
    body = json.dumps({"sms_id": result.external_id, "state": "delivered"}).encode()
    (report,) = gateway.parse_callback(CallbackRequest(
        method="POST", url=gateway.callback_url, body=body,
        headers={"Example-Signature": signature_header(secret, body)}))
    print(json.dumps({
        "types": sorted(types),
        "plugin": types["example-carrier"].plugin,
        "distribution": dists.get("example-carrier"),
        "module": b24sms_example_gateway.__file__,
        "sent": carrier.sent,
        "status": gateway.map_status(result.raw_status),
        "reported": [report.external_id, gateway.map_status(report.raw_status)],
    }))
"""


def _pip_install(source: Path) -> None:
    """Install like a user would; without build isolation first (no index needed), else with."""
    base = [sys.executable, "-m", "pip", "install", "--no-deps", "--force-reinstall", "-q"]
    for extra in (["--no-build-isolation"], []):
        done = _run([*base, *extra, str(source)])
        if done.returncode == 0:
            return
    pytest.fail(f"pip install of the example plugin failed:\n{done.stdout}\n{done.stderr}")


def _run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a command, its output captured; the caller checks the return code."""
    return subprocess.run(args, check=False, capture_output=True, text=True, timeout=300, **kwargs)


@pytest.mark.slow
def test_an_installed_third_party_plugin_is_discovered_and_works(tmp_path):
    # build from a copy, so the work tree gets no build/ or *.egg-info
    source = tmp_path / "src"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    _pip_install(source)

    env = {k: v for k, v in os.environ.items() if k != LOAD_ENV}
    run = _run([sys.executable, "-c", CHECK_INSTALLED], cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout)
    assert BUILT_INS | {"example-carrier"} <= set(found["types"])
    assert found["plugin"] == "example-carrier"
    assert found["distribution"] == "b24sms-example-gateway"
    assert "site-packages" in found["module"]  # the installed copy, not the source tree
    assert found["sent"][0]["to"] == "+4915112345678" and found["sent"][0]["from"] == "ACME"
    assert found["status"] == "queued"
    assert found["reported"] == [found["sent"][0]["sms_id"], "delivered"]

    # the allowlist knows it by its entry-point name
    list_types = (
        "from b24sms.plugins import gateway_types, make_plugin_manager;"
        "print(sorted(gateway_types(make_plugin_manager())))"
    )
    only = _run(
        [sys.executable, "-c", list_types], cwd=tmp_path, env={**env, LOAD_ENV: "example-carrier"}
    )
    assert only.returncode == 0, only.stderr
    assert only.stdout.strip() == "['example-carrier']"

    # and the contract tests, parametrised by discovery, now check it too
    contract_tests = Path(__file__).resolve().parent / "test_gateway_contract.py"
    contract = _run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(contract_tests),
            "-k",
            "example-carrier",
        ],
        cwd=contract_tests.parent.parent,
        env=env,
    )
    assert contract.returncode == 0, contract.stdout + contract.stderr
    assert " passed" in contract.stdout and "failed" not in contract.stdout


def test_the_cores_observers_come_from_default_plugins_once():
    pm = make_plugin_manager({LOAD_ENV: ""})
    register_default_plugins(pm)
    # a second app on the same service registers again: nothing doubles
    register_default_plugins(pm)
    names = {name for name, _ in DEFAULT_PLUGINS}
    assert {name for name, _ in pm.list_name_plugin()} == names
    observers = pm.hook.b24sms_status_changed.get_hookimpls()
    assert sorted(impl.plugin_name for impl in observers) == sorted(names)
