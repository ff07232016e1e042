"""Config: TOML loading, ${VAR} expansion, validation errors that name file, key and problem."""

from __future__ import annotations

import dataclasses
import stat
from pathlib import Path

import pytest

import b24sms
from b24sms import create_app
from b24sms.config import (
    DEFAULT_CONFIG,
    Config,
    ConfigError,
    ProviderConfig,
    load_config,
    prepare_instance,
    validate_config,
)
from b24sms.testing.service import service_config as base_config

GOOD = """
[service]
public_url = "https://sms.example.com/"
secret_key = "${KEY}"
default_region = "${REGION:-DE}"

[providers.sms1]
plugin = "log"
name = { en = "Log", de = "Protokoll" }
outcome = "sent"
"""


def write(tmp_path, text: str):
    path = tmp_path / "b24sms.toml"
    path.write_text(text)
    return path


def test_loads_expands_and_applies_defaults(tmp_path):
    config = load_config(write(tmp_path, GOOD), environ={"KEY": "k" * 20})
    service = config.service
    assert service.secret_key == "k" * 20
    assert service.default_region == "DE"
    assert service.public_url == "https://sms.example.com"
    assert service.queue_url.startswith("sqlite:///")
    assert config.bitrix24.requests_per_second == 2.0
    provider = config.providers["sms1"]
    assert provider.code == "sms1" and provider.plugin == "log" and provider.enabled is True
    assert provider.options == {"outcome": "sent"}
    assert provider.name == {"en": "Log", "de": "Protokoll"} and provider.portals is None


def test_unset_variable_names_file_key_and_variable(tmp_path):
    path = write(tmp_path, GOOD)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    text = str(info.value)
    assert str(path) in text and "service.secret_key" in text and "KEY" in text


@pytest.mark.parametrize(
    "text, key, problem",
    [
        (
            '[service]\npublic_url = "ftp://x"\nsecret_key = "' + "k" * 20 + '"',
            "service.public_url",
            "must start with",
        ),
        (
            '[service]\npublic_url = "https://x.y"\nsecret_key = "short"',
            "service.secret_key",
            "at least 16",
        ),
        (
            '[service]\npublic_url = "https://x.y"\nsecret_key = "' + "k" * 20 + '"\nbogus = 1',
            "service.bogus",
            "unknown key",
        ),
        (
            '[service]\npublic_url = "https://x.y"\nsecret_key = "'
            + "k" * 20
            + '"\n[providers.a]\nname = "A"',
            "providers.a.plugin",
            "Missing data",
        ),
        (
            '[service]\npublic_url = "https://x.y"\nsecret_key = "'
            + "k" * 20
            + '"\n[providers."bad code"]\nplugin = "log"\nname = "A"',
            "providers.bad code",
            "CODE",
        ),
        (
            '[service]\npublic_url = "https://x.y"\nsecret_key = "'
            + "k" * 20
            + '"\n[providers.a]\nplugin = "log"\nname = 3',
            "providers.a.name",
            "string",
        ),
        ("[service\n", "", "not valid TOML"),
    ],
)
def test_errors_name_the_key_and_the_problem(tmp_path, text, key, problem):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    message = str(info.value)
    assert message.startswith(str(path))
    assert key in message and problem in message


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.toml", environ={})


def test_default_config_runs_with_no_edits(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(environ={})
    assert config.service.database_url.startswith("sqlite:///")
    assert [p.plugin for p in config.providers.values()] == ["log"]
    # loading and validating write nothing; start-up generates the secret key
    assert config.service.secret_key == ""
    assert list(tmp_path.iterdir()) == []
    prepared = prepare_instance(config)
    assert config.service.secret_key == ""
    # the generated secret key is kept, not regenerated on the next start
    key = prepared.service.secret_key
    assert len(key) >= 32 and (tmp_path / "instance" / "secret_key").read_text() == key
    assert prepare_instance(load_config(environ={})).service.secret_key == key
    # owner-only: the key signs every HANDLER URL
    assert stat.S_IMODE((tmp_path / "instance").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "instance" / "secret_key").stat().st_mode) == 0o600


def test_the_default_config_is_package_data():
    # read through importlib.resources, so a wheel install finds it from any directory
    assert DEFAULT_CONFIG.is_file()
    assert Path(str(DEFAULT_CONFIG)).parent == Path(b24sms.__file__).parent


def test_configured_keys_write_nothing_at_start_up(tmp_path, monkeypatch):
    from b24sms.crypto import generate_key

    monkeypatch.chdir(tmp_path)
    key = generate_key()
    service = {"public_url": "http://127.0.0.1:1", "secret_key": "s" * 16}
    config = validate_config({"service": {**service, "encryption_keys": [key]}}, environ={})
    prepared = prepare_instance(config).service
    assert (prepared.secret_key, prepared.encryption_keys) == ("s" * 16, (key,))
    assert list(tmp_path.iterdir()) == []
    # without encryption keys, start-up makes this machine's key (validation still writes nothing)
    config = validate_config({"service": service}, environ={})
    assert list(tmp_path.iterdir()) == []
    assert prepare_instance(config).service.encryption_keys != ()
    assert list(tmp_path.iterdir()) != []


def test_create_app_generates_the_secret_key_at_start_up(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = create_app(
        {
            "service": {
                "public_url": "http://127.0.0.1:1",
                "secret_key": "",
                "database_url": f"sqlite:///{tmp_path}/db.sqlite3",
                "queue_url": "memory://",
            }
        },
        environ={"B24SMS_LOAD_PLUGINS": ""},
    )
    key = (tmp_path / "instance" / "secret_key").read_text()
    assert app.config["SECRET_KEY"] == key and len(key) >= 32
    app.extensions["b24sms"].close()


def test_example_config_is_valid(tmp_path):
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "config" / "example.toml"
    env = {
        "B24SMS_SECRET_KEY": "x" * 32,
        "B24_CLIENT_SECRET": "secret",
        "TWILIO_AUTH_TOKEN": "token",
        "SMTP_PASSWORD": "pw",
        "GATEWAY_A_TOKEN": "a",
        "GATEWAY_A_CALLBACK_SECRET": "b",
        "GATEWAY_B_KEY": "c",
        "GATEWAY_B_CALLBACK_SECRET": "d",
    }
    config = load_config(example, environ=env)
    assert len(config.providers) >= 5


def test_validate_config_accepts_dicts():
    config = validate_config(
        {"service": {"public_url": "http://127.0.0.1:1", "secret_key": "s" * 16}}, environ={}
    )
    assert config.providers == {}


def test_the_config_is_typed_and_frozen(tmp_path):
    raw = base_config(
        tmp_path,
        service={"retry_base_delay": 1, "previous_secret_keys": ["p" * 16, ""]},
        bitrix24={"requests_per_second": 3, "allowed_domains": ["*.bitrix24.com"]},
        rate_limit={"trusted_proxies": ["10.0.0.0/8"], "exempt": ["127.0.0.1"]},
        providers={"sms": {"plugin": "log", "name": "Log", "portals": ["m1"], "outcome": "sent"}},
    )
    config = validate_config(raw, environ={})
    assert isinstance(config, Config) and isinstance(config.providers["sms"], ProviderConfig)
    # numbers as the schema types them, whatever the TOML wrote; lists as tuples
    assert type(config.service.retry_base_delay) is float and config.service.retry_base_delay == 1
    assert type(config.bitrix24.requests_per_second) is float
    assert type(config.bitrix24.burst) is int
    assert config.service.previous_secret_keys == ("p" * 16,)
    assert config.bitrix24.allowed_domains == ("*.bitrix24.com",)
    assert config.rate_limit.trusted_proxies == ("10.0.0.0/8",)
    assert config.rate_limit.exempt == ("127.0.0.1",)
    assert config.providers["sms"].portals == ("m1",)
    # nothing changes it after start-up: not a section, not the providers, not their options
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.service.secret_key = "another-key-0123456789"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.providers["sms"].enabled = False
    with pytest.raises(TypeError):
        config.providers["new"] = config.providers["sms"]
    with pytest.raises(TypeError):
        config.providers["sms"].options["outcome"] = "failed"
    # nor does the dict it was read from
    raw["providers"]["sms"]["outcome"] = "failed"
    raw["service"]["previous_secret_keys"].append("q" * 16)
    assert config.providers["sms"].options == {"outcome": "sent"}
    assert config.service.previous_secret_keys == ("p" * 16,)


def test_prepare_instance_returns_a_new_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = validate_config(base_config(tmp_path, service={"secret_key": ""}), environ={})
    prepared = prepare_instance(config)
    assert prepared is not config and config.service.secret_key == ""
    assert prepared.service.secret_key == (tmp_path / "instance" / "secret_key").read_text()
    # everything else is the same config
    assert dataclasses.replace(prepared.service, secret_key="", encryption_keys=()) == (
        config.service
    )
    assert (prepared.providers, prepared.bitrix24, prepared.filename) == (
        config.providers,
        config.bitrix24,
        config.filename,
    )


def test_the_config_shows_no_secret_when_printed(tmp_path):
    from b24sms.crypto import generate_key

    secrets = {
        "secret_key": "current-secret-key-0123",
        "previous": "previous-secret-key-0123",
        "encryption_key": generate_key(),
        "client_secret": "oauth-client-secret-0123",
        "metrics_token": "metrics-token-0123456789",
        "database_password": "db-password-0123",
        "queue_password": "queue-password-0123",
        "redis_password": "redis-password-0123",
        "auth_token": "gateway-auth-token-0123",
    }
    raw = base_config(
        tmp_path,
        service={
            "secret_key": secrets["secret_key"],
            "previous_secret_keys": [secrets["previous"]],
            "encryption_keys": [secrets["encryption_key"]],
            "database_url": f"postgresql://b24sms:{secrets['database_password']}@db/b24sms",
            "queue_url": f"redis://:{secrets['queue_password']}@redis:6379/0",
        },
        bitrix24={"client_secret": secrets["client_secret"]},
        metrics={"enabled": True, "token": secrets["metrics_token"]},
        rate_limit={"redis_url": f"redis://:{secrets['redis_password']}@redis:6379/1"},
        providers={"http": {"plugin": "http", "name": "H", "auth_token": secrets["auth_token"]}},
    )
    config = validate_config(raw, environ={})
    text = repr(config)
    assert "public_url=" in text and "requests_per_second=" in text
    for name, secret in secrets.items():
        assert secret not in text, name
