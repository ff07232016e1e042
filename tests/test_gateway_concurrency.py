"""The built-in gateways under concurrent sends: one instance, many threads, real sockets.

Each test sends from many threads at once through ONE gateway instance to its fake (the fake
HTTP API, the fake Twilio API, an aiosmtpd server), then checks that every message arrived
exactly once and that the connections were reused (counted at the fake).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
from marshmallow import RAISE

from b24sms.gateway import (
    Gateway,
    GatewayContext,
    OutgoingMessage,
    PermanentGatewayError,
    RetryableGatewayError,
    SendResult,
)
from b24sms.plugins import PluginError, build_gateways, gateway_types, make_plugin_manager
from tests.fakes.http_gateway import FakeSmsApi
from tests.fakes.smtp_server import LoopbackController, Recorder
from tests.fakes.twilio_api import FakeTwilio

PUBLIC_URL = "https://sms.example.com"
#: threads sending at once, and the concurrency the gateway is given
THREADS = 16
#: messages each thread sends one after the other
PER_THREAD = 3


@dataclass(frozen=True)
class SizedContext(GatewayContext):
    """A context that says how many sends run at once, as the delivery engine's will."""

    concurrency: int = 32


@pytest.fixture(scope="module")
def types():
    return gateway_types(make_plugin_manager({"B24SMS_LOAD_PLUGINS": "http,twilio,email"}))


@pytest.fixture
def build(types) -> Iterator[Callable[..., Gateway]]:
    made: list[Gateway] = []

    def build(plugin: str, options: dict[str, Any], concurrency: int | None = None) -> Gateway:
        if concurrency is None:
            gateway = build_gateways(
                {"code1": {"plugin": plugin, "options": options}}, types, PUBLIC_URL
            )["code1"]
        else:
            cls = types[plugin].cls
            loaded = cls.options_schema(unknown=RAISE).load(options)
            context = SizedContext(
                "code1", PUBLIC_URL, logging.getLogger("test.gateway"), concurrency
            )
            gateway = cls(loaded, context)
        made.append(gateway)
        return gateway

    yield build
    for gateway in made:
        gateway.close()


def message(number: int, to: str = "+14155550100") -> OutgoingMessage:
    return OutgoingMessage(
        id=number,
        message_id=f"b24-{number}",
        code="code1",
        member_id="member-1",
        to=to,
        body=f"message number {number}",
        callback_url=f"{PUBLIC_URL}/gateways/code1/callback",
    )


def send_from_threads(
    gateway: Gateway, first: int, threads: int = THREADS, per_thread: int = PER_THREAD
) -> list[SendResult]:
    """``threads`` threads released at once, each sending ``per_thread`` messages in turn;
    message numbers start at ``first``."""
    start = threading.Barrier(threads)

    def work(index: int) -> list[SendResult]:
        start.wait(timeout=30)
        base = first + index * per_thread
        return [gateway.send(message(base + k)) for k in range(per_thread)]

    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures = [pool.submit(work, i) for i in range(threads)]
        return [result for future in futures for result in future.result(timeout=120)]


def expected_bodies(first: int, count: int) -> list[str]:
    return [f"message number {n}" for n in range(first, first + count)]


def assert_each_once(received: list[str], expected: list[str]) -> None:
    counts = Counter(received)
    assert sorted(counts) == sorted(expected)
    assert {text: n for text, n in counts.items() if n != 1} == {}


def two_bursts(gateway: Gateway, fake: Any, received: Callable[[], list[str]]) -> list[SendResult]:
    """Two bursts from THREADS threads through ``gateway`` to an HTTP ``fake``: every message
    arrives once, the sends overlapped, and the second burst opens no connection."""
    total = THREADS * PER_THREAD
    results = send_from_threads(gateway, first=1)
    assert_each_once(received(), expected_bodies(1, total))
    assert fake.peak_in_flight >= 2, "the sends never overlapped: the test proves nothing"
    # At most one connection per sending thread, each kept for the next send.
    assert fake.connections <= THREADS
    opened = fake.connections

    results += send_from_threads(gateway, first=total + 1)
    assert_each_once(received(), expected_bodies(1, 2 * total))
    assert fake.connections == opened
    return results


# -- http ------------------------------------------------------------------------------------------


@pytest.fixture
def api() -> Iterator[FakeSmsApi]:
    with FakeSmsApi() as fake:
        yield fake


def http_options(api: FakeSmsApi, **extra: Any) -> dict[str, Any]:
    return {
        "url": api.json_url,
        "body": {"to": "{to}", "text": "{body}", "reference": "{id}"},
        "response_id": "messages.0.id",
        **extra,
    }


def test_http_concurrent_sends_arrive_once_over_reused_connections(build, api):
    api.delay = 0.05  # long enough that the threads' sends overlap at the fake
    gateway = build("http", http_options(api), concurrency=THREADS)
    results = two_bursts(gateway, api, lambda: [m["text"] for m in api.messages])
    assert len({r.external_id for r in results}) == len(results)


def test_http_pool_is_sized_to_the_concurrency(build, api):
    """Sixteen threads, the pool sized to 16: the second burst opens nothing. requests' own
    default keeps 10 per host, so 6 connections would be opened again (and again)."""
    api.delay = 0.05
    gateway = build("http", http_options(api), concurrency=THREADS)
    send_from_threads(gateway, first=1, per_thread=1)
    opened = api.connections
    assert opened > 10, "fewer overlapping sends than requests' default pool holds"
    send_from_threads(gateway, first=100, per_thread=1)
    assert api.connections == opened


def test_http_default_concurrency_without_a_context_value(build, api):
    gateway = build("http", http_options(api))
    assert gateway.concurrency == 32
    gateway.send(message(1))
    gateway.send(message(2))
    assert api.connections == 1


# -- http: idempotency ---------------------------------------------------------------------------


def test_http_idempotency_header_makes_a_resend_harmless(build, api):
    api.idempotency_header = "Idempotency-Key"
    gateway = build("http", http_options(api, idempotency_header="Idempotency-Key"))

    first = gateway.send(message(7))
    # The same message again, as after a crash between the gateway's accept and our record.
    again = gateway.send(message(7))
    other = gateway.send(message(8))

    assert [m["text"] for m in api.messages] == ["message number 7", "message number 8"]
    assert again.external_id == first.external_id != other.external_id
    assert api.replayed == 1
    assert [r.header("Idempotency-Key") for r in api.requests] == ["7", "7", "8"]


def test_http_idempotency_key_template(build, api):
    api.idempotency_header = "X-Request-Id"
    options = http_options(api, idempotency_header="X-Request-Id", idempotency_key="prod-{id}")
    gateway = build("http", options)
    gateway.send(message(7))
    assert api.requests[-1].header("X-Request-Id") == "prod-7"


def test_http_same_key_from_two_threads_at_once_is_one_message(build, api):
    api.idempotency_header = "Idempotency-Key"
    api.delay = 0.1
    gateway = build("http", http_options(api, idempotency_header="Idempotency-Key"))
    start = threading.Barrier(4)

    def send() -> SendResult:
        start.wait(timeout=10)
        return gateway.send(message(9))

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = [f.result(timeout=30) for f in [pool.submit(send) for _ in range(4)]]
    assert len(api.messages) == 1
    assert {r.external_id for r in results} == {api.messages[0]["id"]}


def test_http_a_failed_send_is_not_remembered_under_its_key(build, api):
    api.idempotency_header = "Idempotency-Key"
    gateway = build("http", http_options(api, idempotency_header="Idempotency-Key"))
    api.fail_next(503)
    with pytest.raises(RetryableGatewayError, match="503"):
        gateway.send(message(3))
    gateway.send(message(3))  # the retry: the gateway never took the first one
    assert [m["text"] for m in api.messages] == ["message number 3"]
    assert api.replayed == 0


def test_http_no_idempotency_header_by_default(build, api):
    api.idempotency_header = "Idempotency-Key"
    gateway = build("http", http_options(api))
    gateway.send(message(5))
    gateway.send(message(5))
    assert api.requests[-1].header("Idempotency-Key") is None
    assert len(api.messages) == 2  # without the header a re-send is a second message


@pytest.mark.parametrize(
    ("extra", "text"),
    [
        ({"idempotency_header": "Idempotency Key"}, "HTTP header name"),
        ({"idempotency_header": "Idempotency-Key", "idempotency_key": "{to}"}, "{to}"),
        ({"idempotency_header": "Idempotency-Key", "idempotency_key": "{code}"}, "{id}"),
        ({"idempotency_header": "Idempotency-Key", "idempotency_key": "{{id}}"}, "{id}"),
        ({"idempotency_header": "Idempotency-Key", "idempotency_key": "é-{id}"}, "ASCII"),
    ],
)
def test_http_bad_idempotency_options(build, api, extra, text):
    with pytest.raises(PluginError) as info:
        build("http", http_options(api, **extra))
    assert "providers.code1.idempotency_" in str(info.value)
    assert text in str(info.value)


# -- twilio --------------------------------------------------------------------------------------


def test_twilio_concurrent_sends_arrive_once_over_reused_connections(build):
    with FakeTwilio() as fake:
        fake.delay = 0.05
        options = {
            "account_sid": fake.account_sid,
            "auth_token": fake.auth_token,
            "from": "+15005550006",
            "api_base_url": fake.url,
            "timeout": 10,
        }
        gateway = build("twilio", options, concurrency=THREADS)
        results = two_bursts(gateway, fake, lambda: [m["body"] for m in fake.messages.values()])
        assert sorted(r.external_id for r in results) == sorted(fake.messages)


# -- email ---------------------------------------------------------------------------------------


@pytest.fixture
def smtp_server() -> Iterator[Callable[..., tuple[Recorder, LoopbackController]]]:
    started: list[LoopbackController] = []

    def start(**smtp_kwargs: Any) -> tuple[Recorder, LoopbackController]:
        recorder = Recorder()
        controller = LoopbackController(recorder, hostname="127.0.0.1", port=0, **smtp_kwargs)
        controller.start()
        started.append(controller)
        return recorder, controller

    yield start
    for controller in started:
        controller.stop()


def email_options(controller: LoopbackController, **extra: Any) -> dict[str, Any]:
    return {
        "smtp_host": "127.0.0.1",
        "smtp_port": controller.port,
        "security": "none",
        "from": "sms@example.com",
        "address": "{digits}@sms.example.com",
        "timeout": 10,
        **extra,
    }


def mail_bodies(recorder: Recorder) -> list[str]:
    return [recorder.parsed(i).get_content().strip() for i in range(len(recorder.mails))]


def test_email_concurrent_sends_arrive_once_over_pooled_connections(build, smtp_server):
    recorder, controller = smtp_server()
    gateway = build("email", email_options(controller, max_connections=4))
    total = THREADS * PER_THREAD

    results = send_from_threads(gateway, first=1)

    assert_each_once(mail_bodies(recorder), expected_bodies(1, total))
    assert len({r.external_id for r in results}) == total
    # Sixteen threads shared four connections: never more were open.
    assert 1 <= recorder.connections <= 4
    assert len(set(recorder.peers)) == recorder.connections


def test_email_connection_dropped_while_idle_is_replaced(build, smtp_server):
    # The server drops connections idle for 0.3 s, as servers do after their idle timeout.
    recorder, controller = smtp_server(timeout=0.3)
    gateway = build("email", email_options(controller))
    gateway.send(message(1))
    time.sleep(0.8)
    gateway.send(message(2))  # MAIL FROM meets a closed connection: sent on a fresh one
    assert mail_bodies(recorder) == expected_bodies(1, 2)
    assert recorder.connections == 2


def test_email_421_at_mail_from_on_a_reused_connection_goes_out_on_a_fresh_one(build, smtp_server):
    recorder, controller = smtp_server()
    gateway = build("email", email_options(controller))
    gateway.send(message(1))
    # The server ends the reused connection at MAIL FROM (too many mails on one connection).
    recorder.mail_answers.append("421 4.7.0 too many messages on this connection")
    gateway.send(message(2))
    assert mail_bodies(recorder) == expected_bodies(1, 2)
    assert recorder.connections == 2


def test_email_421_at_mail_from_on_a_fresh_connection_is_retryable(build, smtp_server):
    recorder, controller = smtp_server()
    gateway = build("email", email_options(controller))
    recorder.mail_answers.append("421 4.7.0 try again later")
    with pytest.raises(RetryableGatewayError) as info:
        gateway.send(message(1))  # a fresh connection: not tried again here, the core retries
    assert info.value.code == "421"
    assert recorder.mails == []
    assert recorder.connections == 1


@pytest.mark.parametrize(
    ("server", "options", "noop_after", "before", "after"),
    [
        # idle past noop_after: NOOP finds the connection the server dropped
        ({"timeout": 0.3}, {}, 0.1, 1, 2),
        # older than connection_max_age: closed and replaced though it still works
        ({}, {"connection_max_age": 0.3}, None, 2, 1),
    ],
    ids=["noop-finds-it-dropped", "max-age"],
)
def test_email_connection_is_replaced_when_dropped_or_old(
    build, smtp_server, server, options, noop_after, before, after
):
    recorder, controller = smtp_server(**server)
    gateway = build("email", email_options(controller, **options))
    if noop_after is not None:
        gateway._pool.noop_after = noop_after
    for number in range(1, before + 1):
        gateway.send(message(number))
    time.sleep(0.8)
    for number in range(before + 1, before + after + 1):
        gateway.send(message(number))
    assert mail_bodies(recorder) == expected_bodies(1, before + after)
    assert recorder.connections == 2
    first, second = recorder.peers[0], recorder.peers[-1]
    assert first != second
    assert recorder.peers == [first] * before + [second] * after


def test_email_refused_recipient_keeps_the_connection(build, smtp_server):
    recorder, controller = smtp_server()
    gateway = build("email", email_options(controller))
    recorder.rcpt_answer = "550 5.1.1 no such user"
    with pytest.raises(PermanentGatewayError, match="550"):
        gateway.send(message(1))
    recorder.rcpt_answer = None
    gateway.send(message(2))
    assert mail_bodies(recorder) == expected_bodies(2, 1)
    assert recorder.connections == 1


def test_email_all_connections_busy_is_retryable(build, smtp_server):
    recorder, controller = smtp_server()
    gateway = build("email", email_options(controller, max_connections=1, timeout=0.3))
    held = gateway._pool.acquire()  # another send holds the only connection
    try:
        with pytest.raises(RetryableGatewayError) as info:
            gateway.send(message(1))
        assert info.value.code == "busy"
    finally:
        gateway._pool.release(held, reusable=True)
    gateway.send(message(2))
    assert mail_bodies(recorder) == expected_bodies(2, 1)
    assert recorder.connections == 1
