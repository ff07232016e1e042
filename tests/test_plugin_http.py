"""The ``http`` gateway against the fake SMS API over real sockets."""

from __future__ import annotations

import importlib
import json
import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from b24sms.gateway import (
    CallbackInvalid,
    CallbackRejected,
    CallbackRequest,
    OutgoingMessage,
    PermanentGatewayError,
    RetryableGatewayError,
)
from b24sms.plugins import PluginError, build_gateways, gateway_types, make_plugin_manager

from .fakes.http_gateway import CallbackSink, FakeSmsApi, post_callback, sign, signature_header

PUBLIC_URL = "https://sms.example.com"
SECRET = "callback-secret-0123456789"
TOKEN = "Bearer sk-live-TOPSECRET-4242"


@pytest.fixture(scope="module")
def types():
    return gateway_types(make_plugin_manager({"B24SMS_LOAD_PLUGINS": "http"}))


@pytest.fixture
def api():
    with FakeSmsApi() as fake:
        yield fake


@pytest.fixture
def make(types):
    made = []

    def make(code="acme", **options):
        gateway = build_gateways({code: {"plugin": "http", "options": options}}, types, PUBLIC_URL)[
            code
        ]
        made.append(gateway)
        return gateway

    yield make
    for gateway in made:
        gateway.close()


def json_options(api, **extra):
    options = {
        "url": api.json_url,
        "headers": {"Authorization": TOKEN},
        "body": {"to": "{to}", "text": "{body}"},
        "response_id": "messages.0.id",
        "response_status": "messages.0.status",
        "statuses": {"ACCEPTED": "queued", "DELIVRD": "delivered", "UNDELIV": "undelivered"},
        "callback_id": "id",
        "callback_status": "status",
        "callback_secret": SECRET,
    }
    options.update(extra)
    return options


def message(**overrides) -> OutgoingMessage:
    fields = {
        "id": 42,
        "message_id": "b24-msg-1",
        "code": "acme",
        "member_id": "member-1",
        "to": "+14155550100",
        "body": "Hello {to} – привет",
        "callback_url": f"{PUBLIC_URL}/gateways/acme/callback",
    }
    fields.update(overrides)
    return OutgoingMessage(**fields)


def module(types):
    return importlib.import_module(types["http"].cls.__module__)


# sending -------------------------------------------------------------------------------------


def test_json_send_substitutes_placeholders_and_reads_the_answer(api, make):
    body = {
        "to": "{to}",
        "text": "{body}",
        "meta": {"ref": "{id}", "b24": "{message_id}", "code": "{code}", "flash": False},
        "notify": ["{callback_url}"],
        "literal": "{{to}}",
    }
    gateway = make(**json_options(api, body=body))
    result = gateway.send(message())

    sent = api.requests[-1]
    assert sent.method == "POST" and sent.header("Content-Type") == "application/json"
    assert sent.header("Authorization") == TOKEN
    assert sent.json == {
        "to": "+14155550100",
        "text": "Hello {to} – привет",  # the message text is never expanded
        "meta": {"ref": "42", "b24": "b24-msg-1", "code": "acme", "flash": False},
        "notify": [f"{PUBLIC_URL}/gateways/acme/callback"],
        "literal": "{to}",
    }
    assert (result.external_id, result.raw_status) == ("json-1", "ACCEPTED")
    assert result.status == "queued"


def test_form_send(api, make):
    gateway = make(
        url=api.form_url,
        encoding="form",
        body={"to": "{to}", "text": "{body}", "sender": "ACME"},
        response_id="result.msg_id",
        response_status="state",
        statuses={"ENROUTE": "sent"},
    )
    result = gateway.send(message(body="hi & bye=1"))
    sent = api.requests[-1]
    assert sent.header("Content-Type") == "application/x-www-form-urlencoded"
    assert sent.form == {"to": "+14155550100", "text": "hi & bye=1", "sender": "ACME"}
    assert (result.external_id, result.raw_status, result.status) == ("form-1", "ENROUTE", "sent")


def test_get_sends_the_body_as_query_parameters(api, make):
    gateway = make(url=api.form_url, method="GET", response_id="result.msg_id")
    gateway.send(message(body="ping"))
    assert api.requests[-1].method == "GET"
    assert api.requests[-1].query == {"to": "+14155550100", "text": "ping"}


def test_default_body_and_one_session_per_instance(api, make):
    gateway = make(url=api.json_url)
    first = gateway.send(message())
    gateway.send(message(id=43))
    assert api.requests[0].json == {"to": "+14155550100", "text": "Hello {to} – привет"}
    # without response paths a 2xx is "sent", nothing to match reports with
    assert (first.external_id, first.raw_status, first.status) == (None, "accepted", "sent")
    # one requests.Session per instance: both requests came over one pooled connection
    assert len({r.client for r in api.requests}) == 1


def test_accepted_without_id_is_not_resent(api, make, caplog):
    api.answer = (200, b'{"ok": true}')
    gateway = make(**json_options(api))
    with caplog.at_level(logging.WARNING, logger="b24sms.gateway.acme"):
        result = gateway.send(message())
    assert (result.external_id, result.raw_status, result.status) == (None, "accepted", "sent")
    assert "messages.0.id" in caplog.text


def test_accepted_with_a_non_json_answer(api, make):
    api.answer = (202, b"OK")
    result = make(**json_options(api)).send(message())
    assert (result.external_id, result.status) == (None, "sent")


def test_unknown_status_word_in_the_answer_counts_as_sent(api, make):
    api.initial_status = "SOMETHING_NEW"
    result = make(**json_options(api)).send(message())
    assert (result.raw_status, result.status) == ("SOMETHING_NEW", "sent")


def test_503_is_retryable_with_retry_after_then_succeeds(api, make):
    api.fail_next(503, times=2, retry_after="7")
    gateway = make(**json_options(api))
    for _ in range(2):
        with pytest.raises(RetryableGatewayError) as info:
            gateway.send(message())
        assert info.value.retry_after == 7 and info.value.code == "503"
    assert gateway.send(message()).external_id == "json-1"


def test_429_is_retryable_and_honours_an_http_date(api, make):
    api.fail_next(429, retry_after="Wed, 21 Oct 2015 07:28:00 GMT")
    with pytest.raises(RetryableGatewayError) as info:
        make(**json_options(api)).send(message())
    assert info.value.code == "429" and info.value.retry_after == 0


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_4xx_is_permanent(api, make, status):
    api.fail_next(status)
    with pytest.raises(PermanentGatewayError) as info:
        make(**json_options(api)).send(message())
    assert info.value.code == str(status)


def test_a_number_the_api_refuses(api, make):
    api.fail_to["+15550000000"] = 400
    with pytest.raises(PermanentGatewayError, match="cannot send to"):
        make(**json_options(api)).send(message(to="+15550000000"))


def test_timeout_is_retryable(api, make):
    api.delay = 1.0
    with pytest.raises(RetryableGatewayError) as info:
        make(**json_options(api, timeout=0.2)).send(message())
    assert info.value.code == "timeout"


def test_connection_refused_is_retryable(make):
    with pytest.raises(RetryableGatewayError) as info:
        make(url="http://127.0.0.1:9/send").send(message())
    assert info.value.code == "connection"


def test_secrets_stay_out_of_errors_and_logs(api, make, caplog):
    # a gateway that echoes the request back in its error answer
    api.fail_next(400, body=json.dumps({"error": f"bad header {TOKEN}", "key": "k-SECRETKEY"}))
    gateway = make(
        **json_options(
            api,
            url=api.json_url + "?api_key=QUERYSECRET99",
            body={"to": "{to}", "text": "{body}", "api_key": "k-SECRETKEY"},
        )
    )
    with caplog.at_level(logging.DEBUG), pytest.raises(PermanentGatewayError) as info:
        gateway.send(message())
    # our own loggers (urllib3's DEBUG lines show the URL: the service keeps urllib3 at INFO)
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("b24sms"))
    text = str(info.value) + logged
    for secret in ("sk-live-TOPSECRET-4242", "k-SECRETKEY", "QUERYSECRET99", SECRET):
        assert secret not in text
    assert "***" in str(info.value)


@pytest.mark.parametrize(
    "answer",
    [
        "invalid token sk-live-TOPSECRET-4242",  # the credential without its "Bearer "
        "x" * 180 + " Bearer sk-live-TOPSECRET-4242",  # across the 200 characters kept
    ],
)
def test_a_header_credential_is_hidden_however_the_answer_repeats_it(api, make, answer):
    api.fail_next(400, body=answer)
    gateway = make(**json_options(api))
    with pytest.raises(PermanentGatewayError) as info:
        gateway.send(message())
    assert "sk-live" not in str(info.value) and "TOPSECRET" not in str(info.value)
    assert "***" in str(info.value)


# configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"url": "ftp://x"}, "url"),
        ({"url": "http://x", "body": {"to": "{phone}"}}, "body"),
        ({"url": "http://x", "body": {"to": "{to.__class__}"}}, "body"),
        ({"url": "http://x", "encoding": "form", "body": {"a": {"b": "{to}"}}}, "body"),
        ({"url": "http://x", "statuses": {"OK": "done"}}, "statuses"),
        ({"url": "http://x", "callback_secret": SECRET}, "callback_id"),
        ({"url": "http://x", "callback_secret": "short"}, "callback_secret"),
        ({"url": "http://x", "encoding": "xml"}, "encoding"),
        ({"url": "http://x", "timeout": 0}, "timeout"),
        ({"url": "http://x", "bogus": 1}, "bogus"),
        ({}, "url"),
    ],
)
def test_bad_options(make, options, key):
    with pytest.raises(PluginError) as info:
        make(**options)
    text = str(info.value)
    assert f"providers.acme.{key}" in text and "'http'" in text
    assert SECRET not in text


# delivery reports ----------------------------------------------------------------------------


def signed(payload, secret=SECRET, *, form=False, header="X-Signature", signature=None):
    if form:
        from urllib.parse import urlencode

        body = urlencode(payload).encode()
        content_type = "application/x-www-form-urlencoded"
        form_fields = dict(payload)
    else:
        body = json.dumps(payload).encode()
        content_type = "application/json"
        form_fields = {}
    sig = signature if signature is not None else signature_header(body, secret)
    return CallbackRequest(
        method="POST",
        url=f"{PUBLIC_URL}/gateways/acme/callback",
        headers={header: sig, "Content-Type": content_type},
        body=body,
        form=form_fields,
        content_type=content_type,
    )


def test_signed_json_callback(api, make):
    gateway = make(**json_options(api))
    (report,) = gateway.parse_callback(signed({"id": "json-1", "status": "DELIVRD"}))
    assert (report.external_id, report.raw_status) == ("json-1", "DELIVRD")
    assert gateway.map_status(report.raw_status) == "delivered"


def test_signed_form_callback_with_nested_paths_and_custom_header(api, make):
    gateway = make(
        **json_options(
            api, callback_id="msg.id", callback_status="state", callback_signature_header="X-Sig"
        )
    )
    request = signed({"msg.id": "form-9", "state": "UNDELIV"}, form=True, header="x-sig")
    (report,) = gateway.parse_callback(request)
    assert (report.external_id, report.raw_status) == ("form-9", "UNDELIV")


def test_batch_callback_and_legacy_sha256_prefix(api, make):
    gateway = make(
        **json_options(
            api,
            callback_id="data.ref",
            callback_status="data.state",
            callback_legacy_signatures=True,
        )
    )
    payload = [{"data": {"ref": 1, "state": "DELIVRD"}}, {"data": {"ref": 2, "state": "UNDELIV"}}]
    body = json.dumps(payload).encode()
    request = signed(payload, signature="sha256=" + sign(body, SECRET))
    reports = gateway.parse_callback(request)
    assert [(r.external_id, r.raw_status) for r in reports] == [("1", "DELIVRD"), ("2", "UNDELIV")]


@pytest.mark.parametrize(
    "request_",
    [
        signed({"id": "1", "status": "DELIVRD"}, secret="another-secret-0123456"),
        signed({"id": "1", "status": "DELIVRD"}, signature=""),
        signed({"id": "1", "status": "DELIVRD"}, signature="zz-not-hex-ü"),
        signed({"id": "1", "status": "DELIVRD"}, header="X-Other"),
    ],
    ids=["wrong-secret", "empty", "garbage", "missing"],
)
def test_bad_signatures_are_rejected(api, make, request_):
    with pytest.raises(CallbackRejected):
        make(**json_options(api)).parse_callback(request_)


def test_without_a_callback_secret_every_callback_is_rejected(api, make):
    options = json_options(api)
    del options["callback_secret"]
    gateway = make(**options)
    assert gateway.callbacks is False
    # even one "signed" with an empty key
    with pytest.raises(CallbackRejected, match="callback_secret"):
        gateway.parse_callback(signed({"id": "1", "status": "DELIVRD"}, secret=""))


def test_verified_callback_without_the_fields_is_invalid(api, make):
    gateway = make(**json_options(api))
    with pytest.raises(CallbackInvalid, match="'status'"):
        gateway.parse_callback(signed({"id": "1"}))
    bad_json = signed({})
    body = b"not json"
    bad_json = CallbackRequest(
        method="POST",
        url=bad_json.url,
        headers={"X-Signature": signature_header(body, SECRET)},
        body=body,
        content_type="application/json",
    )
    with pytest.raises(CallbackInvalid):
        gateway.parse_callback(bad_json)


def test_post_callback_helper_over_a_socket(api, make):
    gateway = make(**json_options(api))
    with CallbackSink() as sink:
        url = f"{sink.url}/gateways/acme/callback"
        assert post_callback(url, {"id": "json-7", "status": "DELIVRD"}, SECRET).status_code == 200
        assert post_callback(url, {"id": "json-7", "status": "X"}, None).status_code == 200
        post_callback(
            url, {"id": "json-8", "status": "UNDELIV"}, SECRET, encoding="form"
        ).raise_for_status()
        (report,) = gateway.parse_callback(sink.callback_request(0))
        assert report.external_id == "json-7"
        with pytest.raises(CallbackRejected):
            gateway.parse_callback(sink.callback_request(1))
        (report,) = gateway.parse_callback(sink.callback_request(2))
        assert (report.external_id, report.raw_status) == ("json-8", "UNDELIV")


# templating ----------------------------------------------------------------------------------


@given(st.text())
def test_message_text_is_substituted_verbatim(types, text):
    render = module(types).render
    assert render("{body}", {"body": text}) == text
    assert render("<{to}|{body}>", {"to": "+1", "body": text}) == f"<+1|{text}>"


def test_dig(types):
    dig, missing = module(types).dig, module(types)._MISSING
    data = {"messages": [{"id": 5}], "a.b": 1}
    assert dig(data, "messages.0.id") == 5
    assert dig(data, "messages.-1.id") == 5
    assert dig(data, "a.b") == 1
    assert dig(data, "messages.1.id") is missing
    assert dig(data, "messages.x") is missing
