"""A real SMTP server on 127.0.0.1 (aiosmtpd) that keeps every mail, for the email gateway.

``recorder.connections`` counts the SMTP connections the server accepted and
``recorder.peers`` holds the client address of each mail's connection (equal: one connection
reused). ``LoopbackController(recorder, …, timeout=0.5)`` drops connections idle that long, as
servers do (aiosmtpd's idle timeout; default 300 s).
"""

from __future__ import annotations

import email
import email.message
import email.policy
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP

__all__ = ["LoopbackController", "Recorder"]


@dataclass
class Recorder:
    """An aiosmtpd handler that keeps every mail and answers what a test scripts."""

    mails: list[Any] = field(default_factory=list)
    rcpt_answer: str | None = None
    data_answer: str | None = None
    #: answers for the next MAIL FROM commands, one each (e.g. "421 4.7.0 too many messages")
    mail_answers: list[str] = field(default_factory=list)
    #: SMTP connections accepted (counted by :class:`LoopbackController`'s server)
    connections: int = 0
    #: the client (host, port) of each kept mail's connection
    peers: list[tuple[str, int]] = field(default_factory=list)

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if self.mail_answers:
            return self.mail_answers.pop(0)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.rcpt_answer:
            return self.rcpt_answer
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.data_answer:
            return self.data_answer
        self.mails.append(envelope)
        self.peers.append(tuple(session.peer))
        return "250 Message accepted for delivery"

    def parsed(self, index: int = -1) -> email.message.EmailMessage:
        return email.message_from_bytes(self.mails[index].content, policy=email.policy.default)


class _CountingSMTP(SMTP):
    """aiosmtpd's server, counting the connections it accepts in its handler."""

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        if isinstance(self.event_handler, Recorder):
            # the server's event loop is one thread: no lock needed
            self.event_handler.connections += 1


class LoopbackController(Controller):
    """aiosmtpd's Controller on port 0: the real port is read back from the bound socket."""

    def factory(self) -> SMTP:
        return _CountingSMTP(self.handler, **self.SMTP_kwargs)

    def _trigger_server(self) -> None:
        if self.port == 0:
            self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()
        # that was aiosmtpd's own probe (it has read the greeting): not a client's connection
        if isinstance(self.handler, Recorder):
            self.handler.connections = 0
