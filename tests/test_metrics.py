"""``GET /metrics``: off by default, token-protected, counts that match what happened.

Message counts come from the database at scrape time and are compared exactly; the in-process
counters and histograms are global to the test process, so they are compared as differences
between two scrapes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from b24sms import metrics
from b24sms.config import ConfigError, MetricsConfig, validate_config
from b24sms.event_hooks import MessageInfo
from b24sms.gateway import PermanentGatewayError, RetryableGatewayError
from b24sms.messages import enqueue_report
from b24sms.models import Message, Portal, utcnow
from tests.conftest import CLIENT_ID, CLIENT_SECRET, SECRET_KEY, base_config
from tests.deployment import free_port, write_config

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "scrape-token-0123456789abcdef"
PROVIDERS = {
    "smslog": {"plugin": "log", "name": "Log only"},
    "second": {"plugin": "log", "name": "Failing", "outcome": "failed"},
}
ENABLED = {"enabled": True, "token": TOKEN}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    values: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def scrape(url: str, token: str = TOKEN) -> Samples:
    response = requests.get(
        f"{url}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=10
    )
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    return parse(response.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def local() -> Samples:
    """The in-process metrics of this test process, right now."""
    return parse(metrics.generate_latest(metrics.REGISTRY).decode())


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def installed(server, emulator):
    portal = emulator.add_portal()
    assert portal.install(server.url).status_code == 200
    return portal


# -- switched off, switched on, protected ----------------------------------------------------


def test_metrics_are_off_by_default(client):
    response = client.get("/metrics")
    assert response.status_code == 404
    assert response.json["error"] == "not_found"


def test_the_token_is_required_and_never_echoed(live_app):
    server = live_app(metrics=ENABLED)
    for headers in (
        {},
        {"Authorization": "Bearer wrong-token-0123456789"},
        {"Authorization": f"Basic {TOKEN}"},
    ):
        response = requests.get(f"{server.url}/metrics", headers=headers, timeout=10)
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert TOKEN not in response.text
    ok = requests.get(
        f"{server.url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
    )
    assert ok.status_code == 200 and TOKEN not in ok.text


def test_without_a_token_the_endpoint_is_open(live_app):
    server = live_app(metrics={"enabled": True})
    assert requests.get(f"{server.url}/metrics", timeout=10).status_code == 200


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        ({"token": "short"}, "metrics.token: must be at least 16 characters"),
        ({"enabled": "perhaps"}, "metrics.enabled"),
        ({"password": "x"}, "metrics.password: unknown key"),
    ],
)
def test_the_metrics_table_is_validated(tmp_path, section, problem):
    with pytest.raises(ConfigError, match=problem):
        validate_config(base_config(tmp_path, metrics=section), environ={})


def test_metrics_defaults(tmp_path):
    config = validate_config(base_config(tmp_path), environ={})
    assert config.metrics == MetricsConfig(enabled=False, token="", database=True)


# -- the counts --------------------------------------------------------------------------------


def test_counters_match_the_messages_sent(live_app, emulator):
    server = live_app(providers=PROVIDERS, metrics=ENABLED)
    portal = installed(server, emulator)
    before = local()
    delivered = [portal.send_sms("smslog", f"+1415555010{i}", "x")[0] for i in range(3)]
    failed = [portal.send_sms("second", f"+1415555020{i}", "x")[0] for i in range(2)]
    _, response = portal.send_sms("smslog", "12", "x")  # not a number: failed at once
    assert response.status_code == 200
    for message_id in delivered + failed:
        portal.wait_for_status(message_id)

    samples = scrape(server.url)
    # From the database: exact.
    assert value(samples, "b24sms_messages_received_total", code="smslog") == 4
    assert value(samples, "b24sms_messages_received_total", code="second") == 2
    assert value(samples, "b24sms_messages_sent_total", code="smslog") == 3
    assert value(samples, "b24sms_messages_sent_total", code="second") == 2
    assert value(samples, "b24sms_messages_final_total", code="smslog", status="delivered") == 3
    assert value(samples, "b24sms_messages_final_total", code="smslog", status="failed") == 1
    assert value(samples, "b24sms_messages_final_total", code="second", status="failed") == 2
    assert value(samples, "b24sms_messages_final_total", code="second", status="delivered") == 0
    assert value(samples, "b24sms_messages", code="smslog", status="queued") == 0
    assert value(samples, "b24sms_portals", state="active") == 1
    assert value(samples, "b24sms_database_up") == 1

    # In this process: as differences.
    after = local()
    handler = "b24sms_handler_duration_seconds_count"
    assert delta(before, after, handler, code="smslog", status="200") == 4
    assert delta(before, after, handler, code="second", status="200") == 2
    # Every message went through a HANDLER transaction (one at a time here: batches of one).
    assert delta(before, after, "b24sms_ingest_batch_size_sum") == 6
    assert delta(before, after, "b24sms_ingest_batch_size_count") == 6
    changes = "b24sms_status_changes_total"
    assert delta(before, after, changes, code="smslog", status="delivered", source="gateway") == 3
    assert delta(before, after, changes, code="smslog", status="failed", source="handler") == 1
    assert delta(before, after, changes, code="second", status="failed", source="gateway") == 2
    assert (
        delta(before, after, "b24sms_bitrix24_request_duration_seconds_count", method="batch") >= 1
    )


def test_unknown_codes_do_not_become_labels(live_app, emulator):
    server = live_app(providers=PROVIDERS, metrics=ENABLED)
    before = local()
    response = requests.post(f"{server.url}/bitrix24/handler/made-up-code", data={}, timeout=10)
    assert response.status_code == 404
    after = local()
    assert (
        delta(before, after, "b24sms_handler_duration_seconds_count", code="unknown", status="404")
        == 1
    )
    assert not any(dict(labels).get("code") == "made-up-code" for _, labels in after)


def test_outbox_backlog_is_labelled_by_portal_id_only(live_app, emulator):
    server = live_app(providers=PROVIDERS, metrics=ENABLED)
    portal = installed(server, emulator)
    message_id, _ = portal.send_sms("smslog", "+14155550100", "x")
    portal.wait_for_status(message_id)
    db = server.app.extensions["b24sms"].db
    with db.session() as session:
        message = session.scalar(select(Message).where(Message.message_id == message_id))
        enqueue_report(session, message)  # waiting to be reported; no flush asked for
        portal_id = session.scalar(select(Portal.id).where(Portal.member_id == portal.member_id))
    response = requests.get(
        f"{server.url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
    )
    samples = parse(response.text)
    assert value(samples, "b24sms_outbox_backlog", portal=str(portal_id)) == 1
    assert value(samples, "b24sms_outbox_oldest_age_seconds", portal=str(portal_id)) >= 0
    # Who the customers are stays private.
    host = portal.domain.split(":")[0]
    assert portal.domain not in response.text and portal.member_id not in response.text
    assert f'"{host}' not in response.text


def test_rest_errors_and_token_refreshes_are_counted(live_app, emulator):
    server = live_app(providers=PROVIDERS, metrics=ENABLED)
    portal = installed(server, emulator)
    before = local()
    portal.expire_tokens()
    portal.inject("INTERNAL_SERVER_ERROR", 500, methods="messageservice.message.status.update")
    message_id, _ = portal.send_sms("smslog", "+14155550100", "x")
    server.app.extensions["b24sms"].queue.drain(max_wait=10)
    portal.wait_for_status(message_id)
    after = local()
    errors = "b24sms_bitrix24_errors_total"
    assert delta(before, after, errors, method="batch", error="expired_token") == 1
    assert (
        delta(
            before,
            after,
            errors,
            method="messageservice.message.status.update",
            error="INTERNAL_SERVER_ERROR",
        )
        == 1
    )
    assert delta(before, after, "b24sms_token_refreshes_total", result="refreshed") == 1


def test_failed_sends_and_retries_are_counted_from_the_hooks():
    info = MessageInfo(
        id=1,
        message_id="m",
        code="hooked",
        member_id="x",
        domain="d",
        to=None,
        body="",
        module_id=None,
        status="queued",
        external_id=None,
        attempts=1,
        last_error=None,
        created_at=utcnow(),
    )
    hooks = metrics.MetricsHooks()
    before = local()
    hooks.b24sms_send_failed(message=info, error=RetryableGatewayError("down"), will_retry=True)
    hooks.b24sms_send_failed(message=info, error=PermanentGatewayError("bad"), will_retry=False)
    after = local()
    assert delta(before, after, "b24sms_send_retries_total", code="hooked") == 1
    assert delta(before, after, "b24sms_send_failures_total", code="hooked", retryable="true") == 1
    assert delta(before, after, "b24sms_send_failures_total", code="hooked", retryable="false") == 1


def test_gateway_send_latency_by_outcome():
    before = local()
    metrics.observe_gateway_send("timed", 0.2, None)
    metrics.observe_gateway_send("timed", 1.5, RetryableGatewayError("slow"))
    metrics.observe_gateway_send("timed", 0.1, PermanentGatewayError("no"))
    after = local()
    name = "b24sms_gateway_send_duration_seconds_count"
    for outcome in ("accepted", "retryable_error", "permanent_error"):
        assert delta(before, after, name, code="timed", outcome=outcome) == 1
    assert (
        delta(
            before,
            after,
            "b24sms_gateway_send_duration_seconds_bucket",
            code="timed",
            outcome="accepted",
            le="0.25",
        )
        == 1
    )


def test_error_codes_from_outside_are_cleaned_and_capped(monkeypatch):
    monkeypatch.setattr(metrics, "_error_labels", set())
    monkeypatch.setattr(metrics, "_MAX_ERROR_LABELS", 2)
    before = local()
    for code in ("A", 'B"}\n', "C", "D"):
        metrics.count_rest_error("capped.method", code)
    after = local()
    name = "b24sms_bitrix24_errors_total"
    assert delta(before, after, name, method="capped.method", error="A") == 1
    assert delta(before, after, name, method="capped.method", error="B___") == 1
    assert delta(before, after, name, method="capped.method", error="OTHER") == 2


def test_an_unreachable_database_is_reported_not_raised():
    from b24sms.db import Database

    # a real driver against a closed port: what a PostgreSQL that is down answers
    db = Database(f"postgresql+psycopg://b24sms@127.0.0.1:{free_port()}/b24sms?connect_timeout=2")
    try:
        collector = metrics.DatabaseCollector(SimpleNamespace(providers={}, db=db))
        families = list(collector.collect())
    finally:
        db.dispose()
    assert [(f.name, f.samples[0].value) for f in families] == [("b24sms_database_up", 0)]


def test_database_counts_can_be_left_to_one_instance(live_app):
    server = live_app(metrics={**ENABLED, "database": False})
    response = requests.get(
        f"{server.url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
    )
    assert "b24sms_messages_received_total" not in response.text
    assert "b24sms_handler_duration_seconds" in response.text


# -- several processes ---------------------------------------------------------------------------


@pytest.fixture
def gunicorn_app(tmp_path, emulator) -> Iterator[tuple[str, Path]]:
    """The app under gunicorn with two worker processes and PROMETHEUS_MULTIPROC_DIR."""
    pytest.importorskip("gunicorn", reason="gunicorn is not installed (pip install -e '.[test]')")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = tmp_path / "b24sms.toml"
    write_config(
        config,
        {
            "service": {
                "public_url": url,
                "secret_key": SECRET_KEY,
                "database_url": f"sqlite:///{tmp_path}/b24sms.sqlite3",
                "queue_url": "memory://",
            },
            "bitrix24": {
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
                "oauth_url": emulator.oauth_url,
            },
            "metrics": {"enabled": True, "token": TOKEN},
            "providers.smslog": {"plugin": "log", "name": "Log only"},
        },
    )
    # Migrated once up front, so the two workers do not race to create the schema.
    from b24sms.db import Database
    from b24sms.schema import upgrade

    database = Database(f"sqlite:///{tmp_path}/b24sms.sqlite3")
    upgrade(database)
    database.dispose()
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    env = {**os.environ, "B24SMS_CONFIG": str(config), "PROMETHEUS_MULTIPROC_DIR": str(multiproc)}
    # A file, not a pipe: a full pipe would block gunicorn's logging mid-test.
    stderr = (tmp_path / "gunicorn.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-w",
            "2",
            "-b",
            f"127.0.0.1:{port}",
            "--graceful-timeout",
            "2",
            "wsgi:app",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                # The first answer can be slow on a fresh checkout (imports compile to .pyc).
                if requests.get(f"{url}/healthz", timeout=10).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                log_text = (tmp_path / "gunicorn.log").read_text(errors="replace")[-2000:]
                pytest.fail(f"gunicorn did not start: {log_text}")
            time.sleep(0.1)
        yield url, multiproc
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        stderr.close()


@pytest.mark.slow
@pytest.mark.deployment
def test_gunicorn_workers_are_added_up(gunicorn_app, emulator):
    url, multiproc = gunicorn_app
    portal = emulator.add_portal()
    assert portal.install(url).status_code == 200
    # Concurrent calls: a sync worker serves one at a time, so both workers get some.
    with ThreadPoolExecutor(4) as pool:
        sent = list(
            pool.map(lambda i: portal.send_sms("smslog", f"+1415555030{i}", "x")[0], range(8))
        )
    for message_id in sent:
        assert portal.wait_for_status(message_id) == "delivered"
    writers = {path.stem.rsplit("_", 1)[-1] for path in multiproc.glob("histogram_*.db")}
    assert len(writers) == 2, f"expected both workers to have handled calls, got {writers}"
    for _ in range(6):
        samples = scrape(url)
        # Whichever worker answers, it reports the handler calls of both.
        assert (
            value(samples, "b24sms_handler_duration_seconds_count", code="smslog", status="200")
            == 8
        )
        assert (
            value(
                samples,
                "b24sms_status_changes_total",
                code="smslog",
                status="delivered",
                source="gateway",
            )
            == 8
        )
        assert value(samples, "b24sms_messages_received_total", code="smslog") == 8


def test_importing_metrics_changes_no_prometheus_setting_until_init_app():
    # A fresh interpreter: in this one an app built earlier has already called init_app.
    script = (
        "from types import SimpleNamespace\n"
        "from flask import Flask\n"
        "from prometheus_client import generate_latest\n"
        "from b24sms import metrics\n"
        "from b24sms.config import validate_config\n"
        "metrics.count_token_refresh('refreshed')\n"
        "print(b'b24sms_token_refreshes_created' in generate_latest(metrics.REGISTRY))\n"
        "config = validate_config({'service': {'public_url': 'http://x', 'secret_key': ''}}, {})\n"
        "metrics.init_app(Flask('t'), SimpleNamespace(config=config))\n"
        "print(b'b24sms_token_refreshes_created' in generate_latest(metrics.REGISTRY))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    # prometheus-client's default until the app is set up; the *_created series off after
    assert done.stdout.split() == ["True", "False"]
