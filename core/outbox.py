"""Reporting statuses to Bitrix24: each portal's outbox, flushed in coalesced, paced batches.

:func:`b24sms.messages.record_status` keeps one outbox row per message holding its newest
status (coalescing). :func:`flush_portal` sends those rows as ``batch`` requests of up to 50
``messageservice.message.status.update`` commands:

- **one flusher per portal** across all processes and machines: a lease row in
  ``portal_pacing`` (database, because SQLite and PostgreSQL deployments have no shared lock
  service and a lease with an expiry survives a killed worker);
- **paced** by a token bucket mirroring the portal's leaky bucket (``requests_per_second``,
  ``burst``), its state in the same row so every process spends from one bucket. A slice of the
  burst is left for other callers (provider sync on install);
- **coalesced**: a partial batch waits briefly while entries keep arriving (``QUIET`` seconds
  without a new one, at most ``MAX_HOLD`` for the oldest), so a burst fills batches of 50;
- **careful with answers**: an entry is deleted only when the version it reported is still the
  entry's version (a newer status that arrived meanwhile stays); per-command errors are handled
  one by one (``ERROR_MESSAGE_NOT_FOUND`` and other permanent ones dropped and logged,
  transient ones retried with backoff); a failed request pauses the portal
  (``QUERY_LIMIT_EXCEEDED`` briefly, ``OPERATION_TIME_LIMIT`` until ``operating_reset_at``,
  transient errors with backoff), and a portal whose tokens are dead or that Bitrix24 blocked
  is not called any more — its entries wait for a re-install.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from .backoff import retry_delay, retry_while_unreachable
from .bitrix24 import method_limits
from .bitrix24.errors import (
    Bitrix24Error,
    OperationTimeLimit,
    PortalBlocked,
    RateLimited,
    TokensRevoked,
    TransientError,
)
from .models import OutboxEntry, Portal, PortalPacing, PortalState, utcnow

if TYPE_CHECKING:
    from .bitrix24.client import BatchResult, Bitrix24Client
    from .service import Service

log = logging.getLogger(__name__)

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
#: seconds a lease outlives its last renewal beyond the REST timeout (a killed flusher's lease
#: frees itself after this)
LEASE_MARGIN = 30.0
#: the part of the portal's burst we leave to other callers (provider sync, installs)
BUCKET_RESERVE = 0.1
#: a flush that found the lease taken tries again after this many seconds
LOCKED_RETRY = 1.0
#: a permanent answer to the batch request itself (the app lost access…) pauses at least this
PERMANENT_PAUSE = 60.0
#: seconds a flusher keeps trying to give its lease back while the database is unreachable
RELEASE_PERSISTENCE = 10.0


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
class _Step:
    kind: str  # send | wait | stop | done
    reason: str | None = None
    wait: float = 0.0
    entries: list[_Entry] = field(default_factory=list)
    domain: str = ""


@dataclass(frozen=True)
class _Pacing:
    rate: float
    capacity: float
    lease_ttl: float
    max_attempts: int
    retry_base: float
    retry_cap: float


def _pacing(service: Service) -> _Pacing:
    b24 = service.config["bitrix24"]
    burst = float(b24["burst"])
    return _Pacing(
        rate=float(b24["requests_per_second"]),
        capacity=max(1.0, burst - max(1.0, round(burst * BUCKET_RESERVE))),
        lease_ttl=float(b24.get("timeout", 30.0)) + LEASE_MARGIN,
        max_attempts=int(service.settings["max_attempts"]),
        retry_base=float(service.settings["retry_base_delay"]),
        retry_cap=float(service.settings["retry_max_delay"]),
    )


def _seconds(value: float) -> dt.timedelta:
    return dt.timedelta(seconds=value)


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
    pacing = _pacing(service)
    report = FlushReport(portal_id)
    owner = _owner_id()
    acquired = _acquire(service, portal_id, owner, pacing.lease_ttl)
    if acquired is None:
        report.stopped = "gone"
        return report
    if not acquired:
        report.stopped, report.retry_in = "locked", LOCKED_RETRY
        return report
    if client is None:
        from .bitrix24.client import Bitrix24Client

        client = Bitrix24Client(service.db, portal_id, settings=service.config["bitrix24"])
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
        report.remaining = _release(service, portal_id, owner)
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


# -- the lease ----------------------------------------------------------------------------------


def _owner_id() -> str:
    host = socket.gethostname()[:64].replace(":", "_")
    return f"{host}:{os.getpid()}:{threading.get_ident()}:{uuid.uuid4().hex[:8]}"


def _owner_dead(owner: str) -> bool:
    """True when the lease holder was a process on this machine that no longer exists."""
    parts = owner.split(":")
    try:
        host, pid = parts[0], int(parts[1])
    except (IndexError, ValueError):
        return False
    if host != socket.gethostname()[:64].replace(":", "_") or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _acquire(service: Service, portal_id: int, owner: str, ttl: float) -> bool | None:
    """Take the portal's flush lease: True, False (held by a live flusher), None (no portal)."""
    now = utcnow()
    with service.db.session() as session:
        # The portal row lock serialises creating the pacing row on PostgreSQL; on SQLite every
        # transaction is BEGIN IMMEDIATE, which serialises all of it anyway.
        portal = session.get(Portal, portal_id, with_for_update=True)
        if portal is None:
            return None
        state = session.get(PortalPacing, portal_id, with_for_update=True)
        if state is None:
            state = PortalPacing(portal_id=portal_id, bucket_level=0.0, failures=0)
            session.add(state)
        elif (
            state.lease_owner
            and state.lease_owner != owner
            and state.lease_until is not None
            and state.lease_until > now
            and not _owner_dead(state.lease_owner)
        ):
            return False
        elif state.lease_owner and state.lease_owner != owner:
            log.warning(
                "portal %s: taking over the flush lease of %s", portal_id, state.lease_owner
            )
        state.lease_owner = owner
        state.lease_until = now + _seconds(ttl)
        return True


def _release(service: Service, portal_id: int, owner: str) -> int:
    """Give the lease back (if still ours); returns the entries left in the outbox.

    While the database cannot be reached this is tried again for up to ``RELEASE_PERSISTENCE``
    seconds: a lease left behind by a live process holds every other flusher of the portal off
    until it expires (``timeout + LEASE_MARGIN``), however short the outage was.
    """

    def release() -> int:
        with service.db.session() as session:
            state = session.get(PortalPacing, portal_id)
            if state is not None and state.lease_owner == owner:
                state.lease_owner = None
                state.lease_until = None
            return int(
                session.scalar(
                    select(func.count())
                    .select_from(OutboxEntry)
                    .where(OutboxEntry.portal_id == portal_id)
                )
                or 0
            )

    try:
        return retry_while_unreachable(release, time.monotonic() + RELEASE_PERSISTENCE)
    except Exception:
        # The lease expires by itself; the flush's outcome is already committed.
        log.exception("portal %s: could not release the flush lease", portal_id)
        return 0


# -- one round: decide, then send ---------------------------------------------------------------


def _take_token(state: PortalPacing, now: dt.datetime, rate: float, capacity: float) -> float:
    """Spend one request from the bucket: 0 when taken, else the seconds until one is free."""
    level = float(state.bucket_level or 0.0)
    if state.bucket_at is not None:
        elapsed = max(0.0, (now - state.bucket_at).total_seconds())
        level = max(0.0, level - elapsed * rate)
    if level + 1.0 <= capacity + 1e-9:
        state.bucket_level = level + 1.0
        state.bucket_at = now
        return 0.0
    return (level + 1.0 - capacity) / rate


def _plan(service: Service, portal_id: int, owner: str, pacing: _Pacing, hold: bool) -> _Step:
    """In one transaction: may we call the portal, is a batch worth sending, is a token free;
    if so, renew the lease, spend the token and read the batch."""
    now = utcnow()
    with service.db.session() as session:
        portal = session.get(Portal, portal_id)
        if portal is None:
            return _Step("stop", "gone")
        if portal.state != PortalState.ACTIVE:
            log.info(
                "portal %s (%s) is %s: its outbox waits", portal_id, portal.domain, portal.state
            )
            return _Step("stop", "inactive")
        state = session.get(PortalPacing, portal_id)
        if state is None or state.lease_owner != owner:
            # Our lease expired and another flusher took over: it carries on.
            return _Step("stop", "locked")
        if portal.paused_until is not None and portal.paused_until > now:
            return _Step("wait", "paused", (portal.paused_until - now).total_seconds())
        blocked = method_limits.wait_seconds(session, portal_id, STATUS_UPDATE)
        if blocked > 0:  # OPERATION_TIME_LIMIT of status.update alone (limits.md)
            return _Step("wait", "method_limit", blocked)
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
            return _Step("done", wait=(later - now).total_seconds() if later else 0.0)
        if count < BATCH_SIZE and hold and oldest is not None and newest is not None:
            # Entries are still arriving: a fuller batch later beats a thin one now.
            wait = min(
                (newest - now).total_seconds() + QUIET,
                (oldest - now).total_seconds() + MAX_HOLD,
            )
            if wait > 0:
                return _Step("wait", "coalescing", wait)
        wait = _take_token(state, now, pacing.rate, pacing.capacity)
        if wait > 0:
            return _Step("wait", "pacing", wait)
        state.lease_until = now + _seconds(pacing.lease_ttl)
        rows = session.scalars(
            select(OutboxEntry).where(due).order_by(OutboxEntry.id).limit(BATCH_SIZE)
        ).all()
        entries = [_Entry(r.id, r.version, r.code, r.message_id, r.status) for r in rows]
        return _Step("send", entries=entries, domain=portal.domain)


def _send(
    service: Service,
    portal_id: int,
    client: Bitrix24Client,
    step: _Step,
    pacing: _Pacing,
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
        _request_failed(service, portal_id, step.domain, exc, pacing, report)
        return
    except Exception as exc:
        log.exception("portal %s (%s): status batch raised", portal_id, step.domain)
        error = TransientError("UNEXPECTED", type(exc).__name__)
        _request_failed(service, portal_id, step.domain, error, pacing, report)
        return
    _record_answer(service, portal_id, step, result, pacing, report)


def _request_failed(
    service: Service,
    portal_id: int,
    domain: str,
    exc: Bitrix24Error,
    pacing: _Pacing,
    report: FlushReport,
) -> None:
    """The batch request as a whole failed: pause or stop the portal; the entries all wait."""
    now = utcnow()
    report.errors[exc.code] = report.errors.get(exc.code, 0) + 1
    with service.db.session() as session:
        portal = session.get(Portal, portal_id)
        state = session.get(PortalPacing, portal_id)
        if portal is None or state is None:
            report.stopped = "gone"
            return
        if isinstance(exc, RateLimited):
            # Someone else shares the portal's bucket (other apps on our IP): believe it full.
            state.bucket_level = pacing.capacity
            state.bucket_at = now
            pause = exc.retry_after or 1.0
            portal.paused_until = now + _seconds(pause)
            report.stopped = "rate_limited"
            log.warning(
                "portal %s (%s): QUERY_LIMIT_EXCEEDED; pausing %.1fs", portal_id, domain, pause
            )
            return
        if isinstance(exc, OperationTimeLimit):
            portal.paused_until = max(exc.reset_at, now + _seconds(0.1))
            pause = (portal.paused_until - now).total_seconds()
            report.stopped = "operation_time_limit"
            log.warning(
                "portal %s (%s): OPERATION_TIME_LIMIT; paused until %s",
                portal_id,
                domain,
                portal.paused_until,
            )
            return
        if isinstance(exc, TokensRevoked | PortalBlocked) or exc.action in ("reinstall", "stop"):
            # The client (or the token refresh) marked the portal already — unless a re-install
            # stored fresh tokens meanwhile, which a second mark here would undo.
            report.stopped = "inactive"
            log.warning(
                "portal %s (%s): %s; its outbox waits for a re-install", portal_id, domain, exc
            )
            return
        state.failures = (state.failures or 0) + 1
        pause = retry_delay(state.failures, max(pacing.retry_base, 0.1), pacing.retry_cap)
        if exc.action == "give_up":
            # A verdict on the batch request itself (access denied…): nothing we retry soon will
            # change it, but the statuses are worth keeping until an operator fixes it.
            pause = max(pause, min(PERMANENT_PAUSE, pacing.retry_cap))
            report.stopped = "error"
            log.error(
                "portal %s (%s): status batch refused: %s; pausing %.0fs",
                portal_id,
                domain,
                exc,
                pause,
            )
        else:
            report.stopped = "transient"
            log.warning(
                "portal %s (%s): status batch failed: %s; retry in %.1fs",
                portal_id,
                domain,
                exc,
                pause,
            )
        portal.paused_until = now + _seconds(pause)
        portal.last_error = str(exc)


def _record_answer(
    service: Service,
    portal_id: int,
    step: _Step,
    result: BatchResult,
    pacing: _Pacing,
    report: FlushReport,
) -> None:
    """Apply a batch's per-command answers to the entries it reported."""
    now = utcnow()
    with service.db.session() as session:
        state = session.get(PortalPacing, portal_id)
        if state is not None and state.failures:
            state.failures = 0
            portal = session.get(Portal, portal_id)
            if portal is not None:
                portal.last_error = None
        for entry in step.entries:
            key = str(entry.id)
            same_version = (OutboxEntry.id == entry.id) & (OutboxEntry.version == entry.version)
            if key in result.results:
                gone = session.execute(
                    delete(OutboxEntry)
                    .where(same_version)
                    .execution_options(synchronize_session=False)
                ).rowcount
                if gone:
                    report.delivered += 1
                else:
                    report.superseded += 1
                continue
            error = result.errors.get(key)
            code = error.code if error is not None else "SKIPPED"
            report.errors[code] = report.errors.get(code, 0) + 1
            if error is not None and error.action not in ("retry", "wait", "refresh"):
                log.warning(
                    "portal %s (%s): status %s of message %s (%s) refused: %s; dropped",
                    portal_id,
                    step.domain,
                    entry.status,
                    entry.message_id,
                    entry.code,
                    error,
                )
                session.execute(
                    delete(OutboxEntry)
                    .where(same_version)
                    .execution_options(synchronize_session=False)
                )
                report.dropped += 1
                continue
            row = session.get(OutboxEntry, entry.id)
            if row is None or row.version != entry.version:
                continue  # replaced by a newer status meanwhile: that one starts afresh
            row.attempts = (row.attempts or 0) + 1
            row.last_error = str(error) if error is not None else "not run by the batch"
            if row.attempts >= pacing.max_attempts:
                log.error(
                    "portal %s (%s): status %s of message %s (%s) failed %d times (%s); dropped",
                    portal_id,
                    step.domain,
                    entry.status,
                    entry.message_id,
                    entry.code,
                    row.attempts,
                    row.last_error,
                )
                session.delete(row)
                report.dropped += 1
                continue
            delay = retry_delay(
                row.attempts,
                max(pacing.retry_base, 0.1),
                pacing.retry_cap,
                error.retry_after if error is not None else None,
            )
            row.not_before = now + _seconds(delay)
            report.retried += 1
