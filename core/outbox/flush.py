"""Reporting statuses to Bitrix24: each portal's outbox, flushed in coalesced, paced batches.

:func:`b24sms.messages.record_status` keeps one outbox row per message holding its newest
status (coalescing). :func:`flush_portal` sends those rows as ``batch`` requests of up to 50
``messageservice.message.status.update`` commands, round after round:

1. take the portal's flush lease (:mod:`.lease`: one flusher per portal everywhere);
2. plan a round in one transaction (:func:`_plan`): may the portal be called now and is a token
   of its bucket free (:mod:`.pacing`), is a batch worth sending yet — a partial batch waits
   while entries keep arriving (``QUIET`` seconds without a new one, at most ``MAX_HOLD`` for
   the oldest), so a burst fills batches of 50;
3. send the batch and apply the answer, or the failure (:mod:`.policy`);
4. give the lease back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ..bitrix24 import method_limits
from ..bitrix24.errors import Bitrix24Error, TransientError
from ..models import OutboxEntry, Portal, PortalPacing, PortalState, utcnow
from .lease import LOCKED_RETRY, acquire, owner_id, release
from .pacing import Pacing, pacing_of, seconds, take_token, wait_before_calling
from .policy import record_answer, request_failed

if TYPE_CHECKING:
    from ..bitrix24.client import Bitrix24Client
    from ..service import Service

# One logger for the outbox's modules: the log lines operators know say b24sms.outbox.
log = logging.getLogger(__package__)

STATUS_UPDATE = "messageservice.message.status.update"
#: commands per batch request (Bitrix24's limit)
BATCH_SIZE = 50
#: a partial batch waits until no new entry has arrived for this long…
QUIET = 1.0
#: …but its oldest entry waits no longer than this
MAX_HOLD = 5.0
#: waits up to this long sleep inside the task; longer ones reschedule the flush
INLINE_WAIT = 1.0
#: one flush task yields its worker after this long (and reschedules itself at once)
MAX_RUN = 30.0


@dataclass
class FlushReport:
    """What one :func:`flush_portal` call did.

    ``stopped`` says why it returned while due entries were left: ``locked`` (another flusher
    holds the portal), ``paused``, ``pacing``, ``coalescing``, ``rate_limited``,
    ``operation_time_limit``, ``transient``, ``error``, ``inactive`` (tokens dead, blocked,
    uninstalled), ``gone`` (no such portal) or ``yield`` (ran ``MAX_RUN``). ``retry_in`` is when
    to flush again, None when nothing is due (or the portal must not be called).
    """

    portal_id: int
    requests: int = 0
    #: commands sent (status updates)
    updates: int = 0
    #: entries Bitrix24 accepted and we deleted
    delivered: int = 0
    #: entries Bitrix24 accepted while a newer status replaced them (kept for the next batch)
    superseded: int = 0
    #: entries given up (ERROR_MESSAGE_NOT_FOUND, other permanent errors, too many attempts)
    dropped: int = 0
    #: entries kept for a later try after a per-command transient error
    retried: int = 0
    #: entries left in the portal's outbox when the flush returned
    remaining: int = 0
    stopped: str | None = None
    retry_in: float | None = None
    errors: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _Entry:
    id: int
    version: int
    code: str
    message_id: str
    status: str


@dataclass
class Step:
    """One round's plan: send these entries, wait, stop, or done."""

    kind: str  # send | wait | stop | done
    reason: str | None = None
    wait: float = 0.0
    entries: list[_Entry] = field(default_factory=list)
    domain: str = ""


def outbox_backlog(session: Session) -> dict[int, int]:
    """Entries waiting in each portal's outbox: ``{portal_id: count}`` (portals with any)."""
    rows = session.execute(
        select(OutboxEntry.portal_id, func.count()).group_by(OutboxEntry.portal_id)
    ).all()
    return {portal_id: count for portal_id, count in rows}


def flush_portal(
    service: Service,
    portal_id: int,
    client: Bitrix24Client | None = None,
    *,
    hold: bool = True,
    max_run: float = MAX_RUN,
    sleep: Callable[[float], None] = time.sleep,
) -> FlushReport:
    """Report the portal's waiting statuses to Bitrix24, as long as entries are due.

    :param client: the REST client; default a :class:`~b24sms.bitrix24.client.Bitrix24Client`.
    :param hold: wait briefly to fill partial batches (off in immediate mode, where nothing
        else can add entries while we wait).
    :param max_run: return after this many seconds with ``retry_in=0`` to free the worker.
    :returns: what was done and when to flush again (``retry_in``).
    """
    pacing = pacing_of(service)
    report = FlushReport(portal_id)
    owner = owner_id()
    acquired = acquire(service, portal_id, owner, pacing.lease_ttl)
    if acquired is None:
        report.stopped = "gone"
        return report
    if not acquired:
        report.stopped, report.retry_in = "locked", LOCKED_RETRY
        return report
    if client is None:
        from ..bitrix24.client import Bitrix24Client

        client = Bitrix24Client(service.db, portal_id, settings=service.config.bitrix24)
    started = time.monotonic()
    try:
        while True:
            if time.monotonic() - started > max_run:
                report.stopped, report.retry_in = "yield", 0.0
                break
            step = _plan(service, portal_id, owner, pacing, hold)
            if step.kind == "done":
                report.retry_in = step.wait if step.wait > 0 else None
                break
            if step.kind == "stop":
                report.stopped, report.retry_in = step.reason, None
                break
            if step.kind == "wait":
                if step.wait <= INLINE_WAIT:
                    sleep(step.wait)
                    continue
                report.stopped, report.retry_in = step.reason, step.wait
                break
            _send(service, portal_id, client, step, pacing, report)
            if report.stopped in ("inactive", "gone"):
                break
            # Other failures paused the portal in the database; the next round waits for it.
            report.stopped = None
    finally:
        report.remaining = release(service, portal_id, owner)
    if report.requests:
        log.info(
            "portal %s: flushed %d updates in %d requests (%d done, %d dropped, %d retried, "
            "%d left)%s",
            portal_id,
            report.updates,
            report.requests,
            report.delivered,
            report.dropped,
            report.retried,
            report.remaining,
            f"; stopped: {report.stopped}" if report.stopped else "",
        )
    return report


# -- one round: decide, then send ---------------------------------------------------------------


def _plan(service: Service, portal_id: int, owner: str, pacing: Pacing, hold: bool) -> Step:
    """In one transaction: may we call the portal, is a batch worth sending, is a token free;
    if so, renew the lease, spend the token and read the batch."""
    now = utcnow()
    with service.db.session() as session:
        portal = session.get(Portal, portal_id)
        if portal is None:
            return Step("stop", "gone")
        if portal.state != PortalState.ACTIVE:
            log.info(
                "portal %s (%s) is %s: its outbox waits", portal_id, portal.domain, portal.state
            )
            return Step("stop", "inactive")
        state = session.get(PortalPacing, portal_id)
        if state is None or state.lease_owner != owner:
            # Our lease expired and another flusher took over: it carries on.
            return Step("stop", "locked")
        paused = wait_before_calling(portal, now)
        if paused > 0:
            return Step("wait", "paused", paused)
        blocked = method_limits.wait_seconds(session, portal_id, STATUS_UPDATE)
        if blocked > 0:  # OPERATION_TIME_LIMIT of status.update alone (limits.md)
            return Step("wait", "method_limit", blocked)
        due = (OutboxEntry.portal_id == portal_id) & (
            OutboxEntry.not_before.is_(None) | (OutboxEntry.not_before <= now)
        )
        count, oldest, newest = session.execute(
            select(
                func.count(), func.min(OutboxEntry.created_at), func.max(OutboxEntry.created_at)
            ).where(due)
        ).one()
        if not count:
            later = session.scalar(
                select(func.min(OutboxEntry.not_before)).where(
                    OutboxEntry.portal_id == portal_id, OutboxEntry.not_before > now
                )
            )
            return Step("done", wait=(later - now).total_seconds() if later else 0.0)
        if count < BATCH_SIZE and hold and oldest is not None and newest is not None:
            # Entries are still arriving: a fuller batch later beats a thin one now.
            wait = min(
                (newest - now).total_seconds() + QUIET,
                (oldest - now).total_seconds() + MAX_HOLD,
            )
            if wait > 0:
                return Step("wait", "coalescing", wait)
        wait = take_token(state, now, pacing.rate, pacing.capacity)
        if wait > 0:
            return Step("wait", "pacing", wait)
        state.lease_until = now + seconds(pacing.lease_ttl)
        rows = session.scalars(
            select(OutboxEntry).where(due).order_by(OutboxEntry.id).limit(BATCH_SIZE)
        ).all()
        entries = [_Entry(r.id, r.version, r.code, r.message_id, r.status) for r in rows]
        return Step("send", entries=entries, domain=portal.domain)


def _send(
    service: Service,
    portal_id: int,
    client: Bitrix24Client,
    step: Step,
    pacing: Pacing,
    report: FlushReport,
) -> None:
    """Send one batch and record the answer (or the failure, in ``report.stopped``)."""
    commands: dict[str, tuple[str, dict[str, Any]]] = {
        str(e.id): (STATUS_UPDATE, {"CODE": e.code, "MESSAGE_ID": e.message_id, "STATUS": e.status})
        for e in step.entries
    }
    report.requests += 1
    report.updates += len(commands)
    try:
        result = client.batch(commands)
    except Bitrix24Error as exc:
        request_failed(service, portal_id, step.domain, exc, pacing, report)
        return
    except Exception as exc:
        log.exception("portal %s (%s): status batch raised", portal_id, step.domain)
        error = TransientError("UNEXPECTED", type(exc).__name__)
        request_failed(service, portal_id, step.domain, error, pacing, report)
        return
    record_answer(service, portal_id, step, result, pacing, report)
