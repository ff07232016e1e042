"""The recurring queries over messages and their history, each built by one function here that
the code running it calls, and listed in :data:`RECURRING`.

Recurring means: run by the sweep, polling, callbacks, the app page, ``/metrics`` or retention,
again and again while the tables grow. Each must find its rows through an index (most through a
partial index that holds only the rows in flight, due or waiting for retention), so its cost
stays flat however much history is stored. ``tests/test_query_plans.py`` reads the plan of
every entry of :data:`RECURRING` on SQLite and PostgreSQL and fails on a full scan of
``messages`` or ``status_events``: a new recurring query goes into that list.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Select, func, literal_column, select

from .models import (
    FINAL_STATUS_LIST,
    NOT_FINAL_STATUSES,
    Message,
    MessageCount,
    ProviderRegistration,
    StatusEvent,
)
from .statuses import accepted_by_gateway


def _literal_in(column: Any, values: Sequence[str]) -> Any:
    # Literals, not bound parameters: SQLite uses a partial index only when it can see that the
    # query's condition is the index's (b24sms.models.NOT_FINAL_SQL).
    return column.in_([literal_column(f"'{value}'") for value in values])


def not_final() -> Any:
    """``status IN ('queued', 'sent')``: the condition of the not-final partial index."""
    return _literal_in(Message.status, NOT_FINAL_STATUSES)


def final() -> Any:
    """``status IN ('delivered', 'undelivered', 'failed')``, as the retention indexes have it."""
    return _literal_in(Message.status, FINAL_STATUS_LIST)


def stuck_messages(cutoff: dt.datetime, limit: int) -> Select[Any]:
    """The sweep: attempts in flight since before ``cutoff`` (their worker died)."""
    return (
        select(Message)
        .where(Message.sending_since.is_not(None), Message.sending_since <= cutoff, not_final())
        .order_by(Message.sending_since)
        .limit(limit)
        .with_for_update()
    )


def lost_messages(cutoff: dt.datetime, limit: int) -> Select[Any]:
    """The sweep: attempts due since before ``cutoff`` that no worker took (the task was lost)."""
    return (
        select(Message)
        .where(
            Message.next_attempt_at.is_not(None),
            Message.sending_since.is_(None),
            Message.next_attempt_at <= cutoff,
            not_final(),
        )
        .order_by(Message.next_attempt_at)
        .limit(limit)
        .with_for_update()
    )


def poll_candidates(code: str, polled_before: dt.datetime, limit: int) -> Select[Any]:
    """Polling: messages of ``code`` a gateway accepted, not final, not polled since
    ``polled_before`` (``updated_at`` marks the last poll), oldest first."""
    return (
        select(Message)
        .where(
            Message.code == code,
            not_final(),
            Message.updated_at <= polled_before,
            Message.external_id.is_not(None),
            Message.next_attempt_at.is_(None),
            Message.sending_since.is_(None),
        )
        .order_by(Message.updated_at)
        .limit(limit)
        .with_for_update()
    )


def in_flight(code: str) -> Select[Any]:
    """Callbacks: is any send of ``code`` in flight (its report may overtake the answer)?"""
    return (
        select(Message.id).where(Message.code == code, Message.sending_since.is_not(None)).limit(1)
    )


def by_external_id(code: str, external_id: str) -> Select[Any]:
    """Callbacks and polls: the messages a report is about, locked."""
    return (
        select(Message)
        .where(Message.code == code, Message.external_id == external_id)
        .with_for_update()
    )


def page_of_messages(
    portal_id: int,
    status: str,
    code: str,
    before_id: int | None,
    limit: int,
    *,
    after_id: int | None = None,
) -> Select[Any]:
    """The app page's list: the portal's messages, optionally of one status and CODE, newest
    first and older than ``before_id``, or oldest first and newer than ``after_id`` (keyset
    paging: every page costs the same, however deep)."""
    query = select(Message).where(Message.portal_id == portal_id)
    if status:
        query = query.where(Message.status == status)
    if code:
        query = query.where(Message.code == code)
    if after_id is not None:
        return query.where(Message.id > after_id).order_by(Message.id).limit(limit)
    if before_id is not None:
        query = query.where(Message.id < before_id)
    return query.order_by(Message.id.desc()).limit(limit)


def history_of(message_pks: Sequence[int]) -> Select[Any]:
    """The app page: the histories of one page of messages."""
    return (
        select(StatusEvent)
        .where(StatusEvent.message_pk.in_(list(message_pks)))
        .order_by(StatusEvent.id)
    )


def portal_stats(portal_id: int, since: dt.datetime) -> Select[Any]:
    """The app page's delivery numbers: the portal's messages since ``since`` per CODE, status
    and accepted (a window of days: its cost follows the traffic, not the history)."""
    accepted = accepted_by_gateway()
    return (
        select(Message.code, Message.status, accepted, func.count())
        .where(Message.portal_id == portal_id, Message.created_at >= since)
        .group_by(Message.code, Message.status, accepted)
    )


def registrations_of(portal_id: int) -> Select[Any]:
    """The app page's providers: the portal's provider registrations (state, last error)."""
    return select(ProviderRegistration).where(ProviderRegistration.portal_id == portal_id)


def known_codes(portal_id: int) -> Select[Any]:
    """The app page's CODE filter: every CODE ever registered on the portal (the registrations
    table, not a DISTINCT over its messages)."""
    return select(ProviderRegistration.code).where(ProviderRegistration.portal_id == portal_id)


def to_redact(cutoff: dt.datetime, limit: int | None) -> Select[Any]:
    """Retention: final messages created before ``cutoff`` whose body and numbers are kept."""
    return (
        select(Message.id)
        .where(final(), Message.redacted_at.is_(None), Message.created_at < cutoff)
        .order_by(Message.created_at)
        .limit(limit)
    )


def to_delete(cutoff: dt.datetime, limit: int | None) -> Select[Any]:
    """Retention: final messages created before ``cutoff``, oldest first."""
    return (
        select(Message.id)
        .where(final(), Message.created_at < cutoff)
        .order_by(Message.created_at)
        .limit(limit)
    )


def portal_final_messages(portal_id: int, limit: int) -> Select[Any]:
    """Erasing a portal (uninstall with CLEAN): a batch of its final messages."""
    return (
        select(Message.id)
        .where(Message.portal_id == portal_id, final())
        .order_by(Message.id)
        .limit(limit)
    )


def portal_not_final(portal_id: int) -> Select[Any]:
    """Erasing a portal: its messages still in flight (failed before their data goes)."""
    return select(Message).where(Message.portal_id == portal_id, not_final()).with_for_update()


def message_totals() -> Select[Any]:
    """``/metrics``: messages per CODE, status and accepted from the counts table
    (:mod:`b24sms.counts`): ``(code, status, accepted, stored, removed)``."""
    counts = MessageCount.__table__.c
    return select(
        counts.code,
        counts.status,
        counts.accepted,
        func.sum(counts.stored),
        func.sum(counts.removed),
    ).group_by(counts.code, counts.status, counts.accepted)


def _ago(now: dt.datetime, **delta: float) -> dt.datetime:
    return now - dt.timedelta(**delta)


#: Every recurring query, built as its caller builds it, from the present moment of the data
#: (``now``): the plan test checks each of them on both databases. Add a new one here.
RECURRING: dict[str, Callable[[dt.datetime], Select[Any]]] = {
    "sweep: stuck": lambda now: stuck_messages(_ago(now, seconds=300), 500),
    "sweep: lost": lambda now: lost_messages(_ago(now, seconds=300), 500),
    "poll_due": lambda now: poll_candidates("sms_a", _ago(now, seconds=60), 100),
    "callback: in flight": lambda now: in_flight("sms_a"),
    "callback: by external id": lambda now: by_external_id("sms_a", "ext-1000"),
    "app page: list": lambda now: page_of_messages(1, "", "", None, 21),
    "app page: list, older page": lambda now: page_of_messages(1, "", "", 5000, 21),
    "app page: list, newer page": lambda now: page_of_messages(1, "", "", None, 21, after_id=5000),
    "app page: list by status": lambda now: page_of_messages(1, "failed", "", 5000, 21),
    "app page: list by CODE": lambda now: page_of_messages(1, "", "sms_a", 5000, 21),
    "app page: list by status and CODE": lambda now: page_of_messages(
        1, "failed", "sms_a", 5000, 21
    ),
    "app page: history": lambda now: history_of([1, 2, 3]),
    "app page: statistics, 24 h": lambda now: portal_stats(1, _ago(now, days=1)),
    "app page: statistics, 7 days": lambda now: portal_stats(1, _ago(now, days=7)),
    "app page: known codes": lambda now: known_codes(1),
    "app page: providers": lambda now: registrations_of(1),
    "retention: redact": lambda now: to_redact(_ago(now, days=30), 500),
    "retention: delete": lambda now: to_delete(_ago(now, days=180), 500),
    "erase portal: final": lambda now: portal_final_messages(1, 500),
    "erase portal: not final": lambda now: portal_not_final(1),
    "metrics: message counts": lambda now: message_totals(),
}
