"""The plugin manager: discovery through entry points, gateway types, provider instances.

Every gateway plugin, built-in or third-party, is an entry point in the group ``b24sms`` and is
loaded the same way. ``B24SMS_LOAD_PLUGINS`` limits loading to a comma-separated list of
entry-point names (an empty value loads none); unset, all installed plugins load.

The core's own observers of the event hooks (the state-change log line, the metrics counters)
are ordinary plugins too, listed in :data:`DEFAULT_PLUGINS` and registered on the service's
plugin manager by :func:`register_default_plugins`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pluggy
from marshmallow import RAISE, ValidationError

from . import hookspecs
from .config import ProviderConfig, first_error
from .gateway import Gateway, GatewayContext

ENTRY_POINT_GROUP = "b24sms"
LOAD_ENV = "B24SMS_LOAD_PLUGINS"

#: The core's internal plugins, as (plugin name, ``module:class``), like datasette's
#: ``DEFAULT_PLUGINS``. Every process (web or worker) needs them whatever
#: ``B24SMS_LOAD_PLUGINS`` says, so they are not entry points; the class is instantiated once
#: per plugin manager. The built-in gateways stay entry points: they are switchable and listed
#: with their distribution by ``b24sms plugins``.
DEFAULT_PLUGINS: tuple[tuple[str, str], ...] = (
    ("b24sms.status_log", "b24sms.logs:StatusLog"),
    ("b24sms.metrics", "b24sms.metrics:MetricsHooks"),
)

log = logging.getLogger(__name__)


class PluginError(Exception):
    """A plugin or a provider's use of it is wrong; the service does not start."""


def make_plugin_manager(environ: Mapping[str, str] | None = None) -> pluggy.PluginManager:
    """A new plugin manager with the installed plugins loaded and checked."""
    environ = os.environ if environ is None else environ
    pm = pluggy.PluginManager("b24sms")
    pm.add_hookspecs(hookspecs)
    wanted = environ.get(LOAD_ENV)
    if wanted is None:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    else:
        names = {n.strip() for n in wanted.split(",") if n.strip()}
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in names and not pm.has_plugin(ep.name):
                pm.register(ep.load(), name=ep.name)
    pm.check_pending()
    return pm


def register_default_plugins(pm: pluggy.PluginManager) -> None:
    """Register every :data:`DEFAULT_PLUGINS` entry on ``pm`` that is not registered yet.

    Idempotent, because several apps may share one service's plugin manager.
    """
    for name, target in DEFAULT_PLUGINS:
        if pm.get_plugin(name) is not None:
            continue
        module_name, _, attribute = target.partition(":")
        factory = getattr(importlib.import_module(module_name), attribute)
        pm.register(factory(), name=name)


@dataclass(frozen=True)
class GatewayType:
    """A registered gateway type and the plugin it came from."""

    name: str
    cls: type[Gateway]
    plugin: str


def gateway_types(pm: pluggy.PluginManager) -> dict[str, GatewayType]:
    """Collect the gateway types of all plugins; two with one name is an error naming both."""
    found: dict[str, GatewayType] = {}
    for impl in pm.hook.b24sms_register_gateways.get_hookimpls():
        plugin_name = impl.plugin_name

        def register(cls: type[Gateway], _plugin: str = plugin_name) -> None:
            if not (isinstance(cls, type) and issubclass(cls, Gateway)):
                raise PluginError(f"plugin {_plugin!r} registered {cls!r}, not a Gateway subclass")
            if not cls.name:
                raise PluginError(f"plugin {_plugin!r} registered {cls.__name__} without a name")
            other = found.get(cls.name)
            if other is not None:
                raise PluginError(
                    f"gateway type {cls.name!r} is registered by two plugins: "
                    f"{other.plugin!r} and {_plugin!r}"
                )
            found[cls.name] = GatewayType(cls.name, cls, _plugin)

        impl.function(register=register)
    return found


def build_gateways(
    providers: Mapping[str, ProviderConfig | Mapping[str, Any]],
    types: Mapping[str, GatewayType],
    public_url: str,
    filename: str = "<config>",
) -> dict[str, Gateway]:
    """One gateway instance per provider CODE, its options validated by the plugin's schema.

    :param providers: CODE → the config's :class:`~b24sms.config.ProviderConfig`, or, as plugin
        tests write it, a table ``{"plugin": name, "options": {...}}``.
    """
    gateways: dict[str, Gateway] = {}
    for code, provider in providers.items():
        if isinstance(provider, ProviderConfig):
            plugin, options = provider.plugin, provider.options
        else:
            plugin, options = provider["plugin"], provider.get("options", {})
        gtype = types.get(plugin)
        if gtype is None:
            known = ", ".join(sorted(types)) or "none loaded"
            raise PluginError(
                f"{filename}: providers.{code}.plugin: unknown gateway plugin {plugin!r} "
                f"(known: {known})"
            )
        # A plugin gets a dict of its own, as before the config was typed: the schema's load
        # makes one, and without a schema it is a copy of the config's read-only table.
        options = dict(options)
        if gtype.cls.options_schema is not None:
            try:
                options = gtype.cls.options_schema(unknown=RAISE).load(options)
            except ValidationError as exc:
                key, text = first_error(exc.messages)
                raise PluginError(
                    f"{filename}: providers.{code}.{key}: {text} "
                    f"(provider {code!r}, plugin {plugin!r})"
                ) from None
        context = GatewayContext(
            code=code, public_url=public_url, logger=logging.getLogger(f"b24sms.gateway.{code}")
        )
        gateways[code] = gtype.cls(options, context)
    return gateways


def plugin_versions(pm: pluggy.PluginManager) -> list[tuple[str, str, str]]:
    """(plugin name, distribution, version) of every loaded plugin."""
    dists = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    rows = []
    for name, plugin in pm.list_name_plugin():
        dist = dists.get(id(plugin))
        if dist is not None:
            rows.append((name, dist.project_name, dist.version))
        else:
            rows.append((name, "-", "-"))
    return sorted(rows)
