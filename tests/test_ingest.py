"""Taking messages in: concurrent HANDLER calls share transactions, each gets its own answer."""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import func, select, text

from b24sms.ingest import Submission, UnknownPortal, WrongApplicationToken, store_batch
from b24sms.models import Message, StatusEvent

LOG = {"smslog": {"plugin": "log", "name": "Log only"}}


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
    assert isinstance(stranger.error, UnknownPortal)
    assert isinstance(bad_token.error, WrongApplicationToken)
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
    from b24sms import schema
    from b24sms.db import Database

    database = Database(postgres_url)
    schema.upgrade(database)
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
