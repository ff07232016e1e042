"""Outgoing requests to portals: http(s) only, no redirects, short and bounded inside web requests.

The starvation test runs the app under waitress with a fixed number of threads, as ``b24sms
serve`` does: app-page posts naming a slow portal must not take the threads the HANDLER needs.
"""

from __future__ import annotations

import contextlib
import secrets
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
import requests
from sqlalchemy import select

from b24sms import create_app
from b24sms.bitrix24.client import Bitrix24Client
from b24sms.bitrix24.policy import CallSlots, EndpointRefused, RedirectRefused, SlotsBusy, web_slots
from b24sms.models import Portal
from tests.conftest import base_config
from tests.fakes.recorder import Recorder, redirect_to

LOG = {"smslog": {"plugin": "log", "name": "Log only"}}


def set_endpoint(server, member_id: str, endpoint: str) -> int:
    db = server.app.extensions["b24sms"].db
    with db.session() as session:
        portal = session.scalar(select(Portal).where(Portal.member_id == member_id))
        portal.client_endpoint = endpoint
        return portal.id


# -- the request policy ------------------------------------------------------------------------


def test_a_portal_redirect_is_not_followed(live_app, emulator):
    server = live_app(providers=LOG)
    portal = emulator.add_portal()
    assert portal.install(server.url).status_code == 200
    svc = server.app.extensions["b24sms"]
    with Recorder() as internal, Recorder() as moved:
        moved.answer = redirect_to(f"{internal.url}/internal/admin", 302)
        portal_id = set_endpoint(server, portal.member_id, f"{moved.url}/rest/")
        client = Bitrix24Client(svc.db, portal_id, svc.config.bitrix24)
        with pytest.raises(RedirectRefused) as refused:
            client.call("messageservice.sender.list")
        # Another path is not a domain change (b24sms.bitrix24.redirects): refused, not followed.
        assert refused.value.http_status == 302
        assert [r.method for r in moved.requests] == ["POST"]
        assert internal.requests == []


def test_a_moved_portal_is_not_followed_outside_allowed_domains(live_app, emulator):
    # The same REST path on another host is a domain change (change-domen.md), followed
    # between private addresses; but not to a host an install would have been refused for.
    server = live_app(providers=LOG, bitrix24={"allowed_domains": ["127.0.0.1"]})
    portal = emulator.add_portal()
    assert portal.install(server.url).status_code == 200
    svc = server.app.extensions["b24sms"]
    with Recorder() as elsewhere, Recorder() as moved:
        port = elsewhere.host.rsplit(":", 1)[1]
        target = f"http://localhost:{port}/rest/messageservice.sender.list"
        moved.answer = redirect_to(target, 302)
        portal_id = set_endpoint(server, portal.member_id, f"{moved.url}/rest/")
        client = Bitrix24Client(svc.db, portal_id, svc.config.bitrix24)
        with pytest.raises(RedirectRefused) as refused:
            client.call("messageservice.sender.list")
        assert "allowed_domains" in str(refused.value)
        assert elsewhere.requests == []


@pytest.mark.parametrize("endpoint", ["file:///etc/", "gopher://127.0.0.1:6379/", "http:///rest/"])
def test_only_http_endpoints_are_called(live_app, emulator, endpoint):
    server = live_app(providers=LOG)
    portal = emulator.add_portal()
    assert portal.install(server.url).status_code == 200
    before = portal.stats["requests"]
    svc = server.app.extensions["b24sms"]
    portal_id = set_endpoint(server, portal.member_id, endpoint)
    with pytest.raises(EndpointRefused):
        Bitrix24Client(svc.db, portal_id, svc.config.bitrix24).call("profile")
    assert portal.stats["requests"] == before


def test_call_slots_refuse_at_once_when_full():
    slots = CallSlots(size=2, wait=0.0)
    with slots.hold(), slots.hold():
        started = time.perf_counter()
        with pytest.raises(SlotsBusy), slots.hold():
            pass
        assert time.perf_counter() - started < 0.5
    with slots.hold():  # released again
        pass


@pytest.mark.parametrize("accept", ["application/json", "text/html"])
def test_the_app_page_answers_503_when_every_slot_is_taken(live_app, emulator, accept):
    server = live_app(providers=LOG)
    portal = emulator.add_portal()
    assert portal.install(server.url).status_code == 200
    auth = portal.placement_auth()
    before = portal.stats["methods"]["app.info"]
    with contextlib.ExitStack() as stack:
        for _ in range(web_slots.size):
            stack.enter_context(web_slots.hold())
        response = requests.post(
            f"{server.url}/app", data=auth, headers={"Accept": accept}, timeout=10
        )
    assert response.status_code == 503
    assert response.headers["Retry-After"]
    if accept == "application/json":
        assert response.json()["error"] == "busy"
    else:
        assert "Busy." in response.text and auth["AUTH_ID"] not in response.text
    assert portal.stats["methods"]["app.info"] == before  # the portal was not asked
    # with the slots free again, the same sign-in opens the page
    assert requests.post(f"{server.url}/app", data=auth, timeout=10).status_code == 200


# -- slow portals cannot starve the HANDLER ------------------------------------------------------


@contextlib.contextmanager
def waitress_app(tmp_path, emulator, threads: int) -> Iterator[tuple[str, object]]:
    """The app under waitress with ``threads`` threads, like ``b24sms serve``."""
    from waitress.server import create_server

    target: dict[str, Callable] = {}

    def dispatch(environ, start_response):
        return target["app"](environ, start_response)

    server = create_server(dispatch, host="127.0.0.1", port=0, threads=threads)
    url = f"http://127.0.0.1:{server.effective_port}"
    config = base_config(
        tmp_path,
        public_url=url,
        providers=LOG,
        bitrix24={"oauth_url": emulator.oauth_url},
        # one address sends every call here; the rate limit is tested elsewhere
        rate_limit={"enabled": False},
    )
    app = create_app(config)
    target["app"] = app
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield url, app
    finally:
        server.close()
        thread.join(5)
        app.extensions["b24sms"].close()


def handler_latencies(portal, n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        _, response = portal.send_sms("smslog", "+14155550100", "hello")
        out.append(time.perf_counter() - started)
        assert response.status_code == 200, response.text
    return out


@pytest.mark.slow
def test_app_page_posts_naming_a_slow_portal_do_not_starve_the_handler(tmp_path, emulator):
    threads, posts, delay = 8, 24, 4.0
    with waitress_app(tmp_path, emulator, threads) as (url, _app):
        slow, quiet = emulator.add_portal(), emulator.add_portal()
        assert slow.install(url).status_code == 200
        assert quiet.install(url).status_code == 200
        handler_latencies(quiet, 3)  # warm-up: connections, caches
        baseline = handler_latencies(quiet, 15)

        # the install's provider sync reads app.info too (in its batch): count only what follows
        app_info_at_install = slow.stats["methods"].get("app.info", 0)
        slow.rest_delays["app.info"] = delay  # under WEB_TIMEOUT's read timeout: it answers
        statuses: Counter[int] = Counter()
        lock = threading.Lock()

        def open_page() -> None:
            form = slow.placement_auth()
            form["AUTH_ID"] = secrets.token_hex(16)  # a new token each: no cached answer
            response = requests.post(
                f"{url}/app", data=form, headers={"Accept": "application/json"}, timeout=30
            )
            with lock:
                statuses[response.status_code] += 1

        load = [threading.Thread(target=open_page) for _ in range(posts)]
        for thread in load:
            thread.start()
        time.sleep(0.5)  # every post has arrived; the slow portal holds the admitted ones
        loaded = handler_latencies(quiet, 15)
        during = sum(1 for t in load if t.is_alive())
        for thread in load:
            thread.join(30)

    quiet_p50 = statistics.median(baseline)
    ratio_p50 = statistics.median(loaded) / quiet_p50
    ratio_max = max(loaded) / quiet_p50
    print(
        f"HANDLER p50 quiet {quiet_p50 * 1000:.1f} ms; under {posts} slow app-page posts: "
        f"p50 x{ratio_p50:.1f}, max x{ratio_max:.1f}; answers {dict(statuses)}"
    )
    # The HANDLER calls were measured while the admitted posts still waited on the portal.
    assert during >= 1
    assert ratio_p50 < 5, (baseline, loaded)
    assert ratio_max < 30, (baseline, loaded)
    # One post at a time reached the slow portal (its host's one slot); the rest got 503 at once.
    assert slow.stats["methods"]["app.info"] - app_info_at_install <= 1
    assert statuses[503] >= posts - 1
    assert sum(statuses.values()) == posts


def test_call_slots_hold_one_call_per_host_at_a_time():
    slots = CallSlots(size=4, wait=0.0)
    with slots.hold(host="slow.example:8443"):
        for same in ("slow.example:8443", "SLOW.example:8443"):
            with pytest.raises(SlotsBusy), slots.hold(host=same):
                pass
        # other portals, and calls naming no host, still get the free slots
        with (
            slots.hold(host="other.example"),
            slots.hold(host="third.example"),
            slots.hold(),
            pytest.raises(SlotsBusy),  # the overall bound: 4 in flight
            slots.hold(host="fourth.example"),
        ):
            pass
    with slots.hold(host="slow.example:8443"):  # released again
        pass


def test_a_waiter_for_a_busy_host_gets_the_slot_when_it_is_released():
    slots = CallSlots(size=4, wait=5.0)
    release = threading.Event()
    held = threading.Event()

    def hold_a_while() -> None:
        with slots.hold(host="portal.example"):
            held.set()
            release.wait(5)

    holder = threading.Thread(target=hold_a_while)
    holder.start()
    assert held.wait(5)
    threading.Timer(0.2, release.set).start()
    started = time.perf_counter()
    with slots.hold(host="portal.example"):
        waited = time.perf_counter() - started
    holder.join(5)
    assert 0.1 < waited < 4.0
