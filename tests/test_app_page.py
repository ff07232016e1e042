"""The app page: opened by Bitrix24 in a frame, verified, isolated per portal, driven in Chromium.

The end-to-end test starts Debian's headless Chromium through chromedriver (both from apt:
``chromium``, ``chromium-driver``) and is skipped with the reason where they are missing.
"""

from __future__ import annotations

import html
import logging
import re
import time
from pathlib import Path
from urllib.parse import urlencode

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from b24sms.bitrix24 import verify
from b24sms.models import Message, OutboxEntry
from b24sms.web import app_page, app_session
from tests.helpers import frame_body, frame_query, open_page

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
METRICS_TOKEN = "metrics-token-0123456789"
PROVIDERS = {
    "smslog": {"plugin": "log", "name": {"en": "Log only", "de": "Nur Protokoll"}},
    "second": {"plugin": "log", "name": "Always failing", "outcome": "failed"},
}


@pytest.fixture(autouse=True)
def _fresh_probe_cache():
    # Tokens are random per test, but a cached answer must never leak between tests.
    verify.clear_cache()
    yield
    verify.clear_cache()


def db_of(server):
    return server.app.extensions["b24sms"].db


def session_token(page_html: str) -> str:
    match = re.search(r'name="s" value="([^"]+)"', page_html)
    assert match, "no session token in the page"
    return html.unescape(match.group(1))


def send_token(page_html: str) -> str:
    match = re.search(r'name="t" value="([^"]+)"', page_html)
    assert match, "no test-message form token in the page"
    return html.unescape(match.group(1))


def installed_portal(server, emulator):
    portal = emulator.add_portal()
    assert portal.install(server.url).status_code == 200
    return portal


def scrape(server, token: str = METRICS_TOKEN) -> dict[tuple[str, tuple], float]:
    response = requests.get(
        f"{server.url}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=10
    )
    assert response.status_code == 200, response.text
    values: dict[tuple[str, tuple], float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


# -- the browser -----------------------------------------------------------------------------


def _browser_missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            return f"{path} is missing (apt-get install -y chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


@pytest.fixture
def chromium(tmp_path):
    """Headless Chromium driven through Debian's chromedriver (no Selenium Manager download)."""
    reason = _browser_missing()
    if reason:
        pytest.skip(f"real-browser test skipped: {reason}")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # Chromium refuses to run as root with its sandbox
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1280,1700",
        # The page may fetch Bitrix24's JS library when framed; the test stays off the internet.
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def launcher_page(app_url: str, auth: dict[str, str]) -> str:
    """A page playing Bitrix24's part: a frame, and a form POSTing the placement auth into it."""
    inputs = "".join(
        f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
        for k, v in frame_body(auth).items()
    )
    action = html.escape(f"{app_url}/app?{urlencode(frame_query(auth))}")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Bitrix24</title>
<style>body{{margin:0;font-family:sans-serif;background:#eef2f4}}
header{{padding:10px 16px;background:#2fc6f6;color:#fff}}
iframe{{display:block;margin:12px auto;border:0;background:#fff}}</style></head>
<body><header>Bitrix24 (emulated) — Applications — SMS providers</header>
<iframe name="b24app" id="b24app" width="960" height="1500"></iframe>
<form id="launch" method="post" target="b24app" action="{action}">{inputs}</form>
<script>document.getElementById("launch").submit();</script></body></html>"""


@pytest.mark.slow
@pytest.mark.browser
def test_app_page_end_to_end_in_chromium(live_app, emulator, chromium, caplog):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import Select, WebDriverWait

    caplog.set_level(logging.INFO)
    started = time.monotonic()
    server = live_app(providers=PROVIDERS, metrics={"enabled": True, "token": METRICS_TOKEN})
    # The portal serves the page around the frame from its own domain, as a real portal does: the
    # app page's frame-ancestors allows that domain only.
    portal = emulator.add_portal()
    assert portal.install(server.url).status_code == 200
    delivered_id, response = portal.send_sms("smslog", "+14155550123", "Your code: 1234")
    assert response.status_code == 200, response.text
    failed_id, response = portal.send_sms("second", "+14155550124", "Hello")
    assert response.status_code == 200, response.text
    assert portal.wait_for_status(delivered_id) == "delivered"
    assert portal.wait_for_status(failed_id) == "failed"

    driver = chromium
    wait = WebDriverWait(driver, 15)
    driver.get(portal.serve_page(launcher_page(server.url, portal.placement_auth())))
    wait.until(EC.frame_to_be_available_and_switch_to_it("b24app"))
    wait.until(EC.presence_of_element_located((By.ID, "messages")))

    # Providers: CODE, name in the frame's language, plugin, registration state.
    providers = {
        row.get_attribute("data-code"): row.text
        for row in driver.find_elements(By.CSS_SELECTOR, "#providers tbody tr")
    }
    assert set(providers) == {"smslog", "second"}
    assert "Log only" in providers["smslog"] and "registered" in providers["smslog"]
    assert "Always failing" in providers["second"] and "log" in providers["second"]
    assert driver.find_element(By.ID, "portal-domain").text == portal.domain

    # The message sent through the emulator, masked, with its whole history.
    row = driver.find_element(By.CSS_SELECTOR, f'tr[data-message-id="{delivered_id}"]')
    assert row.get_attribute("data-status") == "delivered"
    assert "+1********23" in row.text and "+14155550123" not in driver.page_source
    history = [li.text.split()[0] for li in row.find_elements(By.CSS_SELECTOR, ".history li")]
    assert history == ["queued", "sent", "delivered"]
    assert "Your code" not in driver.page_source  # bodies are never shown
    # The per-provider chart has a bar for each window.
    assert len(driver.find_elements(By.CSS_SELECTOR, "#stats-1 svg.bar")) == 2
    assert (
        driver.find_element(By.CSS_SELECTOR, '#stats-2 tr[data-code="second"] .rate').text == "0%"
    )

    # Filter by status: only the failed message is left.
    before = driver.find_element(By.ID, "messages")
    Select(driver.find_element(By.ID, "filter-status")).select_by_value("failed")
    driver.find_element(By.ID, "filter-apply").click()
    wait.until(EC.staleness_of(before))
    ids = [
        r.get_attribute("data-message-id")
        for r in driver.find_elements(By.CSS_SELECTOR, "#messages tbody tr")
    ]
    assert ids == [failed_id]
    assert (
        Select(driver.find_element(By.ID, "filter-status")).first_selected_option.get_attribute(
            "value"
        )
        == "failed"
    )

    # Filter by CODE.
    before = driver.find_element(By.ID, "messages")
    Select(driver.find_element(By.ID, "filter-status")).select_by_value("")
    Select(driver.find_element(By.ID, "filter-code")).select_by_value("smslog")
    driver.find_element(By.ID, "filter-apply").click()
    wait.until(EC.staleness_of(before))
    ids = [
        r.get_attribute("data-message-id")
        for r in driver.find_elements(By.CSS_SELECTOR, "#messages tbody tr")
    ]
    assert ids == [delivered_id]

    # A test message from the form: stored, sent by the log gateway, final status shown.
    Select(driver.find_element(By.ID, "test-code")).select_by_value("smslog")
    driver.find_element(By.ID, "test-to").send_keys("+14155550199")
    before = driver.find_element(By.ID, "test-form")
    driver.find_element(By.ID, "test-send").click()
    wait.until(EC.staleness_of(before))
    notice = wait.until(EC.presence_of_element_located((By.ID, "notice"))).text
    test_id = re.search(r"test-[0-9a-f]{32}", notice).group(0)
    test_row = driver.find_element(By.CSS_SELECTOR, f'tr[data-message-id="{test_id}"]')
    assert test_row.get_attribute("data-status") == "delivered"
    assert "test" in test_row.find_element(By.CSS_SELECTOR, ".tag").text.lower()
    assert [
        li.text.split()[0] for li in test_row.find_elements(By.CSS_SELECTOR, ".history li")
    ] == ["queued", "sent", "delivered"]

    ARTIFACTS.mkdir(exist_ok=True)
    driver.switch_to.default_content()
    screenshot = ARTIFACTS / "app-page.png"
    assert driver.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000

    # A narrow frame (Bitrix24's slider on a small screen): the page itself never scrolls
    # sideways; only wide tables do, inside their own box.
    driver.execute_script("document.getElementById('b24app').width = 420")
    driver.switch_to.frame("b24app")
    overflow = driver.execute_script(
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow <= 1
    driver.switch_to.default_content()
    driver.save_screenshot(str(ARTIFACTS / "app-page-narrow.png"))

    # It reached the log gateway: the gateway's own log record names it (masked number).
    gateway_lines = [r.getMessage() for r in caplog.records if r.name == "b24sms.gateway.smslog"]
    assert any(test_id in line and "+1********99" in line for line in gateway_lines)
    # Bitrix24 never heard of it: the emulated portal knows only the messages it sent.
    assert test_id not in portal.messages
    with db_of(server).session() as session:
        stored = session.scalar(select(Message).where(Message.message_id == test_id))
        assert stored.status == "delivered" and stored.attempts == 1

    # /metrics after the run: the counters match the messages sent (2 smslog, 1 second).
    values = scrape(server)
    assert values[("b24sms_messages_received_total", (("code", "smslog"),))] == 2
    assert values[("b24sms_messages_received_total", (("code", "second"),))] == 1
    assert values[("b24sms_messages_sent_total", (("code", "smslog"),))] == 2
    final = {
        (dict(labels)["code"], dict(labels)["status"]): value
        for (name, labels), value in values.items()
        if name == "b24sms_messages_final_total"
    }
    assert final[("smslog", "delivered")] == 2 and final[("second", "failed")] == 1
    assert final[("smslog", "failed")] == 0 and final[("second", "delivered")] == 0
    assert time.monotonic() - started < 60


# -- who may open it -------------------------------------------------------------------------


def test_forged_and_foreign_auth_ids_get_401(live_app, emulator):
    server = live_app(providers=PROVIDERS)
    portal = installed_portal(server, emulator)
    other = installed_portal(server, emulator)
    auth = portal.placement_auth()

    ok = open_page(server, auth)
    assert ok.status_code == 200 and portal.domain in ok.text

    forged = open_page(server, {**auth, "AUTH_ID": "f" * 70})
    assert forged.status_code == 401
    assert "did not confirm your sign-in" in forged.text
    assert "f" * 70 not in forged.text

    # Another portal's live token, presented with this portal's member_id.
    foreign = open_page(server, {**auth, "AUTH_ID": other.placement_auth()["AUTH_ID"]})
    assert foreign.status_code == 401

    # A DOMAIN from the request is never where the token is checked: the other portal's own
    # token, sent with our member_id and the other portal's DOMAIN, is still refused.
    with_domain = {**other.placement_auth(), "member_id": portal.member_id}
    assert open_page(server, with_domain).status_code == 401
    # ...and our token with a foreign DOMAIN shows our portal, not the DOMAIN's.
    mixed = open_page(server, {**auth, "DOMAIN": other.domain})
    assert (
        mixed.status_code == 200 and portal.domain in mixed.text and other.domain not in mixed.text
    )

    unknown = open_page(server, {**auth, "member_id": "0" * 32})
    assert unknown.status_code == 401 and "no active installation" in unknown.text

    as_json = open_page(server, {**auth, "AUTH_ID": "nope"}, Accept="application/json")
    assert as_json.status_code == 401
    assert as_json.json()["error"] == "unauthorized"

    bare = requests.get(f"{server.url}/app", timeout=10)
    assert bare.status_code == 401 and "only opens inside Bitrix24" in bare.text


def test_a_token_of_another_app_on_the_same_portal_is_refused(live_app, emulator):
    server = live_app(providers=PROVIDERS)
    portal = installed_portal(server, emulator)
    # app.info answers for whichever app the token was issued to.
    portal._app_info = lambda: {"ID": 9, "CODE": "local.someone.else", "INSTALLED": True}
    assert open_page(server, portal.placement_auth()).status_code == 401


def test_an_uninstalled_portal_cannot_open_the_page(live_app, emulator):
    server = live_app(providers=PROVIDERS)
    portal = installed_portal(server, emulator)
    auth = portal.placement_auth()
    page = open_page(server, auth)
    token = session_token(page.text)
    portal.uninstall()
    assert open_page(server, auth).status_code == 401
    again = requests.post(f"{server.url}/app", data={"s": token}, timeout=10)
    assert again.status_code == 401


def test_the_session_token_carries_navigation_and_cannot_be_forged(live_app, emulator):
    server = live_app(providers=PROVIDERS)
    portal = installed_portal(server, emulator)
    message_id, _ = portal.send_sms("second", "+14155550124", "x")
    page = open_page(server, portal.placement_auth())
    token = session_token(page.text)
    assert portal.access_token not in page.text and portal.refresh_token not in page.text
    assert page.headers["Cache-Control"] == "no-store"
    # framed by the portal's own pages only (tests/test_frame_ancestors.py)
    assert f"frame-ancestors http://{portal.domain}" in page.headers["Content-Security-Policy"]

    filtered = requests.post(f"{server.url}/app", data={"s": token, "status": "failed"}, timeout=10)
    assert filtered.status_code == 200 and message_id in filtered.text
    empty = requests.post(f"{server.url}/app", data={"s": token, "status": "delivered"}, timeout=10)
    assert message_id not in empty.text and "match the filter" in empty.text

    tampered = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    assert requests.post(f"{server.url}/app", data={"s": tampered}, timeout=10).status_code == 401
    # The token is the only credential: no member_id or AUTH_ID needed, none accepted instead.
    assert (
        requests.post(
            f"{server.url}/app", data={"member_id": portal.member_id}, timeout=10
        ).status_code
        == 401
    )


def test_provider_names_follow_the_frames_language(live_app, emulator):
    server = live_app(providers=PROVIDERS)
    portal = installed_portal(server, emulator)
    page = open_page(server, {**portal.placement_auth(), "LANG": "de"})
    assert "Nur Protokoll" in page.text
    # ...and the language stays with the session.
    again = requests.post(f"{server.url}/app", data={"s": session_token(page.text)}, timeout=10)
    assert "Nur Protokoll" in again.text


def test_sessions_expire(live_app, emulator):
    server = live_app(providers=PROVIDERS)
    portal = installed_portal(server, emulator)
    token = session_token(open_page(server, portal.placement_auth()).text)
    with server.app.app_context():
        session = app_session.read_session(token)
        assert session.member_id == portal.member_id
        with pytest.raises(app_session.Unauthorized, match="expired"):
            app_session.read_session(token, now=time.time() + app_session.SESSION_MAX + 1)


def test_a_portal_never_sees_another_portals_data(live_app, emulator):
    server = live_app(providers=PROVIDERS)
    mine = installed_portal(server, emulator)
    theirs = installed_portal(server, emulator)
    my_id, _ = mine.send_sms("smslog", "+14155550111", "mine")
    their_ids = [theirs.send_sms(code, "+14155550222", "theirs")[0] for code in PROVIDERS]
    mine.wait_for_status(my_id)

    page = open_page(server, mine.placement_auth())
    assert my_id in page.text
    for other_id in their_ids:
        assert other_id not in page.text
    assert "+1********22" not in page.text and theirs.domain not in page.text
    # The per-provider numbers count this portal's messages only.
    assert re.search(
        r'data-code="second">\s*<td><code>second</code></td>\s*<td class="chart-col">'
        r'.*?<span class="total">0</span>',
        page.text,
        re.DOTALL,
    )

    # Every filter and page stays within the portal.
    token = session_token(page.text)
    for form in ({"code": "second"}, {"status": "failed"}, {"page": "2"}):
        other = requests.post(f"{server.url}/app", data={"s": token, **form}, timeout=10)
        assert other.status_code == 200, other.text[:300]
        assert session_token(other.text)  # the page itself, not an error page
        assert all(other_id not in other.text for other_id in their_ids)

    # A test-message form token of one portal is refused with another's session.
    their_page = open_page(server, theirs.placement_auth())
    refused = requests.post(
        f"{server.url}/app/test-message",
        data={
            "s": token,
            "t": send_token(their_page.text),
            "code": "smslog",
            "to": "+14155550100",
            "body": "hi",
        },
        timeout=10,
    )
    assert refused.status_code == 401 and "does not belong" in refused.text


# -- the test-message form -------------------------------------------------------------------


def test_test_message_is_stored_once_and_never_reported(live_app, emulator):
    server = live_app(providers=PROVIDERS)
    portal = installed_portal(server, emulator)
    page = open_page(server, portal.placement_auth())
    form = {
        "s": session_token(page.text),
        "t": send_token(page.text),
        "code": "smslog",
        "to": "+14155550100",
        "body": "Testing",
    }
    first = requests.post(f"{server.url}/app/test-message", data=form, timeout=10)
    assert first.status_code == 200 and "stored and handed to smslog" in first.text
    # The same form sent twice (a reload) stores nothing new.
    second = requests.post(f"{server.url}/app/test-message", data=form, timeout=10)
    assert second.status_code == 200 and "was sent already" in second.text
    with db_of(server).session() as session:
        rows = session.scalars(select(Message).where(Message.message_id.like("test-%"))).all()
        assert len(rows) == 1 and rows[0].status == "delivered"
        assert rows[0].module_id == app_page.TEST_MODULE_ID


def test_test_message_statuses_never_reach_bitrix24(live_app, emulator):
    server = live_app(providers=PROVIDERS)
    portal = installed_portal(server, emulator)
    page = open_page(server, portal.placement_auth())
    updates = portal.stats_snapshot()["methods"]["messageservice.message.status.update"]
    form = {
        "s": session_token(page.text),
        "t": send_token(page.text),
        "code": "smslog",
        "to": "+14155550100",
        "body": "Testing",
    }
    assert requests.post(f"{server.url}/app/test-message", data=form, timeout=10).ok
    server.app.extensions["b24sms"].queue.drain(max_wait=5)
    assert portal.stats_snapshot()["methods"]["messageservice.message.status.update"] == updates
    with db_of(server).session() as session:
        assert session.scalar(select(func.count()).select_from(OutboxEntry)) == 0


def test_test_message_with_a_bad_number_fails_like_a_real_one(live_app, emulator):
    server = live_app(providers=PROVIDERS)
    portal = installed_portal(server, emulator)
    page = open_page(server, portal.placement_auth())
    form = {
        "s": session_token(page.text),
        "t": send_token(page.text),
        "code": "smslog",
        "to": "12",
        "body": "x",
    }
    answer = requests.post(f"{server.url}/app/test-message", data=form, timeout=10)
    assert answer.status_code == 200
    with db_of(server).session() as session:
        message = session.scalar(select(Message).where(Message.message_id.like("test-%")))
        assert message.status == "failed" and "not a valid phone number" in message.last_error
        # Failed before sending and not reported: nothing waits in the outbox for Bitrix24.
        assert session.scalar(select(func.count()).select_from(OutboxEntry)) == 0


@pytest.mark.parametrize(
    ("change", "problem"),
    [({"code": "nope"}, "Choose one"), ({"to": ""}, "phone number"), ({"body": ""}, "text of")],
)
def test_test_message_form_problems_are_explained(live_app, emulator, change, problem):
    server = live_app(providers=PROVIDERS)
    portal = installed_portal(server, emulator)
    page = open_page(server, portal.placement_auth())
    form = {
        "s": session_token(page.text),
        "t": send_token(page.text),
        "code": "smslog",
        "to": "+14155550100",
        "body": "Testing",
        **change,
    }
    answer = requests.post(f"{server.url}/app/test-message", data=form, timeout=10)
    assert answer.status_code == 400 and problem in answer.text
    with db_of(server).session() as session:
        assert session.scalar(select(func.count()).select_from(Message)) == 0


def send_test_message(server, page_html: str, **headers: str) -> requests.Response:
    form = {
        "s": session_token(page_html),
        "t": send_token(page_html),
        "code": "smslog",
        "to": "+14155550100",
        "body": "Testing",
    }
    return requests.post(f"{server.url}/app/test-message", data=form, headers=headers, timeout=10)


def test_test_messages_are_capped_per_portal_across_processes(live_app, emulator):
    # Two servers on one database stand for two processes: the count lives in the database.
    cap = {"app_page": {"test_messages_per_hour": 3}}
    one = live_app(providers=PROVIDERS, **cap)
    two = live_app(providers=PROVIDERS, **cap)
    portal = installed_portal(one, emulator)
    page = open_page(one, portal.placement_auth())
    for server in (one, two, one):
        answer = send_test_message(server, page.text)
        assert answer.status_code == 200 and "stored and handed to smslog" in answer.text
        page = answer  # each answer carries the next form token

    refused = send_test_message(two, page.text)
    assert refused.status_code == 429
    assert "at most 3 are allowed" in refused.text and "test_messages_per_hour" in refused.text
    assert 3000 < int(refused.headers["Retry-After"]) <= 3601
    as_json = send_test_message(one, refused.text, Accept="application/json")
    assert as_json.status_code == 429
    assert as_json.json()["error"] == "too_many_test_messages"
    with db_of(one).session() as session:
        stored = select(func.count()).where(Message.message_id.like("test-%"))
        assert session.scalar(stored) == 3

    # Another portal has a count of its own.
    other = installed_portal(one, emulator)
    other_page = open_page(one, other.placement_auth())
    assert send_test_message(two, other_page.text).status_code == 200


def test_test_messages_can_be_turned_off(live_app, emulator):
    server = live_app(providers=PROVIDERS, app_page={"test_messages_per_hour": 0})
    portal = installed_portal(server, emulator)
    answer = send_test_message(server, open_page(server, portal.placement_auth()).text)
    assert answer.status_code == 429 and "Test messages are turned off here" in answer.text
    with db_of(server).session() as session:
        assert session.scalar(select(func.count()).select_from(Message)) == 0


def test_test_message_needs_the_form_token(live_app, emulator):
    server = live_app(providers=PROVIDERS)
    portal = installed_portal(server, emulator)
    page = open_page(server, portal.placement_auth())
    data = {"s": session_token(page.text), "code": "smslog", "to": "+14155550100", "body": "x"}
    for token in ("", "forged"):
        answer = requests.post(
            f"{server.url}/app/test-message", data={**data, "t": token}, timeout=10
        )
        assert answer.status_code == 401


# -- the token probe cache -------------------------------------------------------------------


def test_a_confirmed_auth_id_is_cached_briefly(live_app, emulator):
    server = live_app(providers=PROVIDERS)
    portal = installed_portal(server, emulator)
    auth = portal.placement_auth()
    calls = portal.stats_snapshot()["methods"]["app.info"]
    for _ in range(3):
        assert open_page(server, auth).status_code == 200
    assert portal.stats_snapshot()["methods"]["app.info"] == calls + 1
    # A revoked token is noticed once the cached answer runs out.
    portal.revoke_tokens()
    verify.clear_cache()
    assert open_page(server, auth).status_code == 401


def test_probe_cache_keeps_no_tokens():
    cache = verify._ProbeCache(size=2)
    key = cache.key("http://portal/rest/", "secret-token")
    assert "secret-token" not in key
    cache.put(key, True, ttl=60)
    assert cache.get(key) is True
    cache.put(cache.key("http://portal/rest/", "b"), True, ttl=60)
    cache.put(cache.key("http://portal/rest/", "c"), False, ttl=0.01)
    assert cache.get(key) is None  # the oldest entry went first
    time.sleep(0.02)
    assert cache.get(cache.key("http://portal/rest/", "c")) is None


def test_static_stylesheet_is_served(live_app, emulator):
    server = live_app(providers=PROVIDERS)
    css = requests.get(f"{server.url}/static/app.css", timeout=10)
    assert css.status_code == 200 and ".history" in css.text
