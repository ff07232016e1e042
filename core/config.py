"""Configuration: one TOML file, ``${VAR}`` expansion, validated as a whole at start-up.

The path comes from ``B24SMS_CONFIG``, else the package's own ``default.toml`` (shipped inside
the package, so a wheel install starts from any directory). Any problem is raised as
:class:`ConfigError` naming the file, the key and what is wrong, and the service does not start.
Plugin options are validated later, by each plugin's own schema (see :mod:`b24sms.plugins`).

Loading and validating write nothing: the instance folder and the generated secret key are made
at start-up, by :func:`prepare_instance` (called by ``create_app`` and the CLI).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from marshmallow import INCLUDE, RAISE, Schema, ValidationError, fields, validate, validates_schema

#: the embedded default (SQLite under instance/, one log-only provider), package data
DEFAULT_CONFIG = resources.files(__package__ or "b24sms").joinpath("default.toml")
#: owner-only: the instance folder holds the secret key, the SQLite database and its tokens
INSTANCE_FOLDER_MODE = 0o700
INSTANCE_FILE_MODE = 0o600
CODE_RE = re.compile(r"^[a-zA-Z0-9._-]+$")
_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file, the key and the problem."""


def expand_variables(value: Any, environ: Mapping[str, str], path: str, filename: str) -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string of ``value``, recursively."""
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in environ:
                return environ[name]
            if default is not None:
                return default
            raise ConfigError(
                f"{filename}: {path}: environment variable {name} is not set "
                f"(set it, or write ${{{name}:-default}})"
            )

        return _VAR_RE.sub(substitute, value)
    if isinstance(value, dict):
        return {
            k: expand_variables(v, environ, f"{path}.{k}" if path else k, filename)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [expand_variables(v, environ, f"{path}[{i}]", filename) for i, v in enumerate(value)]
    return value


def _empty_or_16_characters(value: str) -> None:
    """A key or token: empty (generated, or switched off), or at least 16 characters."""
    if value and len(value) < 16:
        raise ValidationError("must be at least 16 characters")


def _url(schemes: tuple[str, ...]) -> Callable[[str], None]:
    def check(value: str) -> None:
        scheme = urlsplit(value).scheme.split("+", 1)[0]
        if scheme not in schemes:
            raise ValidationError(f"must start with one of {', '.join(s + '://' for s in schemes)}")

    return check


class ServiceSchema(Schema):
    class Meta:
        unknown = RAISE

    public_url = fields.String(required=True, validate=_url(("http", "https")))
    #: empty: generated once and kept in instance/secret_key (single-machine use)
    secret_key = fields.String(required=True, validate=_empty_or_16_characters)
    #: keys replaced by a rotation, still accepted on HANDLER URLs until `providers sync` ran
    #: everywhere (docs/operations.md); empty strings are dropped, so `${OLD_KEY:-}` works
    previous_secret_keys = fields.List(
        fields.String(validate=_empty_or_16_characters),
        load_default=list,
    )
    #: Fernet keys for secrets at rest: the first encrypts, all decrypt (b24sms.crypto); empty
    #: strings are dropped; none left: one generated next to the SQLite database (or instance/)
    encryption_keys = fields.List(fields.String(), load_default=list)
    database_url = fields.String(
        load_default="sqlite:///instance/b24sms.sqlite3", validate=_url(("sqlite", "postgresql"))
    )
    queue_url = fields.String(
        load_default="sqlite:///instance/b24sms-queue.sqlite3",
        validate=_url(("sqlite", "postgresql", "postgres", "redis", "memory")),
    )
    default_region = fields.String(load_default="US", validate=validate.Regexp(r"^[A-Z]{2}$"))
    max_attempts = fields.Integer(load_default=8, validate=validate.Range(min=1, max=100))
    retry_base_delay = fields.Float(load_default=2.0, validate=validate.Range(min=0))
    retry_max_delay = fields.Float(load_default=600.0, validate=validate.Range(min=0))
    stuck_after = fields.Float(load_default=300.0, validate=validate.Range(min=1))
    sweep_interval = fields.Float(load_default=60.0, validate=validate.Range(min=1))
    max_body_bytes = fields.Integer(load_default=256 * 1024, validate=validate.Range(min=1024))
    workers = fields.Integer(load_default=2, validate=validate.Range(min=1, max=64))
    threads = fields.Integer(load_default=32, validate=validate.Range(min=1, max=256))
    log_format = fields.String(load_default="text", validate=validate.OneOf(["text", "json"]))
    log_level = fields.String(
        load_default="INFO", validate=validate.OneOf(["DEBUG", "INFO", "WARNING", "ERROR"])
    )


class Bitrix24Schema(Schema):
    class Meta:
        unknown = RAISE

    client_id = fields.String(load_default="")
    client_secret = fields.String(load_default="")
    #: the app's CODE as app.info names it; needed for a Market app (CODE vendor.app, client_id
    #: app.…); a local app's CODE is its client_id
    app_code = fields.String(load_default="")
    oauth_url = fields.String(
        load_default="https://oauth.bitrix.info/oauth/token/", validate=_url(("http", "https"))
    )
    requests_per_second = fields.Float(load_default=2.0, validate=validate.Range(min=0.1))
    burst = fields.Integer(load_default=50, validate=validate.Range(min=1, max=250))
    timeout = fields.Float(load_default=30.0, validate=validate.Range(min=1, max=60))
    user_agent = fields.String(load_default="")
    #: optional: globs of the portal host names an install may have (empty: any), e.g.
    #: ["*.bitrix24.com", "crm.example.org"]; checked before and after the OAuth proof
    allowed_domains = fields.List(
        fields.String(
            validate=validate.Regexp(
                r"^[A-Za-z0-9.*?\[\]-]+$", error="must be a host name glob like *.bitrix24.com"
            )
        ),
        load_default=list,
    )
    #: seconds between reconciles of each portal's providers and event bindings (0: never)
    reconcile_interval = fields.Float(load_default=3600.0, validate=validate.Range(min=0))


class MetricsSchema(Schema):
    """``[metrics]``: the Prometheus endpoint ``GET /metrics``, off unless asked for."""

    class Meta:
        unknown = RAISE

    enabled = fields.Boolean(load_default=False)
    #: the bearer token scrapers must send; empty: no token (only on a private network)
    token = fields.String(
        load_default="",
        validate=_empty_or_16_characters,
    )
    #: counts computed from the shared database at scrape time (see b24sms.metrics)
    database = fields.Boolean(load_default=True)


def _check_proxies(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, list)):
        raise ValidationError("must be a number of proxies or a list of proxy addresses")
    if isinstance(value, int):
        if not 0 <= value <= 10:
            raise ValidationError("must be between 0 and 10")
        return
    for item in value:
        _check_network(item)


def _check_network(value: Any) -> None:
    import ipaddress

    try:
        ipaddress.ip_network(str(value), strict=False)
    except ValueError:
        raise ValidationError(f"{value!r} is not an IP address or network") from None


class RateLimitSchema(Schema):
    """``[rate_limit]``: token buckets on the public routes (see b24sms.web.rate_limits)."""

    class Meta:
        unknown = RAISE

    enabled = fields.Boolean(load_default=True)
    #: auto: shared in Redis when queue_url is redis://, else per process
    storage = fields.String(
        load_default="auto", validate=validate.OneOf(["auto", "memory", "redis"])
    )
    redis_url = fields.String(
        load_default="", validate=lambda v: v == "" or _url(("redis", "rediss", "unix"))(v)
    )
    #: 0: the peer address is the client; N: N proxies append to X-Forwarded-For; or a list
    trusted_proxies = fields.Raw(load_default=0, validate=_check_proxies)
    exempt = fields.List(fields.String(validate=_check_network), load_default=list)
    portal_rate = fields.Float(load_default=200.0, validate=validate.Range(min=0.01))
    portal_burst = fields.Integer(load_default=20_000, validate=validate.Range(min=1))
    ip_rate = fields.Float(load_default=50.0, validate=validate.Range(min=0.01))
    ip_burst = fields.Integer(load_default=1_000, validate=validate.Range(min=1))
    failure_rate = fields.Float(load_default=0.5, validate=validate.Range(min=0.001))
    failure_burst = fields.Integer(load_default=30, validate=validate.Range(min=1))


class ProviderSchema(Schema):
    """The core's part of a ``[providers.<CODE>]`` table; the rest goes to the plugin."""

    class Meta:
        unknown = INCLUDE

    plugin = fields.String(required=True, validate=validate.Length(min=1))
    name = fields.Raw(required=True)
    description = fields.Raw(load_default="")
    portals = fields.List(fields.String(), load_default=None)
    enabled = fields.Boolean(load_default=True)

    @validates_schema
    def check_name(self, data: dict, **kwargs: Any) -> None:
        name = data.get("name")
        if isinstance(name, str) and name.strip():
            return
        if (
            isinstance(name, dict)
            and name
            and all(
                isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in name.items()
            )
        ):
            return
        raise ValidationError("must be a string or a table of language = name", "name")

    @validates_schema
    def check_description(self, data: dict, **kwargs: Any) -> None:
        # A language map like name (messageservice-sender-add.md).
        description = data.get("description", "")
        if isinstance(description, str) or (
            isinstance(description, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in description.items())
        ):
            return
        raise ValidationError(
            "must be a string or a table of language = description", "description"
        )


CORE_PROVIDER_KEYS = frozenset(ProviderSchema().fields)


class RetentionSchema(Schema):
    """``[retention]``: how long message data is kept (b24sms.retention, docs/operations.md)."""

    class Meta:
        unknown = RAISE

    #: days after which a final message's body, numbers and context are erased (0: never)
    redact_after_days = fields.Integer(load_default=30, validate=validate.Range(min=0))
    #: days after which a final message and its history are deleted (0: never)
    delete_after_days = fields.Integer(load_default=180, validate=validate.Range(min=0))
    #: messages per transaction: small, so the HANDLER never waits long for the writer lock
    batch_size = fields.Integer(load_default=500, validate=validate.Range(min=1, max=10_000))


class ConfigSchema(Schema):
    class Meta:
        unknown = RAISE

    service = fields.Nested(ServiceSchema, required=True)
    bitrix24 = fields.Nested(Bitrix24Schema, load_default=lambda: Bitrix24Schema().load({}))
    providers = fields.Dict(keys=fields.String(), values=fields.Dict(), load_default=dict)
    metrics = fields.Nested(MetricsSchema, load_default=lambda: MetricsSchema().load({}))
    rate_limit = fields.Nested(RateLimitSchema, load_default=lambda: RateLimitSchema().load({}))
    retention = fields.Nested(RetentionSchema, load_default=lambda: RetentionSchema().load({}))


def first_error(messages: Any, prefix: str = "", *, brackets: bool = False) -> tuple[str, str]:
    """Flatten marshmallow's nested error dict to (key, text) of the first problem.

    Keys are dotted (``service.public_url``), or bracketed the way forms name them
    (``auth[member_id]``) with ``brackets``.
    """
    if isinstance(messages, dict):
        key, value = next(iter(messages.items()))
        key = str(key)
        if key == "_schema":
            return first_error(value, prefix, brackets=brackets)
        if prefix:
            key = f"{prefix}[{key}]" if brackets else f"{prefix}.{key}"
        return first_error(value, key, brackets=brackets)
    if isinstance(messages, list):
        first = messages[0]
        if isinstance(first, (dict, list)):
            return first_error(first, prefix, brackets=brackets)
        return prefix, str(first)
    return prefix, str(messages)


def _field_problem(messages: Any) -> str:
    key, text = first_error(messages)
    if text == "Unknown field.":
        text = "unknown key"
    return f"{key}: {text}"


def load_config(
    path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Read, expand and validate the configuration file; return a plain dict.

    :param path: the TOML file; default ``B24SMS_CONFIG`` or the package's ``default.toml``.
    :param environ: variables for ``${VAR}``; default ``os.environ``.
    :raises ConfigError: naming the file, the key and the problem.
    """
    environ = os.environ if environ is None else environ
    source = path or environ.get("B24SMS_CONFIG") or DEFAULT_CONFIG
    filename = str(source)
    try:
        if isinstance(source, str | os.PathLike):
            with open(source, "rb") as fh:
                raw = tomllib.load(fh)
        else:
            # package data: a real file in a wheel install, but only a resource in a zip
            raw = tomllib.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{filename}: file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{filename}: not valid TOML: {exc}") from None
    return validate_config(raw, environ, filename)


def validate_config(
    raw: dict[str, Any], environ: Mapping[str, str] | None = None, filename: str = "<config>"
) -> dict[str, Any]:
    """Expand and validate an already parsed configuration (tests build these as dicts).

    Pure: writes nothing. An empty ``service.secret_key`` stays empty here; start-up fills it
    with :func:`prepare_instance`.
    """
    environ = os.environ if environ is None else environ
    expanded = expand_variables(raw, environ, "", filename)
    try:
        config = ConfigSchema().load(expanded)
    except ValidationError as exc:
        raise ConfigError(f"{filename}: {_field_problem(exc.messages)}") from None
    providers: dict[str, dict[str, Any]] = {}
    for code, table in config["providers"].items():
        if not CODE_RE.match(code):
            raise ConfigError(
                f"{filename}: providers.{code}: a provider CODE may hold only letters, digits, "
                "'.', '_' and '-'"
            )
        try:
            provider = ProviderSchema().load(table)
        except ValidationError as exc:
            raise ConfigError(
                f"{filename}: providers.{code}.{_field_problem(exc.messages)}"
            ) from None
        core = {k: provider.pop(k) for k in list(provider) if k in CORE_PROVIDER_KEYS}
        core["options"] = provider
        core["code"] = code
        providers[code] = core
    config["providers"] = providers
    config["service"]["public_url"] = config["service"]["public_url"].rstrip("/")
    _check_rate_limit_storage(config, filename)
    config["service"]["previous_secret_keys"] = [
        key for key in config["service"]["previous_secret_keys"] if key
    ]
    config["service"]["encryption_keys"] = _encryption_keys(config["service"], filename)
    config["filename"] = filename
    return config


def _check_rate_limit_storage(config: dict[str, Any], filename: str) -> None:
    limits = config["rate_limit"]
    queue_is_redis = config["service"]["queue_url"].startswith(("redis://", "rediss://"))
    if limits["storage"] == "redis" and not (limits["redis_url"] or queue_is_redis):
        raise ConfigError(
            f'{filename}: rate_limit.redis_url: storage = "redis" needs a redis_url '
            "(or a redis:// queue_url)"
        )


def _encryption_keys(service: dict[str, Any], filename: str) -> list[str]:
    """The configured keys, checked (empty strings dropped, so ``${KEY:-}`` works). None set:
    :func:`prepare_instance` uses this machine's generated key at start-up."""
    from .crypto import InvalidKey, KeySet

    keys = [key for key in service["encryption_keys"] if key]
    if not keys:
        return []
    try:
        KeySet(keys)
    except InvalidKey as exc:
        raise ConfigError(f"{filename}: service.encryption_keys: {exc}") from None
    return keys


def instance_encryption_key(database_url: str) -> str:
    """The generated encryption key of this machine, created on first use (mode 0600) next to
    the SQLite database (``instance/encryption_key`` by default), else in ``instance/``.

    Fine for one machine; machines sharing a database must share the keys: set
    ``encryption_keys`` there (docs/operations.md, "Secrets at rest").
    """
    from .crypto import generate_key
    from .instance import ENCRYPTION_KEY_FILE, read_or_create_secret, sqlite_file

    database = sqlite_file(resolve_sqlite_path(database_url))
    folder = database.parent if database is not None else Path.cwd() / "instance"
    return read_or_create_secret(folder / ENCRYPTION_KEY_FILE, generate_key)


def resolve_sqlite_path(url: str, base: Path | None = None) -> str:
    """Make a relative ``sqlite:///relative/path`` absolute against ``base`` (default: cwd) and
    create its folder, so ``instance/`` appears on first run."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or url in ("sqlite://", "sqlite:///:memory:"):
        return url
    rest = url[len(prefix) :]
    path = Path(rest)
    if not path.is_absolute():
        path = (base or Path.cwd()) / path
    from .instance import private_folder

    private_folder(path.parent)  # a folder made here is ours: 0700
    return prefix + str(path)


def instance_secret_key(instance: Path | None = None) -> str:
    """The generated secret key of this machine, created on first use in ``instance/secret_key``.

    Fine for one machine; several machines must share one key, so set ``secret_key`` there.
    The file is created owner-only (0600) and exclusively, so two processes starting at once
    agree on one key.
    """
    import secrets

    from .instance import read_or_create_secret

    path = (instance or Path.cwd() / "instance") / "secret_key"
    return read_or_create_secret(path, lambda: secrets.token_urlsafe(32))


def prepare_instance(config: Mapping[str, Any], instance: Path | None = None) -> dict[str, Any]:
    """The start-up step after validation: the config with an empty ``secret_key`` and empty
    ``encryption_keys`` replaced by this machine's generated ones (created on first start in
    ``instance/secret_key`` and next to the SQLite database).

    Returns a new dict; ``config`` is not changed. A config with its keys set writes nothing.

    :param instance: the instance folder; default ``instance/`` in the working directory.
    """
    prepared = dict(config)
    service = dict(config["service"])
    if not service["secret_key"]:
        service["secret_key"] = instance_secret_key(instance)
    if not service["encryption_keys"]:
        service["encryption_keys"] = [instance_encryption_key(service["database_url"])]
    prepared["service"] = service
    return prepared
