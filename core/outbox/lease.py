"""The flush lease: one flusher per portal across all processes and machines.

A lease row in ``portal_pacing`` (database, because SQLite and PostgreSQL deployments have no
shared lock service, and a lease with an expiry survives a killed worker): the owner names
host, process and thread, so a lease left by a process of this machine that died is taken over
at once, and any other after its expiry.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING

from sqlalchemy import func, select

from ..backoff import retry_while_unreachable
from ..models import OutboxEntry, Portal, PortalPacing, utcnow

if TYPE_CHECKING:
    from ..service import Service

# One logger for the outbox's modules: the log lines operators know say b24sms.outbox.
log = logging.getLogger(__package__)

#: seconds a lease outlives its last renewal beyond the REST timeout (a killed flusher's lease
#: frees itself after this)
LEASE_MARGIN = 30.0
#: a flush that found the lease taken tries again after this many seconds
LOCKED_RETRY = 1.0
#: seconds a flusher keeps trying to give its lease back while the database is unreachable
RELEASE_PERSISTENCE = 10.0


def owner_id() -> str:
    """A lease owner name unique to this flush: host, process id, thread id, random."""
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


def acquire(service: Service, portal_id: int, owner: str, ttl: float) -> bool | None:
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
        state.lease_until = now + dt.timedelta(seconds=ttl)
        return True


def release(service: Service, portal_id: int, owner: str) -> int:
    """Give the lease back (if still ours); returns the entries left in the outbox.

    While the database cannot be reached this is tried again for up to ``RELEASE_PERSISTENCE``
    seconds: a lease left behind by a live process holds every other flusher of the portal off
    until it expires (``timeout + LEASE_MARGIN``), however short the outage was.
    """

    def give_back() -> int:
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
        return retry_while_unreachable(give_back, time.monotonic() + RELEASE_PERSISTENCE)
    except Exception:
        # The lease expires by itself; the flush's outcome is already committed.
        log.exception("portal %s: could not release the flush lease", portal_id)
        return 0
