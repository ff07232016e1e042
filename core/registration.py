"""Provider registration: make each portal's providers match the config.

``messageservice.sender.list`` says which CODEs this app has on the portal (only this app's, so
nothing registered by other apps is ever touched). Then, in as few ``batch`` requests as possible:
``add`` what is missing, ``update`` what changed (or what we have no record of), ``delete`` what is
no longer enabled for the portal. Portals without ``sender.update`` get delete + add instead.
What was sent is remembered as a fingerprint on :class:`~b24sms.models.ProviderRegistration`.

Handler URLs carry a key binding them to one portal and one CODE, because Bitrix24 leaves
``auth[…]`` out of some handler calls; :mod:`b24sms.handler_keys` signs and checks it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast
from urllib.parse import urlsplit

from sqlalchemy import select, update

from . import handler_keys
from .bitrix24.client import MAX_BATCH, Bitrix24Client
from .bitrix24.errors import Bitrix24Error, MethodNotFound
from .config import Bitrix24Config, Config, ProviderConfig
from .db import Database
from .handler_keys import handler_key, verify_handler_key
from .models import (
    PaymentState,
    Portal,
    PortalPacing,
    PortalState,
    ProviderRegistration,
    RegistrationState,
    utcnow,
)
from .outbox.pacing import take_token

__all__ = [
    "SyncReport",
    "desired_providers",
    "handler_key",
    "handler_url",
    "sync_all",
    "sync_portal",
    "verify_handler_key",
    "wanted_codes",
]

if TYPE_CHECKING:
    from sqlalchemy import CursorResult

log = logging.getLogger(__name__)

# Answers that mean the wanted state is already there.
_ALREADY_INSTALLED = "ERROR_SENDER_ALREADY_INSTALLED"
_NOT_FOUND = "ERROR_SENDER_NOT_FOUND"


class _ServiceLike(Protocol):
    """What this module needs of :class:`b24sms.service.Service`."""

    db: Database
    config: Config
    providers: Mapping[str, ProviderConfig]

    @property
    def public_url(self) -> str: ...


def public_url_problems(public_url: str) -> list[str]:
    """Why Bitrix24 would refuse handlers below ``[service] public_url``, one sentence each,
    naming the key: Bitrix24 calls handlers from its own servers, so they must be public
    (api-reference/events/index.md), and it refuses a HANDLER whose host has no dot
    (ERROR_WRONG_HANDLER_URL, see docs/getting-started.md); https keeps the
    application_token and the messages off the wire in clear."""
    parts = urlsplit(public_url)
    problems = []
    if parts.scheme != "https":
        problems.append(
            f"[service] public_url {public_url!r} is not https: Bitrix24 sends messages and the "
            "application_token to it; use an https address (a tunnel when trying from a laptop)"
        )
    if "." not in (parts.hostname or ""):
        problems.append(
            f"[service] public_url {public_url!r} has no dot in its host: Bitrix24 refuses such "
            "handlers with ERROR_WRONG_HANDLER_URL; use a public name such as sms.example.com"
        )
    return problems


def handler_url(service: _ServiceLike, member_id: str, code: str, key_version: int = 0) -> str:
    """The HANDLER URL registered for ``code`` on the portal ``member_id`` (signed by
    :mod:`b24sms.handler_keys`, for the portal's ``handler_key_version``)."""
    return handler_keys.handler_url(
        service.public_url, service.config.service.secret_key, member_id, code, key_version
    )


def wanted_codes(service: _ServiceLike, member_id: str) -> list[str]:
    """The CODEs the config wants on the portal ``member_id``: enabled, and either for all
    portals or listing this one."""
    return [
        code
        for code, provider in service.providers.items()
        if provider.enabled and (provider.portals is None or member_id in provider.portals)
    ]


def desired_providers(
    service: _ServiceLike, member_id: str, key_version: int = 0
) -> dict[str, dict[str, Any]]:
    """CODE → the ``messageservice.sender.add`` parameters of every provider the config wants on
    the portal ``member_id`` (:func:`wanted_codes`)."""
    wanted: dict[str, dict[str, Any]] = {}
    for code in wanted_codes(service, member_id):
        provider = service.providers[code]
        wanted[code] = {
            "CODE": code,
            "TYPE": "SMS",
            "HANDLER": handler_url(service, member_id, code, key_version),
            "NAME": provider.name,
            "DESCRIPTION": _description(provider),
        }
    return wanted


def _description(provider: ProviderConfig) -> str | dict[str, str]:
    """``description`` as Bitrix24 takes it: a string or a language map, like ``NAME``
    (api-reference/messageservice/messageservice-sender-add.md). When ``name`` is a map and the
    description a string, the description goes as a map of the same languages: a portal showing
    the localized name then shows a description too."""
    description, name = provider.description, provider.name
    if isinstance(description, Mapping):
        return {str(lang): str(text) for lang, text in description.items()}
    if isinstance(name, Mapping) and description:
        return {str(lang): description for lang in name}
    return description


def fingerprint(params: dict[str, Any]) -> str:
    """sha256 of what Bitrix24 shows and calls: handler, name, description."""
    data = json.dumps(
        [params["HANDLER"], params["NAME"], params.get("DESCRIPTION", "")],
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(data.encode()).hexdigest()


#: the app events every portal must deliver to us (settings/app-uninstallation.md,
#: api-reference/common/events/on-app-update.md); bound with event.bind, since Bitrix24 calls
#: only handlers the app bound itself (api-reference/events/index.md)
APP_EVENTS = ("ONAPPUNINSTALL", "ONAPPUPDATE")
#: bound too where the app is paid for (api-reference/common/events/on-app-payment.md)
PAYMENT_EVENT = "ONAPPPAYMENT"
#: app.info STATUS values of an app that is never paid for: F free, L local (app-info.md).
#: Every other STATUS gets ONAPPPAYMENT bound: P paid, T trial and D demo can be paid for, and
#: on-app-payment.md's own example sends "S", which no list explains — an unknown status is
#: more likely a paid kind, and a binding too many costs nothing, a missing one a stale mark.
UNPAID_STATUSES = frozenset({"F", "L"})
#: where Bitrix24 sends the app events, below public_url
EVENTS_PATH = "/bitrix24/events"

# (op, key, method, params): key is a provider CODE or an event name
_Command = tuple[str, str, str, dict[str, Any]]


def events_url(service: _ServiceLike) -> str:
    """The URL the app events are bound to."""
    return f"{service.public_url}{EVENTS_PATH}"


def wanted_events(app_status: str | None) -> list[str]:
    """The events to bind for an app of this app.info ``STATUS`` (None: unknown, and
    ONAPPPAYMENT is not wanted; :func:`sync_portal` then keeps an existing binding as it is)."""
    events = list(APP_EVENTS)
    status = (app_status or "").strip().upper()
    if status and status not in UNPAID_STATUSES:
        events.append(PAYMENT_EVENT)
    return events


@dataclass
class SyncReport:
    """What :func:`sync_portal` did on one portal. ``str()`` gives a line for the CLI."""

    domain: str
    member_id: str = ""
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    #: CODE (or event name) → why it failed
    errors: dict[str, str] = field(default_factory=dict)
    #: the portal-level failure (``sender.list`` or a whole batch refused), if any
    error: Bitrix24Error | None = None
    #: events bound to our handler after the sync (None: event.get could not be read)
    events: list[str] | None = None
    #: events bound by this sync, and old handlers removed
    bound: list[str] = field(default_factory=list)
    unbound: list[str] = field(default_factory=list)
    #: PAYMENT_EXPIRED / PAYMENT_REQUIRED when Bitrix24 said so, else None
    payment_state: str | None = None
    #: app.info was read: only then may a missing PAYMENT_EXPIRED clear the payment mark
    app_info_read: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and not self.failed

    def __str__(self) -> str:
        parts = [
            f"{label} {', '.join(codes)}"
            for label, codes in (
                ("added", self.added),
                ("updated", self.updated),
                ("deleted", self.deleted),
                ("unchanged", self.unchanged),
                ("bound", self.bound),
                ("unbound old", self.unbound),
            )
            if codes
        ]
        parts += [f"FAILED {code} ({self.errors.get(code, '?')})" for code in self.failed]
        if self.payment_state:
            parts.append(self.payment_state)
        if self.error is not None:
            parts.append(f"ERROR {self.error}")
        return f"{self.domain}: {'; '.join(parts) or 'nothing to do'}"


@dataclass
class _Outcome:
    """Per CODE: the registration row to write after the calls."""

    state: str
    fingerprint: str | None = None
    error: str | None = None


@dataclass
class _Sync:
    """One sync's working state: what the config wants, what we remember, what happened."""

    service: _ServiceLike
    client: Bitrix24Client
    report: SyncReport
    wanted: dict[str, dict[str, Any]]
    fingerprints: dict[str, str]
    records: dict[str, tuple[str, str | None]]
    outcomes: dict[str, _Outcome] = field(default_factory=dict)
    readd: list[str] = field(default_factory=list)

    def old_fingerprint(self, code: str) -> str | None:
        return self.records.get(code, (None, None))[1]


def sync_portal(
    service: _ServiceLike, portal_id: int, client: Bitrix24Client | None = None
) -> SyncReport:
    """Make the providers registered on one portal, and the app events bound there, match the
    config.

    One ``batch`` reads ``sender.list``, ``event.get`` and ``app.info``; then one ``batch`` per
    50 changes (provider add/update/delete, event bind/unbind), plus one more for portals that
    lack ``sender.update``. A failing CODE is recorded on its registration (state ``error``) and
    does not stop the others; a failure of the whole portal (rate limit, revoked tokens…) ends the
    sync and is returned in :attr:`SyncReport.error` — call again later, nothing is lost. The
    outcome (bindings, payment state, when, and the error) is stored on the portal.
    Call it outside any open database transaction: it opens its own (on SQLite each one takes
    the database-wide write lock, so an outer one would block it until the busy timeout).

    :param service: the service (config, database, providers).
    :param portal_id: primary key of the portal.
    :param client: the REST client to use; default a new one on the shared HTTP session.
    :returns: what was added, updated, deleted, bound, left alone, and what failed.
    :raises LookupError: no portal with this id.
    """
    db = service.db
    with db.session() as session:
        portal = session.get(Portal, portal_id)
        if portal is None:
            raise LookupError(f"no portal with id {portal_id}")
        member_id, domain = portal.member_id, portal.domain
        key_version, oldest_key = portal.handler_key_version, portal.handler_key_oldest
        records = {
            r.code: (r.state, r.fingerprint)
            for r in session.scalars(
                select(ProviderRegistration).where(ProviderRegistration.portal_id == portal_id)
            )
        }
    wanted = desired_providers(service, member_id, key_version)
    sync = _Sync(
        service=service,
        client=client or Bitrix24Client(db, portal_id, service.config.bitrix24),
        report=SyncReport(domain=domain, member_id=member_id),
        wanted=wanted,
        fingerprints={code: fingerprint(params) for code, params in wanted.items()},
        records=records,
    )
    try:
        present, bindings, app = _read_portal(sync.client)
        sync.report.app_info_read = app is not None
        sync.report.payment_state = _payment_state(app)
        plan = _plan_providers(sync, present)
        plan += _plan_events(sync, bindings, app)
        _apply(sync, _run(sync.client, plan))
        if sync.readd:
            _replace(sync)
    except Bitrix24Error as exc:
        sync.report.error = exc
        if exc.code.upper() == PaymentState.PAYMENT_REQUIRED:
            sync.report.payment_state = PaymentState.PAYMENT_REQUIRED
        log.warning("%s: provider sync stopped: %s", domain, exc)

    _save(db, portal_id, sync.outcomes)
    _save_portal_state(db, portal_id, sync.report)
    _retire_keys(db, portal_id, sync.report, oldest_key, key_version)
    log.info("provider sync %s", sync.report)
    return sync.report


def _read_portal(
    client: Bitrix24Client,
) -> tuple[set[str], list[dict[str, Any]] | None, dict[str, Any] | None]:
    """One batch: this app's CODEs (an error there ends the sync), its event bindings and its
    app.info (None each when the portal refused that command)."""
    result = client.batch(
        {
            "senders": ("messageservice.sender.list", {}),
            "events": ("event.get", {}),
            "app": ("app.info", {}),
        }
    )
    if "senders" in result.errors:
        raise result.errors["senders"]
    events = result.results.get("events")
    bindings = [b for b in events if isinstance(b, dict)] if isinstance(events, list) else None
    app = result.results.get("app")
    return _codes(result.results.get("senders")), bindings, app if isinstance(app, dict) else None


def _payment_state(app: dict[str, Any] | None) -> str | None:
    """PAYMENT_EXPIRED when app.info says so (api-reference/common/system/app-info.md)."""
    if app is not None and str(app.get("PAYMENT_EXPIRED", "N")).upper() == "Y":
        return PaymentState.PAYMENT_EXPIRED
    return None


def _plan_providers(sync: _Sync, present: set[str]) -> list[_Command]:
    plan: list[_Command] = []
    for code, params in sync.wanted.items():
        fp = sync.fingerprints[code]
        if code not in present:
            plan.append(("add", code, "messageservice.sender.add", params))
        elif code not in sync.records or sync.records[code][1] != fp:
            update = {k: v for k, v in params.items() if k != "TYPE"}
            plan.append(("update", code, "messageservice.sender.update", update))
        else:
            sync.report.unchanged.append(code)
            sync.outcomes[code] = _Outcome(RegistrationState.REGISTERED, fp)
    for code in sorted(present - sync.wanted.keys()):
        plan.append(("delete", code, "messageservice.sender.delete", {"CODE": code}))
    # CODEs we remember but that are neither on the portal nor wanted: already gone.
    for code, (state, _fp) in sync.records.items():
        if code not in present and code not in sync.wanted and state != RegistrationState.REMOVED:
            sync.outcomes[code] = _Outcome(RegistrationState.REMOVED)
    return plan


def _plan_events(
    sync: _Sync, bindings: list[dict[str, Any]] | None, app: dict[str, Any] | None
) -> list[_Command]:
    """Bind what is missing, once; unbind our events bound elsewhere (an old public_url) or
    twice. Nothing when event.get could not be read: binding blind would make duplicates."""
    if bindings is None:
        sync.report.errors["events"] = "event.get could not be read"
        return []
    url = events_url(sync.service)
    wanted = wanted_events(str(app.get("STATUS") or "") if app else None)
    if app is None and any(
        str(b.get("event", "")).upper() == PAYMENT_EVENT and b.get("handler") == url
        for b in bindings
    ):
        # app.info failed: whether the app is paid for is unknown, so our ONAPPPAYMENT
        # binding stays as it is rather than be unbound on a guess.
        wanted.append(PAYMENT_EVENT)
    managed = {*APP_EVENTS, PAYMENT_EVENT}
    plan: list[_Command] = []
    ours: dict[str, int] = {}
    for binding in bindings:
        event, handler = str(binding.get("event", "")).upper(), str(binding.get("handler", ""))
        if event not in managed:
            continue
        if handler == url and event in wanted:
            ours[event] = ours.get(event, 0) + 1
        else:
            plan.append(("unbind", event, "event.unbind", {"event": event, "handler": handler}))
    for event in wanted:
        if ours.get(event, 0) > 1:
            # Bound twice: Bitrix24 would deliver twice. Unbinding removes every copy.
            plan.append(("unbind", event, "event.unbind", {"event": event, "handler": url}))
        if ours.get(event, 0) != 1:
            plan.append(("bind", event, "event.bind", {"event": event, "handler": url}))
    sync.report.events = sorted(e for e, n in ours.items() if n == 1)
    return plan


def _apply(sync: _Sync, done: list[tuple[str, str, Bitrix24Error | None]]) -> None:
    """Record each command's answer on the report and the registrations."""
    report, outcomes = sync.report, sync.outcomes
    for op, code, error in done:
        fp = sync.fingerprints.get(code)
        if op in ("bind", "unbind"):
            _event_done(sync, op, code, error)
        elif op == "delete":
            if error is None or error.code == _NOT_FOUND:
                report.deleted.append(code)
                outcomes[code] = _Outcome(RegistrationState.REMOVED)
            else:
                _fail(report, outcomes, code, error, sync.old_fingerprint(code))
        elif op == "add":
            if error is None or error.code == _ALREADY_INSTALLED:
                report.added.append(code)
                outcomes[code] = _Outcome(RegistrationState.REGISTERED, _known(fp, error))
            else:
                _fail(report, outcomes, code, error)
        elif error is None:
            report.updated.append(code)
            outcomes[code] = _Outcome(RegistrationState.REGISTERED, fp)
        elif isinstance(error, MethodNotFound) or error.code == _NOT_FOUND:
            # Older portals lack sender.update; a CODE deleted meanwhile just needs adding.
            sync.readd.append(code)
        else:
            _fail(report, outcomes, code, error, sync.old_fingerprint(code))


def _event_done(sync: _Sync, op: str, event: str, error: Bitrix24Error | None) -> None:
    report = sync.report
    if error is not None:
        report.failed.append(event)
        report.errors[event] = str(error)
        return
    if op == "unbind":
        report.unbound.append(event)
        return
    report.bound.append(event)
    if report.events is not None and event not in report.events:
        report.events = sorted([*report.events, event])


def _replace(sync: _Sync) -> None:
    """delete + add for portals without ``sender.update``."""
    log.info(
        "%s: sender.update unavailable, replacing %s", sync.report.domain, ", ".join(sync.readd)
    )
    replace: list[_Command] = []
    for code in sync.readd:
        replace.append(("delete", code, "messageservice.sender.delete", {"CODE": code}))
        replace.append(("add", code, "messageservice.sender.add", sync.wanted[code]))
    for op, code, error in _run(sync.client, replace):
        if op == "delete":
            # A missing CODE is fine; any other failure shows again in the add below.
            continue
        if error is None or error.code == _ALREADY_INSTALLED:
            sync.report.updated.append(code)
            sync.outcomes[code] = _Outcome(
                RegistrationState.REGISTERED, _known(sync.fingerprints[code], error)
            )
        else:
            _fail(sync.report, sync.outcomes, code, error)


def _save_portal_state(db: Database, portal_id: int, report: SyncReport) -> None:
    """Bindings, payment state and the outcome of this reconcile, for portals list and the app
    page."""
    with db.session() as session:
        portal = session.get(Portal, portal_id)
        if portal is None:
            return
        portal.reconciled_at = utcnow()
        portal.reconcile_error = (
            str(report.error)
            if report.error is not None
            else "; ".join(f"{k}: {v}" for k, v in report.errors.items()) or None
        )
        if report.events is not None:
            portal.event_bindings = ",".join(report.events)
        if report.payment_state is not None:
            portal.payment_state = report.payment_state
        elif (
            report.error is None
            and report.app_info_read
            and portal.payment_state == PaymentState.PAYMENT_EXPIRED
        ):
            # app.info answered without PAYMENT_EXPIRED: paid again.
            portal.payment_state = None


def _retire_keys(
    db: Database, portal_id: int, report: SyncReport, oldest_key: int, key_version: int
) -> None:
    """After a sync that registered every CODE with keys of ``key_version``, older keys go."""
    if not report.ok or oldest_key >= key_version:
        return
    with db.session() as session:
        portal = session.get(Portal, portal_id, with_for_update=True)
        if portal is not None and portal.handler_key_oldest < key_version:
            portal.handler_key_oldest = key_version
    log.info("portal %s: HANDLER keys older than version %d retired", portal_id, key_version)


def sync_all(service: _ServiceLike) -> list[SyncReport]:
    """:func:`sync_portal` for every active portal, one after the other."""
    with service.db.session() as session:
        ids = list(
            session.scalars(
                select(Portal.id).where(Portal.state == PortalState.ACTIVE).order_by(Portal.id)
            )
        )
    return [sync_portal(service, portal_id) for portal_id in ids]


#: requests a reconcile of a portal usually costs: the reading batch and one batch of changes
RECONCILE_COST = 2.0
#: portals reconciled per periodic run at most: a run must not hold a worker for long
RECONCILE_PER_RUN = 20
#: a portal whose access token has expired is reconciled only when its tokens were last
#: refreshed longer ago than this: a reconcile would refresh them, and refreshing on a timer
#: ("do not schedule the renewal for once an hour or once a day … the application may be
#: blocked", settings/oauth/auto-renewal.md) is what Bitrix24 forbids, while a refresh token
#: unused for 180 days dies (same page) — 30 days leave ample room for a failed attempt
IDLE_REFRESH_AFTER = dt.timedelta(days=30)
#: each portal's interval is spread by this fraction, so portals installed together (a mass
#: re-install, a migration) do not all call Bitrix24 in the same minute
RECONCILE_JITTER = 0.1


def reconcile_due_at(portal_id: int, reconciled_at: dt.datetime, interval: float) -> dt.datetime:
    """When the portal is due again: ``interval`` seconds after its last reconcile, spread by
    up to ±:data:`RECONCILE_JITTER` (fixed per portal, so it does not drift run by run)."""
    spread = ((portal_id * 2654435761) % 1000) / 1000.0  # Knuth's multiplicative hash
    factor = 1.0 - RECONCILE_JITTER + 2 * RECONCILE_JITTER * spread
    return reconciled_at + dt.timedelta(seconds=interval * factor)


def reconcile_due(service: _ServiceLike) -> list[SyncReport]:
    """The periodic reconcile: :func:`sync_portal` for the active portals whose last reconcile is
    older than ``[bitrix24] reconcile_interval`` (jittered), oldest first, at most
    :data:`RECONCILE_PER_RUN` per run. Restores providers and event bindings Bitrix24 removed
    (an app update, an administrator), so the install page's "will be retried" holds.

    An idle portal is left alone while its access token has expired, unless its last refresh
    is older than :data:`IDLE_REFRESH_AFTER`: the reconcile must not be the timer that refreshes
    its tokens every hour. Its next call for a message refreshes them and makes it due again.

    A sync costs two requests (one when nothing changed) of a portal's burst of 50; they are
    spent from the bucket estimate the outbox paces by, and a portal whose bucket has no room
    for them is left to the next run. A portal that answers with a limit is tried next interval.
    """
    interval = service.config.bitrix24.reconcile_interval
    if interval <= 0:
        return []
    now = utcnow()
    earliest = now - dt.timedelta(seconds=interval * (1.0 - RECONCILE_JITTER))
    with service.db.session() as session:
        rows = session.execute(
            select(Portal.id, Portal.reconciled_at)
            .where(
                Portal.state == PortalState.ACTIVE,
                Portal.reconciled_at.is_(None) | (Portal.reconciled_at <= earliest),
                # token_expires_at is the last refresh plus the token's lifetime (an hour)
                Portal.token_expires_at.is_(None)
                | (Portal.token_expires_at > now)
                | (Portal.token_expires_at <= now - IDLE_REFRESH_AFTER),
            )
            .order_by(Portal.reconciled_at.is_not(None), Portal.reconciled_at, Portal.id)
        ).all()
    due = [
        (portal_id, at)
        for portal_id, at in rows
        if at is None or reconcile_due_at(portal_id, at, interval) <= now
    ][:RECONCILE_PER_RUN]
    reports = []
    for portal_id, at in due:
        if not _room_in_bucket(service.db, portal_id, service.config.bitrix24):
            log.info("portal %s: REST bucket busy, reconcile on the next run", portal_id)
            continue
        if not _claim(service.db, portal_id, at, now):
            continue  # another worker's periodic run took it
        try:
            reports.append(sync_portal(service, portal_id))
        except LookupError:
            continue  # uninstalled with CLEAN meanwhile
    return reports


def _room_in_bucket(db: Database, portal_id: int, settings: Bitrix24Config) -> bool:
    """Spend :data:`RECONCILE_COST` requests from the portal's leaky bucket as every process
    estimates it (``portal_pacing``, which the outbox paces its status batches by, leaving a
    slice of the burst to callers like this one); False when even that slice is taken."""
    rate, burst = settings.requests_per_second, settings.burst
    now = utcnow()
    with db.session() as session:
        state = session.get(PortalPacing, portal_id)
        if state is None:
            return True  # no outbox traffic ever: the bucket is empty
        return take_token(state, now, rate, burst, RECONCILE_COST) == 0.0


def _claim(db: Database, portal_id: int, seen: dt.datetime | None, now: dt.datetime) -> bool:
    """Compare-and-set on ``reconciled_at``: every consumer schedules the periodic task, and two
    syncs of one portal at once could both find an event unbound and bind it twice."""
    same = Portal.reconciled_at.is_(None) if seen is None else Portal.reconciled_at == seen
    with db.session() as session:
        claimed = cast(
            "CursorResult[Any]",
            session.execute(
                update(Portal)
                .where(Portal.id == portal_id, same)
                .values(reconciled_at=now)
                .execution_options(synchronize_session=False)
            ),
        ).rowcount
    return bool(claimed)


def _codes(result: Any) -> set[str]:
    """The CODEs in a ``sender.list`` answer (a list of strings; tolerate objects and maps)."""
    if isinstance(result, dict):
        result = list(result.values())
    codes: set[str] = set()
    for item in result or []:
        if isinstance(item, dict):
            item = item.get("CODE") or item.get("code")
        if item:
            codes.add(str(item))
    return codes


def _run(
    client: Bitrix24Client, plan: list[_Command]
) -> list[tuple[str, str, Bitrix24Error | None]]:
    """Run the planned commands in batches of 50, in order; ``(op, code, error or None)`` each."""
    done: list[tuple[str, str, Bitrix24Error | None]] = []
    for start in range(0, len(plan), MAX_BATCH):
        chunk = plan[start : start + MAX_BATCH]
        commands = {
            f"c{i}": (method, params) for i, (_op, _code, method, params) in enumerate(chunk)
        }
        result = client.batch(commands)
        for i, (op, code, _method, _params) in enumerate(chunk):
            key = f"c{i}"
            error = result.errors.get(key)
            if error is None and key not in result.results:
                error = Bitrix24Error("NOT_EXECUTED", "the batch did not run this command")
            done.append((op, code, error))
    return done


def _known(fp: str | None, error: Bitrix24Error | None) -> str | None:
    """The fingerprint to remember after an add: none when the CODE was "already installed",
    because then what the portal holds was written by someone else (a concurrent sync, an older
    config); the next sync updates it."""
    return fp if error is None else None


def _fail(
    report: SyncReport,
    outcomes: dict[str, _Outcome],
    code: str,
    error: Bitrix24Error,
    fp: str | None = None,
) -> None:
    report.failed.append(code)
    report.errors[code] = str(error)
    # Keep the old fingerprint: what is on the portal did not change.
    outcomes[code] = _Outcome(RegistrationState.ERROR, fp, str(error))


def _save(db: Database, portal_id: int, outcomes: dict[str, _Outcome]) -> None:
    if not outcomes:
        return
    with db.session() as session:
        rows = {
            r.code: r
            for r in session.scalars(
                select(ProviderRegistration).where(ProviderRegistration.portal_id == portal_id)
            )
        }
        for code, outcome in outcomes.items():
            row = rows.get(code)
            if row is None:
                row = ProviderRegistration(portal_id=portal_id, code=code)
                session.add(row)
            row.state = outcome.state
            row.fingerprint = outcome.fingerprint
            row.last_error = outcome.error
