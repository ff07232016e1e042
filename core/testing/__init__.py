"""Testing b24sms gateway plugins: fixtures, the service on loopback, the gateway contract.

Installed with b24sms and registered as a pytest plugin (:mod:`b24sms.testing.plugin`), so a
plugin package's tests get the fixtures ``b24sms_emulator``, ``b24sms_service`` and
``b24sms_portal`` without a line of setup. Import the rest from here::

    from b24sms.testing import GatewayContract, send_and_wait

    class TestAcmeContract(GatewayContract):
        plugin = "acme"
        ...

- :class:`GatewayTypeContract` — what every gateway type must declare and do, checked with
  its ``example_options`` alone;
- :class:`GatewayContract` — all of that, plus sending through the carrier's fake API, the
  error classes of its failures, its documented status words, and one message end to end
  from an emulated Bitrix24 portal to its final status;
- :func:`send_and_wait`, :func:`service_config`, :func:`wait_until`, :class:`LiveServer`,
  :class:`RunningService` — the building blocks, for tests of your own.

Importing this package starts nothing and imports neither Flask nor the emulator; the names
are loaded when first used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "GatewayContract": "contract",
    "GatewayTypeContract": "contract",
    "CLIENT_ID": "service",
    "CLIENT_SECRET": "service",
    "SECRET_KEY": "service",
    "FINAL_STATUSES": "service",
    "Delivery": "service",
    "LiveServer": "service",
    "RunningService": "service",
    "portal_statuses": "service",
    "provider_table": "service",
    "send_and_wait": "service",
    "service_config": "service",
    "wait_until": "service",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    # Lazy: pytest imports b24sms.testing.plugin (and so this package) in every run, and the
    # contract module must be imported only after the plugin registered it for rewriting.
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
