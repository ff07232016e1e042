"""b24sms: a Bitrix24 SMS provider service with pluggable gateways.

``create_app()`` builds the Flask app; plugin authors import :data:`hookimpl` from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from .hookspecs import hookimpl

if TYPE_CHECKING:
    from flask import Flask

try:
    __version__ = version("b24sms")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = ["__version__", "create_app", "hookimpl"]


def create_app(
    test_config: Mapping[str, Any] | None = None,
    *,
    config_path: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Flask:
    """Build the Flask app.

    :param test_config: a whole configuration as a dict (the TOML's shape); used instead of the
        file. Tests pass one; production reads ``B24SMS_CONFIG`` or the package's
        ``default.toml``.
    :param config_path: a TOML file to read instead of ``B24SMS_CONFIG``.

    With an empty ``secret_key`` this is where the generated one is made, in
    ``instance/secret_key`` (see :func:`b24sms.config.prepare_instance`).

    :raises b24sms.config.ConfigError, b24sms.plugins.PluginError: the service cannot start.
    """
    from .app import build_app

    return build_app(test_config, config_path=config_path, environ=environ)
