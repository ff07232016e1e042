"""Rate limits on the public routes: one noisy client cannot starve the others, and Bitrix24's
own bursts are never refused. Over real sockets, except the bucket arithmetic and address
parsing, which are checked directly."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from sqlalchemy import func, select

from b24sms.config import ConfigError, validate_config
from b24sms.models import Message
from b24sms.rate_limit_store import Limit, MemoryBuckets, RedisBuckets, make_buckets
from b24sms.web.rate_limits import client_ip, ip_key, parse_networks
from tests.conftest import base_config
from tests.fakes.http_gateway import FakeSmsApi, post_callback

LOG = {"smslog": {"plugin": "log", "name": "Log only"}}
SECRET = "rate-limit-callback-secret-0123"


def messages(server) -> int:
    with server.app.extensions["b24sms"].db.session() as session:
        return session.scalar(select(func.count()).select_from(Message))


def forged_handler_call(server, code: str = "smslog", **headers: str) -> requests.Response:
    """A well-formed HANDLER call with a made-up portal and key: 401 unless rate limited."""
    url = f"{server.url}/bitrix24/handler/{code}?member_id={'f' * 32}&key={'0' * 32}"
    form = {
        "type": "SMS",
        "code": code,
        "message_id": uuid.uuid4().hex,
        "message_to": "+14155550100",
        "message_body": "forged",
    }
    return requests.post(url, data=form, headers=headers, timeout=10)


def assert_rate_limited(response: requests.Response) -> None:
    assert response.status_code == 429, response.text
    body = response.json()
    assert body["error"] == "rate_limited" and set(body) == {"error", "message"}
    assert int(response.headers["Retry-After"]) >= 1


# -- the bucket arithmetic ----------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_takes_refills_and_says_how_long_to_wait():
    clock = Clock()
    buckets = MemoryBuckets(clock=clock)
    limit = Limit(rate=2.0, burst=3)
    assert [buckets.take("k", limit) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("k", limit) == pytest.approx(0.5)  # one token comes back in 1/rate s
    clock.now += 0.5
    assert buckets.take("k", limit) == 0.0
    clock.now += 100  # never more than the burst
    assert [buckets.take("k", limit) for _ in range(4)][-1] > 0
    assert buckets.take("other", limit) == 0.0  # keys are independent


def test_peek_takes_nothing_and_charge_never_goes_below_empty():
    clock = Clock()
    buckets = MemoryBuckets(clock=clock)
    limit = Limit(rate=1.0, burst=2)
    assert buckets.peek("f", limit) == 0.0 and buckets.peek("f", limit) == 0.0
    for _ in range(5):
        buckets.charge("f", limit)
    assert buckets.peek("f", limit) == pytest.approx(1.0)
    clock.now += 1.0
    assert buckets.peek("f", limit) == 0.0  # five charges cost no more than emptying it


def test_memory_buckets_forget_the_least_recently_used_beyond_their_cap():
    buckets = MemoryBuckets(max_keys=2)
    limit = Limit(rate=0.001, burst=1)
    for key in ("a", "b", "c"):
        assert buckets.take(key, limit) == 0.0
    assert buckets.take("c", limit) > 0
    assert buckets.take("a", limit) == 0.0  # dropped, so full again: memory is bounded


# -- who the client is ----------------------------------------------------------------------------


def test_forwarded_for_is_ignored_unless_proxies_are_trusted():
    assert client_ip("10.0.0.5", ["1.2.3.4"], 0) == "10.0.0.5"
    # one proxy of ours appends the address it saw: the last hop is the client
    assert client_ip("10.0.0.5", ["6.6.6.6, 1.2.3.4"], 1) == "1.2.3.4"
    assert client_ip("10.0.0.5", ["6.6.6.6", "5.5.5.5, 1.2.3.4"], 2) == "5.5.5.5"
    # fewer hops than trusted proxies, or garbage: the peer
    assert client_ip("10.0.0.5", ["1.2.3.4"], 2) == "10.0.0.5"
    assert client_ip("10.0.0.5", ["not-an-ip"], 1) == "10.0.0.5"


def test_trusted_proxy_networks_are_skipped_from_the_right():
    proxies = parse_networks(["10.0.0.0/8", "fd00::/8"])
    assert client_ip("10.0.0.5", ["6.6.6.6, 1.2.3.4, 10.1.1.1"], proxies) == "1.2.3.4"
    # a peer that is not our proxy wrote the header itself
    assert client_ip("8.8.8.8", ["1.2.3.4"], proxies) == "8.8.8.8"
    assert client_ip("10.0.0.5", ["10.2.2.2"], proxies) == "10.2.2.2"
    assert client_ip("10.0.0.5", [], proxies) == "10.0.0.5"


def test_ipv6_clients_count_per_64_and_mapped_ipv4_as_ipv4():
    assert ip_key("2001:db8:1:2:aaaa::1") == ip_key("2001:db8:1:2:bbbb::2") == "2001:db8:1:2::/64"
    assert ip_key("2001:db8:1:3::1") != ip_key("2001:db8:1:2::1")
    assert ip_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert ip_key("") == "unknown"


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ({"trusted_proxies": True}, "rate_limit.trusted_proxies"),
        ({"trusted_proxies": 11}, "rate_limit.trusted_proxies"),
        ({"trusted_proxies": ["10.0.0.0/8", "nonsense"]}, "rate_limit.trusted_proxies"),
        ({"exempt": ["300.1.1.1"]}, "rate_limit.exempt"),
        ({"portal_burst": 0}, "rate_limit.portal_burst"),
        ({"storage": "memcached"}, "rate_limit.storage"),
        ({"storage": "redis"}, "rate_limit.redis_url"),
        ({"surprise": 1}, "rate_limit.surprise"),
    ],
)
def test_bad_rate_limit_options_stop_the_start(tmp_path, section, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(base_config(tmp_path, rate_limit=section), {})


def test_storage_follows_the_queue(tmp_path):
    defaults = validate_config(base_config(tmp_path), {}).rate_limit
    assert defaults.enabled and defaults.storage == "auto"
    assert isinstance(make_buckets(defaults, "sqlite:///x.sqlite3"), MemoryBuckets)
    assert isinstance(make_buckets(defaults, "redis://127.0.0.1:6379/0"), RedisBuckets)
    memory = dataclasses.replace(defaults, storage="memory")
    assert isinstance(make_buckets(memory, "redis://h/0"), MemoryBuckets)
    # a named queue's buckets are its own, and redis-py never sees the queue= parameter
    named = make_buckets(defaults, "redis://127.0.0.1:6379/0?queue=staging&health_check_interval=5")
    assert named.prefix == "b24sms:ratelimit:staging:"
    assert named.client.connection_pool.connection_kwargs["health_check_interval"] == 5


# -- over a socket --------------------------------------------------------------------------------


def test_the_handler_key_is_checked_once_per_call(live_app, emulator, monkeypatch):
    """The rate limit and the HANDLER both need the key's verdict: one HMAC pass serves both."""
    import b24sms.web.bitrix24 as web_bitrix24

    server = live_app(providers=LOG)
    portal = emulator.add_portal()
    portal.install(server.url)
    checks = []
    real = web_bitrix24.check_key

    def counted(*args, **kwargs):
        checks.append(args[1:3])
        return real(*args, **kwargs)

    monkeypatch.setattr(web_bitrix24, "check_key", counted)
    assert portal.send_sms("smslog", "+14155550100", "hi")[1].status_code == 200
    assert checks == [(portal.member_id, "smslog")]


def test_a_noisy_portal_is_refused_while_another_portal_goes_on(live_app, emulator, caplog):
    server = live_app(providers=LOG, rate_limit={"portal_rate": 0.01, "portal_burst": 3})
    noisy, quiet = emulator.add_portal(), emulator.add_portal()
    noisy.install(server.url)
    quiet.install(server.url)
    answers = [noisy.send_sms("smslog", "+14155550100", f"n{i}")[1] for i in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert_rate_limited(answers[-1])
    assert int(answers[-1].headers["Retry-After"]) == 100  # 1 token at 0.01/s
    assert messages(server) == 3  # the refused call stored nothing
    # the other portal, calling from the very same address, has its own budget
    for i in range(3):
        assert quiet.send_sms("smslog", "+14155550101", f"q{i}")[1].status_code == 200
    refusals = [r.getMessage() for r in caplog.records if r.name == "b24sms.web.rate_limits"]
    assert any(noisy.member_id in line and "lost" in line for line in refusals)


def test_failures_spend_the_address_budget_but_never_a_valid_handler_call(live_app, emulator):
    server = live_app(providers=LOG, rate_limit={"failure_burst": 3, "failure_rate": 0.01})
    portal = emulator.add_portal()
    portal.install(server.url)
    assert [forged_handler_call(server).status_code for _ in range(3)] == [401, 401, 401]
    assert_rate_limited(forged_handler_call(server))
    # every other public route is closed to that address now …
    assert_rate_limited(requests.post(f"{server.url}/bitrix24/events", data={}, timeout=10))
    assert_rate_limited(requests.post(f"{server.url}/gateways/smslog/callback", timeout=10))
    assert_rate_limited(requests.get(f"{server.url}/app", timeout=10))
    # … but Bitrix24 calls every portal's HANDLER from shared servers: a call with a valid key
    # is the portal's, whatever its address did
    message_id, response = portal.send_sms("smslog", "+14155550100", "still delivered")
    assert response.status_code == 200, response.text
    assert portal.wait_for_status(message_id) == "delivered"
    # monitoring is never limited
    assert requests.get(f"{server.url}/healthz", timeout=10).status_code == 200


def test_successes_cost_no_failure_budget(live_app, emulator):
    with FakeSmsApi() as api:
        providers = {
            "gw": {
                "plugin": "http",
                "name": "HTTP",
                "url": api.json_url,
                "response_id": "messages.0.id",
                "callback_id": "id",
                "callback_status": "status",
                "callback_secret": SECRET,
            }
        }
        server = live_app(providers=providers, rate_limit={"failure_burst": 2})
        portal = emulator.add_portal()
        portal.install(server.url)
        message_id, _ = portal.send_sms("gw", "+14155550100", "hi")
        gateway_id = api.messages[0]["id"]
        url = f"{server.url}/gateways/gw/callback"
        for status in ["sent"] * 10 + ["delivered"]:
            response = post_callback(url, {"id": gateway_id, "status": status}, SECRET)
            assert response.status_code == 200, response.text
        assert portal.wait_for_status(message_id) == "delivered"


def test_every_request_counts_against_the_address(live_app):
    server = live_app(providers=LOG, rate_limit={"ip_burst": 3, "ip_rate": 0.5})
    url = f"{server.url}/bitrix24/events"
    codes = [requests.post(url, data={"event": "X"}, timeout=10).status_code for _ in range(4)]
    assert codes == [400, 400, 400, 429]
    time.sleep(2.1)  # one token back at 0.5/s
    assert requests.post(url, data={"event": "X"}, timeout=10).status_code == 400


def test_trusted_proxy_header_separates_clients_and_spoofing_does_not(live_app):
    limits = {"failure_burst": 2, "failure_rate": 0.01}
    behind_proxy = live_app(providers=LOG, rate_limit={**limits, "trusted_proxies": 1})
    for _ in range(2):
        forged_handler_call(behind_proxy, **{"X-Forwarded-For": "198.51.100.7"})
    assert_rate_limited(forged_handler_call(behind_proxy, **{"X-Forwarded-For": "198.51.100.7"}))
    other = forged_handler_call(behind_proxy, **{"X-Forwarded-For": "198.51.100.8"})
    assert other.status_code == 401  # another client behind the same proxy
    # a client prepending addresses of its own is still the last hop our proxy added
    spoofed = forged_handler_call(behind_proxy, **{"X-Forwarded-For": "1.1.1.1, 198.51.100.7"})
    assert spoofed.status_code == 429

    direct = live_app(providers=LOG, rate_limit=limits)  # no proxy: the header is the client's
    for index in range(2):
        forged_handler_call(direct, **{"X-Forwarded-For": f"203.0.113.{index}"})
    assert_rate_limited(forged_handler_call(direct, **{"X-Forwarded-For": "203.0.113.99"}))


def test_exempt_networks_and_disabled_limits(live_app):
    exempt = live_app(providers=LOG, rate_limit={"failure_burst": 1, "exempt": ["127.0.0.0/8"]})
    off = live_app(providers=LOG, rate_limit={"enabled": False, "failure_burst": 1})
    for server in (exempt, off):
        assert {forged_handler_call(server).status_code for _ in range(5)} == {401}


def test_the_default_limits_take_a_bitrix24_burst(live_app, emulator, tmp_path):
    """An automation rule firing at once: hundreds of calls for one portal, 16 at a time, from
    one address, all accepted under the default limits (Bitrix24 never retries a refusal)."""
    # A queue without a consumer: the calls store and enqueue, as on a web machine.
    server = live_app(providers=LOG, service={"queue_url": f"sqlite:///{tmp_path}/q.sqlite3"})
    portal = emulator.add_portal()
    portal.install(server.url)
    count = 500
    with ThreadPoolExecutor(16) as pool:
        answers = list(
            pool.map(
                lambda i: portal.send_sms(
                    "smslog", f"+1415555{i:04d}", f"burst {i}", with_auth=i % 2 == 0
                )[1],
                range(count),
            )
        )
    assert [a.status_code for a in answers] == [200] * count
    assert messages(server) == count


# -- shared in Redis ------------------------------------------------------------------------------


def redis_url() -> str:
    try:
        import redis

        redis.Redis.from_url("redis://127.0.0.1:6379/15", socket_connect_timeout=0.5).ping()
    except Exception as exc:  # noqa: BLE001 - any failure means: no Redis here
        pytest.skip(f"Redis not reachable on 127.0.0.1:6379 ({type(exc).__name__})")
    return "redis://127.0.0.1:6379/15"


@pytest.mark.deployment
def test_redis_buckets_are_shared_by_every_process(live_app):
    url = redis_url()
    settings = {"storage": "redis", "redis_url": url, "failure_burst": 3, "failure_rate": 0.01}
    first = live_app(providers=LOG, rate_limit=settings)
    second = live_app(providers=LOG, rate_limit=settings)
    limiter = first.app.extensions["b24sms.rate_limit"]
    assert isinstance(limiter.buckets, RedisBuckets)
    limiter.buckets.clear()
    try:
        # two "processes", one budget: failures at either count for both
        assert forged_handler_call(first).status_code == 401
        assert forged_handler_call(second).status_code == 401
        assert forged_handler_call(first).status_code == 401
        assert_rate_limited(forged_handler_call(second))
    finally:
        limiter.buckets.clear()


@pytest.mark.deployment
def test_redis_arithmetic_matches_memory():
    buckets = RedisBuckets(redis_url())
    key = f"test:{uuid.uuid4().hex}"
    limit = Limit(rate=0.5, burst=2)
    try:
        assert buckets.take(key, limit) == 0.0 and buckets.take(key, limit) == 0.0
        assert buckets.take(key, limit) == pytest.approx(2.0, abs=0.05)
        assert buckets.peek(key, limit) == pytest.approx(2.0, abs=0.05)
        buckets.charge(key, limit, 5)
        assert buckets.peek(key, limit) == pytest.approx(2.0, abs=0.05)
        ttl = buckets.client.pttl(buckets.prefix + key)
        assert 0 < ttl <= 5000  # an idle key goes away once it would be full again
    finally:
        buckets.clear()


def _count_redis_calls(buckets: RedisBuckets) -> list[int]:
    """Count the bucket script's round trips to Redis (a spy: every call still goes there;
    the server's own counters would include other clients')."""
    calls = [0]
    script = buckets._script

    def counted(*args, **kwargs):
        calls[0] += 1
        return script(*args, **kwargs)

    buckets._script = counted
    return calls


@pytest.mark.deployment
def test_processes_lease_portal_tokens_from_redis_and_the_limit_still_holds():
    """Two limiters on one Redis (two web processes): a HANDLER burst costs a Redis round trip
    per lease, not per call, and the portal's budget is still what it says."""
    from b24sms.config import RateLimitSchema
    from b24sms.web.rate_limits import RateLimiter

    url = redis_url()
    settings = RateLimitSchema().load({"portal_rate": 0.01, "portal_burst": 2000})
    first, second = (RateLimiter(settings, RedisBuckets(url)) for _ in range(2))
    assert first.lease_size == second.lease_size == 20
    member_id = f"lease-{uuid.uuid4().hex}"
    try:
        calls = _count_redis_calls(first.buckets)
        assert all(first.check_portal(member_id) is None for _ in range(100))
        assert calls[0] == 5  # 5 leases of 20, not 100 calls
        allowed = 100
        refused_in_a_row = 0
        while refused_in_a_row < 50 and allowed < 3000:
            for limiter in (first, second):
                if limiter.check_portal(member_id) is None:
                    allowed += 1
                    refused_in_a_row = 0
                else:
                    refused_in_a_row += 1
        # Tokens a process leased but had no call for are lost to the other: one lease each.
        assert 2000 - 2 * 20 <= allowed <= 2000 + 1
        decision = second.check_portal(member_id)
        assert decision is not None and decision.scope == "portal"
    finally:
        first.buckets.clear()


@pytest.mark.deployment
def test_concurrent_calls_of_one_process_share_its_lease():
    """16 threads of one process: no tokens are taken from Redis only to be dropped."""
    from b24sms.config import RateLimitSchema
    from b24sms.web.rate_limits import RateLimiter

    settings = RateLimitSchema().load({"portal_rate": 0.01, "portal_burst": 2000})
    limiter = RateLimiter(settings, RedisBuckets(redis_url()))
    member_id = f"threads-{uuid.uuid4().hex}"
    try:
        with ThreadPoolExecutor(16) as pool:
            outcomes = list(pool.map(lambda _: limiter.check_portal(member_id), range(2500)))
        allowed = sum(1 for o in outcomes if o is None)
        assert 2000 - 20 <= allowed <= 2000 + 1
    finally:
        limiter.buckets.clear()


@pytest.mark.deployment
def test_small_portal_budgets_are_counted_call_by_call_in_redis():
    from b24sms.config import RateLimitSchema
    from b24sms.web.rate_limits import RateLimiter

    settings = RateLimitSchema().load({"portal_rate": 0.01, "portal_burst": 5})
    first, second = (RateLimiter(settings, RedisBuckets(redis_url())) for _ in range(2))
    assert first.lease_size == 1
    member_id = f"small-{uuid.uuid4().hex}"
    try:
        outcomes = [(first if i % 2 else second).check_portal(member_id) for i in range(6)]
        assert [o is None for o in outcomes] == [True] * 5 + [False]
    finally:
        first.buckets.clear()
    assert MemoryBuckets.shared is False and RateLimiter(settings, MemoryBuckets()).lease_size == 1


def test_an_unreachable_redis_falls_back_to_this_process(caplog, monkeypatch):
    caplog.set_level(logging.WARNING, logger="b24sms.rate_limit_store")
    buckets = RedisBuckets(f"redis://127.0.0.1:{socket_port()}/0", timeout=0.2)
    calls = []
    script = buckets._script
    monkeypatch.setattr(buckets, "_script", lambda **kw: calls.append(1) or script(**kw))
    limit = Limit(rate=0.01, burst=2)
    waits = [buckets.take("k", limit) for _ in range(3)]
    assert waits[:2] == [0.0, 0.0] and waits[2] > 0  # still limited, per process
    assert len(calls) == 1  # Redis is left alone for a while, not tried on every request
    warnings = [r.getMessage() for r in caplog.records if "Redis unreachable" in r.getMessage()]
    assert len(warnings) == 1


def socket_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_parse_networks_accepts_addresses_and_networks():
    networks = parse_networks(["10.0.0.1", "fd00::/8"])
    assert networks[0] == ipaddress.ip_network("10.0.0.1/32")
    assert ipaddress.ip_address("fd00::1") in networks[1]
