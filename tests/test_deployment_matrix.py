"""The scaled deployment, end to end, on every supported store.

One suite, three layouts (the README's deployment section):

- ``sqlite``: the embedded default, SQLite database + SQLite queue;
- ``postgresql``: PostgreSQL database (``postgresql+psycopg://``) + PostgreSQL queue;
- ``redis``: PostgreSQL database + Redis queue;

each with the web app under gunicorn (2 workers) and 2 ``b24sms worker`` processes, plus the
embedded default as users start it first: ``b24sms serve`` alone (waitress + embedded consumer).

The checks: the app is installed by the portal emulator; a burst of 200 HANDLER calls from 16
threads is answered 200; every message reaches ``delivered`` at the emulator; the fake gateway
accepted each exactly once; the portal never answered ``QUERY_LIMIT_EXCEEDED``.

PostgreSQL (127.0.0.1:5432) and Redis (127.0.0.1:6379) cases skip with the reason when those
servers are not running; each module gets its own PostgreSQL database and Redis queue name.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.deployment import (
    CODE,
    Deployment,
    Figures,
    count_outcome,
    http_gateway_options,
    record_figures,
    send_burst,
    stores,
)
from tests.fakes.http_gateway import FakeSmsApi

BURST = 200


@pytest.mark.parametrize("layout", ["serve", "sqlite", "postgresql", "redis"])
@pytest.mark.slow
@pytest.mark.deployment
def test_burst_end_to_end(
    layout: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    emulator: Any,
    gateway: FakeSmsApi,
) -> None:
    """Install, a burst of 200 HANDLER calls, every message delivered once, no rate-limit hit;
    and in the scaled layouts both gunicorn workers took calls and both workers sent."""
    database_url, queue_url = stores("sqlite" if layout == "serve" else layout, request, tmp_path)
    started = time.monotonic()
    deployment = Deployment(
        tmp_path / "deployment",
        database_url=database_url,
        queue_url=queue_url,
        oauth_url=emulator.oauth_url,
        providers={CODE: http_gateway_options(gateway.json_url)},
        web="serve" if layout == "serve" else "gunicorn",
    )
    with deployment:
        assert "database at revision" in deployment.upgrade()
        deployment.start_web()
        if layout != "serve":
            deployment.start_worker()
            deployment.start_worker()
        portal = emulator.add_portal()
        response = portal.install(deployment.url)
        assert response.status_code == 200, response.text
        assert CODE in portal.senders

        burst = send_burst(portal, CODE, BURST)
        assert len(burst.accepted) == BURST, f"not answered 200: {burst.refused[:5]}"
        deployment.wait_until(
            lambda: all(portal.final_status(m) == "delivered" for m in burst.accepted),
            90,
            f"{BURST} messages delivered at the emulator",
        )
        figures = Figures(f"matrix[{layout}]", "none (end to end)", _describe(layout))
        lost, twice = count_outcome(figures, burst, portal, gateway)
        stats = portal.stats_snapshot()
        figures.seconds = time.monotonic() - started
        figures.notes = {
            "status_batches": stats["batches"],
            "query_limit_exceeded": stats["rejected_rate_limit"],
        }
        record_figures(figures)
        assert not lost and not twice
        assert figures.gateway_sends == BURST
        assert stats["rejected_rate_limit"] == 0
        stored = deployment.messages()
        assert len(stored) == BURST
        assert {status for status, _, _ in stored.values()} == {"delivered"}
        if layout != "serve":
            web_pids = {
                line.split()[1]
                for line in deployment.log_lines("access pid=")
                if "/bitrix24/handler/" in line
            }
            assert len(web_pids) >= 2, "one gunicorn worker took every HANDLER call"
            senders = [w.name for w in deployment.workers if ": attempt " in w.output()]
            assert len(senders) == 2, f"only {senders} sent anything"


def _describe(layout: str) -> str:
    return {
        "serve": "b24sms serve (waitress + embedded consumer), SQLite + SQLite queue",
        "sqlite": "gunicorn -w 2 + 2 workers, SQLite + SQLite queue",
        "postgresql": "gunicorn -w 2 + 2 workers, PostgreSQL + PostgreSQL queue",
        "redis": "gunicorn -w 2 + 2 workers, PostgreSQL + Redis queue",
    }[layout]


def test_queue_url_names_the_queue_inside_its_store(tmp_path: Path) -> None:
    """``?queue=<name>`` lets deployments (and parallel test runs) share one Redis or one
    PostgreSQL database; it is taken out of the URL before the store's client sees it."""
    from huey import PriorityRedisHuey

    from b24sms.queue import QueueError, make_huey, split_queue_name

    assert split_queue_name("redis://h:6379/0") == ("redis://h:6379/0", None)
    assert split_queue_name("redis://h:6379/0?queue=b24_a") == ("redis://h:6379/0", "b24_a")
    assert split_queue_name("postgresql://u@h/db?sslmode=require&queue=x") == (
        "postgresql://u@h/db?sslmode=require",
        "x",
    )
    redis = make_huey("redis://127.0.0.1:1/0?queue=staging")
    # The priority variant: flushes and the sweep outrank sends.
    assert isinstance(redis, PriorityRedisHuey) and redis.name == "staging"
    sqlite = make_huey(f"sqlite:///{tmp_path}/queue.sqlite3?queue=other")
    assert sqlite.name == "other" and (tmp_path / "queue.sqlite3").parent.is_dir()
    with pytest.raises(QueueError, match="queue="):
        make_huey("redis://127.0.0.1:1/0?queue=no.dots")
