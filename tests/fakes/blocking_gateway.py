"""A gateway that blocks its sends on demand, for the tests that kill a worker mid-send.

It lives here rather than in its test module because the worker subprocesses import it too
(``build``), and a test module is no library.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

from b24sms import hookimpl
from b24sms.config import load_config, prepare_instance
from b24sms.gateway import Gateway, OutgoingMessage, SendResult, StatusReport
from b24sms.plugins import make_plugin_manager
from b24sms.service import Service


class BlockingGateway(Gateway):
    """Delivers at once, unless the file ``<control>/block`` exists: then it announces the send
    in ``<control>/started-<id>`` and blocks until the file goes (or its process is killed)."""

    name: ClassVar[str] = "blocking"
    statuses: ClassVar[dict[str, str]] = {"accepted": "sent", "DELIVRD": "delivered"}

    def send(self, message: OutgoingMessage) -> SendResult:
        control = Path(self.options["control"])
        if (control / "block").exists():
            (control / f"started-{message.id}").write_text(str(os.getpid()))
            while (control / "block").exists():
                time.sleep(0.05)
        return SendResult(
            external_id=f"w-{message.id}-{message.attempt}",
            raw_status="accepted",
            later=(StatusReport("DELIVRD"),),
        )


class BlockingPlugin:
    @hookimpl
    def b24sms_register_gateways(self, register: Callable[[type[Gateway]], None]) -> None:
        register(BlockingGateway)


def build(config_path: Path) -> Service:
    """The service as both processes build it: from the file, with the blocking gateway."""
    pm = make_plugin_manager(environ={"B24SMS_LOAD_PLUGINS": ""})
    pm.register(BlockingPlugin(), name="blocking-test")
    return Service(prepare_instance(load_config(config_path, environ={})), plugin_manager=pm)
