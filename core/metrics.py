"""Prometheus metrics: ``GET /metrics``, off unless ``[metrics] enabled = true``.

Two sources, chosen by what each number must survive:

- **Counted where it happens** (prometheus-client counters and histograms in this module): HANDLER
  latency, gateway send latency, send failures and retries, status changes, Bitrix24 REST calls
  and their errors by error code, token refreshes. They describe *this machine's* processes. Under
  gunicorn set ``PROMETHEUS_MULTIPROC_DIR`` (an empty directory, before the processes start):
  every process writes its values there and the scrape adds them up, queue workers of the same
  machine included.
- **Read from the database at scrape time** (:class:`DatabaseCollector`): messages received,
  accepted by a gateway and finished per CODE and status, messages per current status, outbox
  backlog per portal, portals per state. The database is the one truth shared by every process
  and machine, so these are right however many web and worker machines there are and whatever
  restarted — an in-process counter would only count what this process saw. The message counts
  come from the ``message_counts`` table, kept in step by the transactions that store and move
  messages (:mod:`b24sms.counts`), so a scrape costs the same at any history size; the counters
  keep counting messages that retention or an uninstall with ``CLEAN`` deleted (they never go
  down), while the ``b24sms_messages`` gauge counts what is stored now.

Portals are labelled by their internal id, never by domain or member_id, so the endpoint does
not tell the internet who the customers are. The endpoint itself is protected by a bearer token
(``[metrics] token``), compared in constant time.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from . import counts
from .errors import ApiError
from .hookspecs import hookimpl
from .models import OutboxEntry, Portal, utcnow
from .statuses import FINAL_STATUSES, STATUSES

if TYPE_CHECKING:
    from .event_hooks import MessageInfo
    from .gateway import GatewayError
    from .service import Service

log = logging.getLogger(__name__)

#: the registry of this module's in-process metrics (not prometheus-client's global one, so a
#: host application's own metrics never mix with ours)
REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_REMOTE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

HANDLER_SECONDS = Histogram(
    "b24sms_handler_duration_seconds",
    "Time to answer a HANDLER call from Bitrix24 (verify, store, enqueue).",
    ["code", "status"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
INGEST_BATCH = Histogram(
    "b24sms_ingest_batch_size",
    "HANDLER messages stored per transaction (calls that arrived together share one).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 100),
    registry=REGISTRY,
)
GATEWAY_SECONDS = Histogram(
    "b24sms_gateway_send_duration_seconds",
    "Time a gateway's send() took, per attempt.",
    ["code", "outcome"],
    buckets=_REMOTE_BUCKETS,
    registry=REGISTRY,
)
SEND_FAILURES = Counter(
    "b24sms_send_failures",
    "Send attempts that failed, by whether the error is retryable.",
    ["code", "retryable"],
    registry=REGISTRY,
)
SEND_RETRIES = Counter(
    "b24sms_send_retries",
    "Failed send attempts after which another attempt was scheduled.",
    ["code"],
    registry=REGISTRY,
)
STATUS_CHANGES = Counter(
    "b24sms_status_changes",
    "Message status changes applied in this process, by new status and who reported it.",
    ["code", "status", "source"],
    registry=REGISTRY,
)
REST_SECONDS = Histogram(
    "b24sms_bitrix24_request_duration_seconds",
    "Bitrix24 REST requests (a batch counts once), by method.",
    ["method"],
    buckets=_REMOTE_BUCKETS,
    registry=REGISTRY,
)
REST_ERRORS = Counter(
    "b24sms_bitrix24_errors",
    "Bitrix24 REST errors by method and error code (batch commands counted one by one).",
    ["method", "error"],
    registry=REGISTRY,
)
TOKEN_REFRESHES = Counter(
    "b24sms_token_refreshes",
    "Token refreshes: refreshed (OAuth called), reused (another process had refreshed), "
    "refused (tokens revoked), failed (OAuth unreachable or other error).",
    ["result"],
    registry=REGISTRY,
)

# Label values that come from outside (error codes from portals) are cleaned and capped, so
# nobody can grow the number of time series without bound.
_LABEL_RE = re.compile(r"[^A-Za-z0-9_.:-]")
_MAX_ERROR_LABELS = 200
_error_labels: set[str] = set()
_error_labels_lock = threading.Lock()


def _error_label(code: str | None) -> str:
    text = _LABEL_RE.sub("_", str(code or "UNKNOWN"))[:64] or "UNKNOWN"
    with _error_labels_lock:
        if text in _error_labels:
            return text
        if len(_error_labels) >= _MAX_ERROR_LABELS:
            return "OTHER"
        _error_labels.add(text)
        return text


def _method_label(method: str) -> str:
    return _LABEL_RE.sub("_", method.strip().lower())[:96] or "unknown"


# -- instrumentation entry points (called from the code that does the work) --------------------


def observe_rest_request(method: str, seconds: float) -> None:
    """A Bitrix24 REST request finished (answered or not) after ``seconds``."""
    REST_SECONDS.labels(_method_label(method)).observe(seconds)


def count_rest_error(method: str, error_code: str | None) -> None:
    """Bitrix24 answered ``method`` with the error ``error_code`` (or the network failed)."""
    REST_ERRORS.labels(_method_label(method), _error_label(error_code)).inc()


def count_token_refresh(result: str) -> None:
    """One :func:`b24sms.bitrix24.oauth.refresh_tokens` call ended with ``result``."""
    TOKEN_REFRESHES.labels(result).inc()


def observe_gateway_send(code: str, seconds: float, error: BaseException | None) -> None:
    """One ``gateway.send()`` call of provider ``code`` took ``seconds``.

    :param error: the error it raised, or None when the gateway accepted the message.
    """
    if error is None:
        outcome = "accepted"
    else:
        outcome = "retryable_error" if getattr(error, "retryable", False) else "permanent_error"
    GATEWAY_SECONDS.labels(code, outcome).observe(seconds)


class MetricsHooks:
    """Counts from the event hooks; one of :data:`b24sms.plugins.DEFAULT_PLUGINS`."""

    @hookimpl
    def b24sms_status_changed(self, message: MessageInfo, status: str, source: str) -> None:
        STATUS_CHANGES.labels(message.code, status, source).inc()

    @hookimpl
    def b24sms_send_failed(
        self, message: MessageInfo, error: GatewayError, will_retry: bool
    ) -> None:
        SEND_FAILURES.labels(message.code, "true" if error.retryable else "false").inc()
        if will_retry:
            SEND_RETRIES.labels(message.code).inc()


# -- counts from the database --------------------------------------------------------------------


class DatabaseCollector:
    """Counts computed from the shared database at each scrape (see the module docstring).

    Three grouped queries per scrape: the message counts table, the outbox by portal, portals
    by state. A database that cannot be reached gives
    ``b24sms_database_up 0`` and no counts, rather than a failed scrape.
    """

    def __init__(self, service: Service) -> None:
        self.service = service

    def describe(self) -> list[Metric]:
        # Nothing to describe up front: describing must not query the database.
        return []

    def collect(self) -> Iterator[Metric]:
        try:
            messages, outbox, portals = self._query()
        except SQLAlchemyError as exc:
            log.warning("metrics: database query failed: %s", type(exc).__name__)
            yield GaugeMetricFamily(
                "b24sms_database_up", "Whether the metrics' database queries succeeded.", value=0
            )
            return
        yield GaugeMetricFamily(
            "b24sms_database_up", "Whether the metrics' database queries succeeded.", value=1
        )
        yield from self._message_metrics(messages)
        backlog = GaugeMetricFamily(
            "b24sms_outbox_backlog",
            "Statuses waiting to be reported to Bitrix24, per portal id.",
            labels=["portal"],
        )
        oldest = GaugeMetricFamily(
            "b24sms_outbox_oldest_age_seconds",
            "Age of the oldest status waiting to be reported, per portal id.",
            labels=["portal"],
        )
        now = utcnow()
        for portal_id, count, first in outbox:
            backlog.add_metric([str(portal_id)], count)
            age = (now - first).total_seconds() if first is not None else 0.0
            oldest.add_metric([str(portal_id)], max(0.0, age))
        yield backlog
        yield oldest
        states = GaugeMetricFamily(
            "b24sms_portals", "Installed portals by state.", labels=["state"]
        )
        for state, count in sorted(portals):
            states.add_metric([state], count)
        yield states

    def _query(self) -> tuple[list[Any], list[Any], list[Any]]:
        # A read transaction (b24sms.db.Database.read): the scrape never waits for, or holds
        # up, the HANDLER's writes; the message counts come from the counts table
        # (b24sms.counts), a few rows, not from a scan of the messages.
        with self.service.db.read() as session:
            messages = counts.totals(session)
            outbox = session.execute(
                select(OutboxEntry.portal_id, func.count(), func.min(OutboxEntry.created_at))
                .group_by(OutboxEntry.portal_id)
                .order_by(OutboxEntry.portal_id)
            ).all()
            portals = session.execute(
                select(Portal.state, func.count()).group_by(Portal.state)
            ).all()
        return list(messages), list(outbox), list(portals)

    def _message_metrics(self, rows: list[Any]) -> Iterator[Metric]:
        codes = set(self.service.providers)
        received: dict[str, int] = dict.fromkeys(codes, 0)
        sent: dict[str, int] = dict.fromkeys(codes, 0)
        by_status: dict[tuple[str, str], int] = {
            (code, status): 0 for code in codes for status in STATUSES
        }
        ever: dict[tuple[str, str], int] = {}
        for code, status, was_accepted, stored, removed in rows:
            # Counters count every message ever stored (retention's deletions included, so
            # they never go down); the gauge counts what is stored now.
            received[code] = received.get(code, 0) + stored + removed
            if was_accepted:
                sent[code] = sent.get(code, 0) + stored + removed
            by_status[(code, status)] = by_status.get((code, status), 0) + stored
            ever[(code, status)] = ever.get((code, status), 0) + stored + removed
        total = CounterMetricFamily(
            "b24sms_messages_received",
            "Messages stored (from Bitrix24 HANDLER calls and app-page tests), per CODE.",
            labels=["code"],
        )
        accepted = CounterMetricFamily(
            "b24sms_messages_sent",
            "Messages a gateway accepted (sent, or a later status with the gateway's id), "
            "per CODE.",
            labels=["code"],
        )
        final = CounterMetricFamily(
            "b24sms_messages_final",
            "Messages that reached a final status, per CODE and status.",
            labels=["code", "status"],
        )
        current = GaugeMetricFamily(
            "b24sms_messages",
            "Stored messages by their current status, per CODE (queued and sent are in flight).",
            labels=["code", "status"],
        )
        for code in sorted(received):
            total.add_metric([code], received[code])
            accepted.add_metric([code], sent.get(code, 0))
        for (code, status), count in sorted(by_status.items()):
            current.add_metric([code, status], count)
            if status in FINAL_STATUSES:
                final.add_metric([code, status], ever.get((code, status), 0))
        yield from (total, accepted, final, current)


# -- the endpoint --------------------------------------------------------------------------------


class _Scrape:
    """What one scrape exposes: the process metrics (or every process's, in multi-process mode)
    followed by the database counts."""

    def __init__(self, sources: list[Any]) -> None:
        self.sources = sources

    def collect(self) -> Iterator[Metric]:
        for source in self.sources:
            yield from source.collect()


def multiprocess_dir() -> str | None:
    """``PROMETHEUS_MULTIPROC_DIR`` when set (prometheus-client reads it at import time)."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def exposition(service: Service) -> bytes:
    """The text exposition of every metric, as ``GET /metrics`` answers it."""
    sources: list[Any] = []
    if multiprocess_dir():
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        sources.append(registry)
    else:
        sources.append(REGISTRY)
    if service.config.metrics.database:
        sources.append(DatabaseCollector(service))
    return generate_latest(_Scrape(sources))


bp = Blueprint("metrics", __name__)


def _token_ok(expected: str) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        return False
    return hmac.compare_digest(given.strip().encode(), expected.encode())


@bp.get("/metrics")
def metrics_endpoint() -> Response:
    """Prometheus exposition; 404 when disabled, 401 without the configured bearer token."""
    service: Service = current_app.extensions["b24sms"]
    settings = service.config.metrics
    if not settings.enabled:
        raise ApiError(404, "not_found", "metrics are disabled ([metrics] enabled = false)")
    token = settings.token
    if token and not _token_ok(token):
        response = Response(
            '{"error": "unauthorized", "message": "a valid bearer token is required"}\n',
            status=401,
            mimetype="application/json",
        )
        response.headers["WWW-Authenticate"] = 'Bearer realm="b24sms metrics"'
        return response
    response = Response(exposition(service), mimetype=None)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    response.headers["Cache-Control"] = "no-store"
    return response


def _start_timer() -> None:
    if request.endpoint == "bitrix24.handler":
        g.b24sms_handler_started = time.perf_counter()


def _observe_handler(response: Response) -> Response:
    started = g.pop("b24sms_handler_started", None)
    if started is not None:
        service: Service = current_app.extensions["b24sms"]
        code = (request.view_args or {}).get("code", "")
        # Only configured CODEs become labels: the URL is the caller's to choose.
        label = code if code in service.providers else "unknown"
        HANDLER_SECONDS.labels(label, str(response.status_code)).observe(
            time.perf_counter() - started
        )
    return response


def init_app(app: Flask, service: Service) -> None:
    """Time HANDLER calls and serve ``GET /metrics`` (the hook counters are a default plugin)."""
    # The ``*_created`` series double the output and no dashboard of ours uses them. A
    # prometheus-client switch for the whole process, read at scrape time: set here, not at import.
    disable_created_metrics()
    app.before_request(_start_timer)
    app.after_request(_observe_handler)
    app.register_blueprint(bp)
    settings = service.config.metrics
    if settings.enabled and not settings.token:
        log.warning(
            "metrics: GET /metrics is served without a token; keep it off the internet "
            "or set [metrics] token"
        )
