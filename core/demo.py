"""``b24sms demo``: the whole flow against the bundled emulator, printed as a timeline.

A temporary SQLite database and queue, the service under waitress with an embedded consumer, an
emulated portal that installs the app, sends one message through the log-only provider, and
receives the statuses back.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .statuses import FINAL_STATUSES

CLIENT_ID = "local.demo00000000000.00000000"


class _Dispatcher:
    """WSGI target set after the socket exists (the app must know its own URL)."""

    app: Any = None

    def __call__(self, environ: dict, start_response: Callable) -> Any:
        return self.app(environ, start_response)


class _TimelineHandler(logging.Handler):
    """Shows what the log gateway writes as a line of the timeline."""

    def __init__(self, say: Callable[[str], None]) -> None:
        super().__init__(logging.INFO)
        self.say = say

    def emit(self, record: logging.LogRecord) -> None:
        self.say(f"log gateway: {record.getMessage()}")


def run_demo(number: str, text: str, echo: Callable[[str], None] = print) -> int:
    """Run the demo; 0 when the message reached a final status at the portal."""
    import secrets

    from waitress.server import create_server

    from .app import build_app
    from .config import prepare_instance, validate_config
    from .emulator import Emulator
    from .service import Service

    started = time.monotonic()

    def say(line: str) -> None:
        echo(f"{time.monotonic() - started:7.3f}s  {line}")

    client_secret = secrets.token_urlsafe(16)
    with (
        tempfile.TemporaryDirectory(prefix="b24sms-demo-") as tmp,
        Emulator(client_id=CLIENT_ID, client_secret=client_secret) as emu,
    ):
        portal = emu.add_portal()
        say(f"emulated portal {portal.domain} (member_id {portal.member_id})")
        dispatcher = _Dispatcher()
        server = create_server(dispatcher, host="127.0.0.1", port=0, threads=4)
        # waitress's type stubs leave out effective_port (the port it bound for port=0)
        public_url = f"http://127.0.0.1:{server.effective_port}"  # type: ignore[union-attr]
        config = validate_config(
            {
                "service": {
                    "public_url": public_url,
                    "secret_key": secrets.token_urlsafe(32),
                    "database_url": f"sqlite:///{Path(tmp) / 'demo.sqlite3'}",
                    "queue_url": f"sqlite:///{Path(tmp) / 'demo-queue.sqlite3'}",
                    "retry_base_delay": 0.2,
                },
                "bitrix24": {
                    "client_id": CLIENT_ID,
                    "client_secret": client_secret,
                    "oauth_url": emu.oauth_url,
                },
                "providers": {
                    "demo_log": {"plugin": "log", "name": "Demo log", "outcome": "delivered"}
                },
            }
        )
        service = Service(prepare_instance(config))
        gateway_log = _TimelineHandler(say)
        logging.getLogger("b24sms.gateway.demo_log").addHandler(gateway_log)
        logging.getLogger("b24sms.gateway.demo_log").setLevel(logging.INFO)
        dispatcher.app = build_app(service=service)
        consumer = service.queue.start_embedded(2)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        say(f"b24sms serving on {public_url} with an embedded queue consumer")
        try:
            response = portal.install(public_url)
            say(f"portal → POST /bitrix24/install (ONAPPINSTALL): HTTP {response.status_code}")
            say(f"providers registered on the portal: {sorted(portal.senders)}")
            message_id, response = portal.send_sms("demo_log", number, text)
            say(
                f"portal → POST HANDLER demo_log, message {message_id}: HTTP {response.status_code}"
            )
            seen = 0
            deadline = time.monotonic() + 30
            final = None
            while time.monotonic() < deadline and final is None:
                statuses = portal.messages[message_id]["statuses"]
                for entry in statuses[seen:]:
                    say(f"b24sms → messageservice.message.status.update: {entry['status']}")
                    if entry["status"] in FINAL_STATUSES:
                        final = entry["status"]
                seen = len(statuses)
                time.sleep(0.05)
            if final is None:
                say("no final status within 30 s")
                return 1
            say(
                f"done: the portal shows the message as {final}; "
                f"{portal.stats['requests']} REST requests, "
                f"{portal.stats['rejected_rate_limit']} rejected by the rate limit"
            )
            return 0
        finally:
            logging.getLogger("b24sms.gateway.demo_log").removeHandler(gateway_log)
            # waitress's loop cannot be stopped from another thread without racing its select();
            # the thread is a daemon and ends with the command.
            server.task_dispatcher.shutdown()
            consumer.stop()
            service.close()
