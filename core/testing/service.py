"""The service and the emulated Bitrix24 on loopback, for tests of b24sms and of its plugins.

Nothing here starts at import: every server is made by a call (or by a fixture of
:mod:`b24sms.testing.plugin`), and Flask, werkzeug and the emulator are imported only then.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: the test app's secret, client id and client secret; the emulator knows the same pair
SECRET_KEY = "test-secret-key-0123456789abcdef"
CLIENT_ID = "local.test0000000000.00000000"
CLIENT_SECRET = "test-client-secret-XYZ"

#: the statuses after which Bitrix24 hears nothing more about a message
FINAL_STATUSES = frozenset({"delivered", "undelivered", "failed"})
#: every status a portal can receive
ALL_STATUSES = frozenset({"queued", "sent", *FINAL_STATUSES})


def service_config(
    tmp_path: str | Path, public_url: str = "http://127.0.0.1:9", **sections: Any
) -> dict[str, Any]:
    """A whole config as a dict: SQLite in ``tmp_path``, the in-memory queue, one log provider.

    ``service`` and ``bitrix24`` are merged into the defaults; other sections (``providers``
    among them) replace them. The queue runs each task at once, in the web process.
    """
    config: dict[str, Any] = {
        "service": {
            "public_url": public_url,
            "secret_key": SECRET_KEY,
            "database_url": f"sqlite:///{tmp_path}/b24sms.sqlite3",
            "queue_url": "memory://",
            "default_region": "US",
        },
        "bitrix24": {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET},
        "providers": {"smslog": {"plugin": "log", "name": "Log only"}},
    }
    for key, value in sections.items():
        if key in ("service", "bitrix24"):
            config[key].update(copy.deepcopy(value))
        else:
            config[key] = copy.deepcopy(value)
    return config


def wait_until(predicate: Callable[[], Any], timeout: float = 15.0) -> Any:
    """Poll ``predicate`` until it returns something true, and return that.

    :raises TimeoutError: after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError("condition not met")


class _Dispatcher:
    """A WSGI app whose target is set after the socket exists (the app needs its own URL)."""

    app: Callable[..., Any] | None = None

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        assert self.app is not None, "the server answers once start() gave it an app"
        return self.app(environ, start_response)


class LiveServer:
    """The Flask app served on 127.0.0.1 by a threaded werkzeug server.

    The socket is bound first, so :attr:`url` is known before the app (whose ``public_url``
    it is) is built; :meth:`start` then serves the app.
    """

    def __init__(self) -> None:
        from werkzeug.serving import make_server

        self.dispatcher = _Dispatcher()
        self.server = make_server("127.0.0.1", 0, self.dispatcher, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.app: Any = None
        self._thread: threading.Thread | None = None

    def start(self, app: Any) -> None:
        """Serve ``app`` from a daemon thread."""
        self.app = app
        self.dispatcher.app = app
        # shutdown() waits for the loop's next poll: 0.05 s instead of the default 0.5 s per test
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the app's service (database, queue, gateways)."""
        self.server.shutdown()
        self.server.server_close()
        if self.app is not None:
            self.app.extensions["b24sms"].close()


class RunningService(LiveServer):
    """A :class:`LiveServer` configured against an :class:`~b24sms.emulator.Emulator`.

    :param emulator: a started emulator; the service refreshes its tokens there.
    :param tmp_path: where the SQLite database goes.
    :param sections: config sections on top of :func:`service_config`'s.
    """

    def __init__(self, emulator: Any, tmp_path: str | Path, **sections: Any) -> None:
        super().__init__()
        from b24sms import create_app

        self.emulator = emulator
        bitrix24 = {"oauth_url": emulator.oauth_url, **sections.pop("bitrix24", {})}
        self.config = service_config(tmp_path, public_url=self.url, bitrix24=bitrix24, **sections)
        self.start(create_app(self.config))

    def add_portal(self) -> Any:
        """A new emulated portal with this app installed (ONAPPINSTALL) and its providers
        registered; fails with the app's answer when the install does not succeed."""
        portal = self.emulator.add_portal()
        response = portal.install(self.url)
        wanted = {
            code
            for code, table in self.config.get("providers", {}).items()
            if table.get("enabled", True) and table.get("register", True)
        }
        if response.status_code != 200 or not wanted <= set(portal.senders):
            raise AssertionError(
                f"install failed: HTTP {response.status_code} {response.text[:500]}; "
                f"registered {sorted(portal.senders)}, wanted {sorted(wanted)}"
            )
        return portal


@dataclass
class Delivery:
    """A HANDLER call made through :func:`send_and_wait` and what the portal heard of it."""

    message_id: str
    #: the HTTP status the HANDLER answered
    http_status: int
    #: the statuses the portal received for the message, oldest first
    statuses: list[str]

    @property
    def last(self) -> str | None:
        """The newest status the portal received, or None."""
        return self.statuses[-1] if self.statuses else None


def portal_statuses(portal: Any, message_id: str) -> list[str]:
    """Every status the emulated portal received for ``message_id``, oldest first."""
    with portal._lock:  # the emulator's own lock: its servers append from other threads
        record = portal.messages.get(message_id) or {}
        return [entry["status"] for entry in record.get("statuses", [])]


def send_and_wait(
    portal: Any,
    code: str,
    to: str = "+14155550100",
    body: str = "b24sms test message",
    *,
    until: Collection[str] = FINAL_STATUSES,
    timeout: float = 15.0,
    **send_options: Any,
) -> Delivery:
    """Post a HANDLER call for sender ``code`` the way Bitrix24 does, and wait until the portal
    received one of the statuses in ``until`` for it (``messageservice.message.status.update``).

    :param send_options: passed to :meth:`~b24sms.emulator.portal.EmulatedPortal.send_sms`
        (``module_id``, ``with_auth``, ``extra`` …).
    :returns: the :class:`Delivery`; when the HANDLER did not answer 200, at once.
    :raises TimeoutError: naming the statuses seen, when none of ``until`` came in ``timeout``.
    """
    message_id, response = portal.send_sms(code, to, body, **send_options)
    if response.status_code == 200:
        portal.wait_for_status(message_id, statuses=until, timeout=timeout)
    return Delivery(message_id, response.status_code, portal_statuses(portal, message_id))


def emulator_for_tests(**kwargs: Any) -> Any:
    """An unstarted :class:`~b24sms.emulator.Emulator` for the test app's client id and secret."""
    from b24sms.emulator import Emulator

    return Emulator(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, **kwargs)


def running_services(emulator: Any, tmp_path: str | Path) -> Iterator[Callable[..., Any]]:
    """A generator for a fixture: yields ``start(**sections) → RunningService`` and stops every
    service it started when resumed."""
    started: list[RunningService] = []

    def start(**sections: Any) -> RunningService:
        service = RunningService(emulator, tmp_path, **sections)
        started.append(service)
        return service

    try:
        yield start
    finally:
        for service in started:
            service.stop()


def provider_table(plugin: str, options: Mapping[str, Any], name: str = "") -> dict[str, Any]:
    """``[providers.<CODE>]`` for a gateway type: its name and options in one table."""
    return {"plugin": plugin, "name": name or f"{plugin} (test)", **options}
