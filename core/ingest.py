"""Taking messages in: every HANDLER call's message is committed before the call is answered.

Bitrix24 never retries a HANDLER call, so a message is stored durably before we say 200. One
transaction per call would make the commit (and the queue write after it) the cost of every
call; instead calls that arrive together share one (:mod:`b24sms.group_commit`): portals looked
up in one query, messages in one multi-row ``INSERT``, one trigger on the queue for the batch,
so the database and queue are asked once per batch instead of once per message.

Each caller gets its own answer: ``accepted``, ``duplicate``, or its own error (an unknown
portal is :class:`UnknownPortal` for that call only, which the web layer answers 401). When a
batch cannot be stored, each of its messages is tried again alone before anyone is told it
failed, so one message the database refuses never fails the calls it happened to share a
transaction with; a database that is down fails the batch at once (each call answers 503 and
nothing is stored).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import phonenumbers
from sqlalchemy import bindparam, select
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from . import metrics
from .event_hooks import MessageInfo, notify
from .group_commit import GroupCommit
from .messages import (
    StatusChange,
    insert_message_rows,
    message_row,
    record_status,
)
from .models import Message, PaymentState, Portal, PortalState, utcnow
from .portals import tokens_match
from .queue import enqueue_or_log
from .statuses import FAILED, QUEUED

if TYPE_CHECKING:
    from .service import Service

log = logging.getLogger(__name__)


class Refused(Exception):
    """A message this portal may not store; the message says why (the web layer answers 401)."""


class UnknownPortal(Refused):
    """No installed portal has this ``member_id``."""


class WrongApplicationToken(Refused):
    """The call's ``auth[application_token]`` is not the portal's."""


class RetiredHandlerKey(Refused):
    """The call's HANDLER key is of a version the portal no longer accepts (rotated)."""


@dataclass(frozen=True)
class Accepted:
    """What :func:`accept_message` did: ``accepted`` (stored, handed to delivery) or
    ``duplicate`` (this portal's message_id is stored already; ``id`` None when it raced in
    through a concurrent request)."""

    result: str
    id: int | None = None
    status: str | None = None

    def answer(self) -> dict[str, Any]:
        """The HANDLER's JSON answer."""
        body: dict[str, Any] = {"result": self.result}
        if self.id is not None:
            body["id"] = self.id
        if self.status is not None:
            body["status"] = self.status
        return body


@dataclass(eq=False)
class Submission:
    """One message on its way in, and what became of it."""

    member_id: str
    code: str
    data: Mapping[str, Any]
    auth: Mapping[str, Any]
    report: bool
    to: str | None
    #: the HANDLER key version the call proved (None: not a HANDLER call, nothing to check)
    key_version: int | None = None
    outcome: Accepted | None = None
    error: BaseException | None = None
    # Filled while the batch is stored; reset when it is tried again alone.
    portal_id: int | None = None
    info: MessageInfo | None = None
    failed: StatusChange | None = field(default=None, repr=False)

    def reset(self) -> None:
        self.outcome = self.error = self.info = self.failed = None
        self.portal_id = None


def normalise_number(raw: str, region: str) -> str | None:
    """E.164 for a number as typed in the CRM, or None when it is not a possible number."""
    try:
        number = phonenumbers.parse(raw, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_possible_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def accept_message(
    svc: Service,
    member_id: str,
    code: str,
    data: Mapping[str, Any],
    *,
    auth: Mapping[str, Any] | None = None,
    report: bool = True,
    key_version: int | None = None,
) -> Accepted:
    """Store a message of portal ``member_id`` for provider ``code`` and hand it to delivery.

    The one path of every message: the HANDLER's, and the app page's test messages. The
    message is committed before this returns (Bitrix24 never retries a HANDLER call), then
    queued for sending, and ``b24sms_message_stored`` is called.

    :param data: the HANDLER fields as :func:`load_handler_call` loads them (``message_id``,
        ``message_to``, ``message_body``, ``module_id``, context fields).
    :param auth: the call's ``auth[…]``; when it holds ``application_token``, that must be the
        portal's.
    :param report: whether a failure decided here (an unusable number) goes to the portal's
        outbox; False for messages Bitrix24 does not know (app-page tests).
    :param key_version: the HANDLER key version the call's key proved; it must be one the
        portal still accepts.
    :raises UnknownPortal: the portal is not installed.
    :raises WrongApplicationToken: the call's application_token is not the portal's.
    :raises RetiredHandlerKey: the call's key was retired by a rotation.
    """
    submission = Submission(
        member_id=member_id,
        code=code,
        data=data,
        auth=auth or {},
        report=report,
        to=normalise_number(data["message_to"], svc.settings.default_region),
        key_version=key_version,
    )
    svc.ingest.submit(submission)
    if submission.error is not None:
        raise submission.error
    assert submission.outcome is not None
    return submission.outcome


class Ingest:
    """The service's way in for messages: a :class:`GroupCommit` over :func:`store_batch`."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self._group = GroupCommit(self._run)

    def submit(self, submission: Submission) -> None:
        self._group.submit(submission)

    def _run(self, batch: Sequence[Submission]) -> None:
        metrics.INGEST_BATCH.observe(len(batch))
        store_batch(self.service, batch)


def _context(data: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("bindings", "workflow_id", "document_id", "document_type", "ts")
    return {k: data[k] for k in keys if data.get(k) is not None}


#: built once: every batch looks its portals up
#: (Core, not ORM, selects: a tenth of the overhead per execution)
_portals = Portal.__table__.c
_PORTAL_COLUMNS = select(
    _portals.id,
    _portals.member_id,
    _portals.domain,
    _portals.state,
    _portals.application_token,
    _portals.payment_state,
    _portals.handler_key_oldest,
    _portals.handler_key_version,
)
_PORTAL = _PORTAL_COLUMNS.where(_portals.member_id == bindparam("member_id"))
_PORTALS = _PORTAL_COLUMNS.where(_portals.member_id.in_(bindparam("member_ids", expanding=True)))
_messages = Message.__table__.c
_EXISTING = select(_messages.id).where(
    _messages.portal_id == bindparam("portal_id"), _messages.message_id == bindparam("message_id")
)


def store_batch(svc: Service, batch: Sequence[Submission]) -> None:
    """Store a batch of messages in one transaction, then tell hooks and queue about them.

    Outcomes go on the submissions. When the transaction fails for a reason other than an
    unreachable or locked database, each message is stored again alone.
    """
    try:
        _store(svc, batch)
    except DBAPIError as exc:
        if len(batch) == 1 or _unavailable(exc):
            raise
        log.warning(
            "a batch of %d messages could not be stored (%s); storing each alone",
            len(batch),
            type(exc.orig).__name__,
        )
        for submission in batch:
            submission.reset()
            try:
                _store(svc, [submission])
            except Exception as alone:  # noqa: BLE001 - this caller's error, not the others'
                submission.reset()
                submission.error = alone
    _after_commit(svc, batch)


def _unavailable(exc: DBAPIError) -> bool:
    """An error that storing message by message would only repeat, slower."""
    return bool(exc.connection_invalidated) or isinstance(exc, OperationalError)


def _store(svc: Service, batch: Sequence[Submission]) -> None:
    now = utcnow()
    # A Core connection, not an ORM session: a batch needs none (but for unusable numbers).
    with svc.db.connection() as conn:
        member_ids = {s.member_id for s in batch}
        if len(member_ids) == 1:
            # The usual batch (one portal's burst): a statement with a fixed text.
            found = conn.execute(_PORTAL, {"member_id": next(iter(member_ids))})
        else:
            found = conn.execute(_PORTALS, {"member_ids": sorted(member_ids)})
        portals = {row.member_id: row for row in found}
        storing: list[Submission] = []
        for submission in batch:
            portal = portals.get(submission.member_id)
            submission.error = _refusal(portal, submission)
            if submission.error is not None:
                continue
            assert portal is not None  # _refusal refuses a portal we do not know
            submission.portal_id = portal.id
            storing.append(submission)
        if not storing:
            return
        rows = [
            message_row(
                portal_id=_portal_id(s),
                code=s.code,
                message_id=s.data["message_id"],
                to_raw=s.data["message_to"],
                to=s.to,
                body=s.data["message_body"],
                module_id=s.data.get("module_id"),
                context=_context(s.data),
                now=now,
            )
            for s in storing
        ]
        stored = insert_message_rows(conn, rows, now=now)
        for submission in storing:
            portal = portals[submission.member_id]
            key = (_portal_id(submission), submission.data["message_id"])
            message_pk = stored.pop(key, None)
            if message_pk is None:
                # Stored before, by a call that raced us to it, or twice in this batch.
                submission.outcome = Accepted(
                    "duplicate",
                    conn.scalar(
                        _EXISTING,
                        {"portal_id": submission.portal_id, "message_id": key[1]},
                    ),
                )
                continue
            data = submission.data
            refused = portal.payment_state == PaymentState.PAYMENT_REQUIRED
            if submission.to is None or refused:
                # Bitrix24 refuses the app (PAYMENT_REQUIRED): failed at once, with the reason,
                # rather than sent and retried. PAYMENT_EXPIRED alone is no refusal: the app
                # keeps working through a grace period (api-reference/common/system/app-info.md).
                with Session(conn) as session:
                    _fail_at_once(
                        session, submission, message_pk, portal.payment_state if refused else None
                    )
                    session.flush()
            else:
                submission.info = MessageInfo(
                    id=message_pk,
                    message_id=data["message_id"],
                    code=submission.code,
                    member_id=portal.member_id,
                    domain=portal.domain,
                    to=submission.to,
                    body=data["message_body"],
                    module_id=data.get("module_id"),
                    status=QUEUED,
                    external_id=None,
                    attempts=0,
                    last_error=None,
                    created_at=now,
                )
            assert submission.info is not None  # set by both branches above
            submission.outcome = Accepted("accepted", message_pk, submission.info.status)


def _portal_id(submission: Submission) -> int:
    """The portal a submission that passed :func:`_refusal` is stored for."""
    assert submission.portal_id is not None
    return submission.portal_id


def _refusal(portal: Any, submission: Submission) -> Refused | None:
    """Why the portal refuses this submission (a row of ``_PORTAL_COLUMNS``), or None."""
    if portal is None or portal.state == PortalState.UNINSTALLED:
        return UnknownPortal("portal not installed")
    auth = submission.auth
    if "application_token" in auth and not tokens_match(
        portal.application_token, auth["application_token"]
    ):
        return WrongApplicationToken("application_token mismatch")
    version = submission.key_version
    if version is not None and not (
        portal.handler_key_oldest <= version <= portal.handler_key_version
    ):
        return RetiredHandlerKey("handler key retired; the portal's providers were synced anew")
    return None


def _fail_at_once(
    session: Session, submission: Submission, message_pk: int, payment_state: str | None = None
) -> None:
    message = session.get(Message, message_pk)
    assert message is not None
    message.last_error = (
        f"{payment_state}: the app is not paid for on this portal"
        if payment_state
        else "the recipient is not a valid phone number"
    )
    submission.failed = record_status(
        session,
        message,
        FAILED,
        source="handler",
        detail=message.last_error,
        report=submission.report,
    )
    submission.info = MessageInfo.from_row(message)


def _after_commit(svc: Service, batch: Sequence[Submission]) -> None:
    """Log and announce what was stored, then queue it: one send task for the batch."""
    to_send: list[int] = []
    to_flush: set[int] = set()
    for submission in batch:
        info = submission.info
        if info is None or submission.error is not None:
            continue
        # The status log (b24sms.status) writes the line that says it was stored.
        notify(svc.pm, "b24sms_message_stored", message=info)
        change = submission.failed
        if change is not None:
            # Failed before any send: observers (status log, metrics) hear it like any other.
            notify(
                svc.pm,
                "b24sms_status_changed",
                message=info,
                previous=change.previous,
                status=change.status,
                raw_status=change.raw_status,
                source=change.source,
            )
            if submission.report:
                to_flush.add(change.portal_id)
        else:
            to_send.append(info.id)
    if to_send:
        enqueue_or_log(svc.queue.enqueue_sends, to_send)
    for portal_id in sorted(to_flush):
        enqueue_or_log(svc.queue.enqueue_flush, portal_id)


__all__ = [
    "Accepted",
    "Ingest",
    "Refused",
    "RetiredHandlerKey",
    "Submission",
    "accept_message",
    "normalise_number",
    "store_batch",
    "UnknownPortal",
    "WrongApplicationToken",
]
