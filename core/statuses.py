"""The five statuses Bitrix24 knows and the rule that they only move forward.

``queued < sent < {delivered, undelivered, failed}``; the last three are final. A report that
would move a message back (a late ``sent`` after ``delivered``, a repeated ``queued``) is kept in
the message's history and not applied.
"""

from __future__ import annotations

QUEUED = "queued"
SENT = "sent"
DELIVERED = "delivered"
UNDELIVERED = "undelivered"
FAILED = "failed"

STATUSES = (QUEUED, SENT, DELIVERED, UNDELIVERED, FAILED)
FINAL_STATUSES = frozenset({DELIVERED, UNDELIVERED, FAILED})
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
