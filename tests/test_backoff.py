"""Backoff: the retry-while-the-database-is-unreachable loop (retry_delay: test_delivery.py)."""

from __future__ import annotations

import sqlite3
import time

import pytest
from sqlalchemy.exc import OperationalError

from b24sms.backoff import retry_while_unreachable


def _unreachable() -> OperationalError:
    return OperationalError("SELECT 1", {}, sqlite3.OperationalError("database is locked"))


def test_the_loop_retries_while_unreachable_then_returns():
    answers = iter([_unreachable(), _unreachable(), "stored"])
    waits: list[float] = []
    retried: list[float] = []

    def action():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    result = retry_while_unreachable(
        action,
        time.monotonic() + 60,
        on_retry=lambda exc, delay: retried.append(delay),
        sleep=waits.append,
    )
    assert result == "stored"
    assert waits == retried == [0.1, 0.2]


def test_the_loop_gives_up_at_the_deadline_and_other_errors_pass_at_once():
    calls = []

    def down():
        calls.append(1)
        raise _unreachable()

    with pytest.raises(OperationalError):
        retry_while_unreachable(down, time.monotonic() + 0.5, sleep=lambda s: None)
    assert 1 < len(calls) < 100

    def broken():
        raise ValueError("a bug, not an outage")

    with pytest.raises(ValueError):
        retry_while_unreachable(broken, time.monotonic() + 60, sleep=lambda s: None)
