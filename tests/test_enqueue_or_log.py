"""One "enqueue or log": a queue that is down never fails the caller, and leaks no secret."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from b24sms.queue import Queue, enqueue_or_log
from tests.deployment import free_port


def test_a_queue_that_cannot_be_reached_is_logged_not_raised(caplog):
    # A Redis URL on a port nobody listens on: the enqueue fails at the socket.
    queue = Queue(f"redis://:hunter2-secret@127.0.0.1:{free_port()}/0", SimpleNamespace())
    caplog.set_level(logging.WARNING, logger="b24sms.queue")
    assert enqueue_or_log(queue.enqueue_sends, [42, 43]) is False
    assert enqueue_or_log(queue.enqueue_send, 7, delay=5) is False
    lines = [r.getMessage() for r in caplog.records if r.name == "b24sms.queue"]
    assert "queue unavailable; enqueue_sends([42, 43]) is left to the sweep: ConnectionError" in (
        lines
    )
    assert any(line.startswith("queue unavailable; enqueue_send(7)") for line in lines)
    assert not any("hunter2" in line for line in lines)


def test_a_working_queue_is_called(tmp_path):
    queue = Queue(f"sqlite:///{tmp_path / 'queue.db'}", SimpleNamespace())
    assert enqueue_or_log(queue.enqueue_send, 7) is True
    assert queue.huey.pending_count() == 1
