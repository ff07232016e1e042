"""Group commit: concurrent HANDLER calls share transactions, and each still gets its own answer."""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import func, select, text

from b24sms.errors import ApiError
from b24sms.ingest import GroupCommit, Submission, store_batch
from b24sms.models import Message, StatusEvent

LOG = {"smslog": {"plugin": "log", "name": "Log only"}}


# -- the mechanism ------------------------------------------------------------------------------


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


# -- storing ------------------------------------------------------------------------------------


def _submission(member_id: str, message_id: str, token: str, to: str | None = "+14155550100"):
    return Submission(
        member_id=member_id,
        code="smslog",
        data={
            "message_id": message_id,
            "message_to": to or "not a number",
            "message_body": "hi",
            "module_id": "crm",
        },
        auth={"application_token": token},
        report=True,
        to=to,
    )


@pytest.fixture
def installed(live_app, emulator):
    server = live_app(providers=LOG)
    portal = emulator.add_portal()
    portal.install(server.url)
    return server, portal


def test_a_row_the_database_refuses_fails_only_its_own_call(installed):
    server, portal = installed
    svc = server.app.extensions["b24sms"]
    with svc.db.engine.begin() as conn:
        conn.execute(
            text(
                "CREATE TRIGGER refuse_poison BEFORE INSERT ON messages "
                "WHEN NEW.message_id = 'poison' BEGIN SELECT RAISE(ABORT, 'refused'); END"
            )
        )
    token = portal.application_token
    batch = [
        _submission(portal.member_id, "good-1", token),
        _submission(portal.member_id, "poison", token),
        _submission(portal.member_id, "good-2", token, to=None),
        _submission("not-installed", "stranger", token),
        _submission(portal.member_id, "bad-token", "wrong"),
        _submission(portal.member_id, "good-1", token),  # twice in one batch
    ]
    store_batch(svc, batch)

    good1, poison, good2, stranger, bad_token, again = batch
    assert good1.outcome.result == "accepted" and good1.error is None
    assert good2.outcome.result == "accepted" and good2.outcome.status == "failed"
    assert again.outcome.result == "duplicate" and again.outcome.id == good1.outcome.id
    assert poison.outcome is None and "refused" in str(poison.error)
    assert isinstance(stranger.error, ApiError) and stranger.error.status == 401
    assert isinstance(bad_token.error, ApiError) and bad_token.error.status == 401
    with svc.db.session() as session:
        stored = session.scalars(select(Message.message_id).order_by(Message.id)).all()
        histories = {
            m.message_id: [e.status for e in m.history] for m in session.scalars(select(Message))
        }
        orphans = session.scalar(
            select(func.count())
            .select_from(StatusEvent)
            .where(StatusEvent.message_pk.not_in(select(Message.id)))
        )
    assert stored == ["good-1", "good-2"]
    # nothing of the refused row, in either table
    assert orphans == 0
    assert histories == {"good-1": ["queued", "sent", "delivered"], "good-2": ["queued", "failed"]}


@pytest.mark.slow
def test_a_burst_of_handler_calls_shares_transactions_and_loses_nothing(installed):
    server, portal = installed
    _burst(server, portal)


@pytest.mark.deployment
@pytest.mark.slow
def test_a_burst_on_postgresql(live_app, emulator, postgres_url):
    """Needs PostgreSQL on 127.0.0.1:5432 (skipped with the reason when it is not running):
    the multi-row INSERT … ON CONFLICT DO NOTHING RETURNING is spelt for it too."""
    from b24sms import migrate
    from b24sms.db import Database

    database = Database(postgres_url)
    migrate.upgrade(database)
    database.dispose()
    server = live_app(service={"database_url": postgres_url}, providers=LOG)
    portal = emulator.add_portal()
    portal.install(server.url)
    _burst(server, portal)


def _burst(server, portal) -> None:
    calls = [(f"m{i:03d}", None) for i in range(120)]
    calls += [("m007", None), ("m042", None)]  # repeats racing their first call
    calls += [(f"forged{i}", "not-the-token") for i in range(5)]  # refused, alone
    barrier = threading.Barrier(32)

    def call(args):
        message_id, token = args
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(5)
        extra = {"auth[application_token]": token} if token else None
        _, response = portal.send_sms(
            "smslog", "+14155550100", "hi", message_id=message_id, extra=extra
        )
        return message_id, token, response

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(call, calls))

    answers: dict[str, list[str]] = {}
    for message_id, token, response in results:
        if token:
            assert response.status_code == 401, response.text
            continue
        assert response.status_code == 200, response.text
        answers.setdefault(message_id, []).append(response.json()["result"])
    assert len(answers) == 120
    for message_id, results_of_id in answers.items():
        repeated = message_id in ("m007", "m042")
        assert sorted(results_of_id) == (["accepted", "duplicate"] if repeated else ["accepted"]), (
            message_id
        )

    svc = server.app.extensions["b24sms"]
    with svc.db.session() as session:
        stored = session.scalars(select(Message.message_id)).all()
        # Messages of one transaction share its timestamp: calls were stored together.
        largest = session.scalar(
            select(func.count())
            .select_from(Message)
            .group_by(Message.created_at)
            .order_by(func.count().desc())
            .limit(1)
        )
    assert sorted(stored) == sorted(answers)
    assert largest > 1
    for i in range(0, 120, 17):
        assert portal.wait_for_status(f"m{i:03d}") == "delivered"
