"""A real SMTP server on 127.0.0.1 (aiosmtpd) that keeps every mail, for the email gateway."""

from __future__ import annotations

import email
import email.message
import email.policy
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.controller import Controller

__all__ = ["LoopbackController", "Recorder"]


@dataclass
class Recorder:
    """An aiosmtpd handler that keeps every mail and answers what a test scripts."""

    mails: list[Any] = field(default_factory=list)
    rcpt_answer: str | None = None
    data_answer: str | None = None

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.rcpt_answer:
            return self.rcpt_answer
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.data_answer:
            return self.data_answer
        self.mails.append(envelope)
        return "250 Message accepted for delivery"

    def parsed(self, index: int = -1) -> email.message.EmailMessage:
        return email.message_from_bytes(self.mails[index].content, policy=email.policy.default)


class LoopbackController(Controller):
    """aiosmtpd's Controller on port 0: the real port is read back from the bound socket."""

    def _trigger_server(self) -> None:
        if self.port == 0:
            self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()
