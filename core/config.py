"""Configuration: one TOML file, ``${VAR}`` expansion, validated as a whole at start-up.

The path comes from ``B24SMS_CONFIG``, else the package's own ``default.toml`` (shipped inside
the package, so a wheel install starts from any directory). Any problem is raised as
:class:`ConfigError` naming the file, the key and what is wrong, and the service does not start.
Plugin options are validated later, by each plugin's own schema (see :mod:`b24sms.plugins`).

The result is a frozen :class:`Config` of typed sections (:class:`ServiceConfig`,
:class:`Bitrix24Config`, :class:`ProviderConfig` …), built by the schemas' ``post_load``: code
reads ``config.service.public_url``, never string keys. A new key goes into a schema and its
section's dataclass.

Loading and validating write nothing: the instance folder and the generated secret key are made
at start-up, by :func:`prepare_instance` (called by ``create_app`` and the CLI).
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal
from urllib.parse import urlsplit

from marshmallow import (
    INCLUDE,
    RAISE,
    Schema,
    ValidationError,
    fields,
    post_load,
    validate,
    validates,
    validates_schema,
)

#: the embedded default (SQLite under instance/, one log-only provider), package data
DEFAULT_CONFIG = resources.files(__package__ or "b24sms").joinpath("default.toml")
#: owner-only: the instance folder holds the secret key, the SQLite database and its tokens
CODE_RE = re.compile(r"^[a-zA-Z0-9._-]+$")
_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file, the key and the problem."""


# -- the typed config: what the schemas below build ------------------------------------------
# Frozen: one process shares one config between threads, and nothing may change it after
# start-up. The defaults live in the schemas only (one place), so these classes have none.
# Secrets are left out of the repr, so a config that reaches a log line or a traceback
# shows none.


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """``[service]``."""

    #: without a trailing slash; handler and callback URLs are built below it
    public_url: str
    #: empty until :func:`prepare_instance` put this machine's generated key in
    secret_key: str = field(repr=False)
    #: keys replaced by a rotation, still accepted on HANDLER URLs (empty ones dropped)
    previous_secret_keys: tuple[str, ...] = field(repr=False)
    #: Fernet keys, the first encrypts; empty until :func:`prepare_instance` (empty ones dropped)
    encryption_keys: tuple[str, ...] = field(repr=False)
    #: URLs may carry a password
    database_url: str = field(repr=False)
    queue_url: str = field(repr=False)
    default_region: str
    max_attempts: int
    retry_base_delay: float
    retry_max_delay: float
    stuck_after: float
    sweep_interval: float
    max_body_bytes: int
    workers: int
    threads: int
    log_format: Literal["text", "json"]
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"]


@dataclass(frozen=True, slots=True)
class Bitrix24Config:
    """``[bitrix24]``: the app's credentials and how we call portals."""

    client_id: str
    client_secret: str = field(repr=False)
    #: the app's CODE as app.info names it (a Market app's; a local app's is its client_id)
    app_code: str
    oauth_url: str
    requests_per_second: float
    burst: int
    timeout: float
    user_agent: str
    allowed_domains: tuple[str, ...]
    reconcile_interval: float


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """``[metrics]``: ``GET /metrics``."""

    enabled: bool
    token: str = field(repr=False)
    database: bool


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    """``[rate_limit]``: token buckets on the public routes."""

    enabled: bool
    #: auto: Redis when the queue is Redis (or redis_url is set), else memory
    storage: Literal["auto", "memory", "redis"]
    redis_url: str = field(repr=False)
    #: a number of proxies, or the proxies' addresses and networks
    trusted_proxies: int | tuple[str, ...]
    exempt: tuple[str, ...]
    portal_rate: float
    portal_burst: int
    ip_rate: float
    ip_burst: int
    failure_rate: float
    failure_burst: int


@dataclass(frozen=True, slots=True)
class RetentionConfig:
    """``[retention]``: how long message data is kept."""

    redact_after_days: int
    delete_after_days: int
    batch_size: int


@dataclass(frozen=True, slots=True)
class AppPageConfig:
    """``[app_page]``: the page a portal's users open inside Bitrix24."""

    test_messages_per_hour: int


#: ``name`` / ``description``: one string, or language → text (a plain dict, so that it goes
#: into Bitrix24's JSON as it is; typed read-only)
LocalizedText = str | Mapping[str, str]


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    """One ``[providers.<CODE>]`` table: the core's keys, and the rest as the plugin's
    ``options`` (a read-only mapping, validated later by the plugin's own schema)."""

    code: str
    plugin: str
    name: LocalizedText
    description: LocalizedText
    #: member_ids to register on; None: every portal
    portals: tuple[str, ...] | None
    enabled: bool
    #: may hold the gateway's credentials
    options: Mapping[str, Any] = field(repr=False)


@dataclass(frozen=True, slots=True)
class Config:
    """The whole validated configuration (:func:`load_config`, :func:`validate_config`)."""

    service: ServiceConfig
    bitrix24: Bitrix24Config
    #: CODE → provider, in the file's order (read-only)
    providers: Mapping[str, ProviderConfig]
    metrics: MetricsConfig
    rate_limit: RateLimitConfig
    retention: RetentionConfig
    app_page: AppPageConfig
    #: where it came from, for error messages
    filename: str = "<config>"


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

    @validates("encryption_keys")
    def check_encryption_keys(self, value: list[str], **kwargs: Any) -> None:
        from .crypto import InvalidKey, KeySet

        keys = [key for key in value if key]
        if keys:
            try:
                KeySet(keys)
            except InvalidKey as exc:
                # InvalidKey names the key by its position, never by its value
                raise ValidationError(str(exc)) from None

    @post_load
    def build(self, data: dict[str, Any], **kwargs: Any) -> ServiceConfig:
        # Empty strings are dropped, so `${OLD_KEY:-}` and `${KEY:-}` can stand for "none".
        data["previous_secret_keys"] = tuple(k for k in data["previous_secret_keys"] if k)
        data["encryption_keys"] = tuple(k for k in data["encryption_keys"] if k)
        data["public_url"] = data["public_url"].rstrip("/")
        return ServiceConfig(**data)


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
    timeout = fields.Float(load_default=60.0, validate=validate.Range(min=1, max=60))
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

    @post_load
    def build(self, data: dict[str, Any], **kwargs: Any) -> Bitrix24Config:
        data["allowed_domains"] = tuple(data["allowed_domains"])
        return Bitrix24Config(**data)


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

    @post_load
    def build(self, data: dict[str, Any], **kwargs: Any) -> MetricsConfig:
        return MetricsConfig(**data)


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

    @post_load
    def build(self, data: dict[str, Any], **kwargs: Any) -> RateLimitConfig:
        proxies = data["trusted_proxies"]
        data["trusted_proxies"] = proxies if isinstance(proxies, int) else tuple(proxies)
        data["exempt"] = tuple(data["exempt"])
        return RateLimitConfig(**data)


class ProviderSchema(Schema):
    """The core's part of a ``[providers.<CODE>]`` table; the rest goes to the plugin.

    :param code: the table's CODE, which the loaded :class:`ProviderConfig` carries.
    """

    class Meta:
        unknown = INCLUDE

    def __init__(self, code: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.code = code

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

    @post_load
    def build(self, data: dict[str, Any], **kwargs: Any) -> ProviderConfig:
        core = {k: data.pop(k) for k in list(data) if k in CORE_PROVIDER_KEYS}
        portals = core["portals"]
        return ProviderConfig(
            code=self.code,
            plugin=core["plugin"],
            name=core["name"],
            description=core["description"],
            portals=None if portals is None else tuple(portals),
            enabled=core["enabled"],
            # the rest: the plugin's options, validated by its own schema when gateways are built
            options=MappingProxyType(data),
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

    @post_load
    def build(self, data: dict[str, Any], **kwargs: Any) -> RetentionConfig:
        return RetentionConfig(**data)


class AppPageSchema(Schema):
    """``[app_page]``: the page a portal's users open inside Bitrix24 (b24sms.web.app_page)."""

    class Meta:
        unknown = RAISE

    #: test messages one portal may send from the page per hour, counted in the shared
    #: database so every process agrees (0: none); each one is paid for on the gateway
    test_messages_per_hour = fields.Integer(load_default=10, validate=validate.Range(min=0))

    @post_load
    def build(self, data: dict[str, Any], **kwargs: Any) -> AppPageConfig:
        return AppPageConfig(**data)


class ConfigSchema(Schema):
    class Meta:
        unknown = RAISE

    service = fields.Nested(ServiceSchema, required=True)
    bitrix24 = fields.Nested(Bitrix24Schema, load_default=lambda: Bitrix24Schema().load({}))
    providers = fields.Dict(keys=fields.String(), values=fields.Dict(), load_default=dict)
    metrics = fields.Nested(MetricsSchema, load_default=lambda: MetricsSchema().load({}))
    rate_limit = fields.Nested(RateLimitSchema, load_default=lambda: RateLimitSchema().load({}))
    retention = fields.Nested(RetentionSchema, load_default=lambda: RetentionSchema().load({}))
    app_page = fields.Nested(AppPageSchema, load_default=lambda: AppPageSchema().load({}))

    @post_load
    def build(self, data: dict[str, Any], **kwargs: Any) -> Config:
        # Errors raised here are keyed like field errors, so they read
        # "providers.<CODE>.<key>: ..." like every other problem.
        providers: dict[str, ProviderConfig] = {}
        for code, table in data["providers"].items():
            if not CODE_RE.match(code):
                raise ValidationError(
                    {
                        "providers": {
                            code: [
                                "a provider CODE may hold only letters, digits, '.', '_' and '-'"
                            ]
                        }
                    }
                )
            try:
                providers[code] = ProviderSchema(code).load(table)
            except ValidationError as exc:
                raise ValidationError({"providers": {code: exc.messages}}) from None
        service: ServiceConfig = data["service"]
        limits: RateLimitConfig = data["rate_limit"]
        queue_is_redis = service.queue_url.startswith(("redis://", "rediss://"))
        if limits.storage == "redis" and not (limits.redis_url or queue_is_redis):
            raise ValidationError(
                {
                    "rate_limit": {
                        "redis_url": [
                            'storage = "redis" needs a redis_url (or a redis:// queue_url)'
                        ]
                    }
                }
            )
        return Config(
            service=service,
            bitrix24=data["bitrix24"],
            providers=MappingProxyType(providers),
            metrics=data["metrics"],
            rate_limit=limits,
            retention=data["retention"],
            app_page=data["app_page"],
        )


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
) -> Config:
    """Read, expand and validate the configuration file; return the typed :class:`Config`.

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
    raw: Mapping[str, Any], environ: Mapping[str, str] | None = None, filename: str = "<config>"
) -> Config:
    """Expand and validate an already parsed configuration (tests build these as dicts).

    Pure: writes nothing. An empty ``service.secret_key`` stays empty here; start-up fills it
    with :func:`prepare_instance`.

    :returns: the typed, frozen :class:`Config`.
    :raises ConfigError: naming the file, the key and the problem.
    """
    environ = os.environ if environ is None else environ
    expanded = expand_variables(dict(raw), environ, "", filename)
    try:
        config: Config = ConfigSchema().load(expanded)
    except ValidationError as exc:
        raise ConfigError(f"{filename}: {_field_problem(exc.messages)}") from None
    return dataclasses.replace(config, filename=filename)


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


def prepare_instance(config: Config, instance: Path | None = None) -> Config:
    """The start-up step after validation: the config with an empty ``secret_key`` and empty
    ``encryption_keys`` replaced by this machine's generated ones (created on first start in
    ``instance/secret_key`` and next to the SQLite database).

    Returns a new :class:`Config` (``dataclasses.replace``); ``config`` is frozen and stays as it
    was. A config with its keys set writes nothing.

    :param instance: the instance folder; default ``instance/`` in the working directory.
    """
    service = config.service
    if not service.secret_key:
        service = dataclasses.replace(service, secret_key=instance_secret_key(instance))
    if not service.encryption_keys:
        service = dataclasses.replace(
            service, encryption_keys=(instance_encryption_key(service.database_url),)
        )
    return dataclasses.replace(config, service=service)
