"""The five statuses Bitrix24 knows and the rule that they only move forward.

``queued < sent < {delivered, undelivered, failed}``; the last three are final. A report that
would move a message back (a late ``sent`` after ``delivered``, a repeated ``queued``) is kept in
the message's history and not applied.
"""

from __future__ import annotations

from typing import Any

QUEUED = "queued"
SENT = "sent"
DELIVERED = "delivered"
UNDELIVERED = "undelivered"
FAILED = "failed"

STATUSES = (QUEUED, SENT, DELIVERED, UNDELIVERED, FAILED)
#: nothing moves a message on from these
FINAL_STATUSES = frozenset({DELIVERED, UNDELIVERED, FAILED})
#: not final yet: waiting for a send, or sent and waiting for a report
IN_FLIGHT_STATUSES = frozenset({QUEUED, SENT})
#: statuses only a gateway that took the message gives (``failed`` may be decided before any
#: send, so a failed message counts as accepted only when it has an external id)
ACCEPTED_STATUSES = frozenset({SENT, DELIVERED, UNDELIVERED})
_RANK = {QUEUED: 0, SENT: 1, DELIVERED: 2, UNDELIVERED: 2, FAILED: 2}


def is_final(status: str | None) -> bool:
    """True for delivered, undelivered and failed."""
    return status in FINAL_STATUSES


def moves_forward(current: str | None, new: str) -> bool:
    """Whether ``new`` may replace ``current``.

    Nothing replaces a final status (not even another final one: the first final word wins),
    and a status never replaces itself or a later one.
    """
    if new not in _RANK:
        raise ValueError(f"unknown status {new!r}")
    if current is None:
        return True
    if current in FINAL_STATUSES:
        return False
    return _RANK[new] > _RANK[current]


def accepted_by_gateway() -> Any:
    """SQL: 1 for a message its gateway accepted (it has an external id, or a status in
    :data:`ACCEPTED_STATUSES`), else 0 — for sums and groupings (app page, metrics)."""
    from sqlalchemy import case

    from .models import Message

    accepted = Message.external_id.is_not(None) | Message.status.in_(sorted(ACCEPTED_STATUSES))
    return case((accepted, 1), else_=0)
