"""The app page may be framed by its portal's own pages only (CSP ``frame-ancestors``).

Bitrix24 loads an app's page into an ``<iframe>`` of the portal and documents ``frame-ancestors``
with the portal's address as the way to allow it (b24restdocs,
``local-integrations/site-does-not-allow-connection.md``).
"""

from __future__ import annotations

import re

import requests
from sqlalchemy import select

from b24sms.models import Portal
from b24sms.web.security_headers import portal_origin
from tests.helpers import frame_body, frame_query

LOG_ONLY = {"smslog": {"plugin": "log", "name": "Log"}}


def frame_ancestors(response: requests.Response) -> str:
    policy = response.headers["Content-Security-Policy"]
    match = re.search(r"frame-ancestors ([^;]*)", policy)
    assert match, policy
    return match.group(1).strip()


def open_page(server, auth: dict[str, str]) -> requests.Response:
    return requests.post(
        f"{server.url}/app", params=frame_query(auth), data=frame_body(auth), timeout=10
    )


def test_the_app_page_may_be_framed_by_its_portal_only(live_app, emulator):
    server = live_app(providers=LOG_ONLY)
    one, two = emulator.add_portal(), emulator.add_portal()
    for portal in (one, two):
        assert portal.install(server.url).status_code == 200
    first = open_page(server, one.placement_auth())
    second = open_page(server, two.placement_auth())
    assert first.status_code == second.status_code == 200
    # the emulated portals serve http; each page names its own portal and nothing else
    assert frame_ancestors(first) == f"http://{one.domain}"
    assert frame_ancestors(second) == f"http://{two.domain}"
    # the paging and filter forms keep the same policy (a session token instead of AUTH_ID)
    token = re.search(r'name="s" value="([^"]+)"', first.text).group(1)
    again = requests.post(f"{server.url}/app", data={"s": token}, timeout=10)
    assert again.status_code == 200 and frame_ancestors(again) == f"http://{one.domain}"


def test_the_origin_comes_from_the_stored_portal(live_app, emulator):
    server = live_app(providers=LOG_ONLY)
    portal = emulator.add_portal()
    assert portal.install(server.url).status_code == 200
    db = server.app.extensions["b24sms"].db
    with db.session() as session:
        row = session.scalars(select(Portal).where(Portal.member_id == portal.member_id)).one()
        row.domain, row.client_endpoint = "acme.bitrix24.com", "https://acme.bitrix24.com/rest/"
        session.flush()
        assert portal_origin(session, row.id) == "https://acme.bitrix24.com"
        row.domain = "acme.bitrix24.com; script-src *"
        session.flush()
        assert portal_origin(session, row.id) == "'none'"
        session.rollback()


def test_the_not_signed_in_page_has_no_portal_to_name(live_app):
    server = live_app(providers=LOG_ONLY)
    response = requests.post(f"{server.url}/app", data={"s": "forged"}, timeout=10)
    assert response.status_code == 401
    # one sentence, no form or link: shown wherever it is framed
    assert frame_ancestors(response) == "*" and "<form" not in response.text


def test_scripts_only_from_bitrix24_over_https(live_app, emulator):
    server = live_app(providers=LOG_ONLY)
    portal = emulator.add_portal()
    assert portal.install(server.url).status_code == 200
    page = open_page(server, portal.placement_auth())
    assert page.status_code == 200
    policy = page.headers["Content-Security-Policy"]
    sources = re.search(r"script-src ([^;]*)", policy).group(1).split()
    assert [s for s in sources if not s.startswith("'nonce-")] == ["https://api.bitrix24.com"]
    assert "http://api.bitrix24.com" not in policy
    # the library the page loads is the one the policy allows, not a scheme-relative address
    # that an http page would fetch over http
    assert '"https://api.bitrix24.com/api/v1/"' in page.text
    assert '"//api.bitrix24.com' not in page.text
