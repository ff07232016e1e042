"""Group commit: many threads' items stored by one of them in one transaction.

Calls that arrive together share one transaction, the way databases commit their logs: the
first caller to find no batch running becomes the *leader* and runs every item waiting at that
moment as one batch, while the others wait for it. Whoever arrives during that batch goes into
the next one, led by the first of them. A lone call is a batch of one and waits for nobody;
under load the batches grow by themselves.

The interface is :class:`GroupCommit`: ``GroupCommit(run_batch).submit(item)``. Nothing here
knows about messages or databases (:mod:`b24sms.ingest` is its user).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["MAX_BATCH", "GroupCommit"]

#: messages one transaction stores at most; the rest wait for the next one
MAX_BATCH = 100

T = TypeVar("T")


class _Slot(Generic[T]):
    """One caller's place in the line: its item, then its outcome."""

    __slots__ = ("_event", "done", "error", "item", "promoted")

    def __init__(self, item: T) -> None:
        self.item = item
        self.done = False
        self.error: BaseException | None = None
        self.promoted = False
        self._event = threading.Event()

    def wake(self) -> None:
        self._event.set()

    def wait(self) -> None:
        self._event.wait()


class GroupCommit(Generic[T]):
    """Runs ``run_batch`` over items submitted from many threads, many items per call.

    ``run_batch(items)`` is called by one of the submitting threads (the leader) and records
    each item's outcome on the item itself; an exception it raises is every item's error.
    ``submit`` returns when the item's batch has run, and raises that error if there was one.
    """

    def __init__(self, run_batch: Callable[[Sequence[T]], None], max_batch: int = MAX_BATCH):
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._lock = threading.Lock()
        self._pending: list[_Slot[T]] = []
        self._leading = False
        self._leader = threading.local()

    def submit(self, item: T) -> None:
        """Run ``item`` in a batch (led by this thread or another) and return when it has run.

        :raises: whatever ``run_batch`` raised for the item's batch.
        """
        if getattr(self._leader, "active", False):
            # Called from inside a batch (an inline queue running a task that stores a
            # message): waiting for ourselves would never end, so this one goes alone.
            self._run_batch([item])
            return
        slot = _Slot(item)
        with self._lock:
            self._pending.append(slot)
            lead = not self._leading
            self._leading = True
        if not lead:
            slot.wait()
            if not slot.promoted:
                self._raise_for(slot)
                return
        self._lead(slot)
        self._raise_for(slot)

    @staticmethod
    def _raise_for(slot: _Slot[T]) -> None:
        if slot.error is not None:
            raise slot.error

    def _lead(self, own: _Slot[T]) -> None:
        """Run batches until our own item's has run, then hand the lead to the next waiter."""
        try:
            while not own.done:
                with self._lock:
                    batch = self._pending[: self._max_batch]
                    del self._pending[: self._max_batch]
                self._run(batch)
        finally:
            with self._lock:
                if self._pending:
                    successor = self._pending[0]
                    successor.promoted = True
                    successor.wake()
                else:
                    self._leading = False

    def _run(self, batch: list[_Slot[T]]) -> None:
        self._leader.active = True
        try:
            self._run_batch([slot.item for slot in batch])
        except BaseException as exc:
            for slot in batch:
                slot.error = exc
            if not isinstance(exc, Exception):
                raise
        finally:
            self._leader.active = False
            for slot in batch:
                slot.done = True
                slot.wake()
