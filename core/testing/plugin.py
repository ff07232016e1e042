"""The pytest plugin of b24sms (entry point ``pytest11``): fixtures for testing gateway plugins.

Loaded by pytest in every environment where b24sms is installed, so it stays small: no
fixture starts anything until a test asks for it, and every name starts with ``b24sms_``,
so it cannot shadow a project's own fixtures.

- ``b24sms_emulator`` — a started :class:`~b24sms.emulator.Emulator` (OAuth server and
  portals on 127.0.0.1) for the test app's client id and secret;
- ``b24sms_service`` — a factory: ``b24sms_service(providers={...})`` runs the service on
  127.0.0.1 with that config against the emulator, and returns a
  :class:`~b24sms.testing.service.RunningService`; ``.add_portal()`` installs it on a new
  emulated portal;
- ``b24sms_portal`` — a factory: ``b24sms_portal(providers={...})`` → a portal with a service
  of that config installed (the two steps above at once).

Send through the portal with :func:`b24sms.testing.send_and_wait`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

# The contract suite lives in an installed package, outside the test paths pytest rewrites:
# registered here, before anything imports it, its asserts explain themselves on failure.
pytest.register_assert_rewrite("b24sms.testing.contract")


@pytest.fixture
def b24sms_emulator() -> Iterator[Any]:
    """A started portal emulator knowing the test app's client id and secret."""
    from b24sms.testing.service import emulator_for_tests

    with emulator_for_tests() as emulator:
        yield emulator


@pytest.fixture
def b24sms_service(b24sms_emulator: Any, tmp_path: Any) -> Iterator[Callable[..., Any]]:
    """Factory: ``b24sms_service(**config_sections)`` → the service running on 127.0.0.1,
    its SQLite database in ``tmp_path``, its tokens refreshed at ``b24sms_emulator``."""
    from b24sms.testing.service import running_services

    yield from running_services(b24sms_emulator, tmp_path)


@pytest.fixture
def b24sms_portal(b24sms_service: Callable[..., Any]) -> Callable[..., Any]:
    """Factory: ``b24sms_portal(**config_sections)`` → an emulated portal with a service of
    that config installed and its providers registered (the service is ``portal.service``)."""

    def make(**sections: Any) -> Any:
        service = b24sms_service(**sections)
        portal = service.add_portal()
        portal.service = service
        return portal

    return make
