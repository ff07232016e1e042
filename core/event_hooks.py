"""Read-only snapshots of messages for event hooks, and a safe way to call those hooks."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pluggy

    from .models import Message

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MessageInfo:
    """A message as event hooks see it; changing it changes nothing."""

    id: int
    message_id: str
    code: str
    member_id: str
    domain: str
    to: str | None
    body: str
    module_id: str | None
    status: str
    external_id: str | None
    attempts: int
    last_error: str | None
    created_at: dt.datetime

    @classmethod
    def from_row(cls, message: Message) -> MessageInfo:
        # Copied field by field like the gateway's OutgoingMessage in b24sms.delivery, on
        # purpose: the hooks' snapshot and the gateway contract are separate public types
        # (a hook sees status and errors, a gateway the callback URL and attempt) that change
        # apart.
        return cls(
            id=message.id,
            message_id=message.message_id,
            code=message.code,
            member_id=message.portal.member_id,
            domain=message.portal.domain,
            to=message.to,
            body=message.body,
            module_id=message.module_id,
            status=message.status,
            external_id=message.external_id,
            attempts=message.attempts,
            last_error=message.last_error,
            created_at=message.created_at,
        )


def notify(pm: pluggy.PluginManager, hook_name: str, **kwargs: Any) -> None:
    """Call an event hook; a plugin's exception is logged and never reaches the send path."""
    try:
        getattr(pm.hook, hook_name)(**kwargs)
    except Exception:
        log.exception("plugin hook %s raised; ignored", hook_name)
