"""What the app page shows of one portal, read from the database: its providers, its
delivery statistics, one page of its messages with their histories, and its link with Bitrix24.

Everything is read with the portal's id from the verified session (:mod:`.app_session`): a
portal never sees another portal's data. The SQL of the recurring reads is in
:mod:`b24sms.queries`, where the plan test checks that each finds its rows through an index.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from .. import queries
from ..logs import mask_number
from ..messages import TEST_MESSAGE_PREFIX
from ..models import Message, Portal
from ..registration import wanted_codes
from ..service import Service
from ..statuses import DELIVERED, FINAL_STATUSES, STATUSES
from .app_session import PageSession

#: messages per page
PAGE_SIZE = 20
WINDOWS = (("24 hours", dt.timedelta(hours=24)), ("7 days", dt.timedelta(days=7)))


@dataclass
class ProviderRow:
    code: str
    name: str
    plugin: str
    state: str
    last_error: str | None
    #: the test form may use it: enabled and meant for this portal
    usable: bool


@dataclass
class StatsRow:
    code: str
    total: int = 0
    #: accepted by the gateway (sent, or a later status with the gateway's id)
    sent: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUSES, 0))

    @property
    def finished(self) -> int:
        return sum(self.counts[s] for s in FINAL_STATUSES)

    @property
    def rate(self) -> float | None:
        """Delivered share of the messages that reached a final status."""
        return self.counts[DELIVERED] / self.finished if self.finished else None


@dataclass
class HistoryItem:
    status: str
    at: dt.datetime
    source: str
    applied: bool
    detail: str | None


@dataclass
class MessageRow:
    id: int
    message_id: str
    created_at: dt.datetime
    code: str
    number: str
    status: str
    attempts: int
    last_error: str | None
    history: list[HistoryItem]

    @property
    def is_test(self) -> bool:
        return self.message_id.startswith(TEST_MESSAGE_PREFIX)


def provider_name(name: Any, lang: str) -> str:
    """A provider's name in the page's language (``name`` is a string or a language table)."""
    if isinstance(name, Mapping):
        return str(name.get(lang) or name.get("en") or next(iter(name.values()), ""))
    return str(name)


def provider_rows(svc: Service, db_session: Session, session: PageSession) -> list[ProviderRow]:
    """The providers of this portal: those the config wants here, and any registered earlier."""
    wanted = wanted_codes(svc, session.member_id)
    registrations = {
        r.code: r for r in db_session.scalars(queries.registrations_of(session.portal_id))
    }
    rows = []
    for code in sorted(set(wanted) | set(registrations)):
        provider = svc.providers.get(code)
        registration = registrations.get(code)
        if registration is not None:
            state, error = registration.state, registration.last_error
        else:
            state, error = "pending", None
        if provider is None:
            state = f"{state} (no longer configured)"
        elif not provider.enabled:
            state = f"{state} (disabled)"
        rows.append(
            ProviderRow(
                code=code,
                name=provider_name(provider.name, session.lang) if provider else code,
                plugin=provider.plugin if provider else "-",
                state=state,
                last_error=error,
                usable=code in wanted,
            )
        )
    return rows


def provider_stats(
    db_session: Session, portal_id: int, codes: list[str], now: dt.datetime
) -> list[tuple[str, list[StatsRow], int]]:
    """Per window: (label, one row per CODE, the largest total, to scale the chart by)."""
    windows = []
    for label, span in WINDOWS:
        rows = {code: StatsRow(code) for code in codes}
        found = db_session.execute(queries.portal_stats(portal_id, now - span)).all()
        for code, status, was_accepted, count in found:
            row = rows.setdefault(code, StatsRow(code))
            row.total += count
            row.counts[status] = row.counts.get(status, 0) + count
            if was_accepted:
                row.sent += count
        ordered = [rows[c] for c in sorted(rows)]
        windows.append((label, ordered, max((r.total for r in ordered), default=0)))
    return windows


def filter_codes(db_session: Session, portal_id: int, codes: list[str]) -> list[str]:
    """The CODE filter's choices: the portal's providers (``codes``) and every CODE ever
    registered on it."""
    return sorted(set(codes) | set(db_session.scalars(queries.known_codes(portal_id))))


@dataclass(frozen=True)
class Filters:
    """What the list shows: a status and a CODE (empty: all), and where the page is.

    Pages are found by message id (keyset), not by counting rows from the newest (OFFSET):
    ``before`` lists what is older than a message (the "Older" link), ``after`` what is newer
    (the "Newer" link), so every page costs the same however deep. ``page`` is only the
    number shown.
    """

    status: str = ""
    code: str = ""
    page: int = 1
    before: int | None = None
    after: int | None = None


def message_rows(
    db_session: Session, portal_id: int, filters: Filters
) -> tuple[list[MessageRow], bool, bool]:
    """One page of the portal's messages, newest first, with their histories; whether there
    are older ones, and whether there are newer ones."""
    status, code = filters.status, filters.code
    found: list[Message] = []
    newer = False
    if filters.after is not None:
        # Newer than a message: the oldest PAGE_SIZE of those, shown newest first.
        found = list(
            db_session.scalars(
                queries.page_of_messages(
                    portal_id, status, code, None, PAGE_SIZE + 1, after_id=filters.after
                )
            ).all()
        )
        newer = len(found) > PAGE_SIZE
        found = found[:PAGE_SIZE][::-1] if newer else []
        more = True  # the page the reader came from is older
    if not found:
        # The first page (or what was newer than a message fills less than a page: the first
        # page, then, in full).
        before = filters.before if filters.after is None else None
        found = list(
            db_session.scalars(
                queries.page_of_messages(portal_id, status, code, before, PAGE_SIZE + 1)
            ).all()
        )
        more = len(found) > PAGE_SIZE
        found = found[:PAGE_SIZE]
        newer = before is not None
    history: dict[int, list[HistoryItem]] = {m.id: [] for m in found}
    if found:
        for event in db_session.scalars(queries.history_of(list(history))):
            history[event.message_pk].append(
                HistoryItem(
                    event.status, event.created_at, event.source, event.applied, event.detail
                )
            )
    rows = [
        MessageRow(
            id=m.id,
            message_id=m.message_id,
            created_at=m.created_at,
            code=m.code,
            number=mask_number(m.to or m.to_raw),
            status=m.status,
            attempts=m.attempts,
            last_error=m.last_error,
            history=history[m.id],
        )
        for m in found
    ]
    return rows, more, newer


def _cursor(value: str | None) -> int | None:
    try:
        number = int(value or "")
    except ValueError:
        return None
    return number if number > 0 else None


def read_filters(form: Mapping[str, str], codes: list[str]) -> Filters:
    """Filters from the form; anything unknown is ignored rather than trusted."""
    status = form.get("status", "")
    code = form.get("code", "")
    before, after = _cursor(form.get("before")), _cursor(form.get("after"))
    try:
        page = min(max(int(form.get("page", "1")), 1), 10_000)
    except ValueError:
        page = 1
    if before is None and after is None:
        page = 1  # without a place in the list, the list starts at the newest
    return Filters(
        status=status if status in STATUSES else "",
        code=code if code in codes else "",
        page=page,
        before=before,
        after=None if before is not None else after,
    )


def connection_state(db_session: Session, portal_id: int) -> dict[str, Any]:
    """The portal's link with Bitrix24: events bound to us, payment state, last reconcile."""
    portal = db_session.get(Portal, portal_id)
    if portal is None:
        return {}
    return {
        "events": [e for e in (portal.event_bindings or "").split(",") if e],
        "payment_state": portal.payment_state,
        "reconciled_at": portal.reconciled_at,
        "reconcile_error": portal.reconcile_error,
    }
