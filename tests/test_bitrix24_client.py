"""The Bitrix24 REST client and the locked token refresh, over real sockets against the emulator."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from typing import Any
from urllib.parse import parse_qsl

import pytest
import requests

from b24sms.bitrix24.client import Bitrix24Client, php_urlencode
from b24sms.bitrix24.errors import (
    AppConfigRefused,
    Bitrix24Error,
    MethodNotFound,
    OperationTimeLimit,
    PermanentError,
    PortalBlocked,
    RateLimited,
    TokenExpired,
    TokensRevoked,
    TransientError,
    from_response,
)
from b24sms.bitrix24.oauth import refresh_tokens
from b24sms.config import Bitrix24Config, Bitrix24Schema
from b24sms.db import Database
from b24sms.emulator import EmulatedPortal, Emulator, php_form_decode
from b24sms.models import Portal, PortalState
from b24sms.schema import upgrade

from .conftest import CLIENT_ID, CLIENT_SECRET, ENCRYPTION_KEY, keyed

SENDER = {"CODE": "sms1", "TYPE": "SMS", "HANDLER": "http://127.0.0.1:9/h/sms1", "NAME": "One"}


@pytest.fixture
def db(tmp_path) -> Iterator[Database]:
    database = keyed(Database(f"sqlite:///{tmp_path}/b24sms.sqlite3"))
    upgrade(database)
    yield database
    database.dispose()


@pytest.fixture
def settings(emulator: Emulator) -> Bitrix24Config:
    return Bitrix24Schema().load(
        {
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "oauth_url": emulator.oauth_url,
            "timeout": 10.0,
            "user_agent": "",
        }
    )


def store_portal(db: Database, portal: EmulatedPortal) -> int:
    """Insert the emulated portal's row the way an install would; return its id."""
    with db.session() as session:
        row = Portal(
            member_id=portal.member_id,
            domain=portal.domain,
            client_endpoint=portal.client_endpoint,
            access_token=portal.access_token,
            refresh_token=portal.refresh_token,
            application_token=portal.application_token,
            state=PortalState.ACTIVE,
        )
        session.add(row)
        session.flush()
        return row.id


def load_portal(db: Database, portal_id: int) -> Portal:
    with db.session() as session:
        return session.get(Portal, portal_id)


class RecordingSession(requests.Session):
    """A real session that remembers the headers and bodies it sent."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[requests.PreparedRequest] = []

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        self.sent.append(request)
        return super().send(request, **kwargs)


# -- plain calls ----------------------------------------------------------------------------------


def test_call_success_sends_json_with_auth_and_user_agent(db, settings, emulator):
    portal = emulator.add_portal()
    portal_id = store_portal(db, portal)
    http = RecordingSession()
    client = Bitrix24Client(db, portal_id, settings, http=http)

    assert client.call("messageservice.sender.add", SENDER) is True
    assert client.call("messageservice.sender.list") == ["sms1"]

    assert portal.senders["sms1"]["NAME"] == "One"
    assert client.last_time is not None and "operating_reset_at" in client.last_time
    sent = http.sent[0]
    assert sent.url == portal.client_endpoint + "messageservice.sender.add"
    assert sent.headers["User-Agent"].startswith("b24sms/")
    assert sent.headers["Content-Type"] == "application/json"
    assert json.loads(sent.body)["auth"] == portal.access_token
    assert portal.access_token not in sent.url

    client = Bitrix24Client(db, portal_id, replace(settings, user_agent="acme/1.2"), http=http)
    client.call("messageservice.sender.list")
    assert http.sent[-1].headers["User-Agent"] == "acme/1.2"


ERROR_CASES = [
    # (error, HTTP status, class, action)
    ("QUERY_LIMIT_EXCEEDED", 503, RateLimited, "retry"),
    ("INTERNAL_SERVER_ERROR", 500, TransientError, "retry"),
    ("ERROR_UNEXPECTED_ANSWER", 500, TransientError, "retry"),
    ("OPERATION_TIME_LIMIT", 429, OperationTimeLimit, "wait"),
    ("NO_AUTH_FOUND", 401, TokensRevoked, "reinstall"),
    ("invalid_token", 401, TokensRevoked, "reinstall"),
    ("OVERLOAD_LIMIT", 503, PortalBlocked, "pause"),
    ("PORTAL_DELETED", 500, PortalBlocked, "pause"),
    ("ACCESS_DENIED", 403, PermanentError, "give_up"),
    ("insufficient_scope", 403, AppConfigRefused, "configure"),
    ("user_access_error", 403, PermanentError, "give_up"),
    ("ERROR_METHOD_NOT_FOUND", 404, MethodNotFound, "give_up"),
    ("ERROR_SENDER_VALIDATION_FAILURE", 400, PermanentError, "give_up"),
]


@pytest.mark.parametrize(("error", "status", "cls", "action"), ERROR_CASES)
def test_error_answers_raise_typed_errors(db, settings, emulator, error, status, cls, action):
    portal = emulator.add_portal()
    portal_id = store_portal(db, portal)
    client = Bitrix24Client(db, portal_id, settings)
    portal.inject(error, status)

    with pytest.raises(cls) as info:
        client.call("messageservice.sender.list")

    exc = info.value
    assert exc.code == error and exc.http_status == status and exc.action == action
    assert isinstance(exc, Bitrix24Error)
    for secret in (portal.access_token, portal.refresh_token, CLIENT_SECRET):
        assert secret not in str(exc) and secret not in repr(exc)
    # Bitrix24 asked us to stop calling: the portal remembers it and the client obeys.
    expected_state = {"reinstall": PortalState.NEEDS_REINSTALL}.get(action, PortalState.ACTIVE)
    stored = load_portal(db, portal_id)
    assert stored.state == expected_state
    if expected_state != PortalState.ACTIVE or action == "pause":
        assert error in stored.last_error
        requests_before = portal.stats["requests"]
        with pytest.raises(cls):
            client.call("messageservice.sender.list")
        assert portal.stats["requests"] == requests_before
    elif action == "wait":
        # Only the method is paused (settings/performance/limits.md): no request for it until
        # its reset, while another method is called as usual.
        requests_before = portal.stats["requests"]
        with pytest.raises(OperationTimeLimit):
            client.call("messageservice.sender.list")
        assert portal.stats["requests"] == requests_before
        assert client.call("app.info")["STATUS"] == "L"
    else:
        assert client.call("messageservice.sender.list") == []


def test_real_rate_limit_raises_rate_limited(db, settings, emulator):
    portal = emulator.add_portal()
    portal.burst = 2
    portal.requests_per_second = 0.1
    client = Bitrix24Client(db, store_portal(db, portal), settings)
    client.call("messageservice.sender.list")
    client.call("messageservice.sender.list")
    with pytest.raises(RateLimited) as info:
        client.call("messageservice.sender.list")
    assert info.value.retry_after and info.value.action == "retry"
    assert portal.stats["rejected_rate_limit"] == 1


def test_from_response_without_a_bitrix24_error_document():
    assert isinstance(from_response(502, None), TransientError)
    assert isinstance(from_response(504, "<html>Gateway Timeout</html>"), TransientError)
    assert isinstance(from_response(404, None), PermanentError)
    unknown = from_response(400, {"error": "SOMETHING_NEW", "error_description": "x"})
    assert type(unknown) is PermanentError and unknown.code == "SOMETHING_NEW"
    assert isinstance(from_response(None, {"error": "expired_token"}), TokenExpired)


def test_operation_time_limit_carries_reset_at():
    reset = int(time.time()) + 300
    exc = from_response(
        429,
        {
            "error": "OPERATION_TIME_LIMIT",
            "error_description": "",
            "time": {"operating": 480.5, "operating_reset_at": reset},
        },
    )
    assert isinstance(exc, OperationTimeLimit)
    assert exc.reset_at == dt.datetime.fromtimestamp(reset, dt.UTC).replace(tzinfo=None)
    assert 290 < exc.retry_after <= 300
    # Without a time block: a minute from now.
    exc = from_response(429, {"error": "OPERATION_TIME_LIMIT"})
    assert 55 < exc.retry_after <= 60


def test_network_errors_are_transient_and_name_no_secret(db, settings, emulator):
    portal = emulator.add_portal()
    portal_id = store_portal(db, portal)
    with db.session() as session:
        # A port nothing listens on (the emulator's portal, stopped).
        dead = emulator.add_portal()
        dead.stop()
        session.get(Portal, portal_id).client_endpoint = dead.client_endpoint
    client = Bitrix24Client(db, portal_id, settings)
    with pytest.raises(TransientError) as info:
        client.call("messageservice.sender.list")
    assert info.value.code == "NETWORK_ERROR" and info.value.action == "retry"
    assert portal.access_token not in str(info.value)
    assert load_portal(db, portal_id).state == PortalState.ACTIVE


# -- token refresh --------------------------------------------------------------------------------


def test_expired_token_is_refreshed_once_and_the_call_repeated(db, settings, emulator):
    portal = emulator.add_portal()
    portal_id = store_portal(db, portal)
    old_access, old_refresh = portal.access_token, portal.refresh_token
    portal.expire_tokens()

    client = Bitrix24Client(db, portal_id, settings)
    assert client.call("messageservice.sender.add", SENDER) is True

    assert emulator.stats["refreshes"] == 1
    stored = load_portal(db, portal_id)
    assert stored.access_token == portal.access_token != old_access
    assert stored.refresh_token == portal.refresh_token != old_refresh
    assert stored.token_expires_at is not None
    assert stored.server_endpoint == emulator.server_endpoint
    assert portal.stats["methods"]["messageservice.sender.add"] == 2  # refused, then repeated


def test_a_second_expired_token_is_not_refreshed_again(db, settings, emulator):
    portal = emulator.add_portal()
    client = Bitrix24Client(db, store_portal(db, portal), settings)
    portal.inject("expired_token", 401, count=2)
    with pytest.raises(TokenExpired):
        client.call("messageservice.sender.list")
    assert emulator.stats["refreshes"] == 1


def test_token_refreshed_elsewhere_is_reused_without_oauth(db, settings, emulator):
    portal = emulator.add_portal()
    portal_id = store_portal(db, portal)
    token = refresh_tokens(db, portal_id, "some-older-token", settings, requests.Session())
    assert token == portal.access_token
    assert emulator.stats["refreshes"] == 0


def test_concurrent_threads_refresh_exactly_once(db, settings, emulator):
    portal = emulator.add_portal()
    portal_id = store_portal(db, portal)
    portal.expire_tokens()
    emulator.refresh_delay = 0.3
    barrier = threading.Barrier(8)
    outcomes: list[Any] = []

    def work() -> None:
        client = Bitrix24Client(db, portal_id, settings)
        barrier.wait()
        try:
            outcomes.append(client.call("messageservice.sender.list"))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            outcomes.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert outcomes == [[]] * 8
    assert emulator.stats["refreshes"] == 1
    assert emulator.stats["refresh_errors"] == 0
    assert load_portal(db, portal_id).access_token == portal.access_token


CHILD = r"""
import json, sys, threading
from b24sms.db import Database
from b24sms.bitrix24.client import Bitrix24Client
from b24sms.config import Bitrix24Schema
from b24sms.crypto import KeySet, bind_keys

url, portal_id = sys.argv[1], int(sys.argv[2])
settings = Bitrix24Schema().load(json.loads(sys.argv[3]))
db = Database(url)
bind_keys(db.engine, KeySet([sys.argv[4]]))
clients = [Bitrix24Client(db, portal_id, settings) for _ in range(2)]
print("ready", flush=True)
sys.stdin.readline()
outcomes = []

def work(client):
    try:
        outcomes.append(client.call("messageservice.sender.list"))
    except Exception as exc:
        outcomes.append(f"{type(exc).__name__}: {exc}")

threads = [threading.Thread(target=work, args=(c,)) for c in clients]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(outcomes), flush=True)
"""


@pytest.mark.slow
def test_concurrent_processes_refresh_exactly_once(db, settings, emulator):
    portal = emulator.add_portal()
    portal_id = store_portal(db, portal)
    portal.expire_tokens()
    emulator.refresh_delay = 0.3
    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                CHILD,
                db.url,
                str(portal_id),
                json.dumps(asdict(settings)),
                ENCRYPTION_KEY,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    try:
        # Start them together, once every one has imported everything and opened its database.
        for child in children:
            assert child.stdout.readline().strip() == "ready"
        for child in children:
            child.stdin.write("go\n")
            child.stdin.flush()
        outputs = [json.loads(child.communicate(timeout=30)[0]) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()

    assert outputs == [[[], []]] * 3
    assert emulator.stats["refreshes"] == 1
    assert emulator.stats["refresh_errors"] == 0
    assert load_portal(db, portal_id).access_token == portal.access_token


def test_invalid_grant_marks_the_portal_needs_reinstall(db, settings, emulator):
    portal = emulator.add_portal()
    portal_id = store_portal(db, portal)
    portal.expire_tokens()
    emulator.inject("invalid_grant", 400)
    client = Bitrix24Client(db, portal_id, settings)

    with pytest.raises(TokensRevoked) as info:
        client.call("messageservice.sender.list")

    assert info.value.code == "invalid_grant" and info.value.action == "reinstall"
    stored = load_portal(db, portal_id)
    assert stored.state == PortalState.NEEDS_REINSTALL
    assert "invalid_grant" in stored.last_error
    assert portal.refresh_token not in stored.last_error
    # No more calls to a portal that needs a re-install.
    requests_before = portal.stats["requests"]
    with pytest.raises(TokensRevoked):
        client.call("messageservice.sender.list")
    assert portal.stats["requests"] == requests_before


def test_wrong_client_secret_keeps_the_portal_and_names_the_keys(db, settings, emulator, caplog):
    # settings/oauth/error-codes.md: invalid_client -> "Check client_id and client_secret":
    # our config is wrong, not the portal's tokens. The portal stays active with its refresh
    # token, and fixing the config brings it back without a re-install.
    portal = emulator.add_portal()
    portal_id = store_portal(db, portal)
    portal.expire_tokens()
    refresh_token = load_portal(db, portal_id).refresh_token
    client = Bitrix24Client(db, portal_id, replace(settings, client_secret="wrong-secret-123"))
    with (
        caplog.at_level("ERROR", logger="b24sms.bitrix24.oauth"),
        pytest.raises(AppConfigRefused) as info,
    ):
        client.call("messageservice.sender.list")
    assert info.value.code == "invalid_client" and info.value.action == "configure"
    assert "wrong-secret-123" not in str(info.value)
    loud = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("[bitrix24] client_id and client_secret" in line for line in loud)
    assert not any("wrong-secret-123" in line or refresh_token in line for line in loud)
    stored = load_portal(db, portal_id)
    assert stored.state == PortalState.ACTIVE and stored.refresh_token == refresh_token
    # A second call asks again (nothing was marked), and the config fixed makes it work.
    with pytest.raises(AppConfigRefused):
        client.call("messageservice.sender.list")
    fixed = Bitrix24Client(db, portal_id, settings)
    assert fixed.call("messageservice.sender.list") == []
    assert load_portal(db, portal_id).state == PortalState.ACTIVE


@pytest.mark.parametrize("code", ["invalid_request", "insufficient_scope", "invalid_scope"])
def test_oauth_refusals_of_our_app_keep_the_portal(db, settings, emulator, code):
    portal = emulator.add_portal()
    portal_id = store_portal(db, portal)
    portal.expire_tokens()
    emulator.inject(code, 400)
    client = Bitrix24Client(db, portal_id, settings)
    with pytest.raises(AppConfigRefused) as info:
        client.call("messageservice.sender.list")
    assert info.value.code == code
    assert load_portal(db, portal_id).state == PortalState.ACTIVE
    assert client.call("messageservice.sender.list") == []


def test_refresh_trouble_is_transient_and_keeps_the_tokens(db, settings, emulator):
    portal = emulator.add_portal()
    portal_id = store_portal(db, portal)
    portal.expire_tokens()
    emulator.inject("temporarily_unavailable", 503)
    client = Bitrix24Client(db, portal_id, settings)
    with pytest.raises(TransientError):
        client.call("messageservice.sender.list")
    stored = load_portal(db, portal_id)
    assert stored.state == PortalState.ACTIVE and stored.refresh_token == portal.refresh_token

    # OAuth unreachable: the URL (client secret and refresh token in its query) stays out.
    dead = emulator.add_portal()
    dead.stop()
    unreachable = replace(settings, oauth_url=dead.base_url + "/oauth/token/")
    with pytest.raises(TransientError) as info:
        Bitrix24Client(db, portal_id, unreachable).call("messageservice.sender.list")
    assert info.value.code == "NETWORK_ERROR"
    for secret in (CLIENT_SECRET, portal.refresh_token, portal.access_token):
        assert secret not in str(info.value)

    # Once OAuth is back, the next call refreshes and succeeds.
    assert client.call("messageservice.sender.list") == []
    assert emulator.stats["refreshes"] == 1


# -- batch ----------------------------------------------------------------------------------------


def test_batch_results_and_per_command_errors(db, settings, emulator):
    portal = emulator.add_portal()
    client = Bitrix24Client(db, store_portal(db, portal), settings)
    portal.inject("ACCESS_DENIED", 403, methods="messageservice.sender.delete")
    named = {**SENDER, "CODE": "sms2", "NAME": {"en": "Two", "de": "Zwei"}, "DESCRIPTION": "d&x=1"}

    result = client.batch(
        {
            "add1": ("messageservice.sender.add", SENDER),
            "add2": ("messageservice.sender.add", named),
            "dup": ("messageservice.sender.add", SENDER),
            "del": ("messageservice.sender.delete", {"CODE": "sms1"}),
            "list": ("messageservice.sender.list", {}),
        }
    )

    assert result.results == {"add1": True, "add2": True, "list": ["sms1", "sms2"]}
    assert set(result.errors) == {"dup", "del"}
    assert result.errors["dup"].code == "ERROR_SENDER_ALREADY_INSTALLED"
    assert isinstance(result.errors["del"], PermanentError)
    assert result.errors["del"].code == "ACCESS_DENIED"
    assert result.skipped == []
    assert portal.senders["sms2"]["NAME"] == {"en": "Two", "de": "Zwei"}
    assert portal.senders["sms2"]["DESCRIPTION"] == "d&x=1"
    assert portal.stats["requests"] == 1 and portal.stats["batches"] == 1


def test_batch_halt_skips_the_rest(db, settings, emulator):
    portal = emulator.add_portal()
    client = Bitrix24Client(db, store_portal(db, portal), settings)
    result = client.batch(
        {
            "bad": ("messageservice.sender.delete", {"CODE": "missing"}),
            "add": ("messageservice.sender.add", SENDER),
        },
        halt=True,
    )
    assert result.errors["bad"].code == "ERROR_SENDER_NOT_FOUND"
    assert result.skipped == ["add"] and result.results == {}
    assert portal.senders == {}


def test_batch_level_errors_raise_and_expired_token_is_refreshed(db, settings, emulator):
    portal = emulator.add_portal()
    client = Bitrix24Client(db, store_portal(db, portal), settings)
    portal.inject("QUERY_LIMIT_EXCEEDED", 503)
    with pytest.raises(RateLimited):
        client.batch({"list": ("messageservice.sender.list", {})})

    portal.expire_tokens()
    result = client.batch({"add": ("messageservice.sender.add", SENDER)})
    assert result.results == {"add": True}
    assert emulator.stats["refreshes"] == 1


def test_batch_limits(db, settings, emulator):
    portal = emulator.add_portal()
    client = Bitrix24Client(db, store_portal(db, portal), settings)
    too_many = {f"k{i}": ("messageservice.sender.list", {}) for i in range(51)}
    with pytest.raises(ValueError):
        client.batch(too_many)
    with pytest.raises(ValueError):
        client.batch({"inner": ("batch", {})})
    assert client.batch({}).results == {}
    assert portal.stats["requests"] == 0
    fifty = dict(list(too_many.items())[:50])
    assert len(client.batch(fifty).results) == 50


def test_php_urlencode_nests_like_php():
    params = {
        "CODE": "a b",
        "NAME": {"en": "A&B", "de": "Ä"},
        "L": [1, {"x": True}],
        "N": None,
        "F": False,
    }
    encoded = php_urlencode(params)
    assert php_form_decode(parse_qsl(encoded, keep_blank_values=True)) == {
        "CODE": "a b",
        "NAME": {"en": "A&B", "de": "Ä"},
        "L": {"0": "1", "1": {"x": "1"}},
        "F": "0",
    }
    assert php_urlencode({}) == ""


def test_token_expiry_of_odd_answers_never_raises():
    """An OAuth answer is stored after the refresh token is spent: a bad expiry must not fail it."""
    import datetime as dt

    from b24sms.bitrix24.oauth import _expires_at
    from b24sms.models import utcnow
    from b24sms.portals import token_expiry

    assert token_expiry("1742895600", None) == dt.datetime(2025, 3, 25, 9, 40)
    assert token_expiry(None, "60") > utcnow()
    for expires, expires_in in (("1e400", None), ("soon", "later"), (None, None), ({}, "inf")):
        assert token_expiry(expires, expires_in) is None
    # falls back to expires_in, then to an hour
    assert token_expiry("nan-ish", "120") > utcnow() + dt.timedelta(seconds=100)
    hour = _expires_at({"expires": "1e400"}) - utcnow()
    assert dt.timedelta(minutes=59) < hour <= dt.timedelta(hours=1)
