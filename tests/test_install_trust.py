"""Only real portals get in: installs proven at Bitrix24's OAuth server, over real sockets.

An attacker's HTTP server on loopback (``tests/fakes/recorder.py``) records every request it
gets. Each forged install or takeover is refused, changes nothing, and the attacker hears
nothing; the real install through the emulator still works end to end.
"""

from __future__ import annotations

import secrets
import threading
import time
from typing import Any

import pytest
import requests
from sqlalchemy import func, select

from b24sms.bitrix24 import verify
from b24sms.bitrix24.policy import web_slots
from b24sms.config import Bitrix24Schema
from b24sms.models import Message, Portal, PortalState, ProviderRegistration
from tests.conftest import CLIENT_ID, CLIENT_SECRET
from tests.fakes.recorder import Recorder, json_answer, redirect_to

LOG = {"smslog": {"plugin": "log", "name": "Log only"}}


@pytest.fixture
def attacker():
    with Recorder() as server:
        yield server


def db_of(server):
    return server.app.extensions["b24sms"].db


def snapshot(server) -> list[tuple[Any, ...]]:
    """Everything an install could change, for every portal, plus what hangs off them."""
    with db_of(server).session() as session:
        portals = [
            (
                p.member_id,
                p.domain,
                p.client_endpoint,
                p.server_endpoint,
                p.access_token,
                p.refresh_token,
                p.application_token,
                p.state,
                p.token_expires_at,
            )
            for p in session.scalars(select(Portal).order_by(Portal.id))
        ]
        counts = [
            session.scalar(select(func.count()).select_from(model))
            for model in (Message, ProviderRegistration)
        ]
    return [*portals, tuple(counts)]


def portal_row(server, member_id: str) -> Portal | None:
    with db_of(server).session() as session:
        return session.scalar(select(Portal).where(Portal.member_id == member_id))


def set_state(server, member_id: str, state: str) -> None:
    with db_of(server).session() as session:
        session.scalar(select(Portal).where(Portal.member_id == member_id)).state = state


def install_event(
    member_id: str,
    domain: str,
    refresh_token: str,
    *,
    client_endpoint: str | None = None,
    server_endpoint: str | None = None,
    application_token: str = "forged-application-token",
) -> dict[str, str]:
    form = {
        "event": "ONAPPINSTALL",
        "data[VERSION]": "1",
        "data[LANGUAGE_ID]": "en",
        "auth[member_id]": member_id,
        "auth[domain]": domain,
        "auth[access_token]": "forged-access-token",
        "auth[refresh_token]": refresh_token,
        "auth[application_token]": application_token,
    }
    if client_endpoint:
        form["auth[client_endpoint]"] = client_endpoint
    if server_endpoint:
        form["auth[server_endpoint]"] = server_endpoint
    return form


def post_install(server, form: dict[str, str]) -> requests.Response:
    return requests.post(f"{server.url}/bitrix24/install", data=form, timeout=15)


def post_ui_install(server, domain: str, member_id: str, refresh_token: str) -> requests.Response:
    return requests.post(
        f"{server.url}/bitrix24/install",
        params={"DOMAIN": domain, "PROTOCOL": "0", "LANG": "en", "APP_SID": "x" * 32},
        data={
            "AUTH_ID": "forged-access-token",
            "AUTH_EXPIRES": "3600",
            "REFRESH_ID": refresh_token,
            "APPLICATION_TOKEN": "forged-application-token",
            "member_id": member_id,
            "PLACEMENT": "DEFAULT",
        },
        timeout=15,
    )


def assert_refused(response: requests.Response, status: int = 401, field: str = "") -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "message"}
    if field:
        assert body["message"].startswith(f"{field}:"), body


# -- unknown portals ---------------------------------------------------------------------------


def test_a_forged_install_of_an_unknown_portal_is_refused_and_the_attacker_hears_nothing(
    live_app, emulator, attacker
):
    server = live_app(providers=LOG)
    form = install_event(
        secrets.token_hex(16),
        attacker.host,
        "made-up-refresh-token",
        client_endpoint=f"{attacker.url}/rest/",
    )
    assert_refused(post_install(server, form))
    assert_refused(post_ui_install(server, attacker.host, secrets.token_hex(16), "made-up"))
    assert snapshot(server) == [(0, 0)]
    assert attacker.requests == []
    # The refusals came from the OAuth server, which was asked (and only it).
    assert emulator.stats["refresh_errors"] == 2


@pytest.mark.parametrize(
    "variant",
    ["client_endpoint", "domain", "domain_userinfo", "member_id", "server_endpoint", "ui_domain"],
)
def test_an_install_disagreeing_with_the_oauth_answer_is_refused(
    live_app, emulator, attacker, variant
):
    """The attacker installed our app on a portal of their own, so they hold a refresh token
    the OAuth server accepts; everything else they claim must still agree with its answer."""
    server = live_app(providers=LOG)
    own = emulator.add_portal()  # the attacker's portal, with the app on it
    victim = emulator.add_portal()
    claim = {
        "member_id": own.member_id,
        "domain": own.domain,
        "client_endpoint": own.client_endpoint,
        "server_endpoint": emulator.server_endpoint,
    }
    field = variant
    if variant == "client_endpoint":
        claim["client_endpoint"] = f"{attacker.url}/rest/"
    elif variant == "domain":
        claim["domain"] = attacker.host
    elif variant == "domain_userinfo":
        field = "domain"
        claim["domain"] = f"{attacker.host}@{own.domain}"  # urlsplit's host: the real one
    elif variant == "member_id":
        claim["member_id"] = victim.member_id
    elif variant == "server_endpoint":
        claim["server_endpoint"] = f"{attacker.url}/rest/"
    if variant == "ui_domain":
        field = "domain"
        response = post_ui_install(server, attacker.host, own.member_id, own.refresh_token)
    else:
        response = post_install(server, install_event(refresh_token=own.refresh_token, **claim))
    assert_refused(response, 401, field)
    assert emulator.stats["refreshes"] == 1  # the token was real: the answer decided
    assert snapshot(server) == [(0, 0)]
    assert attacker.requests == []
    assert own.stats["requests"] == victim.stats["requests"] == 0


# -- taking over a known portal, in every state --------------------------------------------------


@pytest.mark.parametrize(
    "state",
    [
        PortalState.ACTIVE,
        PortalState.UNINSTALLED,
        PortalState.NEEDS_REINSTALL,
        PortalState.BLOCKED,
    ],
)
def test_a_known_portal_cannot_be_taken_over_in_any_state(live_app, emulator, attacker, state):
    server = live_app(providers=LOG)
    victim = emulator.add_portal()
    assert victim.install(server.url).status_code == 200
    message_id, answer = victim.send_sms("smslog", "+14155550100", "before")
    assert answer.status_code == 200
    if state == PortalState.UNINSTALLED:
        assert victim.uninstall(clean=False).status_code == 200
    elif state != PortalState.ACTIVE:
        set_state(server, victim.member_id, state)
    before = snapshot(server)
    victim_requests = victim.stats["requests"]
    own = emulator.add_portal()  # the attacker's own portal: a refresh token OAuth accepts

    forgeries = [
        # made-up tokens, the attacker's address
        install_event(
            victim.member_id,
            attacker.host,
            "made-up-refresh-token",
            client_endpoint=f"{attacker.url}/rest/",
        ),
        # made-up tokens, the victim's own address: no request to the victim either
        install_event(
            victim.member_id,
            victim.domain,
            "made-up-refresh-token",
            client_endpoint=victim.client_endpoint,
        ),
    ]
    for form in forgeries:
        assert_refused(post_install(server, form))
    # a real token of the attacker's portal, presented as the victim's: fresh each time
    for domain, endpoint in (
        (attacker.host, f"{attacker.url}/rest/"),
        (victim.domain, victim.client_endpoint),
    ):
        form = install_event(victim.member_id, domain, own.refresh_token, client_endpoint=endpoint)
        assert_refused(post_install(server, form), 401, "member_id")
    assert_refused(post_ui_install(server, attacker.host, victim.member_id, own.refresh_token))

    assert snapshot(server) == before
    assert attacker.requests == []
    assert victim.stats["requests"] == victim_requests
    assert own.stats["requests"] == 0

    # Bitrix24's own re-install still works, and the portal is the victim's again.
    assert victim.install(server.url).status_code == 200
    stored = portal_row(server, victim.member_id)
    assert stored.state == PortalState.ACTIVE
    assert stored.application_token == victim.application_token
    assert stored.client_endpoint == victim.client_endpoint
    _, answer = victim.send_sms("smslog", "+14155550101", "after")
    assert answer.status_code == 200, answer.text


# -- redirects and addresses ---------------------------------------------------------------------


def test_an_oauth_redirect_to_an_internal_address_is_not_followed(live_app, emulator):
    with Recorder() as internal, Recorder() as oauth:
        oauth.answer = redirect_to(f"{internal.url}/admin/delete-everything")
        server = live_app(providers=LOG, bitrix24={"oauth_url": f"{oauth.url}/oauth/token/"})
        portal = emulator.add_portal()
        response = portal.install(server.url)
        assert_refused(response, 503)
        assert response.json()["error"] == "oauth_unavailable"
        assert len(oauth.requests) == 1 and internal.requests == []
        # the secret went to the configured OAuth server only, and is not echoed
        assert f"client_secret={CLIENT_SECRET}" in oauth.requests[0].path
        assert CLIENT_SECRET not in response.text
        assert snapshot(server) == [(0, 0)]


@pytest.mark.parametrize(
    "endpoint", ["file:///etc/passwd", "gopher://127.0.0.1:6379/_FLUSHALL", "http:///rest/"]
)
def test_an_oauth_answer_naming_a_non_http_endpoint_is_refused(live_app, emulator, endpoint):
    def answer(_request):
        return json_answer(
            {
                "access_token": "a" * 40,
                "refresh_token": "r" * 40,
                "member_id": "m" * 32,
                "client_endpoint": endpoint,
                "domain": "oauth.bitrix.info",
            }
        )

    with Recorder(answer) as oauth:
        server = live_app(providers=LOG, bitrix24={"oauth_url": f"{oauth.url}/oauth/token/"})
        form = install_event("m" * 32, "127.0.0.1", "r" * 40)
        assert_refused(post_install(server, form), 503)
        assert snapshot(server) == [(0, 0)]


# -- app.info must name our app -----------------------------------------------------------------


MARKET = "app.573ad8a0346747.09223434"


@pytest.mark.parametrize(
    ("client_id", "app_code", "result", "accepted"),
    [
        (CLIENT_ID, "", {"CODE": CLIENT_ID, "ID": 1}, True),
        (CLIENT_ID, "", {"ID": 1, "VERSION": 1}, False),  # no CODE
        (CLIENT_ID, "", {"CODE": "", "ID": 1}, False),
        (CLIENT_ID, "", {"CODE": "local.someone.else"}, False),
        (CLIENT_ID, "", True, False),
        (CLIENT_ID, "", [], False),
        (MARKET, "vendor.sms", {"CODE": "vendor.sms"}, True),  # a Market app: its app code
        (MARKET, "vendor.sms", {"CODE": "other.vendor.app"}, False),  # another Market app
        (MARKET, "vendor.sms", {"ID": 5}, False),
        (MARKET, "", {"CODE": "vendor.sms"}, False),  # our code unknown: nothing proves it
    ],
)
def test_app_info_proves_a_token_only_when_it_names_the_app(client_id, app_code, result, accepted):
    with Recorder(lambda _request: json_answer({"result": result})) as portal:
        settings = Bitrix24Schema().load(
            {"client_id": client_id, "app_code": app_code, "timeout": 5}
        )
        assert verify.probe_token(f"{portal.url}/rest/", "token", settings) is accepted
        assert [r.path for r in portal.requests] == ["/rest/app.info"]


def test_a_probe_does_not_follow_a_redirect():
    with Recorder() as internal, Recorder() as portal:
        portal.answer = redirect_to(f"{internal.url}/rest/app.info", 307)
        settings = Bitrix24Schema().load({"client_id": CLIENT_ID, "timeout": 5})
        assert verify.probe_token(f"{portal.url}/rest/", "token", settings) is False
        assert internal.requests == []


# -- allowed_domains -----------------------------------------------------------------------------


def test_allowed_domains_refuse_outsiders_before_asking_anybody(live_app, emulator):
    server = live_app(providers=LOG, bitrix24={"allowed_domains": ["*.bitrix24.com"]})
    portal = emulator.add_portal()  # 127.0.0.1:<port>
    response = portal.install(server.url)
    assert_refused(response, 403)
    assert response.json()["error"] == "domain_not_allowed"
    assert emulator.stats == {"refreshes": 0, "refresh_errors": 0}
    assert portal.stats["requests"] == 0 and snapshot(server) == [(0, 0)]


def test_allowed_domains_let_matching_portals_in(live_app, emulator):
    server = live_app(providers=LOG, bitrix24={"allowed_domains": ["*.bitrix24.com", "127.0.0.1"]})
    portal = emulator.add_portal()
    assert portal.install(server.url).status_code == 200
    assert portal_row(server, portal.member_id).state == PortalState.ACTIVE


# -- the real install ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["event", "ui"])
def test_a_real_install_stores_what_the_oauth_server_said(live_app, emulator, mode):
    server = live_app(providers=LOG)
    portal = emulator.add_portal()
    response = portal.install(server.url, mode=mode)
    assert response.status_code == 200, response.text
    assert emulator.stats["refreshes"] == 1
    stored = portal_row(server, portal.member_id)
    # The exchange spent the install's refresh token: the stored pair is the new one.
    assert (stored.access_token, stored.refresh_token) == (
        portal.access_token,
        portal.refresh_token,
    )
    assert stored.client_endpoint == portal.client_endpoint
    assert stored.domain == portal.domain
    assert stored.server_endpoint == emulator.server_endpoint
    assert stored.application_token == portal.application_token
    assert set(portal.senders) == {"smslog"}
    message_id, answer = portal.send_sms("smslog", "+14155550100", "hello")
    assert answer.status_code == 200
    assert portal.wait_for_status(message_id) == "delivered"


def test_the_install_page_says_when_providers_were_not_registered(live_app, emulator):
    server = live_app(providers=LOG)
    portal = emulator.add_portal()
    portal.inject("INTERNAL_SERVER_ERROR", 500, count=5, methods="messageservice.sender.list")
    response = portal.install(server.url, mode="ui")
    assert response.status_code == 200
    assert "could not be registered yet" in response.text
    assert "b24sms providers sync" in response.text
    assert "BX24.installFinish()" in response.text
    assert portal_row(server, portal.member_id).state == PortalState.ACTIVE


# -- application_token rotation (ONAPPUPDATE) ---------------------------------------------------


def handler_call(portal, application_token: str) -> requests.Response:
    handler = portal.senders["smslog"]["HANDLER"]
    form = {
        "type": "SMS",
        "code": "smslog",
        "message_id": secrets.token_hex(16),
        "message_to": "+14155550100",
        "message_body": "hello",
        "auth[member_id]": portal.member_id,
        "auth[application_token]": application_token,
    }
    return requests.post(handler, data=form, timeout=10)


def update_event(portal, **auth: str | None) -> dict[str, str]:
    form = {
        "event": "ONAPPUPDATE",
        "data[VERSION]": "2",
        "data[PREVIOUS_VERSION]": "1",
        "auth[member_id]": portal.member_id,
        "auth[domain]": portal.domain,
        "auth[client_endpoint]": portal.client_endpoint,
    }
    form.update({f"auth[{k}]": v for k, v in auth.items() if v is not None})
    return form


def test_an_app_update_rotates_the_application_token(live_app, emulator):
    server = live_app(providers=LOG)
    portal = emulator.add_portal()
    portal.install(server.url)
    old = portal.application_token
    response = portal.update_app()
    assert response.status_code == 200, response.text
    assert portal.application_token != old
    assert portal_row(server, portal.member_id).application_token == portal.application_token
    # HANDLER calls carry the new token now; the old one is refused.
    message_id, answer = portal.send_sms("smslog", "+14155550100", "after the update")
    assert answer.status_code == 200, answer.text
    assert handler_call(portal, old).status_code == 401
    # Providers registered again (Bitrix24 deleted them with the update).
    assert set(portal.senders) == {"smslog"}
    assert portal.wait_for_status(message_id) == "delivered"


def test_an_access_token_alone_does_not_rotate_the_application_token(live_app, emulator):
    """Even the installing administrator's live access token proves nothing about who sends
    it: every user reads their own in the frame, and the portal answers any of them."""
    server = live_app(providers=LOG)
    portal = emulator.add_portal()
    portal.install(server.url)
    before = snapshot(server)
    requests_before = portal.stats["requests"]
    access = portal.placement_auth()["AUTH_ID"]  # alive at the portal, names our app
    form = update_event(portal, application_token=secrets.token_hex(16), access_token=access)
    response = requests.post(f"{server.url}/bitrix24/events", data=form, timeout=15)
    assert_refused(response, 401)
    assert snapshot(server) == before
    assert portal.stats["requests"] == requests_before  # nobody asked the portal either


@pytest.mark.parametrize("proof", ["made_up_tokens", "other_apps_token", "no_code"])
def test_an_unproven_update_with_a_new_token_is_refused(live_app, emulator, attacker, proof):
    server = live_app(providers=LOG)
    portal = emulator.add_portal()
    portal.install(server.url)
    auth: dict[str, str | None] = {
        "application_token": "forged-new-token",
        "access_token": "made-up-access",
        "refresh_token": "made-up-refresh",
    }
    if proof == "other_apps_token":
        own = emulator.add_portal()  # a refresh token OAuth accepts, for another portal
        auth["refresh_token"] = own.refresh_token
    elif proof == "no_code":
        # The stored address would answer app.info without a CODE: it is not even asked.
        attacker.answer = lambda _request: json_answer({"result": {"ID": 1}})
        with db_of(server).session() as session:
            row = session.scalar(select(Portal).where(Portal.member_id == portal.member_id))
            row.client_endpoint = f"{attacker.url}/rest/"
        auth["refresh_token"] = None
    before = snapshot(server)
    response = requests.post(
        f"{server.url}/bitrix24/events", data=update_event(portal, **auth), timeout=15
    )
    assert_refused(response, 401)
    assert snapshot(server) == before
    assert handler_call(portal, "forged-new-token").status_code == 401
    assert attacker.requests == []
    if proof != "no_code":
        assert handler_call(portal, portal.application_token).status_code == 200


def test_an_update_with_the_stored_token_but_unconfirmed_tokens_keeps_the_address(
    live_app, emulator, attacker
):
    """The stored application_token proves the sender; a new address or new tokens still need
    the OAuth server's word."""
    server = live_app(providers=LOG)
    portal = emulator.add_portal()
    portal.install(server.url)
    stored = portal_row(server, portal.member_id)
    form = update_event(
        portal,
        application_token=portal.application_token,
        access_token="made-up",
        refresh_token="made-up",
    )
    form["auth[client_endpoint]"] = f"{attacker.url}/rest/"
    form["auth[domain]"] = attacker.host
    response = requests.post(f"{server.url}/bitrix24/events", data=form, timeout=15)
    assert response.status_code == 200, response.text
    after = portal_row(server, portal.member_id)
    assert (after.client_endpoint, after.domain, after.access_token, after.refresh_token) == (
        stored.client_endpoint,
        stored.domain,
        stored.access_token,
        stored.refresh_token,
    )
    assert attacker.requests == []


# -- only Bitrix24 or an administrator changes whom a portal trusts ------------------------------


def events_post(server, form: dict[str, str]) -> requests.Response:
    return requests.post(f"{server.url}/bitrix24/events", data=form, timeout=15)


def forged_update(portal, user: dict[str, str], token: str, *, refresh: bool) -> dict[str, str]:
    """The review's ONAPPUPDATE: a user's own tokens from the frame, the attacker's token."""
    return update_event(
        portal,
        application_token=token,
        access_token=user["AUTH_ID"],
        refresh_token=user["REFRESH_ID"] if refresh else None,
    )


def forged_ui_install(server, portal, user: dict[str, str], token: str) -> requests.Response:
    """The review's UI install form: a user's REFRESH_ID, the attacker's APPLICATION_TOKEN."""
    return requests.post(
        f"{server.url}/bitrix24/install",
        params={"DOMAIN": portal.domain, "PROTOCOL": "0", "LANG": "en", "APP_SID": "x" * 32},
        data={
            "AUTH_ID": user["AUTH_ID"],
            "AUTH_EXPIRES": "3600",
            "REFRESH_ID": user["REFRESH_ID"],
            "APPLICATION_TOKEN": token,
            "member_id": portal.member_id,
            "PLACEMENT": "DEFAULT",
        },
        timeout=15,
    )


def forged_clean_uninstall(portal, token: str) -> dict[str, str]:
    return {
        "event": "ONAPPUNINSTALL",
        "data[LANGUAGE_ID]": "en",
        "data[CLEAN]": "1",
        "auth[domain]": portal.domain,
        "auth[client_endpoint]": portal.client_endpoint,
        "auth[member_id]": portal.member_id,
        "auth[application_token]": token,
    }


@pytest.mark.parametrize(
    ("variant", "status"),
    [
        ("update_access_token", 401),  # the access-token branch the review used
        ("update_refresh_token", 403),  # OAuth confirms the user; user.admin says no
        ("ui_install", 403),
        ("event_install", 403),
    ],
)
def test_a_portal_user_cannot_replace_the_application_token(live_app, emulator, variant, status):
    server = live_app(providers=LOG)
    portal = emulator.add_portal()
    assert portal.install(server.url).status_code == 200
    _, answer = portal.send_sms("smslog", "+14155550100", "before")
    assert answer.status_code == 200
    real = portal.application_token
    before = snapshot(server)
    asked = portal.stats["methods"]["user.admin"]  # once, by the real install
    user = portal.user_auth(admin=False)  # what BX24.getAuth() gives any user in the frame
    evil = secrets.token_hex(16)

    if variant.startswith("update"):
        form = forged_update(portal, user, evil, refresh=variant == "update_refresh_token")
        response = events_post(server, form)
    elif variant == "ui_install":
        response = forged_ui_install(server, portal, user, evil)
    else:
        form = install_event(
            portal.member_id,
            portal.domain,
            user["REFRESH_ID"],
            client_endpoint=portal.client_endpoint,
            application_token=evil,
        )
        response = post_install(server, form)
    assert_refused(response, status)
    if status == 403:
        assert response.json()["error"] == "admin_required"
        assert portal.stats["methods"]["user.admin"] == asked + 1
    assert snapshot(server) == before
    assert portal_row(server, portal.member_id).application_token == real

    # The HANDLER still takes the real token, and the forged token opens nothing.
    assert handler_call(portal, real).status_code == 200
    assert handler_call(portal, evil).status_code == 401
    # The forged uninstall that would erase the portal's data is refused.
    assert_refused(events_post(server, forged_clean_uninstall(portal, evil)), 401)
    stored = portal_row(server, portal.member_id)
    assert stored.state == PortalState.ACTIVE and stored.application_token == real
    with db_of(server).session() as session:
        # the message before the attack and the one after it: nothing erased
        assert session.scalar(select(func.count()).select_from(Message)) == 2


def test_an_administrators_update_with_a_new_token_is_accepted(live_app, emulator):
    """Another administrator than the installer updates the app: proven at the OAuth server,
    user.admin true, so the new token is stored and used."""
    server = live_app(providers=LOG)
    portal = emulator.add_portal()
    portal.install(server.url)
    old = portal.application_token
    asked = portal.stats["methods"]["user.admin"]
    admin = portal.user_auth(admin=True)
    new = secrets.token_hex(16)
    response = events_post(server, forged_update(portal, admin, new, refresh=True))
    assert response.status_code == 200, response.text
    assert portal.stats["methods"]["user.admin"] == asked + 1
    assert portal_row(server, portal.member_id).application_token == new
    assert handler_call(portal, new).status_code == 200
    assert handler_call(portal, old).status_code == 401


def test_a_first_install_needs_an_administrator(live_app, emulator):
    server = live_app(providers=LOG)
    portal = emulator.add_portal()  # the app is on the portal; the service does not know it
    user = portal.user_auth(admin=False)
    response = forged_ui_install(server, portal, user, secrets.token_hex(16))
    assert_refused(response, 403)
    assert snapshot(server) == [(0, 0)]
    # An administrator's install of the same portal goes in.
    response = forged_ui_install(server, portal, portal.user_auth(admin=True), "t" * 32)
    assert response.status_code == 200, response.text
    assert portal_row(server, portal.member_id).application_token == "t" * 32


@pytest.mark.parametrize("state", [PortalState.ACTIVE, PortalState.UNINSTALLED])
def test_a_reinstall_with_the_stored_token_needs_no_administrator_only_when_active(
    live_app, emulator, state
):
    """Bitrix24's own re-install of an active portal carries the stored token; one of a portal
    that is not active makes it active again, which only an administrator may."""
    server = live_app(providers=LOG)
    portal = emulator.add_portal()
    portal.install(server.url)
    stored = portal.application_token
    if state == PortalState.UNINSTALLED:
        # uninstalled here, while the portal's tokens still work (the event was lost, say)
        set_state(server, portal.member_id, state)
    before = snapshot(server)
    asked = portal.stats["methods"]["user.admin"]
    user = portal.user_auth(admin=False)
    response = forged_ui_install(server, portal, user, stored)
    if state == PortalState.ACTIVE:
        assert response.status_code == 200, response.text
        assert portal.stats["methods"]["user.admin"] == asked
        assert portal_row(server, portal.member_id).application_token == stored
    else:
        assert_refused(response, 403)
        assert snapshot(server) == before


def test_an_admin_check_that_cannot_be_made_is_a_503_and_changes_nothing(live_app, emulator):
    server = live_app(providers=LOG)
    portal = emulator.add_portal()
    portal.install(server.url)
    before = snapshot(server)
    portal.inject("INTERNAL_SERVER_ERROR", 500, count=1, methods="user.admin")
    admin = portal.user_auth(admin=True)
    form = forged_update(portal, admin, secrets.token_hex(16), refresh=True)
    response = events_post(server, form)
    assert_refused(response, 503)
    assert response.json()["error"] == "portal_unavailable"
    assert snapshot(server) == before


# -- one slow portal cannot take every portal-call slot ------------------------------------------


def test_a_slow_portal_holds_one_slot_and_other_portals_app_pages_still_open(live_app, emulator):
    """The review: app-page posts naming one slow portal took all slots, and every other
    portal's app page answered 503. Now that portal holds one slot; the others open."""
    server = live_app(providers=LOG, rate_limit={"enabled": False})
    slow, victim = emulator.add_portal(), emulator.add_portal()
    assert slow.install(server.url).status_code == 200
    assert victim.install(server.url).status_code == 200
    asked_before = slow.stats["methods"]["app.info"]
    slow.rest_delays["app.info"] = 2.0  # under WEB_TIMEOUT's read timeout: it answers
    statuses: list[int] = []

    def open_slow_page() -> None:
        form = slow.placement_auth()
        form["AUTH_ID"] = secrets.token_hex(16)  # a new token each: no cached answer
        response = requests.post(
            f"{server.url}/app", data=form, headers={"Accept": "application/json"}, timeout=30
        )
        statuses.append(response.status_code)

    load = [threading.Thread(target=open_slow_page) for _ in range(web_slots.size * 3)]
    for thread in load:
        thread.start()
    time.sleep(0.5)  # every post arrived; one waits on the slow portal
    victim_answers = []
    for _ in range(5):
        form = victim.placement_auth()
        form["AUTH_ID"] = victim.user_auth(admin=False)["AUTH_ID"]  # an ordinary user
        response = requests.post(f"{server.url}/app", data=form, timeout=10)
        victim_answers.append(response.status_code)
    still_waiting = sum(1 for thread in load if thread.is_alive())
    for thread in load:
        thread.join(30)
    assert still_waiting >= 1  # the victim's pages were opened while the slow one held its slot
    assert victim_answers == [200] * 5
    assert slow.stats["methods"]["app.info"] - asked_before == 1
    assert sorted(statuses).count(503) == len(load) - 1
