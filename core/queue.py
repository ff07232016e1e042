"""The task queue: a huey instance chosen by ``queue_url``, and the three tasks of delivery.

The database is the truth; the queue is only a trigger. Every task takes ids, opens its own
session and calls a plain function (:func:`b24sms.delivery.deliver`,
:func:`b24sms.outbox.flush_portal`, :func:`b24sms.delivery.sweep`), so a lost or duplicated
task costs time, never a message: the periodic sweep finds whatever a lost task left behind.

``queue_url`` selects the store:

- ``memory://`` — immediate mode for tests: tasks run inline, in the calling thread;
- ``sqlite:///path`` — the default; ``b24sms serve`` runs an embedded consumer beside the web
  server (:meth:`Queue.start_embedded`), ``b24sms worker`` a separate one;
- ``postgresql://…`` / ``redis://…`` — several ``b24sms worker`` processes on several machines.

A ``queue=<name>`` query parameter names the queue inside its store (default ``b24sms``), so
several deployments (staging and production, parallel test runs) can share one Redis or one
PostgreSQL database: ``redis://queue:6379/0?queue=b24sms_staging``.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode

from huey import MemoryHuey, PostgresHuey, PriorityRedisHuey, SqliteHuey
from huey.api import Huey, TaskWrapper
from huey.consumer import Consumer, Scheduler
from huey.storage import SqliteStorage

from .config import resolve_sqlite_path
from .instance import private_file
from .redaction import redact_query

if TYPE_CHECKING:
    from .service import Service

log = logging.getLogger(__name__)

QUEUE_NAME = "b24sms"

#: a status change waits this long before its flush runs, so one flush serves a whole burst
FLUSH_DEBOUNCE = 0.5
#: messages one send_messages task sends itself; a larger batch is handed on in chunks
SEND_CHUNK = 4
#: a "flush pending" marker whose task should have started this long ago is considered lost
FLUSH_MARKER_GRACE = 60.0
#: a "reconcile pending" marker this long past its task's due time belongs to a lost task; long,
#: as reconciles run below sends and may wait behind a backlog (the periodic reconcile catches
#: up with what a lost one missed)
RECONCILE_MARKER_GRACE = 600.0
#: huey priorities (higher first): reporting must not wait behind thousands of queued sends
PRIORITY_FLUSH = 20
PRIORITY_SWEEP = 10
PRIORITY_SEND = 0
#: below sends: a reconcile (several REST calls to a portal) never delays another portal's SMS,
#: however many are queued (ONAPPPAYMENT, which anyone can post, asks for one)
PRIORITY_RECONCILE = -10

#: immediate mode: a delayed task due within this many seconds runs inline after a sleep;
#: later ones wait in memory for :meth:`Queue.drain`
IMMEDIATE_MAX_WAIT = 2.0
#: immediate mode: tasks one drain may run before it assumes a task keeps re-enqueueing itself
IMMEDIATE_MAX_TASKS = 20_000


class QueueError(Exception):
    """The queue cannot be used as asked (bad URL, consumer on an in-memory queue)."""


_QUEUE_NAME_RE = re.compile(r"^[A-Za-z0-9_]{1,64}$")


def split_queue_name(queue_url: str) -> tuple[str, str | None]:
    """``queue_url`` without its ``queue=`` query parameter, and that parameter's value.

    :raises QueueError: for a name other than 1–64 letters, digits and underscores (Redis keys
        keep only letters and digits of it, so anything else could make two names collide).
    """
    base, sep, query = queue_url.partition("?")
    if not sep:
        return queue_url, None
    pairs = parse_qsl(query, keep_blank_values=True)
    names = [value for key, value in pairs if key == "queue"]
    if not names:
        return queue_url, None
    rest = [(key, value) for key, value in pairs if key != "queue"]
    if not _QUEUE_NAME_RE.match(names[-1]):
        raise QueueError("queue_url: queue= must be 1-64 letters, digits or underscores")
    return base + (f"?{urlencode(rest)}" if rest else ""), names[-1]


class _SqliteQueueStorage(SqliteStorage):
    """huey's SQLite store with ``synchronous=NORMAL`` instead of FULL: in WAL mode a commit
    then writes no fsync (0.4 ms each on a typical disk, once per enqueue and per dequeue). An
    OS crash can lose the newest tasks, never corrupt the file — and the queue is only a
    trigger: the sweep re-queues whatever a lost task leaves behind."""

    def _create_connection(self) -> Any:
        conn = super()._create_connection()
        conn.execute("pragma synchronous=NORMAL")
        return conn


def make_huey(queue_url: str, name: str = QUEUE_NAME) -> Huey:
    """The huey instance for a ``queue_url`` (its ``queue=`` parameter overrides ``name``).

    :raises QueueError: for a scheme huey cannot serve.
    """
    queue_url, named = split_queue_name(queue_url)
    name = named or name
    scheme = queue_url.split("://", 1)[0].split("+", 1)[0].lower()
    if scheme == "memory":
        return MemoryHuey(name, immediate=True, results=False)
    if scheme == "sqlite":
        path = resolve_sqlite_path(queue_url)[len("sqlite:///") :]
        private_file(Path(path))  # 0600, before huey's SQLite creates it with the umask
        # A generous busy timeout: the web process, the embedded consumer and any separate worker
        # all write to this one file during a burst.
        return SqliteHuey(
            name, filename=path, results=False, timeout=30, storage_class=_SqliteQueueStorage
        )
    if scheme in ("postgresql", "postgres"):
        dsn = "postgresql://" + queue_url.split("://", 1)[1]
        # Tables are created on first use, not here: a queue that is down must not stop the
        # service from starting (health checks report it instead).
        return PostgresHuey(name, dsn=dsn, results=False, create_tables=False)
    if scheme in ("redis", "rediss"):
        # The priority variant: plain RedisHuey refuses tasks with a priority (flush, sweep).
        return PriorityRedisHuey(name, url=queue_url, results=False)
    raise QueueError(f"unsupported queue_url scheme {scheme!r}")


def enqueue_or_log(enqueue: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
    """Call ``enqueue(*args, **kwargs)`` (a :class:`Queue` method); a queue that is down is
    logged, not raised: what the task would work on is committed already, and the sweep finds
    work whose trigger was lost.

    :returns: False when the queue refused.
    """
    try:
        enqueue(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any queue failure: the sweep takes over
        # The type only: a queue error's text can hold its URL, password included.
        log.warning(
            "queue unavailable; %s(%s) is left to the sweep: %s",
            getattr(enqueue, "__name__", "enqueue"),
            ", ".join(map(repr, args)),
            type(exc).__name__,
        )
        return False
    return True


def _flush_marker(portal_id: int) -> str:
    return f"flush-pending:{portal_id}"


def _reconcile_marker(portal_id: int) -> str:
    return f"reconcile-pending:{portal_id}"


def _reconcile_started(portal_id: int) -> str:
    return f"reconcile-started:{portal_id}"


class EmbeddedConsumer:
    """A consumer running in background threads of this process; :meth:`stop` ends it."""

    def __init__(self, consumer: Consumer | None) -> None:
        self.consumer = consumer
        self._supervisor: threading.Thread | None = None
        if consumer is not None:
            self._supervisor = threading.Thread(
                target=self._supervise, name="b24sms-queue-supervisor", daemon=True
            )

    def start(self) -> EmbeddedConsumer:
        if self.consumer is None:
            return self
        # Not Consumer.start(): it installs signal handlers, which belong to the web server.
        self.consumer.scheduler.start()
        for _, worker in self.consumer.worker_threads:
            worker.start()
        assert self._supervisor is not None
        self._supervisor.start()
        return self

    def _supervise(self) -> None:
        assert self.consumer is not None
        # Consumer.run() would restart dead workers; we run without it, so do that part here.
        while not self.consumer.stop_flag.wait(10.0):
            try:
                self.consumer.check_worker_health()
            except Exception:
                log.exception("queue consumer health check failed")

    @property
    def running(self) -> bool:
        return self.consumer is not None and not self.consumer.stop_flag.is_set()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the threads to finish their current task and wait up to ``timeout`` seconds."""
        if self.consumer is None or self.consumer.stop_flag.is_set():
            return
        self.consumer.stop_flag.set()
        deadline = time.monotonic() + timeout
        threads = [t for _, t in self.consumer.worker_threads] + [self.consumer.scheduler]
        for thread in threads:
            if thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))


class Queue:
    """The service's task queue.

    :param queue_url: ``memory://``, ``sqlite:///path``, ``postgresql://…`` or ``redis://…``.
    :param service: the :class:`~b24sms.service.Service` the tasks work for.
    """

    def __init__(self, queue_url: str, service: Service) -> None:
        self.url = queue_url
        self.service = service
        self.huey = make_huey(queue_url)
        self.immediate = bool(self.huey.immediate)
        self._schema_ready = not isinstance(self.huey, PostgresHuey)
        self._schema_lock = threading.Lock()
        # Immediate mode: tasks wait in a heap (eta, seq, task) and the outermost caller runs
        # them one after another, so a task enqueued by a task never recurses.
        self._pending: list[tuple[float, int, Any]] = []
        self._pending_lock = threading.Lock()
        self._seq = itertools.count()
        self._local = threading.local()
        self._register_tasks()

    # -- tasks ----------------------------------------------------------------------------------

    def _register_tasks(self) -> None:
        # One group of tasks a method; each sets the attributes the enqueue_* methods submit.
        self._register_send_tasks()
        self._register_portal_tasks()
        self._register_periodic_tasks()

    def _register_send_tasks(self) -> None:
        """``send_message`` (one message) and ``send_messages`` (one HANDLER batch's)."""
        service = self.service
        huey = self.huey

        @huey.task(name="send_message", priority=PRIORITY_SEND)
        def send_message(message_pk: int) -> None:
            from .delivery import deliver

            deliver(service, message_pk)

        @huey.task(name="send_messages", priority=PRIORITY_SEND)
        def send_messages(message_pks: list[int]) -> None:
            from .delivery import deliver

            # The messages one HANDLER batch stored: one task for them all, written by the web
            # process in one queue write. Sent one after another they would wait for each
            # other's gateway calls (a slow gateway, a large batch), so the worker hands all
            # but the first SEND_CHUNK on to other workers' threads, in chunks, first.
            here, rest = list(message_pks[:SEND_CHUNK]), message_pks[SEND_CHUNK:]
            for start in range(0, len(rest), SEND_CHUNK):
                chunk = list(rest[start : start + SEND_CHUNK])
                try:
                    self._submit(send_messages, (chunk,), None)
                except Exception:
                    log.exception("could not hand on messages %s; sending them here", chunk)
                    here.extend(chunk)
            # A message whose attempt raises is left to the sweep, as a lone send_message
            # would be, and does not hold up the others.
            for message_pk in here:
                try:
                    deliver(service, message_pk)
                except Exception:
                    log.exception(
                        "message %s: the send attempt failed; the sweep retries it", message_pk
                    )

        self.send_message: TaskWrapper = send_message
        self.send_messages: TaskWrapper = send_messages

    def _register_portal_tasks(self) -> None:
        """``flush_outbox`` (report a portal's waiting statuses to Bitrix24) and
        ``reconcile_portal`` (one portal's providers and event bindings, on demand)."""
        service = self.service
        huey = self.huey

        @huey.task(name="flush_outbox", priority=PRIORITY_FLUSH)
        def flush_outbox(portal_id: int) -> None:
            from .outbox import flush_portal

            # Cleared before reading the outbox: a status recorded from now on enqueues a new
            # flush, so none is stranded between our last read and our return.
            self._clear_flush_marker(portal_id)
            report = flush_portal(service, portal_id, hold=not self.immediate)
            if report.retry_in is not None:
                # A wake-up for entries waiting out a per-entry backoff must not hold back the
                # flush of a status that arrives meanwhile; a pause, pacing or a lock holds for
                # every entry, so those go through the marker like any request.
                self.enqueue_flush(
                    portal_id, delay=report.retry_in, coalesce=report.stopped is not None
                )

        @huey.task(name="reconcile_portal", priority=PRIORITY_RECONCILE)
        def reconcile_portal(portal_id: int) -> None:
            from .registration import sync_portal

            # As flush_outbox: a request from now on queues a new reconcile (spaced after this
            # start, see enqueue_reconcile), so none is lost while this one runs.
            self._mark_reconcile_started(portal_id)
            with contextlib.suppress(LookupError):  # uninstalled with CLEAN meanwhile
                sync_portal(service, portal_id)

        self.flush_outbox: TaskWrapper = flush_outbox
        self.reconcile_portal: TaskWrapper = reconcile_portal

    def _register_periodic_tasks(self) -> None:
        """``sweep`` (lost and stuck attempts, polling), ``retention`` and ``reconcile`` (the
        portals due), every sweep_interval."""
        service = self.service
        huey = self.huey

        # The scheduler checks periodic tasks every sweep_interval seconds (see _consumer), so
        # the validator accepts every moment it is asked about.
        @huey.periodic_task(lambda timestamp: True, name="sweep", priority=PRIORITY_SWEEP)
        def sweep_task() -> None:
            from .delivery import poll_due, sweep

            sweep(service)
            poll_due(service)

        # Retention (b24sms.retention): redaction, deletion and erasing uninstalled portals in
        # small batches for a few seconds per run, beside the sweep and off the HANDLER's path.
        @huey.periodic_task(lambda timestamp: True, name="retention", priority=PRIORITY_SWEEP)
        def retention_task() -> None:
            from .retention import periodic

            periodic(service)

        @huey.periodic_task(lambda timestamp: True, name="reconcile", priority=PRIORITY_RECONCILE)
        def reconcile_task() -> None:
            from .registration import reconcile_due

            # Each run does only the portals due after [bitrix24] reconcile_interval.
            reconcile_due(service)

        self.sweep_task: TaskWrapper = sweep_task
        self.retention_task: TaskWrapper = retention_task
        self.reconcile_task: TaskWrapper = reconcile_task

    # -- enqueueing -----------------------------------------------------------------------------

    def enqueue_send(self, message_pk: int, delay: float | None = None) -> None:
        """Ask a worker to deliver a message now, or after ``delay`` seconds."""
        self._submit(self.send_message, (message_pk,), delay)

    def enqueue_reconcile(
        self, portal_id: int, *, spacing: float = 0.0, last_done: float | None = None
    ) -> bool:
        """Ask a worker to reconcile one portal's providers and event bindings, at most once per
        pending request (coalesced with a marker, as :meth:`enqueue_flush`).

        :param spacing: seconds to keep between two reconciles of the portal: the task runs no
            earlier than ``spacing`` after the last one started here or ``last_done``.
        :param last_done: epoch seconds of the portal's last finished reconcile, if known.
        :returns: True when a task was enqueued, False when one is pending already.
        """
        now = time.time()
        key = _reconcile_marker(portal_id)
        if not self._claim_marker(key, now, RECONCILE_MARKER_GRACE):
            return False
        # The spacing is read only once the marker is ours: a task clears its marker after it
        # noted its start, so a start that let us in is seen here (read before, it could be
        # missed, and a second reconcile would run at once).
        eta = now
        if spacing > 0:
            started = self._reconcile_started(portal_id)
            for last in (started, last_done):
                if last is not None:
                    eta = max(eta, last + spacing)
        self.huey.put(key, eta)
        try:
            self._submit(self.reconcile_portal, (portal_id,), eta - now)
        except Exception:
            self._clear_marker(key)
            raise
        return True

    def _mark_reconcile_started(self, portal_id: int) -> None:
        try:
            self.huey.put(_reconcile_started(portal_id), time.time())
        except Exception:
            log.exception("could not note the reconcile start of portal %s", portal_id)
        self._clear_marker(_reconcile_marker(portal_id))

    def _reconcile_started(self, portal_id: int) -> float | None:
        self._ensure_schema()
        started = self.huey.get(_reconcile_started(portal_id), peek=True)
        return None if started is None else float(started)

    def enqueue_sends(self, message_pks: list[int]) -> None:
        """Ask a worker to deliver new messages now: one task for all of them."""
        if len(message_pks) == 1:
            self.enqueue_send(message_pks[0])
        elif message_pks:
            self._submit(self.send_messages, (list(message_pks),), None)

    def enqueue_flush(
        self, portal_id: int, delay: float | None = None, *, coalesce: bool = True
    ) -> bool:
        """Ask for the portal's outbox to be flushed, at most once per pending request.

        Cheap to call after every status change: while a flush for the portal is pending (a
        marker in huey's key-value store), further calls enqueue nothing. The marker is cleared
        when the flush starts, and a marker whose flush is long overdue (a lost task) is
        replaced, so no status waits longer than the sweep.

        :param delay: seconds to wait first; default a short debounce (none in immediate mode).
        :param coalesce: False enqueues without looking at or setting the marker (a wake-up).
        :returns: True when a task was enqueued.
        """
        if delay is None:
            delay = 0.0 if self.immediate else FLUSH_DEBOUNCE
        delay = max(0.0, float(delay))
        if not coalesce:
            self._submit(self.flush_outbox, (portal_id,), delay)
            return True
        eta = time.time() + delay
        if not self._claim_flush_marker(portal_id, eta):
            return False
        try:
            self._submit(self.flush_outbox, (portal_id,), delay)
        except Exception:
            self._clear_flush_marker(portal_id)
            raise
        return True

    def _claim_flush_marker(self, portal_id: int, eta: float) -> bool:
        return self._claim_marker(_flush_marker(portal_id), eta, FLUSH_MARKER_GRACE)

    def _claim_marker(self, key: str, value: float, grace: float) -> bool:
        """Put ``value`` (a task's eta) under ``key`` if no task holds it: True when ours.

        A marker whose task should have started more than ``grace`` seconds ago belongs to a
        lost task and is taken over.
        """
        self._ensure_schema()
        if self.huey.put_if_empty(key, value):
            return True
        pending = self.huey.get(key, peek=True)
        if pending is None:
            # Cleared between our two reads: the task started; try once more.
            return bool(self.huey.put_if_empty(key, value))
        if time.time() > float(pending) + grace:
            self.huey.put(key, value)
            return True
        return False

    def _clear_flush_marker(self, portal_id: int) -> None:
        self._clear_marker(_flush_marker(portal_id))

    def _clear_marker(self, key: str) -> None:
        try:
            self.huey.delete(key)
        except Exception:
            log.exception("could not clear the queue marker %s", key)

    def _submit(self, task: TaskWrapper, args: tuple[Any, ...], delay: float | None) -> None:
        if self.immediate:
            self._submit_inline(task, args, delay or 0.0)
            return
        self._ensure_schema()
        if delay and delay > 0:
            task.schedule(args, delay=delay)
        else:
            task(*args)

    # -- immediate mode -------------------------------------------------------------------------

    def _submit_inline(self, task: TaskWrapper, args: tuple[Any, ...], delay: float) -> None:
        with self._pending_lock:
            heapq.heappush(
                self._pending, (time.monotonic() + delay, next(self._seq), task.s(*args))
            )
        if getattr(self._local, "draining", False):
            return  # the outer drain of this thread runs it: no recursion
        self.drain(max_wait=IMMEDIATE_MAX_WAIT)

    def drain(self, max_wait: float = IMMEDIATE_MAX_WAIT) -> int:
        """Immediate mode: run queued tasks, sleeping for delayed ones due within ``max_wait``.

        Tasks due later stay queued for a later call (tests call ``drain(max_wait=…)`` to run
        them). Returns the number of tasks run. A no-op with a real store.
        """
        if not self.immediate:
            return 0
        self._local.draining = True
        ran = 0
        try:
            while True:
                with self._pending_lock:
                    if not self._pending:
                        break
                    eta = self._pending[0][0]
                    wait = eta - time.monotonic()
                    if wait > max_wait:
                        break
                    if wait <= 0:
                        _, _, task = heapq.heappop(self._pending)
                if wait > 0:
                    time.sleep(wait)
                    continue
                ran += 1
                if ran > IMMEDIATE_MAX_TASKS:
                    log.error("immediate queue: %d tasks in one drain; stopping", ran - 1)
                    break
                self.huey.execute(task)
        finally:
            self._local.draining = False
        return ran

    def pending_inline(self) -> int:
        """Immediate mode: tasks waiting for a later :meth:`drain`."""
        with self._pending_lock:
            return len(self._pending)

    # -- health and consumers -------------------------------------------------------------------

    def _ensure_schema(self) -> None:
        if self._schema_ready:
            return
        with self._schema_lock:
            if not self._schema_ready:
                self.huey.storage.initialize_schema()
                self._schema_ready = True

    def ping(self) -> None:
        """Raise when the queue's store cannot be reached."""
        self._ensure_schema()
        self.huey.storage.queue_size()

    def _consumer(self, workers: int, periodic: bool) -> Consumer:
        if self.immediate:
            raise QueueError(
                "queue_url memory:// runs tasks inline in the process that enqueues them; "
                "a consumer needs sqlite:///, postgresql:// or redis://"
            )
        self._ensure_schema()
        interval = self.service.settings.sweep_interval
        scheduler_class = type("SweepScheduler", (Scheduler,), {"periodic_task_seconds": interval})
        consumer_class = type("B24smsConsumer", (Consumer,), {"scheduler_class": scheduler_class})
        return consumer_class(
            self.huey,
            workers=max(1, int(workers)),
            periodic=periodic,
            worker_type="thread",
            # Poll an idle queue at least every second, so a message waits little for a worker.
            initial_delay=0.05,
            max_delay=1.0,
            scheduler_interval=1,
        )

    def run_consumer(self, workers: int = 2, periodic: bool = True) -> None:
        """Consume tasks in this process until SIGINT / SIGTERM (``b24sms worker``).

        :param workers: worker threads.
        :param periodic: run the sweep every ``sweep_interval`` seconds.
        """
        consumer = self._consumer(workers, periodic)
        log.info("queue consumer starting: %d workers on %s", workers, self.describe())
        consumer.run()

    def start_embedded(self, workers: int = 2) -> EmbeddedConsumer:
        """Start a consumer in background threads (``b24sms serve``); returns its handle.

        With ``memory://`` there is nothing to consume: tasks already run inline, and the
        returned handle's ``stop()`` does nothing.
        """
        if self.immediate:
            return EmbeddedConsumer(None)
        consumer = self._consumer(workers, periodic=True)
        log.info("embedded queue consumer starting: %d workers on %s", workers, self.describe())
        return EmbeddedConsumer(consumer).start()

    def describe(self) -> str:
        """The queue's kind and location, without credentials (for logs and health answers)."""
        scheme, _, rest = self.url.partition("://")
        if "@" in rest:
            rest = rest.split("@", 1)[1]
        # libpq also takes ?password=…
        return redact_query(f"{scheme}://{rest}")
