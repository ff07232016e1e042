"""Hook specifications of b24sms (pluggy project name ``b24sms``).

Plugins implement these with ``@b24sms.hookimpl``. Hooks are always called with keyword
arguments, so an implementation may accept only the arguments it needs. Each hook is documented
in ``docs/plugins.md`` (a test keeps the two in step).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import click

    from .event_hooks import MessageInfo
    from .gateway import Gateway, GatewayError

hookspec = pluggy.HookspecMarker("b24sms")
hookimpl = pluggy.HookimplMarker("b24sms")


@hookspec
def b24sms_register_gateways(register: Callable[[type[Gateway]], None]) -> None:
    """Contribute gateway types.

    Call ``register(GatewayClass)`` once per type; the class's ``name`` is the value of
    ``plugin = "…"`` in a provider's config. The core rejects two types with one name.

    :param register: the callback that records a :class:`b24sms.gateway.Gateway` subclass.
    """


@hookspec
def b24sms_register_commands(cli: click.Group) -> None:
    """Add subcommands to the ``b24sms`` command.

    :param cli: the click group of the ``b24sms`` command.
    """


@hookspec
def b24sms_message_stored(message: MessageInfo) -> None:
    """A message from Bitrix24 was stored and handed to delivery.

    Runs in the web process after the message is committed; keep it quick and never raise:
    an exception is logged and ignored.

    :param message: a read-only snapshot of the message.
    """


@hookspec
def b24sms_status_changed(
    message: MessageInfo, previous: str | None, status: str, raw_status: str | None, source: str
) -> None:
    """A message's status moved forward (queued, sent, delivered, undelivered, failed).

    Called after the change is committed, for audit trails, webhooks and metrics. Reports that
    were recorded but not applied (they would move the status back) do not call it.

    :param message: a read-only snapshot of the message, already holding ``status``.
    :param previous: the status before, or None for the first one.
    :param status: the new status.
    :param raw_status: the gateway's own word for it, when there is one.
    :param source: who reported it: ``handler``, ``gateway``, ``callback``, ``poll`` or ``sweep``.
    """


@hookspec
def b24sms_send_failed(message: MessageInfo, error: GatewayError, will_retry: bool) -> None:
    """One send attempt failed.

    :param message: a read-only snapshot of the message (``attempts`` counts this attempt).
    :param error: the gateway's error; ``str(error)`` is safe to log.
    :param will_retry: True when another attempt is scheduled, False when the message failed.
    """
