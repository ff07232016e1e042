"""Provider reconciliation against the emulated portal, over real sockets."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from sqlalchemy import select

from b24sms.bitrix24.errors import RateLimited
from b24sms.config import Config, validate_config
from b24sms.db import Database
from b24sms.emulator import EmulatedPortal, Emulator
from b24sms.models import Portal, PortalState, ProviderRegistration, RegistrationState
from b24sms.registration import (
    SyncReport,
    handler_key,
    handler_url,
    sync_all,
    sync_portal,
    verify_handler_key,
)
from b24sms.schema import upgrade

from .conftest import SECRET_KEY, base_config, keyed

PUBLIC_URL = "http://127.0.0.1:9"
PROVIDERS = {
    "sms1": {"plugin": "log", "name": "One"},
    "sms2": {"plugin": "log", "name": {"en": "Two", "de": "Zwei"}, "description": "Second"},
}


class Services:
    """Builds service stand-ins over one database: what registration needs of
    :class:`b24sms.service.Service` (config, db, providers, public_url), without plugins and
    queue, so a test can change the providers between two syncs."""

    def __init__(self, tmp_path, emulator: Emulator) -> None:
        self.tmp_path = tmp_path
        self.emulator = emulator
        config = self.config(PROVIDERS)
        self.db = keyed(Database(config.service.database_url))
        upgrade(self.db)

    def config(self, providers: dict[str, Any]) -> Config:
        raw = base_config(
            self.tmp_path, public_url=PUBLIC_URL, bitrix24={"oauth_url": self.emulator.oauth_url}
        )
        raw["providers"] = providers
        return validate_config(raw, environ={})

    def __call__(self, providers: dict[str, Any] = PROVIDERS) -> SimpleNamespace:
        config = self.config(providers)
        return SimpleNamespace(
            config=config,
            settings=config.service,
            db=self.db,
            providers=config.providers,
            public_url=config.service.public_url,
        )

    def store_portal(self, portal: EmulatedPortal, state: str = PortalState.ACTIVE) -> int:
        with self.db.session() as session:
            row = Portal(
                member_id=portal.member_id,
                domain=portal.domain,
                client_endpoint=portal.client_endpoint,
                access_token=portal.access_token,
                refresh_token=portal.refresh_token,
                application_token=portal.application_token,
                state=state,
            )
            session.add(row)
            session.flush()
            return row.id

    def registrations(self, portal_id: int) -> dict[str, ProviderRegistration]:
        with self.db.session() as session:
            rows = session.scalars(
                select(ProviderRegistration).where(ProviderRegistration.portal_id == portal_id)
            )
            return {row.code: row for row in rows}


@pytest.fixture
def services(tmp_path, emulator) -> Iterator[Services]:
    factory = Services(tmp_path, emulator)
    yield factory
    factory.db.dispose()


def test_handler_key_binds_portal_and_code():
    key = handler_key(SECRET_KEY, "member1", "sms1")
    assert len(key) == 32 and int(key, 16) >= 0
    assert verify_handler_key(SECRET_KEY, "member1", "sms1", key)
    assert not verify_handler_key(SECRET_KEY, "member2", "sms1", key)
    assert not verify_handler_key(SECRET_KEY, "member1", "sms2", key)
    assert not verify_handler_key("another-secret-key-0123456789", "member1", "sms1", key)
    assert not verify_handler_key(SECRET_KEY, "member1", "sms1", key[:-1])
    assert not verify_handler_key(SECRET_KEY, "member1", "sms1", None)
    assert not verify_handler_key(SECRET_KEY, "member1", "sms1", "")


def test_first_sync_adds_every_provider(services, emulator):
    portal = emulator.add_portal()
    portal_id = services.store_portal(portal)
    service = services()

    report = sync_portal(service, portal_id)

    assert report.ok and sorted(report.added) == ["sms1", "sms2"]
    assert report.domain == portal.domain and report.member_id == portal.member_id
    assert set(portal.senders) == {"sms1", "sms2"}
    sms2 = portal.senders["sms2"]
    assert sms2["NAME"] == {"en": "Two", "de": "Zwei"}
    # a string description goes as a map of the name's languages (messageservice-sender-add.md)
    assert sms2["DESCRIPTION"] == {"en": "Second", "de": "Second"}
    assert sms2["TYPE"] == "SMS"
    assert sms2["HANDLER"] == handler_url(service, portal.member_id, "sms2")
    handler = urlsplit(sms2["HANDLER"])
    assert f"{handler.scheme}://{handler.netloc}" == PUBLIC_URL
    assert handler.path == "/bitrix24/handler/sms2"
    key = parse_qs(handler.query)["key"][0]
    assert verify_handler_key(SECRET_KEY, portal.member_id, "sms2", key)
    # One batch reading sender.list, event.get and app.info; then one batch with both adds
    # and both event bindings.
    assert portal.stats["requests"] == 2 and portal.stats["batches"] == 2
    assert sorted(report.bound) == ["ONAPPUNINSTALL", "ONAPPUPDATE"]
    rows = services.registrations(portal_id)
    assert {code: row.state for code, row in rows.items()} == {
        "sms1": RegistrationState.REGISTERED,
        "sms2": RegistrationState.REGISTERED,
    }
    assert all(len(row.fingerprint) == 64 for row in rows.values())

    # Nothing changed: one request, nothing done.
    again = sync_portal(service, portal_id)
    assert again.ok and sorted(again.unchanged) == ["sms1", "sms2"]
    assert again.added == again.updated == again.deleted == []
    assert portal.stats["requests"] == 3


def test_changed_name_is_updated(services, emulator):
    portal = emulator.add_portal()
    portal_id = services.store_portal(portal)
    sync_portal(services(), portal_id)

    renamed = {**PROVIDERS, "sms1": {"plugin": "log", "name": "One, renamed"}}
    report = sync_portal(services(renamed), portal_id)

    assert report.ok and report.updated == ["sms1"] and report.unchanged == ["sms2"]
    assert portal.senders["sms1"]["NAME"] == "One, renamed"
    assert portal.stats["methods"]["messageservice.sender.update"] == 1
    assert portal.stats["methods"]["messageservice.sender.delete"] == 0


def test_code_on_the_portal_without_a_record_is_updated(services, emulator):
    portal = emulator.add_portal()
    portal.senders["sms1"] = {
        "CODE": "sms1",
        "TYPE": "SMS",
        "NAME": "Stale",
        "HANDLER": "http://old.example.com/h",
        "DESCRIPTION": "",
    }
    portal_id = services.store_portal(portal)
    service = services()

    report = sync_portal(service, portal_id)

    assert report.ok and report.updated == ["sms1"] and report.added == ["sms2"]
    assert portal.senders["sms1"]["HANDLER"] == handler_url(service, portal.member_id, "sms1")
    assert portal.senders["sms1"]["NAME"] == "One"


def test_disabled_removed_and_excluded_providers_are_deleted(services, emulator):
    portal = emulator.add_portal()
    portal_id = services.store_portal(portal)
    everything = {**PROVIDERS, "sms3": {"plugin": "log", "name": "Three"}}
    sync_portal(services(everything), portal_id)
    assert set(portal.senders) == {"sms1", "sms2", "sms3"}

    changed = {
        "sms1": {"plugin": "log", "name": "One", "enabled": False},
        "sms2": {**PROVIDERS["sms2"], "portals": ["some-other-member-id"]},
        # sms3 is gone from the config altogether
    }
    report = sync_portal(services(changed), portal_id)

    assert report.ok and report.deleted == ["sms1", "sms2", "sms3"]
    assert portal.senders == {}
    rows = services.registrations(portal_id)
    assert {row.state for row in rows.values()} == {RegistrationState.REMOVED}

    # A provider listing this portal is registered here.
    only_here = {"sms2": {**PROVIDERS["sms2"], "portals": [portal.member_id]}}
    assert sync_portal(services(only_here), portal_id).added == ["sms2"]


def test_already_installed_counts_as_added(services, emulator):
    portal = emulator.add_portal()
    portal_id = services.store_portal(portal)
    portal.inject(
        "ERROR_SENDER_ALREADY_INSTALLED",
        400,
        methods="messageservice.sender.add",
        description="Sender already installed!",
    )

    report = sync_portal(services(), portal_id)

    assert report.ok and sorted(report.added) == ["sms1", "sms2"]
    rows = services.registrations(portal_id)
    assert {row.state for row in rows.values()} == {RegistrationState.REGISTERED}
    # Someone else wrote what the portal holds under sms1: not trusted as ours until updated.
    assert rows["sms1"].fingerprint is None and rows["sms2"].fingerprint is not None


def test_portal_without_sender_update_gets_delete_and_add(services, emulator):
    portal = emulator.add_portal()
    portal.supports_sender_update = False
    portal_id = services.store_portal(portal)
    sync_portal(services(), portal_id)
    requests_before = portal.stats["requests"]

    renamed = {**PROVIDERS, "sms2": {**PROVIDERS["sms2"], "name": {"en": "2", "de": "Zwo"}}}
    report = sync_portal(services(renamed), portal_id)

    assert report.ok and report.updated == ["sms2"] and report.unchanged == ["sms1"]
    assert portal.senders["sms2"]["NAME"] == {"en": "2", "de": "Zwo"}
    methods = portal.stats["methods"]
    assert methods["messageservice.sender.update"] == 1
    assert methods["messageservice.sender.delete"] == 1
    assert methods["messageservice.sender.add"] == 3
    # list, the batch with the refused update, the batch with delete + add.
    assert portal.stats["requests"] - requests_before == 3
    assert sync_portal(services(renamed), portal_id).unchanged == ["sms1", "sms2"]


def test_a_failing_code_does_not_stop_the_others(services, emulator):
    portal = emulator.add_portal()
    portal_id = services.store_portal(portal)
    portal.inject("ERROR_SENDER_ADD_FAILURE", 400, methods="messageservice.sender.add")

    report = sync_portal(services(), portal_id)

    assert not report.ok and report.error is None
    assert report.failed == ["sms1"] and report.added == ["sms2"]
    assert "ERROR_SENDER_ADD_FAILURE" in report.errors["sms1"]
    assert "FAILED sms1" in str(report)
    rows = services.registrations(portal_id)
    assert rows["sms1"].state == RegistrationState.ERROR
    assert "ERROR_SENDER_ADD_FAILURE" in rows["sms1"].last_error
    assert rows["sms2"].state == RegistrationState.REGISTERED

    # The next sync repairs it.
    again = sync_portal(services(), portal_id)
    assert again.ok and again.added == ["sms1"] and again.unchanged == ["sms2"]
    rows = services.registrations(portal_id)
    assert rows["sms1"].state == RegistrationState.REGISTERED and rows["sms1"].last_error is None


def test_portal_level_failure_is_reported_and_nothing_is_recorded(services, emulator):
    portal = emulator.add_portal()
    portal_id = services.store_portal(portal)
    portal.inject("QUERY_LIMIT_EXCEEDED", 503)

    report = sync_portal(services(), portal_id)

    assert isinstance(report.error, RateLimited) and not report.ok
    assert report.added == [] and "QUERY_LIMIT_EXCEEDED" in str(report)
    assert services.registrations(portal_id) == {}
    assert sync_portal(services(), portal_id).ok


def test_many_providers_cost_few_requests(services, emulator):
    portal = emulator.add_portal()
    portal_id = services.store_portal(portal)
    many = {f"p{i:02d}": {"plugin": "log", "name": f"Provider {i}"} for i in range(60)}

    report = sync_portal(services(many), portal_id)

    assert report.ok and len(report.added) == 60 and len(portal.senders) == 60
    assert portal.stats["requests"] == 3  # list + two batches (50 + 10)


def test_sync_all_visits_active_portals_only(services, emulator):
    active = emulator.add_portal()
    other = emulator.add_portal()
    blocked = emulator.add_portal()
    services.store_portal(active)
    services.store_portal(other)
    services.store_portal(blocked, state=PortalState.NEEDS_REINSTALL)

    reports = sync_all(services())

    assert [r.domain for r in reports] == [active.domain, other.domain]
    assert all(isinstance(r, SyncReport) and r.ok for r in reports)
    assert set(active.senders) == set(other.senders) == {"sms1", "sms2"}
    assert blocked.senders == {} and blocked.stats["requests"] == 0


def test_expired_token_during_sync_is_refreshed(services, emulator):
    portal = emulator.add_portal()
    portal_id = services.store_portal(portal)
    portal.expire_tokens()
    assert sync_portal(services(), portal_id).ok
    assert emulator.stats["refreshes"] == 1 and set(portal.senders) == {"sms1", "sms2"}


def test_report_prints_for_the_cli():
    report = SyncReport(domain="x.bitrix24.com", added=["a"], deleted=["b"], unchanged=["c"])
    assert str(report) == "x.bitrix24.com: added a; deleted b; unchanged c"
    assert str(SyncReport(domain="y")) == "y: nothing to do"
