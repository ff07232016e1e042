"""Token buckets: per process in memory, or shared by every process in Redis.

A bucket holds up to ``burst`` tokens and refills at ``rate`` tokens a second; a request takes
one, and is refused while the bucket is empty. Three operations cover what the web layer needs
(:mod:`b24sms.web.rate_limits`):

- :meth:`Buckets.take` — take tokens if there are enough (a request that may go ahead);
- :meth:`Buckets.peek` — whether one token is there, without taking it (a failure budget that
  is only spent once the answer turns out to be a failure);
- :meth:`Buckets.charge` — take tokens unconditionally, never below zero (that failure).

Each returns the seconds to wait before the operation would succeed, 0.0 when it did.

:class:`MemoryBuckets` keeps the state in this process: with several processes (gunicorn
workers, machines) each has its own buckets, so the effective limit is the configured one times
the number of processes. :class:`RedisBuckets` keeps it in Redis, one hash per key, updated by
one Lua script (atomic, and timed by the Redis server's clock, so machines' clocks don't
matter). While Redis cannot be reached, each process counts in its own memory instead, and
asks Redis again every few seconds: the limiter must neither stop the service nor slow every
request down by a connection timeout.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

from .config import RateLimitConfig

log = logging.getLogger(__name__)

#: keys kept by :class:`MemoryBuckets` at most; the least recently used go first (a dropped
#: key starts again with a full bucket, so the cap bounds memory, never refuses anybody)
MAX_KEYS = 100_000
#: seconds between two "Redis unreachable" warnings
_WARN_EVERY = 60.0
#: seconds an unreachable Redis is left alone before it is tried again
_RETRY_REDIS_AFTER = 5.0


@dataclass(frozen=True)
class Limit:
    """A bucket's shape: refills at ``rate`` tokens a second, holds at most ``burst``."""

    rate: float
    burst: float

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst < 1:
            raise ValueError("a limit needs rate > 0 and burst >= 1")


class Buckets(Protocol):
    """Where bucket state lives. Every method returns seconds to wait (0.0: done)."""

    #: whether other processes see the same buckets (a shared store is worth leasing from)
    shared: bool

    def take(self, key: str, limit: Limit, cost: float = 1.0) -> float:
        """Take ``cost`` tokens if the bucket holds them; otherwise take nothing."""

    def peek(self, key: str, limit: Limit) -> float:
        """Whether one token is there; takes nothing."""

    def charge(self, key: str, limit: Limit, cost: float = 1.0) -> float:
        """Take ``cost`` tokens, emptying the bucket at most (always returns 0.0)."""

    def clear(self) -> None:
        """Forget every bucket."""


def _step(
    tokens: float, stamp: float, now: float, limit: Limit, cost: float, mode: str
) -> tuple[float, float]:
    """The token bucket arithmetic shared by both stores: (new tokens, seconds to wait)."""
    tokens = min(limit.burst, tokens + max(0.0, now - stamp) * limit.rate)
    if mode == "take":
        if tokens >= cost:
            return tokens - cost, 0.0
        return tokens, (cost - tokens) / limit.rate
    if mode == "charge":
        return max(0.0, tokens - cost), 0.0
    return tokens, 0.0 if tokens >= 1 else (1 - tokens) / limit.rate


class _Operations:
    """The three operations of :class:`Buckets`, over a store's ``_apply``."""

    def _apply(self, key: str, limit: Limit, cost: float, mode: str) -> float:
        raise NotImplementedError

    def take(self, key: str, limit: Limit, cost: float = 1.0) -> float:
        return self._apply(key, limit, cost, "take")

    def peek(self, key: str, limit: Limit) -> float:
        return self._apply(key, limit, 0.0, "peek")

    def charge(self, key: str, limit: Limit, cost: float = 1.0) -> float:
        return self._apply(key, limit, cost, "charge")


class MemoryBuckets(_Operations):
    """Buckets in this process's memory (thread-safe); see the module docstring."""

    #: whether other processes see the same buckets
    shared = False

    def __init__(self, max_keys: int = MAX_KEYS, clock: Any = time.monotonic) -> None:
        self.max_keys = max_keys
        self._clock = clock
        self._state: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def _apply(self, key: str, limit: Limit, cost: float, mode: str) -> float:
        with self._lock:
            now = self._clock()
            tokens, stamp = self._state.get(key, (float(limit.burst), now))
            tokens, wait = _step(tokens, stamp, now, limit, cost, mode)
            self._state[key] = (tokens, now)
            self._state.move_to_end(key)
            while len(self._state) > self.max_keys:
                self._state.popitem(last=False)
            return wait

    def clear(self) -> None:
        with self._lock:
            self._state.clear()


# The same arithmetic as _step, in Redis. Numbers go back as strings: Redis truncates a Lua
# number reply to an integer.
_SCRIPT = """
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local mode = ARGV[4]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens, stamp = tonumber(state[1]), tonumber(state[2])
if tokens == nil or stamp == nil then tokens, stamp = burst, now end
tokens = math.min(burst, tokens + math.max(0, now - stamp) * rate)
local wait = 0
if mode == 'take' then
  if tokens >= cost then tokens = tokens - cost else wait = (cost - tokens) / rate end
elseif mode == 'charge' then
  tokens = math.max(0, tokens - cost)
elseif tokens < 1 then
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'stamp', tostring(now))
redis.call('PEXPIRE', KEYS[1], tostring(math.ceil((burst - tokens) / rate * 1000) + 1000))
return tostring(wait)
"""


class RedisBuckets(_Operations):
    """Buckets shared through Redis by every process and machine; see the module docstring.

    :param namespace: keeps the buckets of deployments sharing one Redis apart.
    """

    shared = True

    def __init__(self, url: str, *, namespace: str = "", timeout: float = 0.5) -> None:
        import redis

        self.prefix = f"b24sms:ratelimit:{namespace + ':' if namespace else ''}"
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self.client = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self._script = self.client.register_script(_SCRIPT)
        #: where buckets live while Redis is unreachable
        self.fallback = MemoryBuckets()
        self._down_until = -math.inf
        self._warned_at = -math.inf

    def _apply(self, key: str, limit: Limit, cost: float, mode: str) -> float:
        now = time.monotonic()
        if now >= self._down_until:
            try:
                answer = self._script(
                    keys=[self.prefix + key], args=[limit.rate, limit.burst, cost, mode]
                )
                return float(answer)
            except self._errors as exc:
                self._down_until = now + _RETRY_REDIS_AFTER
                if now - self._warned_at >= _WARN_EVERY:
                    self._warned_at = now
                    log.warning(
                        "rate limit: Redis unreachable (%s); counting in this process's memory "
                        "until it is back",
                        type(exc).__name__,
                    )
        return self.fallback._apply(key, limit, cost, mode)

    def clear(self) -> None:
        self.fallback.clear()
        try:
            for key in self.client.scan_iter(match=self.prefix + "*", count=1000):
                self.client.delete(key)
        except self._errors:
            pass


def make_buckets(settings: RateLimitConfig, queue_url: str) -> Buckets:
    """The store ``[rate_limit] storage`` asks for (``auto``: Redis when the queue is Redis).

    Buckets in the queue's Redis are namespaced by the queue's ``queue=`` name, like the queue
    itself, so deployments sharing one Redis keep their budgets apart.
    """
    storage = settings.storage
    redis_url, namespace = settings.redis_url, ""
    if not redis_url and queue_url.startswith(("redis://", "rediss://")):
        from .queue import split_queue_name

        # redis-py refuses the queue= parameter
        redis_url, name = split_queue_name(queue_url)
        namespace = name or ""
    if storage == "redis" or (storage == "auto" and redis_url):
        if not redis_url:
            raise ValueError('rate_limit storage = "redis" needs a redis_url')
        return RedisBuckets(redis_url, namespace=namespace)
    return MemoryBuckets()
