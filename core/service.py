"""The service: config, database, plugins, gateways and queue, built once per process.

The Flask app keeps it in ``app.extensions["b24sms"]``; the worker builds one without Flask.
Nothing here runs at import time.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import pluggy

from .config import Config, ProviderConfig, ServiceConfig
from .crypto import KeySet, bind_keys
from .db import Database
from .gateway import Gateway
from .plugins import (
    GatewayType,
    build_gateways,
    gateway_types,
    make_plugin_manager,
    register_default_plugins,
)

log = logging.getLogger(__name__)


class Service:
    """Everything a request or a task needs, owned by one process."""

    def __init__(
        self,
        config: Config,
        *,
        plugin_manager: pluggy.PluginManager | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        #: ``[service]``, the section nearly every caller reads
        self.settings: ServiceConfig = config.service
        self.pm = plugin_manager or make_plugin_manager(environ)
        # Observers every process needs, web or worker: the state-change log line and metrics.
        register_default_plugins(self.pm)
        self.gateway_types: dict[str, GatewayType] = gateway_types(self.pm)
        self.providers: Mapping[str, ProviderConfig] = config.providers
        self.gateways: dict[str, Gateway] = build_gateways(
            self.providers, self.gateway_types, self.settings.public_url, config.filename
        )
        self.db = Database(self.settings.database_url)
        #: secrets at rest: the token columns encrypt and decrypt with these (b24sms.crypto);
        #: a config without keys must pass through config.prepare_instance first
        self.keys = KeySet(self.settings.encryption_keys)
        bind_keys(self.db.engine, self.keys)
        from .registration import public_url_problems

        for problem in public_url_problems(self.public_url):
            log.warning("%s", problem)
        # The queue imports delivery code that needs this object; built last.
        from .queue import Queue

        self.queue = Queue(self.settings.queue_url, self)
        from .ingest import Ingest

        #: the way in for messages: concurrent HANDLER calls share a transaction
        self.ingest = Ingest(self)

    @property
    def public_url(self) -> str:
        return self.settings.public_url

    def close(self) -> None:
        for gateway in self.gateways.values():
            try:
                gateway.close()
            except Exception:
                log.exception("closing gateway %s failed", gateway.code)
        self.db.dispose()
