"""The error policy of status batches: what a failed request or a refused command does.

- a failed request pauses the portal: ``QUERY_LIMIT_EXCEEDED`` briefly (and the bucket is
  believed full), ``OPERATION_TIME_LIMIT`` until ``operating_reset_at``, transient errors with
  backoff, a permanent verdict on the request for at least ``PERMANENT_PAUSE``; a portal whose
  tokens are dead is not called any more (its entries wait for a re-install); one that
  Bitrix24 blocked (``OVERLOAD_LIMIT``, ``PORTAL_DELETED``) waits out the pause the client set;
  an OAuth refusal of our app's config (``invalid_client``…) is retried with backoff;
- per-command answers, one by one: an entry is deleted only when the version it reported is
  still the entry's version (a newer status that arrived meanwhile stays);
  ``ERROR_MESSAGE_NOT_FOUND`` and other permanent errors are dropped and logged, transient ones
  retried with backoff until ``max_attempts``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import delete

from ..backoff import retry_delay
from ..bitrix24.errors import (
    Bitrix24Error,
    OperationTimeLimit,
    PortalBlocked,
    RateLimited,
    TokensRevoked,
)
from ..models import OutboxEntry, Portal, PortalPacing, utcnow
from .pacing import Pacing, seconds

if TYPE_CHECKING:
    from sqlalchemy import CursorResult

    from ..bitrix24.client import BatchResult
    from ..service import Service
    from .flush import FlushReport, Step

# One logger for the outbox's modules: the log lines operators know say b24sms.outbox.
log = logging.getLogger(__package__)

#: a permanent answer to the batch request itself (the app lost access…) pauses at least this
PERMANENT_PAUSE = 60.0


def request_failed(
    service: Service,
    portal_id: int,
    domain: str,
    exc: Bitrix24Error,
    pacing: Pacing,
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
            portal.paused_until = now + seconds(pause)
            report.stopped = "rate_limited"
            log.warning(
                "portal %s (%s): QUERY_LIMIT_EXCEEDED; pausing %.1fs", portal_id, domain, pause
            )
            return
        if isinstance(exc, OperationTimeLimit):
            portal.paused_until = max(exc.reset_at, now + seconds(0.1))
            pause = (portal.paused_until - now).total_seconds()
            report.stopped = "operation_time_limit"
            log.warning(
                "portal %s (%s): OPERATION_TIME_LIMIT; paused until %s",
                portal_id,
                domain,
                portal.paused_until,
            )
            return
        if isinstance(exc, PortalBlocked):
            # The client paused the portal (in every process); wait that out, keep the entries.
            if portal.paused_until is None or portal.paused_until <= now:
                portal.paused_until = now + seconds(PERMANENT_PAUSE)
            report.stopped = "blocked"
            log.warning(
                "portal %s (%s): %s; its outbox waits until %s",
                portal_id,
                domain,
                exc,
                portal.paused_until,
            )
            return
        if isinstance(exc, TokensRevoked) or exc.action == "reinstall":
            # The client (or the token refresh) marked the portal already — unless a re-install
            # stored fresh tokens meanwhile, which a second mark here would undo.
            report.stopped = "inactive"
            log.warning(
                "portal %s (%s): %s; its outbox waits for a re-install", portal_id, domain, exc
            )
            return
        state.failures = (state.failures or 0) + 1
        pause = retry_delay(state.failures, max(pacing.retry_base, 0.1), pacing.retry_cap)
        if exc.action == "configure":
            # Our client_id / client_secret or scopes (logged loudly by the OAuth exchange):
            # retried with backoff until the operator fixes the config; never faster than
            # PERMANENT_PAUSE, or every portal would hammer the OAuth server meanwhile.
            pause = max(pause, PERMANENT_PAUSE)
            report.stopped = "config"
            log.error(
                "portal %s (%s): %s; retry in %.0fs once the config is fixed",
                portal_id,
                domain,
                exc,
                pause,
            )
        elif exc.action == "give_up":
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
        portal.paused_until = now + seconds(pause)
        portal.last_error = str(exc)


def record_answer(
    service: Service,
    portal_id: int,
    step: Step,
    result: BatchResult,
    pacing: Pacing,
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
                gone = cast(
                    "CursorResult[Any]",
                    session.execute(
                        delete(OutboxEntry)
                        .where(same_version)
                        .execution_options(synchronize_session=False)
                    ),
                ).rowcount
                if gone:
                    report.delivered += 1
                else:
                    report.superseded += 1
                continue
            error = result.errors.get(key)
            code = error.code if error is not None else "SKIPPED"
            report.errors[code] = report.errors.get(code, 0) + 1
            if error is not None and error.action not in (
                "retry",
                "wait",
                "refresh",
                "pause",
                "configure",
            ):
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
            row.not_before = now + seconds(delay)
            report.retried += 1
