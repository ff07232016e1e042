"""What the service stores: portals, provider registrations, messages, their history, the outbox.

Times are naive UTC (:func:`utcnow`), the same on SQLite and PostgreSQL. Schema changes go
through Alembic (``core/migrations``); this module is the model the migrations follow.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from .crypto import EncryptedText
from .statuses import FINAL_STATUSES, STATUSES

#: the statuses a message can still leave, in the order of :data:`~b24sms.statuses.STATUSES`
NOT_FINAL_STATUSES = tuple(s for s in STATUSES if s not in FINAL_STATUSES)
FINAL_STATUS_LIST = tuple(s for s in STATUSES if s in FINAL_STATUSES)


def _in_list(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


#: The conditions of the partial indexes, as SQL text. SQLite uses a partial index only when
#: the query's WHERE holds the same terms with the same *literal* values (a bound parameter
#: proves nothing to its planner), so the queries in :mod:`b24sms.queries` spell these
#: conditions with literals too (``literal_execute``).
NOT_FINAL_SQL = _in_list("status", NOT_FINAL_STATUSES)
FINAL_SQL = _in_list("status", FINAL_STATUS_LIST)


def utcnow() -> dt.datetime:
    """Now, as naive UTC."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON}


class PortalState:
    ACTIVE = "active"
    UNINSTALLED = "uninstalled"
    #: tokens refused (invalid_token, NO_AUTH_FOUND, invalid_grant): stop calling, keep the work
    NEEDS_REINSTALL = "needs_reinstall"
    #: OVERLOAD_LIMIT or PORTAL_DELETED: Bitrix24 asked us to stop
    BLOCKED = "blocked"
    #: uninstalled with CLEAN: its data is being deleted in batches (b24sms.retention), then the
    #: row itself; its member_id is freed at once so that a re-install gets a fresh row
    ERASING = "erasing"


class Portal(Base):
    __tablename__ = "portals"

    id: Mapped[int] = mapped_column(primary_key=True)
    member_id: Mapped[str] = mapped_column(String(64), unique=True)
    domain: Mapped[str] = mapped_column(String(255))
    client_endpoint: Mapped[str] = mapped_column(String(512))
    server_endpoint: Mapped[str | None] = mapped_column(String(512))
    #: the tokens are encrypted at rest (b24sms.crypto); 255 is the longest plaintext accepted
    access_token: Mapped[str | None] = mapped_column(EncryptedText(255))
    refresh_token: Mapped[str | None] = mapped_column(EncryptedText(255))
    token_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    application_token: Mapped[str | None] = mapped_column(EncryptedText(255))
    scope: Mapped[str | None] = mapped_column(String(512))
    language: Mapped[str | None] = mapped_column(String(8))
    state: Mapped[str] = mapped_column(String(32), default=PortalState.ACTIVE)
    last_error: Mapped[str | None] = mapped_column(Text)
    #: no REST call before this moment (rate limit, OPERATION_TIME_LIMIT, transient errors)
    paused_until: Mapped[dt.datetime | None] = mapped_column(DateTime)
    installed_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
    uninstalled_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    #: PAYMENT_REQUIRED / PAYMENT_EXPIRED while Bitrix24 says the app is not paid for; cleared
    #: by the next answer that says otherwise (see b24sms.registration)
    payment_state: Mapped[str | None] = mapped_column(String(32))
    #: the events bound to our /bitrix24/events at the last check, comma-separated
    event_bindings: Mapped[str | None] = mapped_column(String(255))
    #: the last reconcile (providers and event bindings against the config) and its error
    reconciled_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    reconcile_error: Mapped[str | None] = mapped_column(Text)
    #: HANDLER keys (b24sms.handler_keys): provider sync registers URLs of handler_key_version;
    #: calls with keys from handler_key_oldest to it are accepted (`portals rotate-key`)
    handler_key_version: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    handler_key_oldest: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    registrations: Mapped[list[ProviderRegistration]] = relationship(
        back_populates="portal", cascade="all, delete-orphan", passive_deletes=True
    )

    def __repr__(self) -> str:  # never show tokens
        return f"<Portal {self.id} {self.domain} {self.state}>"


class PaymentState:
    #: a REST call or the OAuth server answered PAYMENT_REQUIRED (settings/oauth/error-codes.md)
    PAYMENT_REQUIRED = "PAYMENT_REQUIRED"
    #: app.info said PAYMENT_EXPIRED = Y (api-reference/common/system/app-info.md)
    PAYMENT_EXPIRED = "PAYMENT_EXPIRED"


class RegistrationState:
    REGISTERED = "registered"
    ERROR = "error"
    REMOVED = "removed"


class ProviderRegistration(Base):
    """One provider CODE as registered (or meant to be) on one portal."""

    __tablename__ = "provider_registrations"
    __table_args__ = (UniqueConstraint("portal_id", "code"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    portal_id: Mapped[int] = mapped_column(ForeignKey("portals.id", ondelete="CASCADE"))
    code: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(32))
    #: digest of what was sent to Bitrix24 (handler, name, description) to notice changes
    fingerprint: Mapped[str | None] = mapped_column(String(64))
    last_error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)

    portal: Mapped[Portal] = relationship(back_populates="registrations")


class Message(Base):
    """One message Bitrix24 handed us, from the HANDLER call to its final status."""

    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("portal_id", "message_id", name="uq_messages_portal_message_id"),
        Index("ix_messages_code_external_id", "code", "external_id"),
        Index("ix_messages_status_next_attempt", "status", "next_attempt_at"),
        # 0002: the app page's delivery numbers (a portal's last 24 hours / 7 days per CODE,
        # status and accepted) read from the index alone, without a visit to each row
        Index(
            "ix_messages_portal_created_covering",
            "portal_id",
            "created_at",
            "code",
            "status",
            "external_id",
        ),
        # -- 0002: every recurring query has an index it can search (b24sms.queries) --
        # the app page's list, newest first, paged by id (keyset), unfiltered or by status/CODE
        Index("ix_messages_portal_id", "portal_id", "id"),
        Index("ix_messages_portal_status_id", "portal_id", "status", "id"),
        Index("ix_messages_portal_code_id", "portal_id", "code", "id"),
        # Partial indexes hold only the few rows that are in flight, due, pollable or waiting
        # for retention, so the sweep, polling and retention cost the same at any history size.
        Index(
            "ix_messages_sending",
            "sending_since",
            sqlite_where=text("sending_since IS NOT NULL"),
            postgresql_where=text("sending_since IS NOT NULL"),
        ),
        Index(
            "ix_messages_code_sending",
            "code",
            "sending_since",
            sqlite_where=text("sending_since IS NOT NULL"),
            postgresql_where=text("sending_since IS NOT NULL"),
        ),
        Index(
            "ix_messages_due",
            "next_attempt_at",
            sqlite_where=text("next_attempt_at IS NOT NULL AND sending_since IS NULL"),
            postgresql_where=text("next_attempt_at IS NOT NULL AND sending_since IS NULL"),
        ),
        Index(
            "ix_messages_not_final_code_updated",
            "code",
            "updated_at",
            sqlite_where=text(NOT_FINAL_SQL),
            postgresql_where=text(NOT_FINAL_SQL),
        ),
        Index(
            "ix_messages_unredacted",
            "created_at",
            sqlite_where=text(f"{FINAL_SQL} AND redacted_at IS NULL"),
            postgresql_where=text(f"{FINAL_SQL} AND redacted_at IS NULL"),
        ),
        Index(
            "ix_messages_final_created",
            "created_at",
            sqlite_where=text(FINAL_SQL),
            postgresql_where=text(FINAL_SQL),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    portal_id: Mapped[int] = mapped_column(ForeignKey("portals.id", ondelete="CASCADE"))
    code: Mapped[str] = mapped_column(String(64))
    #: Bitrix24's message_id (32 hex): the key of every status update
    message_id: Mapped[str] = mapped_column(String(64))
    to_raw: Mapped[str] = mapped_column(String(64))
    #: E.164, or None when the number could not be parsed (the message is then failed)
    to: Mapped[str | None] = mapped_column(String(32))
    body: Mapped[str] = mapped_column(Text)
    module_id: Mapped[str | None] = mapped_column(String(32))
    #: bindings (crm) or workflow_id / document_id / document_type (bizproc), as sent
    context: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16))
    external_id: Mapped[str | None] = mapped_column(String(128))
    raw_status: Mapped[str | None] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    #: when the next send attempt is due; None once the gateway took it or it is final
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    #: set while a worker is sending, so the sweep can tell "in flight" from "lost"
    sending_since: Mapped[dt.datetime | None] = mapped_column(DateTime)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
    #: when retention erased its body and numbers (``[retention] redact_after_days``)
    redacted_at: Mapped[dt.datetime | None] = mapped_column(DateTime)

    portal: Mapped[Portal] = relationship()
    history: Mapped[list[StatusEvent]] = relationship(
        back_populates="message",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="StatusEvent.id",
    )


class StatusEvent(Base):
    """Every status report about a message, applied or not."""

    __tablename__ = "status_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    message_pk: Mapped[int] = mapped_column(
        ForeignKey("messages.id", ondelete="CASCADE"), index=True
    )
    status: Mapped[str] = mapped_column(String(16))
    raw_status: Mapped[str | None] = mapped_column(String(64))
    #: handler, gateway, callback, poll, sweep, uninstall (an erased portal's messages)
    source: Mapped[str] = mapped_column(String(16))
    applied: Mapped[bool] = mapped_column(Boolean)
    detail: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    message: Mapped[Message] = relationship(back_populates="history")


class OutboxEntry(Base):
    """A status waiting to be reported to Bitrix24: one row per message, newest status wins."""

    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_portal_id", "portal_id", "id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    portal_id: Mapped[int] = mapped_column(ForeignKey("portals.id", ondelete="CASCADE"))
    message_pk: Mapped[int] = mapped_column(
        ForeignKey("messages.id", ondelete="CASCADE"), unique=True
    )
    code: Mapped[str] = mapped_column(String(64))
    message_id: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    #: bumped on every coalesced update, so a flush deletes only the version it reported
    version: Mapped[int] = mapped_column(Integer, default=1)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    not_before: Mapped[dt.datetime | None] = mapped_column(DateTime)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


# ------------------------------------------------------------------------------------------------
# Delivery engine addition (core/outbox.py): the per-portal flush lease and the shared estimate of
# the portal's leaky bucket. Kept in the database because every process (web, embedded consumer,
# `b24sms worker` on other machines) must see the same lease and the same bucket.
# ------------------------------------------------------------------------------------------------


class PortalPacing(Base):
    """Who flushes a portal's outbox now, and how full we believe its REST bucket is."""

    __tablename__ = "portal_pacing"

    portal_id: Mapped[int] = mapped_column(
        ForeignKey("portals.id", ondelete="CASCADE"), primary_key=True
    )
    #: requests we put in the portal's leaky bucket, as of ``bucket_at`` (drains at the rate)
    bucket_level: Mapped[float] = mapped_column(default=0.0)
    bucket_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    #: the flusher holding the lease ("host:pid:thread:nonce") and until when it holds unrenewed
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_until: Mapped[dt.datetime | None] = mapped_column(DateTime)
    #: consecutive failed batch requests (transient errors), for exponential backoff
    failures: Mapped[int] = mapped_column(Integer, default=0)


class MessageCount(Base):
    """Messages per CODE, status and "a gateway accepted it": what ``/metrics`` reports, kept
    in step by :mod:`b24sms.counts` inside the transactions that store, move or delete messages,
    so a scrape reads a few rows instead of every message.

    ``stored`` counts the messages in the table now; ``removed`` those retention or an erasure
    deleted, so the totals (stored + removed) never go down. On PostgreSQL each key is spread
    over a few ``slot`` rows, so concurrent transactions seldom wait for the same row.
    """

    __tablename__ = "message_counts"

    code: Mapped[str] = mapped_column(String(64), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), primary_key=True)
    accepted: Mapped[bool] = mapped_column(Boolean, primary_key=True)
    slot: Mapped[int] = mapped_column(Integer, primary_key=True)
    stored: Mapped[int] = mapped_column(BigInteger, default=0)
    removed: Mapped[int] = mapped_column(BigInteger, default=0)


# ------------------------------------------------------------------------------------------------
# Health (core/web/health.py): ``GET /healthz`` proves the database takes writes by updating a
# row here, not only by reading.
# ------------------------------------------------------------------------------------------------


class HealthCheck(Base):
    """One row per probe name; its ``checked_at`` is rewritten by every health check."""

    __tablename__ = "health_checks"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    checked_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class MethodLimit(Base):
    """A REST method of a portal blocked by ``OPERATION_TIME_LIMIT`` until ``blocked_until``
    (see :mod:`b24sms.bitrix24.method_limits`)."""

    __tablename__ = "method_limits"

    portal_id: Mapped[int] = mapped_column(
        ForeignKey("portals.id", ondelete="CASCADE"), primary_key=True
    )
    method: Mapped[str] = mapped_column(String(128), primary_key=True)
    blocked_until: Mapped[dt.datetime | None] = mapped_column(DateTime)
