"""Hostile input: property-based fuzzing of the public routes over a real socket.

Whatever arrives — malformed forms, wrong types, bad encodings, missing and duplicated keys,
huge bodies — the answer is never a 500, is always the JSON error shape for errors, and nothing
is stored or sent. Each test prints how many cases it tried (the closing note quotes them).
"""

from __future__ import annotations

import json
from urllib.parse import quote, urlencode

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from b24sms import create_app
from b24sms.emulator import Emulator
from b24sms.models import Message, OutboxEntry, Portal, StatusEvent
from tests.conftest import CLIENT_ID, CLIENT_SECRET, LiveServer, base_config

pytestmark = pytest.mark.slow

CASES = 300
FIELDS = [
    "type",
    "code",
    "message_id",
    "message_to",
    "message_body",
    "ts",
    "module_id",
    "bindings[0][OWNER_ID]",
    "bindings[]",
    "auth[member_id]",
    "auth[application_token]",
    "auth",
    "event",
    "data[CLEAN]",
    "auth[access_token]",
    "auth[domain]",
    "document_id[0]",
    "properties[phone_number]",
    "MessageSid",
    "MessageStatus",
    "id",
    "status",
    "AUTH_ID",
    "member_id",
    "DOMAIN",
    "APPLICATION_TOKEN",
    "a[b][c][d][e][f]",
    "x]",
    "[y",
    "",
]

text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
keys = st.one_of(st.sampled_from(FIELDS), text)
pairs = st.lists(st.tuples(keys, text), max_size=12)
raw_bodies = st.one_of(
    st.binary(max_size=300),
    pairs.map(lambda p: urlencode(p).encode()),
    pairs.map(lambda p: "&".join(f"{k}={v}" for k, v in p).encode("utf-8", "surrogatepass")),
    st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), text),
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.dictionaries(st.sampled_from(FIELDS), children, max_size=6),
        ),
        max_leaves=12,
    ).map(lambda v: json.dumps(v).encode()),
)
content_types = st.sampled_from(
    [
        "application/x-www-form-urlencoded",
        "application/json",
        "text/plain",
        "multipart/form-data; boundary=zzz",
        "application/x-www-form-urlencoded; charset=latin-1",
        "",
    ]
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    with Emulator(client_id=CLIENT_ID, client_secret=CLIENT_SECRET) as emu:
        server = LiveServer()
        providers = {
            "smslog": {"plugin": "log", "name": "Log"},
            "gw": {
                "plugin": "http",
                "name": "HTTP",
                "url": "http://127.0.0.1:9/send",
                "callback_id": "id",
                "callback_status": "status",
                "callback_secret": "fuzz-callback-secret-0123",
            },
        }
        # Every fuzz case is a failure from one address: the rate limit would answer 429 after
        # the first few and the routes would go untested (tests/test_rate_limit.py covers it).
        config = base_config(
            tmp,
            public_url=server.url,
            providers=providers,
            bitrix24={"oauth_url": emu.oauth_url},
            rate_limit={"enabled": False},
        )
        server.start(create_app(config))
        portal = emu.add_portal()
        assert portal.install(server.url).status_code == 200
        handler = portal.senders["smslog"]["HANDLER"]
        try:
            yield server, portal, handler
        finally:
            server.stop()


def assert_nothing_changed(server, portal) -> None:
    db = server.app.extensions["b24sms"].db
    with db.session() as session:
        assert session.scalar(select(func.count()).select_from(Message)) == 0
        assert session.scalar(select(func.count()).select_from(StatusEvent)) == 0
        assert session.scalar(select(func.count()).select_from(OutboxEntry)) == 0
        assert session.scalar(select(func.count()).select_from(Portal)) == 1
    assert portal.stats["status_updates"] == 0


def check_answer(response: requests.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error", "message"}
        assert "Traceback" not in body["message"]


def fuzz(url_of, tried: dict, name: str):
    @settings(
        max_examples=CASES,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(body=raw_bodies, content_type=content_types, query=st.sampled_from(["", "x=1", "key="]))
    def run(world, body, content_type, query):
        server, portal, handler = world
        url = url_of(server, handler)
        if query:
            url += ("&" if "?" in url else "?") + query
        headers = {"Content-Type": content_type} if content_type else {}
        response = requests.post(url, data=body, headers=headers, timeout=10)
        tried[name] = tried.get(name, 0) + 1
        check_answer(response)
        if name == "handler" and response.status_code == 200:
            pytest.fail(f"fuzzed HANDLER body was accepted: {body!r}")
        if name != "install":
            assert_nothing_changed(server, portal)

    return run


TRIED: dict[str, int] = {}

test_fuzz_handler = fuzz(lambda s, h: h, TRIED, "handler")
test_fuzz_events = fuzz(lambda s, h: f"{s.url}/bitrix24/events", TRIED, "events")
test_fuzz_callback = fuzz(lambda s, h: f"{s.url}/gateways/gw/callback", TRIED, "callback")
test_fuzz_install = fuzz(lambda s, h: f"{s.url}/bitrix24/install", TRIED, "install")


def test_fuzz_counts_reported(world):
    # After the fuzzers (in file order): the cases each route took, printed for the run's
    # record (pytest -s), and the check that none of them changed anything.
    print("fuzz cases per route:", TRIED)
    assert_nothing_changed(*world[:2])


@pytest.mark.parametrize("size", [300_000, 5_000_000])
def test_huge_bodies_get_413_and_change_nothing(world, size):
    server, portal, handler = world
    response = requests.post(
        handler,
        data=b"message_body=" + b"x" * size,
        timeout=30,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 413 and response.json()["error"] == "payload_too_large"
    assert_nothing_changed(server, portal)


def test_duplicated_keys_take_the_last_value_like_php(world):
    server, portal, handler = world
    body = "&".join(
        [
            "type=SMS",
            "code=smslog",
            "message_id=" + "c" * 32,
            "message_to=" + quote("+1415"),
            "message_to=garbage[",
            "message_body=",
            "message_body=",
            "auth[member_id]=x",
        ]
    )
    response = requests.post(
        handler,
        data=body,
        timeout=10,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code in (400, 401)
    check_answer(response)
    assert_nothing_changed(server, portal)
