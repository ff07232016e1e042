"""The portal emulator, exercised over real sockets with ``requests``, as the service will use
it."""

from __future__ import annotations

import io
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from unittest.mock import ANY
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest
import requests

from b24sms.emulator import (
    EmulatedPortal,
    Emulator,
    php_form_decode,
    php_form_encode,
)

HEX32 = re.compile(r"[0-9a-f]{32}")
SENDER = {"CODE": "sms1", "TYPE": "SMS", "HANDLER": "http://127.0.0.1:9/h/sms1", "NAME": "One"}


# -- a fake app that records what Bitrix24 sends it ---------------------------------------------


class FakeApp:
    """Records every request; answers 200 (an installFinish page for the UI install)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.status = 200
        app = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode()
                split = urlsplit(self.path)
                app.requests.append(
                    {
                        "path": split.path,
                        "query": dict(parse_qsl(split.query)),
                        "form": dict(parse_qsl(body, keep_blank_values=True)),
                        "content_type": self.headers.get("Content-Type"),
                    }
                )
                page = b"<script>BX24.installFinish();</script>"
                self.send_response(app.status)
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    @property
    def last(self) -> dict[str, Any]:
        return self.requests[-1]


@pytest.fixture(scope="module")
def app() -> Iterator[FakeApp]:
    fake = FakeApp()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


@pytest.fixture
def emu() -> Iterator[Emulator]:
    with Emulator(
        client_id="local.test", client_secret="s3cret", requests_per_second=1000, burst=1000
    ) as emulator:
        yield emulator


@pytest.fixture
def portal(emu: Emulator) -> EmulatedPortal:
    return emu.add_portal()


def call(portal: EmulatedPortal, method: str, token: str | None = "", **params: Any) -> Any:
    """JSON POST, as the service will call; token "" means the portal's current one."""
    if token is not None:
        params["auth"] = token or portal.access_token
    response = requests.post(portal.client_endpoint + method, json=params, timeout=5)
    return response.status_code, response.json()


def refresh(emu: Emulator, token: str, client_secret: str = "s3cret") -> requests.Response:
    return requests.get(
        emu.oauth_url,
        params={
            "grant_type": "refresh_token",
            "client_id": "local.test",
            "client_secret": client_secret,
            "refresh_token": token,
        },
        timeout=5,
    )


# -- lifecycle and addresses --------------------------------------------------------------------


def test_addresses_and_stop_release_every_server() -> None:
    emu = Emulator(client_id="local.test", client_secret="s3cret")
    emu.start()
    one, two = emu.add_portal(), emu.add_portal(domain="x.bitrix24.com", member_id="m" * 32)
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/oauth/token/", emu.oauth_url)
    assert HEX32.fullmatch(one.member_id) and HEX32.fullmatch(one.application_token)
    assert one.port != two.port and one.port != emu.port
    assert one.domain == f"127.0.0.1:{one.port}"
    assert one.client_endpoint == f"http://127.0.0.1:{one.port}/rest/"
    assert two.domain == "x.bitrix24.com" and emu.portal("m" * 32) is two
    with pytest.raises(ValueError):
        emu.add_portal(member_id="m" * 32)
    urls = [emu.oauth_url, one.client_endpoint + "profile", two.client_endpoint + "profile"]
    emu.stop()
    emu.stop()
    for url in urls:
        with pytest.raises(requests.ConnectionError):
            requests.get(url, timeout=1)


def test_a_new_portal_has_working_tokens(portal: EmulatedPortal) -> None:
    status, body = call(portal, "profile")
    assert status == 200 and body["result"]["ADMIN"] is True
    status, body = call(portal, "app.info")
    assert body["result"]["CODE"] == "local.test"
    assert set(body["time"]) >= {
        "start",
        "finish",
        "duration",
        "processing",
        "date_start",
        "date_finish",
        "operating",
        "operating_reset_at",
    }
    assert isinstance(body["time"]["operating"], float)
    assert isinstance(body["time"]["operating_reset_at"], int)


# -- auth ---------------------------------------------------------------------------------------


def test_auth_errors(emu: Emulator, portal: EmulatedPortal) -> None:
    assert call(portal, "profile", token=None) == (
        401,
        {"error": "NO_AUTH_FOUND", "error_description": "Wrong authorization data"},
    )
    assert call(portal, "profile", token="nope")[1]["error"] == "invalid_token"
    portal.expire_tokens()
    status, body = call(portal, "profile")
    assert (status, body["error"]) == (401, "expired_token")


def test_tokens_expire_after_token_ttl(emu: Emulator, portal: EmulatedPortal) -> None:
    emu.token_ttl = 0.2
    fresh = refresh(emu, portal.refresh_token).json()["access_token"]
    assert call(portal, "profile", token=fresh)[0] == 200
    time.sleep(0.25)
    assert call(portal, "profile", token=fresh)[1]["error"] == "expired_token"


def test_auth_from_query_string_and_form_and_json_suffix(portal: EmulatedPortal) -> None:
    url = portal.client_endpoint + "messageservice.sender.add.json"
    response = requests.post(
        url,
        params={"auth": portal.access_token},
        data={
            "code": "formed",
            "type": "SMS",
            "handler": "https://sms.example.com/h",
            "NAME[en]": "English",
            "NAME[de]": "Deutsch",
        },
        timeout=5,
    )
    assert response.json()["result"] is True
    assert portal.senders["formed"]["NAME"] == {"en": "English", "de": "Deutsch"}
    response = requests.get(
        portal.client_endpoint + "messageservice.sender.list",
        params={"auth": portal.access_token},
        timeout=5,
    )
    assert response.json()["result"] == ["formed"]


# -- messageservice methods ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "error", "description"),
    [
        ({}, "ERROR_SENDER_VALIDATION_FAILURE", "Empty data!"),
        ({**SENDER, "CODE": ""}, "ERROR_SENDER_VALIDATION_FAILURE", "Empty sender code!"),
        ({**SENDER, "CODE": "a b"}, "ERROR_SENDER_VALIDATION_FAILURE", "Wrong sender code!"),
        ({**SENDER, "CODE": "ab\n"}, "ERROR_SENDER_VALIDATION_FAILURE", "Wrong sender code!"),
        ({**SENDER, "NAME": ""}, "ERROR_SENDER_VALIDATION_FAILURE", "Empty sender NAME!"),
        ({**SENDER, "TYPE": ""}, "ERROR_SENDER_VALIDATION_FAILURE", "Empty sender message TYPE!"),
        (
            {**SENDER, "TYPE": "EMAIL"},
            "ERROR_SENDER_VALIDATION_FAILURE",
            "Unknown sender message TYPE!",
        ),
        ({**SENDER, "HANDLER": "http://localhost/h"}, "ERROR_WRONG_HANDLER_URL", None),
        ({**SENDER, "HANDLER": "not a url"}, "ERROR_WRONG_HANDLER_URL", None),
        ({**SENDER, "HANDLER": "ftp://x.example.com/h"}, "ERROR_UNSUPPORTED_PROTOCOL", None),
    ],
)
def test_sender_add_validation(
    portal: EmulatedPortal, params: dict, error: str, description: str | None
) -> None:
    status, body = call(portal, "messageservice.sender.add", **params)
    assert (status, body["error"]) == (400, error)
    if description:
        assert body["error_description"] == description
    assert portal.senders == {}


def test_sender_lifecycle(portal: EmulatedPortal) -> None:
    lower = {key.lower(): value for key, value in SENDER.items()}
    assert call(portal, "messageservice.sender.add", **lower)[1]["result"] is True
    assert portal.senders["sms1"] == {**SENDER, "DESCRIPTION": ""}
    assert call(portal, "messageservice.sender.add", **SENDER)[1] == {
        "error": "ERROR_SENDER_ALREADY_INSTALLED",
        "error_description": "Sender already installed!",
    }

    update = "messageservice.sender.update"
    assert call(portal, update)[1]["error"] == "ERROR_SENDER_CODE_REQUIRED"
    assert call(portal, update, CODE="sms1")[1]["error"] == "ERROR_SENDER_OTHER_PARAMS_REQUIRED"
    assert call(portal, update, CODE="zz", NAME="x")[1]["error"] == "ERROR_SENDER_NOT_FOUND"
    assert call(portal, update, CODE="sms1", HANDLER="https://new.example.com/h")[0] == 200
    assert portal.senders["sms1"]["HANDLER"] == "https://new.example.com/h"
    portal.supports_sender_update = False
    assert call(portal, update, CODE="sms1", NAME="x") == (
        404,
        {"error": "ERROR_METHOD_NOT_FOUND", "error_description": "Method not found!"},
    )

    assert call(portal, "messageservice.sender.list")[1]["result"] == ["sms1"]
    delete = "messageservice.sender.delete"
    assert call(portal, delete, CODE="sms1")[1]["result"] is True
    assert call(portal, delete, CODE="sms1")[1]["error"] == "ERROR_SENDER_NOT_FOUND"
    assert call(portal, "messageservice.sender.list")[1]["result"] == []
    assert call(portal, "no.such.method")[0] == 404


def test_send_sms_and_status_updates(app: FakeApp, portal: EmulatedPortal) -> None:
    call(portal, "messageservice.sender.add", **{**SENDER, "HANDLER": f"{app.url}/h/sms1?k=1"})
    message_id, response = portal.send_sms("sms1", "+19990000000", "Your code: 1234")
    assert response.status_code == 200 and HEX32.fullmatch(message_id)
    seen = app.last
    assert seen["path"] == "/h/sms1" and seen["query"] == {"k": "1"}
    assert seen["content_type"] == "application/x-www-form-urlencoded"
    form = seen["form"]
    assert form["type"] == "SMS" and form["code"] == "sms1" and form["message_id"] == message_id
    assert form["message_to"] == form["properties[phone_number]"] == "+19990000000"
    assert form["message_body"] == form["properties[message_text]"] == "Your code: 1234"
    assert form["module_id"] == "crm" and form["bindings[0][OWNER_TYPE_ID]"] == "3"
    assert form["auth[application_token]"] == portal.application_token
    assert form["auth[member_id]"] == portal.member_id
    assert "auth[refresh_token]" not in form

    update = "messageservice.message.status.update"
    assert (
        call(portal, update, CODE="sms1", MESSAGE_ID=message_id, STATUS="bogus")[1]["error"]
        == "ERROR_MESSAGE_STATUS_INCORRECT"
    )
    assert call(portal, update, CODE="sms1", MESSAGE_ID="f" * 32, STATUS="sent")[1] == {
        "error": "ERROR_MESSAGE_NOT_FOUND",
        "error_description": "Message not found!",
    }
    assert (
        call(portal, update, CODE="other", MESSAGE_ID=message_id, STATUS="sent")[1]["error"]
        == "ERROR_MESSAGE_NOT_FOUND"
    )
    assert portal.final_status(message_id) is None
    assert call(portal, update, code="sms1", message_id=message_id, status="sent")[0] == 200
    assert portal.final_status(message_id) == "sent"
    with pytest.raises(TimeoutError, match="sent"):
        portal.wait_for_status(message_id, timeout=0.05)
    threading.Timer(
        0.05,
        call,
        (portal, update),
        {"CODE": "sms1", "MESSAGE_ID": message_id, "STATUS": "delivered"},
    ).start()
    assert portal.wait_for_status(message_id, timeout=2) == "delivered"
    assert portal.stats["status_updates"] == 5

    message_id, _ = portal.send_sms(
        "sms1",
        "+1",
        "b",
        module_id="bizproc",
        with_auth=False,
        extra={"ts": "1", "message_to": None, "forged": "x"},
    )
    form = app.last["form"]
    assert form["document_id[1]"] == "CCrmDocumentContact" and "workflow_id" in form
    assert form["ts"] == "1" and form["forged"] == "x" and "message_to" not in form
    assert not any(key.startswith("auth[") for key in form)
    assert portal.messages[message_id]["to"] == "+1"
    with pytest.raises(KeyError):
        portal.send_sms("unknown", "+1", "b")


# -- batch --------------------------------------------------------------------------------------


def test_batch(portal: EmulatedPortal) -> None:
    portal.senders["sms1"] = dict(SENDER)
    portal.messages["a" * 32] = {"code": "sms1", "to": "+1", "body": "b", "statuses": []}
    status_update = "messageservice.message.status.update?" + urlencode(
        {"CODE": "sms1", "MESSAGE_ID": "a" * 32, "STATUS": "delivered"}
    )
    status, body = call(
        portal,
        "batch",
        halt=0,
        cmd={
            "ok": status_update,
            "bad": "messageservice.message.status.update?CODE=sms1&MESSAGE_ID=x&STATUS=sent",
            "list": "messageservice.sender.list",
            "nested": "batch?cmd[x]=profile",
        },
    )
    assert status == 200
    result = body["result"]
    assert result["result"] == {"ok": True, "list": ["sms1"]}
    assert result["result_error"]["bad"]["error"] == "ERROR_MESSAGE_NOT_FOUND"
    assert result["result_error"]["nested"]["error"] == "ERROR_BATCH_METHOD_NOT_ALLOWED"
    assert set(result) == {"result", "result_error", "result_total", "result_next", "result_time"}
    assert portal.final_status("a" * 32) == "delivered"
    assert portal.stats["status_updates"] == 2 and portal.stats["batches"] == 1
    assert portal.request_log[-1][1:] == ("batch", 4, 200)

    # Form-encoded, the way PHP SDKs send it; halt stops at the first error.
    response = requests.post(
        portal.client_endpoint + "batch",
        data={
            "auth": portal.access_token,
            "halt": "1",
            "cmd[a]": "messageservice.sender.delete?CODE=nope",
            "cmd[b]": "messageservice.sender.list",
        },
        timeout=5,
    )
    result = response.json()["result"]
    assert list(result["result_error"]) == ["a"] and result["result"] == {}

    too_many = {str(i): "profile" for i in range(51)}
    status, body = call(portal, "batch", cmd=too_many)
    assert (status, body["error"]) == (400, "ERROR_BATCH_LENGTH_EXCEEDED")
    assert portal.request_log[-1][1:] == ("batch", 51, 400)

    portal.php_empty_arrays = True
    result = call(portal, "batch", cmd=["profile"])[1]["result"]
    assert result["result_error"] == [] and list(result["result"]) == ["0"]


def test_every_answer_is_json(portal: EmulatedPortal) -> None:
    broken = requests.post(
        portal.client_endpoint + "profile",
        data=b"{oops",
        headers={"Content-Type": "application/json"},
        timeout=5,
    )
    assert (broken.status_code, broken.json()["error"]) == (400, "INVALID_REQUEST")
    assert requests.put(portal.client_endpoint + "profile", timeout=5).json()["error"]
    assert requests.get(portal.base_url + "/elsewhere", timeout=5).status_code == 404


# -- rate limit and fault injection -------------------------------------------------------------


def test_leaky_bucket_counts_a_batch_as_one() -> None:
    with Emulator(
        client_id="local.test", client_secret="s3cret", requests_per_second=5, burst=3
    ) as emu:
        portal = emu.add_portal()
        cmd = {str(i): "profile" for i in range(50)}
        answers = [call(portal, "batch", cmd=cmd)[0]] + [
            call(portal, "profile")[0] for _ in range(3)
        ]
        assert answers == [200, 200, 200, 503]
        assert call(portal, "profile", token=None)[1]["error"] == "QUERY_LIMIT_EXCEEDED"
        time.sleep(0.25)
        assert call(portal, "profile")[0] == 200
        assert portal.stats["rejected_rate_limit"] == 2
        assert portal.stats["requests"] == 6
        assert portal.stats["methods"]["profile"] == 55


def test_injected_errors(portal: EmulatedPortal) -> None:
    portal.inject("OPERATION_TIME_LIMIT", 429, count=2, methods=["profile"])
    assert call(portal, "app.info")[0] == 200
    assert call(portal, "profile")[0] == 429
    _, body = call(portal, "batch", cmd={"p": "profile", "a": "app.info"})
    assert body["result"]["result_error"]["p"]["error"] == "OPERATION_TIME_LIMIT"
    assert "a" in body["result"]["result"]
    assert call(portal, "profile")[0] == 200

    portal.inject("INTERNAL_SERVER_ERROR", 500)
    assert call(portal, "batch", cmd={"p": "profile"}) == (
        500,
        {"error": "INTERNAL_SERVER_ERROR", "error_description": "Internal server error"},
    )
    assert call(portal, "batch", cmd={"p": "profile"})[0] == 200


# -- OAuth --------------------------------------------------------------------------------------


def test_refresh_rotates_tokens(emu: Emulator, portal: EmulatedPortal) -> None:
    old_access, old_refresh = portal.access_token, portal.refresh_token
    assert refresh(emu, old_refresh, client_secret="wrong").status_code == 401
    response = refresh(emu, old_refresh)
    assert response.status_code == 200
    body = response.json()
    assert body["access_token"] == portal.access_token != old_access
    assert body["refresh_token"] == portal.refresh_token != old_refresh
    assert body["client_endpoint"] == portal.client_endpoint
    assert body["server_endpoint"] == emu.oauth_url.replace("/oauth/token/", "/rest/")
    assert body["member_id"] == portal.member_id and body["domain"] == "oauth.bitrix.info"
    assert body["expires_in"] == 3600 and body["expires"] > time.time()
    assert (body["scope"], body["status"], body["user_id"]) == ("messageservice,crm", "L", 1)

    spent = refresh(emu, old_refresh)
    assert (spent.status_code, spent.json()["error"]) == (400, "invalid_grant")
    assert call(portal, "profile", token=old_access)[0] == 200
    assert call(portal, "profile", token=body["access_token"])[0] == 200
    assert portal.stats["refreshes"] == 1 and emu.stats["refresh_errors"] == 2

    # POST form works too.
    response = requests.post(
        emu.oauth_url,
        data={
            "grant_type": "refresh_token",
            "client_id": "local.test",
            "client_secret": "s3cret",
            "refresh_token": portal.refresh_token,
        },
        timeout=5,
    )
    assert response.status_code == 200

    emu.inject("PAYMENT_REQUIRED", 402)
    assert refresh(emu, portal.refresh_token).json()["error"] == "PAYMENT_REQUIRED"
    assert refresh(emu, portal.refresh_token).status_code == 200


def test_concurrent_refreshes_of_one_token_let_one_win(
    emu: Emulator, portal: EmulatedPortal
) -> None:
    emu.refresh_delay = 0.1
    token = portal.refresh_token
    codes: list[int] = []
    threads = [
        threading.Thread(target=lambda: codes.append(refresh(emu, token).status_code))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(codes) == [200, 400, 400]
    assert portal.stats["refreshes"] == 1


# -- install / update / uninstall ---------------------------------------------------------------


def test_install_event(app: FakeApp, portal: EmulatedPortal) -> None:
    member_id, first_app_token = portal.member_id, portal.application_token
    response = portal.install(app.url + "/", mode="event")
    assert response.status_code == 200 and portal.app_url == app.url
    seen = app.last
    assert seen["path"] == "/bitrix24/install"
    form = seen["form"]
    assert form["event"] == "ONAPPINSTALL" and form["data[VERSION]"] == "1"
    assert form["data[LANGUAGE_ID]"] == "en" and form["auth[status]"] == "L"
    assert form["auth[access_token]"] == portal.access_token
    assert form["auth[refresh_token]"] == portal.refresh_token
    assert form["auth[application_token]"] == portal.application_token != first_app_token
    assert form["auth[client_endpoint]"] == portal.client_endpoint
    assert form["auth[member_id]"] == member_id and form["auth[domain]"] == portal.domain
    assert int(form["auth[expires]"]) > time.time()

    previous_token = portal.access_token
    portal.install(app.url)
    assert portal.member_id == member_id and portal.access_token != previous_token
    assert app.last["form"]["auth[application_token]"] == portal.application_token


def test_install_ui(app: FakeApp, portal: EmulatedPortal) -> None:
    portal.install(app.url, mode="ui")
    seen = app.last
    assert seen["query"]["DOMAIN"] == portal.domain and seen["query"]["PROTOCOL"] == "0"
    assert f"http://{seen['query']['DOMAIN']}/rest/" == portal.client_endpoint
    form = seen["form"]
    assert form["AUTH_ID"] == portal.access_token and form["REFRESH_ID"] == portal.refresh_token
    assert form["APPLICATION_TOKEN"] == portal.application_token
    assert form["member_id"] == portal.member_id and form["PLACEMENT"] == "DEFAULT"
    assert portal.install_finished

    frame = portal.placement_auth()
    assert frame["AUTH_ID"] == portal.access_token and frame["DOMAIN"] == portal.domain
    assert call(portal, "app.info", token=frame["AUTH_ID"])[1]["result"]["INSTALLED"] is True


def test_update_and_uninstall(app: FakeApp, portal: EmulatedPortal) -> None:
    portal.install(app.url)
    call(portal, "messageservice.sender.add", **SENDER)
    # Events reach only handlers the app bound itself (api-reference/events/index.md).
    for event in ("ONAPPUPDATE", "ONAPPUNINSTALL"):
        assert call(portal, "event.bind", event=event, handler=f"{app.url}/bitrix24/events") == (
            200,
            {"result": True, "time": ANY},
        )
    portal.update_app(version=3)
    assert portal.senders == {}
    seen = app.last
    assert seen["path"] == "/bitrix24/events" and seen["form"]["event"] == "ONAPPUPDATE"
    # on-app-update.md: data holds VERSION, PREVIOUS_VERSION and LANGUAGE_ID, nothing else
    assert {k for k in seen["form"] if k.startswith("data[")} == {
        "data[VERSION]",
        "data[PREVIOUS_VERSION]",
        "data[LANGUAGE_ID]",
    }
    assert seen["form"]["data[VERSION]"] == "3"
    assert seen["form"]["auth[access_token]"] == portal.access_token
    # The update removed the app's handlers (event-bind.md): nothing is bound any more.
    assert call(portal, "event.get")[1]["result"] == []

    call(portal, "event.bind", event="onAppUninstall", handler=f"{app.url}/bitrix24/events")
    call(portal, "messageservice.sender.add", **SENDER)
    token, refresh_token = portal.access_token, portal.refresh_token
    portal.uninstall(clean=True)
    form = app.last["form"]
    assert form["event"] == "ONAPPUNINSTALL" and form["data[CLEAN]"] == "1"
    assert form["auth[application_token]"] == portal.application_token
    assert not any("token" in key and key != "auth[application_token]" for key in form)
    assert portal.senders == {}
    assert call(portal, "profile", token=token)[1]["error"] == "invalid_token"
    assert refresh(portal.emulator, refresh_token).json()["error"] == "invalid_grant"


def test_uninstall_keeps_senders_when_switched(app: FakeApp, portal: EmulatedPortal) -> None:
    # settings/app-uninstallation.md lists what an uninstall deletes; SMS providers are not
    # named, so whether they go is a switch (default: they go).
    portal.install(app.url)
    call(portal, "messageservice.sender.add", **SENDER)
    portal.uninstall_deletes_senders = False
    portal.uninstall()
    assert list(portal.senders) == [SENDER["CODE"]]


def test_no_update_event_without_a_binding(app: FakeApp, portal: EmulatedPortal) -> None:
    portal.install(app.url)
    before = len(app.requests)
    assert portal.update_app() is None
    assert len(app.requests) == before


def test_event_bind_get_unbind_as_documented(portal: EmulatedPortal) -> None:
    # api-reference/events/event-bind.md, event-get.md, event-unbind.md
    handler = "https://app.example.com/bitrix24/events"
    assert call(portal, "event.bind", event="ONAPPUPDATE", handler=handler)[1]["result"] is True
    status, body = call(portal, "event.bind", event="ONNOSUCHTHING", handler=handler)
    assert (status, body["error"]) == (400, "ERROR_EVENT_NOT_FOUND")
    assert body["error_description"] == "Event not found"
    call(portal, "event.bind", event="ONAPPUNINSTALL", handler=handler)
    call(portal, "event.bind", event="ONAPPUNINSTALL", handler="https://old.example.com/e")
    listed = call(portal, "event.get")[1]["result"]
    assert listed[0] == {"event": "ONAPPUPDATE", "handler": handler, "auth_type": "0", "offline": 0}
    assert len(listed) == 3
    unbound = call(
        portal, "event.unbind", event="ONAPPUNINSTALL", handler="https://old.example.com/e"
    )
    assert unbound[1]["result"] == {"count": 1}
    assert [b["event"] for b in call(portal, "event.get")[1]["result"]] == [
        "ONAPPUPDATE",
        "ONAPPUNINSTALL",
    ]
    # inside a batch too
    cmd = {"g": "event.get", "u": "event.unbind?event=ONAPPUPDATE"}
    result = call(portal, "batch", cmd=cmd)[1]["result"]
    assert len(result["result"]["g"]) == 2 and result["result"]["u"] == {"count": 1}


def test_moved_portal_answers_302_at_its_old_address(portal: EmulatedPortal) -> None:
    # settings/how-to-call-rest-api/change-domen.md
    old_endpoint = portal.client_endpoint
    new_endpoint = portal.change_domain()
    assert new_endpoint != old_endpoint and portal.domain in new_endpoint
    moved = requests.post(
        old_endpoint + "app.info",
        json={"auth": portal.access_token},
        allow_redirects=False,
        timeout=5,
    )
    assert moved.status_code == 302
    assert moved.headers["Location"] == new_endpoint + "app.info"
    assert call(portal, "app.info")[1]["result"]["VERSION"] == portal.app_version


def test_method_limit_blocks_only_that_method(portal: EmulatedPortal) -> None:
    # settings/performance/limits.md: 429 OPERATION_TIME_LIMIT for one method, also in a batch
    portal.limit_method("messageservice.sender.list", 30)
    status, body = call(portal, "messageservice.sender.list")
    assert (status, body["error"]) == (429, "OPERATION_TIME_LIMIT")
    # The docs show no reset time with the error: "refer to operating_reset_at from the last
    # successful response" (limits.md); an error body is error and error_description.
    assert set(body) == {"error", "error_description"}
    assert call(portal, "app.info")[0] == 200
    result = call(portal, "batch", cmd={"a": "messageservice.sender.list", "b": "scope"})[1]
    assert result["result"]["result_error"]["a"] == {
        "error": "OPERATION_TIME_LIMIT",
        "error_description": ANY,
    }
    assert "b" in result["result"]["result"]


def test_access_denied_is_worded_as_the_messageservice_pages(portal: EmulatedPortal) -> None:
    # messageservice-sender-add.md: ACCESS_DENIED "Application context required"
    portal.inject("ACCESS_DENIED", 403)
    status, body = call(portal, "messageservice.sender.list")
    assert (status, body) == (
        403,
        {"error": "ACCESS_DENIED", "error_description": "Application context required"},
    )


def test_operating_only_in_single_calls(portal: EmulatedPortal) -> None:
    # limits.md: "An external call to batch is not accounted for in operating"; batch.md's
    # answers show no operating fields, neither in time nor in result_time.
    portal.operating_window = 5.0
    first = time.time()
    body = call(portal, "scope")[1]
    reset_at = body["time"]["operating_reset_at"]
    assert int(first + 5) - 1 <= reset_at <= int(time.time() + 5)
    # Later calls in the same minute's basket keep the oldest basket's reset and add up.
    again = call(portal, "scope")[1]["time"]
    assert again["operating_reset_at"] == reset_at
    assert again["operating"] >= body["time"]["operating"]
    batch = call(portal, "batch", cmd={"a": "scope", "b": "app.info"})[1]
    assert "operating" not in batch["time"] and "operating_reset_at" not in batch["time"]
    for timing in batch["result"]["result_time"].values():
        assert "operating" not in timing and "operating_reset_at" not in timing
    error = call(portal, "no.such.method")[1]
    assert "time" not in error


def test_payment_switches(portal: EmulatedPortal) -> None:
    portal.payment_expired = True
    info = call(portal, "app.info")[1]["result"]
    assert info["PAYMENT_EXPIRED"] == "Y" and info["DAYS"] < 0
    portal.payment_required = True
    status, body = call(portal, "app.info")
    assert (status, body["error"]) == (402, "PAYMENT_REQUIRED")
    portal.pay()
    assert call(portal, "app.info")[1]["result"]["PAYMENT_EXPIRED"] == "N"


# -- the PHP form codec and the command line ----------------------------------------------------


def test_php_form_round_trip() -> None:
    data = {"auth": {"member_id": "m"}, "bindings": [{"OWNER_ID": 5}], "flag": True, "skip": None}
    pairs = php_form_encode(data)
    assert pairs == [("auth[member_id]", "m"), ("bindings[0][OWNER_ID]", "5"), ("flag", "1")]
    assert php_form_decode(pairs) == {
        "auth": {"member_id": "m"},
        "bindings": {"0": {"OWNER_ID": "5"}},
        "flag": "1",
    }
    assert php_form_decode([("a[]", "1"), ("a[]", "2"), ("b[x", "y"), ("c[d][e", "z")]) == {
        "a": {"0": "1", "1": "2"},
        "b_x": "y",
        "c": {"d": "z"},
    }


def test_command_line(app: FakeApp) -> None:
    from b24sms.emulator.__main__ import main

    out, stop = io.StringIO(), threading.Event()
    thread = threading.Thread(
        target=main,
        args=(["--app-url", app.url, "--client-id", "local.x"],),
        kwargs={"stop": stop, "out": out},
    )
    thread.start()
    deadline = time.monotonic() + 3
    while "running" not in out.getvalue() and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    thread.join(3)
    text = out.getvalue()
    assert "member_id:" in text and "/oauth/token/" in text and "install (event): HTTP 200" in text
    assert app.last["form"]["auth[client_endpoint]"] in text
