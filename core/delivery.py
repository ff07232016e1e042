"""Sending messages through their gateways: attempts, retries with backoff, reports, the sweep.

Plain functions that open their own sessions; the queue's tasks are thin wrappers around them
and tests call them directly.

An attempt is two transactions with the gateway call between them. The first counts the attempt
and sets ``sending_since`` and is committed *before* the gateway is called, so a worker that
dies mid-send leaves a visible trace; :func:`sweep` re-queues such messages after
``stuck_after`` seconds, and messages whose task was lost. Delivery is therefore at least once:
a worker killed after the gateway accepted a message but before we recorded it means one more
send on the next attempt.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, contains_eager

from . import metrics, queries
from .backoff import retry_delay, retry_while_unreachable
from .event_hooks import MessageInfo, notify
from .gateway import (
    Gateway,
    GatewayError,
    OutgoingMessage,
    RetryableGatewayError,
    SendResult,
    StatusReport,
)
from .messages import StatusChange, enqueue_report, record_status
from .models import Message, OutboxEntry, Portal, PortalState, utcnow
from .queue import enqueue_or_log
from .redaction import redacted_error
from .statuses import FAILED, is_final

if TYPE_CHECKING:
    from .service import Service

log = logging.getLogger(__name__)

#: a message whose next attempt is due within this many seconds counts as due (clock rounding)
DUE_TOLERANCE = 0.5
#: messages one sweep re-queues at most (the rest wait for the next sweep)
SWEEP_LIMIT = 500
#: messages one :func:`poll_due` asks each polling gateway about at most
POLL_LIMIT = 100
#: how long a callback about an unknown external id waits for an in-flight send to record it
CALLBACK_GRACE = 2.0
#: longest error text kept on a message
MAX_ERROR_TEXT = 1000
#: the outcome of a send is recorded through a database outage for at most this share of
#: ``stuck_after`` from the attempt's start, so it is in before the sweep would re-send
RECORD_RETRY_SHARE = 0.8


@dataclass(frozen=True)
class DeliveryOutcome:
    """What one :func:`deliver` call did.

    ``action`` is ``skipped`` (nothing to do: final, not due, in flight, unknown), ``sent`` (the
    gateway accepted it), ``retry`` (failed, another attempt in ``retry_in`` seconds) or
    ``failed`` (the message is now failed).
    """

    message_pk: int
    action: str
    detail: str | None = None
    retry_in: float | None = None


@dataclass(frozen=True)
class SweepReport:
    """What one :func:`sweep` found: messages re-queued and portals whose flush it asked for."""

    requeued: tuple[int, ...] = ()
    stuck: tuple[int, ...] = ()
    flushes: tuple[int, ...] = ()


def _seconds(value: float) -> dt.timedelta:
    return dt.timedelta(seconds=value)


def _error_text(error: BaseException) -> str:
    return str(error)[:MAX_ERROR_TEXT]


def _info(message: Message) -> MessageInfo:
    return MessageInfo.from_row(message)


def _after_commit(
    service: Service, portal_id: int, changes: Sequence[tuple[StatusChange, MessageInfo]]
) -> None:
    """Tell the event hooks about committed changes and ask for the portal's outbox flush."""
    for change, info in changes:
        notify(
            service.pm,
            "b24sms_status_changed",
            message=dataclasses.replace(info, status=change.status),
            previous=change.previous,
            status=change.status,
            raw_status=change.raw_status,
            source=change.source,
        )
    if changes:
        request_flush(service, portal_id)


def request_flush(service: Service, portal_id: int) -> None:
    """Ask for a flush of the portal's outbox; a queue that is down is logged, not raised
    (the entries are committed, and the sweep asks again)."""
    enqueue_or_log(service.queue.enqueue_flush, portal_id)


def _requeue(service: Service, message_pk: int, delay: float | None = None) -> None:
    enqueue_or_log(service.queue.enqueue_send, message_pk, delay=delay)


# -- sending ------------------------------------------------------------------------------------


def _locked_with_portal(session: Session, message_pk: int) -> Message | None:
    """The message, row-locked, with its portal loaded by the same statement: every send reads
    the portal's domain and member_id, and a lazy load would cost a query of its own."""
    return session.scalars(
        select(Message)
        .join(Message.portal)
        .options(contains_eager(Message.portal))
        .where(Message.id == message_pk)
        .with_for_update(of=Message)
    ).first()


def _not_due(
    message: Message | None, message_pk: int, now: dt.datetime, stuck_after: float
) -> DeliveryOutcome | None:
    """Why this message gets no attempt now (a skipped outcome), or None when it does."""
    if message is None:
        log.warning("message %s: not found; nothing to send", message_pk)
        return DeliveryOutcome(message_pk, "skipped", "not found")
    if is_final(message.status):
        return DeliveryOutcome(message_pk, "skipped", f"already {message.status}")
    if message.next_attempt_at is None:
        # The gateway took it; only reports move it on now.
        return DeliveryOutcome(message_pk, "skipped", "handed to the gateway")
    if message.sending_since is not None and message.sending_since > now - _seconds(stuck_after):
        return DeliveryOutcome(message_pk, "skipped", "in flight")
    early = (message.next_attempt_at - now).total_seconds()
    if early > DUE_TOLERANCE:
        # A duplicate trigger; the task of the scheduled attempt (or the sweep) comes later.
        return DeliveryOutcome(message_pk, "skipped", "not due", retry_in=early)
    return None


def _unsendable(message: Message, gateway: Gateway | None, max_attempts: int) -> str | None:
    """Why this message fails without a gateway call, or None when it can be sent."""
    if message.to is None:
        return "the recipient number could not be parsed"
    if gateway is None:
        return (
            f"no gateway for provider CODE {message.code!r} (it was removed from the configuration)"
        )
    if message.attempts >= max_attempts:
        # Earlier attempts were cut short (a worker died mid-send) and used up the budget.
        return f"gave up after {message.attempts} attempts"
    return None


def _call_gateway(
    gateway: Gateway, outgoing: OutgoingMessage
) -> tuple[SendResult | None, GatewayError | None]:
    """One ``gateway.send``: its result, or the error to record (a plugin's bug is retried)."""
    started = time.perf_counter()
    result: SendResult | None = None
    error: GatewayError | None = None
    try:
        result = gateway.send(outgoing)
        if not isinstance(result, SendResult):
            raise TypeError(f"send() returned {type(result).__name__}, not SendResult")
    except GatewayError as exc:
        # Gateways echo numbers and texts in their errors: cleared before stored, logged, shown.
        error = redacted_error(exc, outgoing.to, outgoing.body)
    except Exception as exc:
        # A bug or an unforeseen failure inside the plugin: keep the traceback, retry anyway —
        # losing the message is worse than trying again.
        log.exception(
            "message %s (%s): gateway %s raised", outgoing.id, outgoing.code, gateway.name
        )
        result, error = (
            None,
            RetryableGatewayError(f"unexpected {type(exc).__name__} in the gateway"),
        )
    metrics.observe_gateway_send(outgoing.code, time.perf_counter() - started, error)
    return result, error


def deliver(service: Service, message_pk: int) -> DeliveryOutcome:
    """Make one send attempt for a message, if it is due, and record the outcome.

    Skips messages that are final, not due, already handed to the gateway, or in flight in
    another worker (``sending_since`` younger than ``stuck_after``). A message without a usable
    number, or whose CODE no longer has a gateway, fails without a gateway call.
    """
    settings = service.settings
    stuck_after = settings.stuck_after
    now = utcnow()
    failed_early: list[tuple[StatusChange, MessageInfo]] = []
    with service.db.session() as session:
        message = _locked_with_portal(session, message_pk)
        skipped = _not_due(message, message_pk, now, stuck_after)
        if skipped is not None:
            return skipped
        assert message is not None
        portal = message.portal
        portal_id, domain, code = message.portal_id, portal.domain, message.code
        gateway = service.gateways.get(message.code)
        problem = _unsendable(message, gateway, settings.max_attempts)
        if problem is not None:
            message.last_error = problem
            message.sending_since = None
            message.next_attempt_at = None
            change = record_status(session, message, FAILED, source="gateway", detail=problem)
            if change is not None:
                failed_early.append((change, _info(message)))
        else:
            assert gateway is not None and message.to is not None
            message.attempts += 1
            message.sending_since = now
            attempt = message.attempts
            outgoing = OutgoingMessage(
                id=message.id,
                message_id=message.message_id,
                code=message.code,
                member_id=portal.member_id,
                to=message.to,
                body=message.body,
                callback_url=gateway.callback_url,
                attempt=attempt,
            )
    if problem is not None:
        log.warning(
            "message %s (%s, %s): failed without sending: %s",
            message_pk,
            code,
            domain,
            problem,
        )
        _after_commit(service, portal_id, failed_early)
        return DeliveryOutcome(message_pk, "failed", problem)

    # _unsendable refused a message without a gateway: from here there is one.
    assert gateway is not None
    # Committed: from here a crash leaves sending_since behind for the sweep.
    log.info("message %s (%s, %s): attempt %d", message_pk, code, domain, attempt)
    attempt_started = time.monotonic()
    result, error = _call_gateway(gateway, outgoing)
    # Until the outcome is recorded, the sweep would take this attempt for lost and send the
    # message again: a database that is briefly unreachable must not cost a second send.
    deadline = attempt_started + RECORD_RETRY_SHARE * stuck_after
    if error is None:
        assert result is not None
        sent = result
        return _record_persistently(
            lambda: _record_sent(service, gateway, message_pk, sent, domain), message_pk, deadline
        )
    failure = error
    return _record_persistently(
        lambda: _record_failure(service, message_pk, failure, domain), message_pk, deadline
    )


def _record_persistently(
    record: Callable[[], DeliveryOutcome], message_pk: int, deadline: float
) -> DeliveryOutcome:
    """Run ``record`` (one transaction), again and again while the database cannot be reached,
    until ``time.monotonic()`` passes ``deadline``; then the error propagates (the sweep
    re-queues the attempt later)."""

    def waiting(exc: OperationalError, delay: float) -> None:
        log.warning(
            "message %s: database unavailable while recording the outcome of its send "
            "(%s); trying again in %.1fs",
            message_pk,
            _reason(exc),
            delay,
        )

    try:
        return retry_while_unreachable(record, deadline, on_retry=waiting)
    except OperationalError as exc:
        log.error(
            "message %s: the outcome of its send could not be recorded (%s); "
            "the sweep will re-queue it",
            message_pk,
            _reason(exc),
        )
        raise


def _reason(exc: OperationalError) -> str:
    return type(exc.orig).__name__ if exc.orig is not None else type(exc).__name__


def _map(gateway: Gateway, report: StatusReport | SendResult) -> str | None:
    if report.status is not None:
        return report.status
    return gateway.map_status(str(report.raw_status))


def _record_sent(
    service: Service, gateway: Gateway, message_pk: int, result: SendResult, domain: str
) -> DeliveryOutcome:
    changes: list[tuple[StatusChange, MessageInfo]] = []
    with service.db.session() as session:
        message = _locked_with_portal(session, message_pk)
        if message is None:
            return DeliveryOutcome(message_pk, "skipped", "deleted while sending")
        portal_id, code = message.portal_id, message.code
        message.sending_since = None
        message.next_attempt_at = None
        if result.external_id is not None:
            message.external_id = str(result.external_id)
        if result.raw_status is not None:
            message.raw_status = str(result.raw_status)[:64]
        reports: list[StatusReport | SendResult] = [result, *result.later]
        applied: list[StatusChange] = []
        for report in reports:
            status = _map(gateway, report)
            if status is None:
                log.warning(
                    "message %s (%s, %s): unknown gateway status %r; ignored",
                    message_pk,
                    code,
                    domain,
                    report.raw_status,
                )
                continue
            detail = report.error if isinstance(report, StatusReport) else None
            change = record_status(
                session,
                message,
                status,
                source="gateway",
                raw_status=None if report.raw_status is None else str(report.raw_status)[:64],
                detail=detail,
                report=False,
            )
            if change is not None:
                applied.append(change)
        if applied:
            # Only the newest status reaches Bitrix24 (the outbox coalesces): one outbox write
            # for a send that reported "sent" and "delivered" at once, not one per report.
            enqueue_report(session, message)
        info = _info(message)
        changes = [(change, info) for change in applied]
        status_now = message.status
    log.info(
        "message %s (%s, %s): accepted by the gateway, status %s",
        message_pk,
        code,
        domain,
        status_now,
    )
    _after_commit(service, portal_id, changes)
    return DeliveryOutcome(message_pk, "sent", status_now)


def _record_failure(
    service: Service, message_pk: int, error: GatewayError, domain: str
) -> DeliveryOutcome:
    settings = service.settings
    max_attempts = settings.max_attempts
    changes: list[tuple[StatusChange, MessageInfo]] = []
    delay: float | None = None
    with service.db.session() as session:
        # With its portal, as the send loaded it: the snapshots below read the portal's domain.
        message = _locked_with_portal(session, message_pk)
        if message is None:
            return DeliveryOutcome(message_pk, "skipped", "deleted while sending")
        portal_id, code, attempts = message.portal_id, message.code, message.attempts
        message.sending_since = None
        message.last_error = _error_text(error)
        will_retry = error.retryable and attempts < max_attempts and not is_final(message.status)
        if will_retry:
            delay = retry_delay(
                attempts,
                settings.retry_base_delay,
                settings.retry_max_delay,
                error.retry_after,
            )
            message.next_attempt_at = utcnow() + _seconds(delay)
        else:
            message.next_attempt_at = None
            change = record_status(
                session, message, FAILED, source="gateway", detail=_error_text(error)
            )
            if change is not None:
                changes.append((change, _info(message)))
        info = changes[0][1] if changes else _info(message)
    if will_retry:
        log.warning(
            "message %s (%s, %s): attempt %d failed: %s; retry in %.1fs",
            message_pk,
            code,
            domain,
            attempts,
            error,
            delay,
        )
    else:
        kind = "permanent error" if not error.retryable else f"{attempts} attempts"
        log.warning("message %s (%s, %s): failed (%s): %s", message_pk, code, domain, kind, error)
    notify(service.pm, "b24sms_send_failed", message=info, error=error, will_retry=will_retry)
    _after_commit(service, portal_id, changes)
    if will_retry:
        _requeue(service, message_pk, delay)
        return DeliveryOutcome(message_pk, "retry", _error_text(error), retry_in=delay)
    return DeliveryOutcome(message_pk, "failed", _error_text(error))


# -- reports from gateways ----------------------------------------------------------------------


def apply_reports(
    service: Service,
    code: str,
    reports: Iterable[StatusReport],
    source: str = "callback",
    *,
    grace: float = CALLBACK_GRACE,
) -> int:
    """Record delivery reports of the gateway behind ``code``, matched by external id.

    Each report is mapped with the gateway's status map (an unknown word is logged and
    ignored) and recorded with :func:`~b24sms.messages.record_status`; applied changes reach the
    event hooks after the commit and the affected portals' outboxes are flushed. A report about
    an unknown external id is logged and ignored — after waiting up to ``grace`` seconds when a
    send of this CODE is in flight, because a fast gateway's callback can overtake the answer
    to our send request, before we stored the external id.

    :returns: the number of reports that matched a message (applied or only recorded).
    """
    gateway = service.gateways.get(code)
    usable: list[tuple[StatusReport, str]] = []
    for report in reports:
        if not report.external_id:
            log.warning("report from %s without an external id; ignored", code)
            continue
        status = _map(gateway, report) if gateway is not None else report.status
        if status is None:
            log.warning(
                "report from %s about %s: unknown status %r; ignored",
                code,
                report.external_id,
                report.raw_status,
            )
            continue
        usable.append((report, status))
    matched = 0
    deadline = time.monotonic() + grace
    while usable:
        found, usable, in_flight = _apply_once(service, code, usable, source)
        matched += found
        if not usable or not in_flight or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    for report, _ in usable:
        log.warning(
            "report from %s about unknown external id %s; ignored", code, report.external_id
        )
    return matched


def _apply_once(
    service: Service, code: str, reports: list[tuple[StatusReport, str]], source: str
) -> tuple[int, list[tuple[StatusReport, str]], bool]:
    """One transaction over ``reports``: (matched, the unmatched ones, a send is in flight)."""
    matched = 0
    unmatched: list[tuple[StatusReport, str]] = []
    by_portal: dict[int, list[tuple[StatusChange, MessageInfo]]] = {}
    with service.db.session() as session:
        for report, status in reports:
            messages = session.scalars(queries.by_external_id(code, str(report.external_id))).all()
            if not messages:
                unmatched.append((report, status))
                continue
            for message in messages:
                matched += 1
                raw = None if report.raw_status is None else str(report.raw_status)[:64]
                change = record_status(
                    session, message, status, source=source, raw_status=raw, detail=report.error
                )
                if report.error and change is not None and status == FAILED:
                    message.last_error = str(report.error)[:MAX_ERROR_TEXT]
                if change is not None:
                    by_portal.setdefault(message.portal_id, []).append((change, _info(message)))
        in_flight = bool(unmatched) and session.scalar(queries.in_flight(code)) is not None
    for portal_id, changes in by_portal.items():
        _after_commit(service, portal_id, changes)
    return matched, unmatched, in_flight


# -- the sweep ----------------------------------------------------------------------------------


def sweep(service: Service) -> SweepReport:
    """Find work a lost task or a dead worker left behind, and trigger it again.

    - messages not final whose attempt has been due for ``stuck_after`` seconds with no worker
      on it (the task was lost): re-queued;
    - messages whose ``sending_since`` is older than ``stuck_after`` (the worker died
      mid-send): released and re-queued; the cut-short attempt still counts;
    - portals with a due outbox backlog that are active and not paused: flushed (paused ones
      get a flush scheduled for the end of the pause).

    Re-queued messages get ``next_attempt_at = now``, so the next sweep leaves them alone for
    another ``stuck_after`` seconds; a duplicate task is harmless (:func:`deliver` skips).
    """
    stuck_after = service.settings.stuck_after
    now = utcnow()
    cutoff = now - _seconds(stuck_after)
    with service.db.session() as session:
        stuck = session.scalars(queries.stuck_messages(cutoff, SWEEP_LIMIT)).all()
        for message in stuck:
            log.warning(
                "message %s (%s): attempt %d stuck since %s (worker lost); re-queued",
                message.id,
                message.code,
                message.attempts,
                message.sending_since,
            )
            message.last_error = f"attempt {message.attempts} was cut short (worker lost)"
            message.sending_since = None
            message.next_attempt_at = now
        lost = session.scalars(queries.lost_messages(cutoff, SWEEP_LIMIT)).all()
        for message in lost:
            message.next_attempt_at = now
        stuck_ids = tuple(m.id for m in stuck)
        lost_ids = tuple(m.id for m in lost if m.id not in stuck_ids)
        if lost_ids:
            log.info("sweep: %d messages due with no task; re-queued", len(lost_ids))
        backlog = session.execute(
            select(Portal.id, Portal.paused_until).where(
                Portal.state == PortalState.ACTIVE,
                Portal.id.in_(
                    select(OutboxEntry.portal_id).where(
                        (OutboxEntry.not_before.is_(None)) | (OutboxEntry.not_before <= now)
                    )
                ),
            )
        ).all()
    for message_pk in stuck_ids + lost_ids:
        _requeue(service, message_pk)
    flushes: list[int] = []
    for portal_id, paused_until in backlog:
        delay = None
        if paused_until is not None and paused_until > now:
            delay = (paused_until - now).total_seconds()
        if enqueue_or_log(service.queue.enqueue_flush, portal_id, delay=delay):
            flushes.append(portal_id)
    return SweepReport(requeued=lost_ids, stuck=stuck_ids, flushes=tuple(flushes))


def poll_due(service: Service) -> int:
    """Ask gateways that have a ``poll_interval`` about their messages not yet final.

    Each message is polled at most once per interval (its ``updated_at`` marks the last poll).
    :returns: the number of reports that matched a message.
    """
    matched = 0
    for code, gateway in service.gateways.items():
        interval = gateway.poll_interval
        if not interval:
            continue
        now = utcnow()
        with service.db.session() as session:
            rows = session.scalars(
                queries.poll_candidates(code, now - _seconds(float(interval)), POLL_LIMIT)
            ).all()
            targets = [(m.id, str(m.external_id)) for m in rows]
            for message in rows:
                message.updated_at = now
        reports: list[StatusReport] = []
        for message_pk, external_id in targets:
            try:
                report = gateway.poll(external_id)
            except GatewayError as exc:
                log.warning("poll of message %s (%s) failed: %s", message_pk, code, exc)
                continue
            except Exception:
                log.exception("poll of message %s (%s) raised", message_pk, code)
                continue
            if report is not None:
                if report.external_id is None:
                    report = dataclasses.replace(report, external_id=external_id)
                reports.append(report)
        if reports:
            matched += apply_reports(service, code, reports, source="poll", grace=0)
    return matched


__all__ = [
    "DeliveryOutcome",
    "SweepReport",
    "apply_reports",
    "deliver",
    "poll_due",
    "request_flush",
    "retry_delay",
    "sweep",
]
