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

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import select

from . import handler_keys
from .bitrix24.client import MAX_BATCH, Bitrix24Client
from .bitrix24.errors import Bitrix24Error, MethodNotFound
from .db import Database
from .handler_keys import handler_key, verify_handler_key
from .models import Portal, PortalState, ProviderRegistration, RegistrationState

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

log = logging.getLogger(__name__)

# Answers that mean the wanted state is already there.
_ALREADY_INSTALLED = "ERROR_SENDER_ALREADY_INSTALLED"
_NOT_FOUND = "ERROR_SENDER_NOT_FOUND"


class _ServiceLike(Protocol):
    """What this module needs of :class:`b24sms.service.Service`."""

    db: Database
    config: Any
    providers: dict[str, dict[str, Any]]

    @property
    def public_url(self) -> str: ...


def handler_url(service: _ServiceLike, member_id: str, code: str, key_version: int = 0) -> str:
    """The HANDLER URL registered for ``code`` on the portal ``member_id`` (signed by
    :mod:`b24sms.handler_keys`, for the portal's ``handler_key_version``)."""
    return handler_keys.handler_url(
        service.public_url, service.config["service"]["secret_key"], member_id, code, key_version
    )


def wanted_codes(service: _ServiceLike, member_id: str) -> list[str]:
    """The CODEs the config wants on the portal ``member_id``: enabled, and either for all
    portals or listing this one."""
    return [
        code
        for code, provider in service.providers.items()
        if provider.get("enabled", True)
        and (provider.get("portals") is None or member_id in provider["portals"])
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
            "NAME": provider["name"],
            "DESCRIPTION": provider.get("description") or "",
        }
    return wanted


def fingerprint(params: dict[str, Any]) -> str:
    """sha256 of what Bitrix24 shows and calls: handler, name, description."""
    data = json.dumps(
        [params["HANDLER"], params["NAME"], params.get("DESCRIPTION", "")],
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(data.encode()).hexdigest()


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
    #: CODE → why it failed
    errors: dict[str, str] = field(default_factory=dict)
    #: the portal-level failure (``sender.list`` or a whole batch refused), if any
    error: Bitrix24Error | None = None

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
            )
            if codes
        ]
        parts += [f"FAILED {code} ({self.errors.get(code, '?')})" for code in self.failed]
        if self.error is not None:
            parts.append(f"ERROR {self.error}")
        return f"{self.domain}: {'; '.join(parts) or 'nothing to do'}"


@dataclass
class _Outcome:
    """Per CODE: the registration row to write after the calls."""

    state: str
    fingerprint: str | None = None
    error: str | None = None


def sync_portal(
    service: _ServiceLike, portal_id: int, client: Bitrix24Client | None = None
) -> SyncReport:
    """Make the providers registered on one portal match the config.

    Costs ``sender.list`` plus one ``batch`` per 50 changes, plus one more batch for portals that
    lack ``sender.update``. A failing CODE is recorded on its registration (state ``error``) and
    does not stop the others; a failure of the whole portal (rate limit, revoked tokens…) ends the
    sync and is returned in :attr:`SyncReport.error` — call again later, nothing is lost.
    Call it outside any open database transaction: it opens its own (on SQLite each one takes
    the database-wide write lock, so an outer one would block it until the busy timeout).

    :param service: the service (config, database, providers).
    :param portal_id: primary key of the portal.
    :param client: the REST client to use; default a new one on the shared HTTP session.
    :returns: what was added, updated, deleted, left alone, and what failed.
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
    report = SyncReport(domain=domain, member_id=member_id)
    client = client or Bitrix24Client(db, portal_id, service.config["bitrix24"])
    wanted = desired_providers(service, member_id, key_version)
    fingerprints = {code: fingerprint(params) for code, params in wanted.items()}
    outcomes: dict[str, _Outcome] = {}
    try:
        present = _codes(client.call("messageservice.sender.list"))
        plan: list[tuple[str, str, str, dict[str, Any]]] = []  # (op, code, method, params)
        for code, params in wanted.items():
            fp = fingerprints[code]
            if code not in present:
                plan.append(("add", code, "messageservice.sender.add", params))
            elif code not in records or records[code][1] != fp:
                update = {k: v for k, v in params.items() if k != "TYPE"}
                plan.append(("update", code, "messageservice.sender.update", update))
            else:
                report.unchanged.append(code)
                outcomes[code] = _Outcome(RegistrationState.REGISTERED, fp)
        for code in sorted(present - wanted.keys()):
            plan.append(("delete", code, "messageservice.sender.delete", {"CODE": code}))
        # CODEs we remember but that are neither on the portal nor wanted: already gone.
        for code, (state, _fp) in records.items():
            if code not in present and code not in wanted and state != RegistrationState.REMOVED:
                outcomes[code] = _Outcome(RegistrationState.REMOVED)

        readd: list[str] = []
        for op, code, error in _run(client, plan):
            fp = fingerprints.get(code)
            if op == "delete":
                if error is None or error.code == _NOT_FOUND:
                    report.deleted.append(code)
                    outcomes[code] = _Outcome(RegistrationState.REMOVED)
                else:
                    _fail(report, outcomes, code, error, records.get(code, (None, None))[1])
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
                readd.append(code)
            else:
                _fail(report, outcomes, code, error, records.get(code, (None, None))[1])

        if readd:
            log.info("%s: sender.update unavailable, replacing %s", domain, ", ".join(readd))
            replace: list[tuple[str, str, str, dict[str, Any]]] = []
            for code in readd:
                replace.append(("delete", code, "messageservice.sender.delete", {"CODE": code}))
                replace.append(("add", code, "messageservice.sender.add", wanted[code]))
            for op, code, error in _run(client, replace):
                if op == "delete":
                    # A missing CODE is fine; any other failure shows again in the add below.
                    continue
                if error is None or error.code == _ALREADY_INSTALLED:
                    report.updated.append(code)
                    outcomes[code] = _Outcome(
                        RegistrationState.REGISTERED, _known(fingerprints[code], error)
                    )
                else:
                    _fail(report, outcomes, code, error)
    except Bitrix24Error as exc:
        report.error = exc
        log.warning("%s: provider sync stopped: %s", domain, exc)

    _save(db, portal_id, outcomes)
    _retire_keys(db, portal_id, report, oldest_key, key_version)
    log.info("provider sync %s", report)
    return report


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
    client: Bitrix24Client, plan: list[tuple[str, str, str, dict[str, Any]]]
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
