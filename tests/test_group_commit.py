"""The group commit on its own: batching, each caller's own outcome, no self-deadlock."""

from __future__ import annotations

import threading
import time

from b24sms.group_commit import GroupCommit


def test_concurrent_submissions_are_batched_and_each_sees_its_own_outcome():
    batches: list[list[int]] = []
    first_started = threading.Event()
    release = threading.Event()

    def run_batch(items):
        batches.append(list(items))
        if len(batches) == 1:
            # Hold the first batch until everyone else has queued behind it.
            first_started.set()
            assert release.wait(10)
        for item in items:
            if item % 7 == 0:
                raise ValueError(f"batch with {item}")

    group = GroupCommit(run_batch, max_batch=10)
    outcomes: dict[int, str] = {}

    def submit(item: int) -> None:
        try:
            group.submit(item)
            outcomes[item] = "ok"
        except ValueError as exc:
            outcomes[item] = str(exc)

    first = threading.Thread(target=submit, args=(1,))
    first.start()
    assert first_started.wait(10)
    others = [threading.Thread(target=submit, args=(i,)) for i in range(2, 26)]
    for t in others:
        t.start()
    time.sleep(0.3)  # all 24 are waiting now
    release.set()
    for t in [first, *others]:
        t.join(10)
        assert not t.is_alive()

    assert batches[0] == [1]
    later = batches[1:]
    # 24 waiting items: batches of at most 10, in arrival order, each item exactly once.
    assert all(len(b) <= 10 for b in later) and len(later) >= 3
    assert sorted(i for b in later for i in b) == list(range(2, 26))
    assert max(len(b) for b in later) == 10
    for batch in batches:
        failed = [i for i in batch if i % 7 == 0]
        for item in batch:
            # A batch that raised fails every item in it, and no item outside it.
            expected = f"batch with {failed[0]}" if failed else "ok"
            assert outcomes[item] == expected, (item, batch)


def test_a_submission_from_inside_a_batch_runs_alone_instead_of_waiting_for_itself():
    seen: list[list[str]] = []

    def run_batch(items):
        seen.append(list(items))
        if "outer" in items:
            # An inline queue running a task that stores a message, inside the batch.
            group.submit("inner")

    group: GroupCommit[str] = GroupCommit(run_batch)
    done = threading.Event()
    thread = threading.Thread(target=lambda: (group.submit("outer"), done.set()), daemon=True)
    thread.start()
    assert done.wait(5), "the nested submit waited for its own batch"
    assert seen == [["outer"], ["inner"]]


def test_a_lone_submission_waits_for_nobody():
    group = GroupCommit(lambda items: None)
    started = time.perf_counter()
    for _ in range(200):
        group.submit(1)
    assert time.perf_counter() - started < 2.0
