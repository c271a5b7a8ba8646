"""The outbox's one writer thread, and group commit.

SQLite allows one writer at a time, and each commit with synchronous=FULL costs
an fsync (~0.3 ms here, several ms on an SD card). So every source hands its
alerts to this thread, which drains whatever has queued up while the previous
commit ran and stores all of it in one transaction. Under load commits grow;
when idle a single alert commits alone at once: latency stays low and
throughput follows the disk, not the number of alerts. Callbacks run after the
commit returns, and only then do sources acknowledge (invariant 1).

Relay-side work (claim, finish, prune) goes through the same thread as calls,
so there is exactly one writer connection in the daemon.

One alert can never take others down: before a group is stored, each alert whose own
values can never be stored (outbox.unstorable) is taken out and reported back as
rejected (the source acknowledges and counts it: retrying would fail forever); the
rest is stored. Any failure of the transaction itself (locked, I/O error, full) fails
the group: nothing is stored, nothing acknowledged, and the sources retry. It is never
blamed on an alert, since it may as well come from the outbox's own state.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from gateway.errors import OutboxFull
from gateway.outbox import Outbox, Outcome, Routed, unstorable

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Stored:
    """A submission's outcome once committed.

    duplicates: the seen keys of alerts skipped as already stored (retransmissions).
    rejected: index in the submitted batch → why that alert can never be stored; it was
    not stored, and its source acknowledges it as a counted rejection.
    not_kept: the ids of unrouted readings acknowledged but not kept, their share of the
    outbox being full (gateway/outbox/room.py); counted, and seen by the watchers.
    """

    duplicates: list[str]
    rejected: dict[int, str]
    not_kept: frozenset[str] = frozenset()


Done = Callable[[Stored | BaseException], None]


@dataclass(slots=True)
class _Add:
    batch: Sequence[Routed]
    done: Done
    linger: float = 0.0


@dataclass(slots=True)
class _Record:
    outcomes: Sequence[Outcome]
    future: concurrent.futures.Future[None]


@dataclass(slots=True)
class _Call:
    fn: Callable[[Outbox], Any]
    future: concurrent.futures.Future[Any]


_STOP = object()


class Writer:
    def __init__(
        self, outbox: Outbox, max_group: int = 1000, commit_interval: float = 0.005
    ) -> None:
        self.outbox = outbox
        self.max_group = max_group
        self.commit_interval = commit_interval
        self._last_commit = 0.0
        self._q: queue.SimpleQueue[_Add | _Record | _Call | object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="outbox-writer", daemon=True)
        self.heartbeat = time.monotonic()
        self.commits = 0
        self.committed_alerts = 0
        self.full = False
        # Since when (monotonic) commits have been failing for a reason other than a
        # full outbox (locked file, I/O error); None while they succeed. The daemon's
        # health check turns a long failure into a restart.
        self.failing_since: float | None = None
        self.last_failure: str | None = None
        self.last_failure_at = 0.0
        self.rejected = 0
        self.died: BaseException | None = None  # what ended the thread, if not stop()
        self.on_commit: Callable[[], None] | None = None
        # Called in this thread once the callbacks of a group have run: sources that
        # collect acknowledgements in their callbacks send them here, in one write.
        self.after_group: list[Callable[[], None]] = []

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish everything submitted so far, then end the thread."""
        if self._thread.is_alive():
            self._q.put(_STOP)
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # --- submitting (any thread) ---------------------------------------------

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def submit(self, batch: Sequence[Routed], done: Done, linger: float = 0.0) -> None:
        """Store `batch`, then call `done` from this thread after the commit.

        `linger`: how long the batch may wait for others to share its commit, for
        sources whose acks are not urgent (serial devices retransmit after 0.5 s).
        Anything submitted without linger ends the wait.
        """
        self._q.put(_Add(batch, done, linger))

    def record(self, outcomes: Sequence[Outcome]) -> concurrent.futures.Future[None]:
        """Record delivery outcomes with the next group (any thread); settled once done.

        The relay records each mail's outcome as the server answers, so a crash resends
        at most the mail in flight and what the last few milliseconds accepted. The
        outcomes of a group share one transaction, committed without an fsync of its own
        (synchronous=NORMAL, WAL): it survives a crash of the process, and the next
        alert's commit makes it durable on the disk. A power cut can lose the last few,
        which are then sent again with their Message-ID: a recognisable duplicate,
        never a loss.
        """
        fut: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._q.put(_Record(outcomes, fut))
        return fut

    def call(self, fn: Callable[[Outbox], T]) -> concurrent.futures.Future[T]:
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._q.put(_Call(fn, fut))
        return fut

    async def add(self, batch: Sequence[Routed]) -> Stored:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Stored] = loop.create_future()

        def done(result: Stored | BaseException) -> None:
            loop.call_soon_threadsafe(_settle, fut, result)

        self.submit(batch, done)
        return await fut

    async def run(self, fn: Callable[[Outbox], T]) -> T:
        return await asyncio.wrap_future(self.call(fn))

    # --- the thread ----------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:
            # Nothing in the loop should raise; if something does, the daemon must know
            # at once (it stops: systemd restarts it), not keep running without a writer.
            self.died = exc
            log.critical("the outbox writer thread died: %r", exc, exc_info=exc)
            raise

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            try:
                first = self._q.get(timeout=1.0)
            except queue.Empty:
                self.heartbeat = time.monotonic()
                continue
            items = [first]
            if isinstance(first, _Add) and first.linger > 0:
                self._linger(items, time.monotonic() + first.linger)
            # Under a steady stream, commit at most once per commit_interval: the alerts
            # arriving meanwhile join the group. Idle, an alert commits at once (the last
            # commit is long past). Fewer fsyncs: less CPU, less flash wear, same acks.
            wait = self._last_commit + self.commit_interval - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            # Drain what queued up during the last commit: this is the group.
            size = 0
            while size < self.max_group:
                try:
                    items.append(self._q.get_nowait())
                except queue.Empty:
                    break
                size += 1
            pending: list[_Add] = []
            records: list[_Record] = []
            for item in items:
                if item is _STOP:
                    stopping = True
                elif isinstance(item, _Add):
                    pending.append(item)
                elif isinstance(item, _Record):
                    records.append(item)
                elif isinstance(item, _Call):
                    # What was submitted before a call is in the outbox when it runs
                    # (a claim must see the outcomes recorded before it).
                    self._record(records)
                    records = []
                    self._commit(pending)
                    pending = []
                    self._call(item)
            self._record(records)
            self._commit(pending)
            # Nothing of this group outlives it while the thread waits for the next: a
            # call's function or result may hold a message of megabytes.
            del first, item
            items.clear()
            for hook in self.after_group:
                try:
                    hook()
                except Exception:
                    log.exception("a source's after-commit hook failed")
            self.heartbeat = time.monotonic()
        log.debug("outbox writer stopped")

    def _linger(self, items: list[_Add | _Record | _Call | object], deadline: float) -> None:
        # Eight UARTs each sending a frame every 7 ms otherwise cost a commit (an fsync
        # and ~300 µs of CPU) for nearly every frame.
        while len(items) < self.max_group and (left := deadline - time.monotonic()) > 0:
            try:
                item = self._q.get(timeout=left)
            except queue.Empty:
                return
            items.append(item)
            if not (isinstance(item, _Add) and item.linger > 0):
                return  # someone waits on this one: commit now

    def _record(self, records: list[_Record]) -> None:
        live = [r for r in records if r.future.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            self.outbox.finish([o for r in live for o in r.outcomes], relaxed=True)
        except BaseException as exc:
            for r in live:
                r.future.set_exception(exc)
            return
        for r in live:
            r.future.set_result(None)

    def _call(self, item: _Call) -> None:
        if not item.future.set_running_or_notify_cancel():
            return
        try:
            item.future.set_result(item.fn(self.outbox))
        except BaseException as exc:
            item.future.set_exception(exc)

    def _commit(self, pending: list[_Add]) -> None:
        if not pending:
            return
        rejected: dict[int, dict[int, str]] = {}
        combined: list[Routed] = []
        for p_i, p in enumerate(pending):
            for i, r in enumerate(p.batch):
                why = unstorable(r)
                if why is None:
                    combined.append(r)
                    continue
                rejected.setdefault(p_i, {})[i] = why
                self.rejected += 1
                log.error(
                    "alert %s on %s can never be stored (%s); it is rejected and "
                    "acknowledged so that it does not hold up other alerts",
                    r.alert.id,
                    ascii(r.alert.topic),
                    why,
                )
        try:
            duplicates = self.outbox.add(combined, checked=True) if combined else []
        except OutboxFull as exc:
            if len(pending) > 1:
                # Some submissions may still fit on their own; try each.
                for p in pending:
                    self._commit([p])
                return
            self._set_full(True, str(exc))
            _notify(pending[0], exc)
            return
        except Exception as exc:
            self._failed(exc, len(combined))
            for p in pending:
                _notify(p, exc)
            return
        self._committed(len(combined))
        not_kept = frozenset(self.outbox.not_kept) if combined else frozenset()
        for p_i, p in enumerate(pending):
            _notify(p, Stored(duplicates, rejected.get(p_i, {}), not_kept))

    def _committed(self, n: int) -> None:
        self._set_full(False)
        if self.failing_since is not None:
            log.warning(
                "the outbox stores alerts again after %.0f s of failures",
                time.monotonic() - self.failing_since,
            )
            self.failing_since = None
        self.commits += 1
        self._last_commit = time.monotonic()
        self.committed_alerts += n
        if self.on_commit is not None:
            self.on_commit()

    def _failed(self, exc: BaseException, n: int) -> None:
        self.last_failure = str(exc)
        self.last_failure_at = time.monotonic()
        if self.failing_since is None:
            self.failing_since = time.monotonic()
            log.error(
                "could not store %d alerts in the outbox: %s; they stay unacknowledged and "
                "are retried",
                n,
                exc,
            )

    def _set_full(self, full: bool, why: str = "") -> None:
        if full and not self.full:
            log.error(
                "the outbox is full (%s): sources stop acknowledging until the relay makes "
                "room; nothing acknowledged is lost",
                why,
            )
        elif self.full and not full:
            log.warning("the outbox has room again; sources acknowledge as before")
        self.full = full


def _notify(add: _Add, result: Stored | BaseException) -> None:
    # A source's callback that raises must not end the one writer thread (and with it
    # every source's acks); the bug is logged with its traceback instead.
    try:
        add.done(result)
    except Exception:
        log.exception("a source's commit callback failed")


def _settle(fut: asyncio.Future[Stored], result: Stored | BaseException) -> None:
    if fut.done():
        return
    if isinstance(result, BaseException):
        fut.set_exception(result)
    else:
        fut.set_result(result)
