"""The relay's side of the outbox: claim a batch, record each outcome as the server
answers it (invariant 11), and wait out an outbox that cannot be written (invariant 9).

An outcome the outbox could not record (its disk is full, a lock is held, storage
fails) is kept here and written first thing once it can be. Until then its row stays
`sending`, so nothing claims it twice; after a crash such rows go out again with the
same Message-ID (at-least-once, duplicates identifiable), each alone, and one found in
flight at three starts in a row is held aside as a poison message
(gateway/outbox/queue.py, HOLD_AFTER).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sqlite3
import time
from functools import partial

from gateway.clock import Stamp
from gateway.outbox import Claimed, Outbox, Outcome, State
from gateway.outbox.writer import Writer
from gateway.runtime import Runtime

log = logging.getLogger(__name__)

DISK_RETRY = 5.0  # seconds between attempts on an outbox that cannot be used
SHUTDOWN_WAIT = 10.0  # seconds to wait at shutdown for outcomes to be recorded


def _claim(limit: int, ob: Outbox) -> list[Claimed]:
    return ob.claim(limit)


def _finish(outcomes: list[Outcome], ob: Outbox) -> None:
    ob.finish(outcomes)


class Shutdown:
    """One deadline for every session's wait at shutdown: SHUTDOWN_WAIT from the first
    that waits, not SHUTDOWN_WAIT each (N cancelled sessions would hold SIGTERM N times
    as long, past systemd's TimeoutStopSec)."""

    def __init__(self, wait: float = SHUTDOWN_WAIT) -> None:
        self.wait = wait
        self.at: float | None = None

    def left(self) -> float:
        now = time.monotonic()
        if self.at is None:
            self.at = now + self.wait
        return max(0.0, self.at - now)


class Ledger:
    def __init__(self, writer: Writer, runtime: Runtime, shutdown: Shutdown | None = None) -> None:
        self.writer = writer
        self.runtime = runtime
        self.shutdown = shutdown or Shutdown()  # the relay's, shared by its sessions
        self.unrecorded: list[Outcome] = []  # refused by the outbox; written first
        self._recorded: list[tuple[list[Outcome], concurrent.futures.Future[None]]] = []
        self._trouble = False

    async def claim(self, limit: int) -> list[Claimed] | None:
        """Up to `limit` rows to send, or None (logged) when the outbox cannot be used:
        full, locked, an I/O error are waited out, never the end of the relay."""
        try:
            batch = await self.writer.run(partial(_claim, limit))
        except sqlite3.Error as exc:
            self._failed(exc)
            return None
        self._recovered()
        return batch

    def record(self, outcomes: list[Outcome]) -> None:
        """Hand outcomes to the writer now: they ride its next group commit, so a crash
        resends the mail in flight, not the mails of the batch already accepted."""
        if outcomes:
            self._recorded.append((outcomes, self.writer.record(outcomes)))

    async def settle(self) -> None:
        """Wait for what `record` handed over; keep what the outbox would not take."""
        recorded, self._recorded = self._recorded, []
        failed: list[Outcome] = []
        for outcomes, fut in recorded:
            try:
                await asyncio.wrap_future(fut)
            except sqlite3.Error as exc:
                self._failed(exc)
                failed += outcomes
        if failed:
            self.unrecorded = failed
        else:
            self._recovered()

    def settle_at_shutdown(self) -> None:
        """Shutting down (the loop is being cancelled): block a little for what was
        recorded. What fails stays `sending` and goes out again after the restart."""
        recorded, self._recorded = self._recorded, []
        if recorded:
            concurrent.futures.wait([f for _, f in recorded], timeout=self.shutdown.left())
        for outcomes, f in recorded:
            if not f.done() or f.exception() is not None:
                log.error("could not record %d delivery outcomes", len(outcomes))

    async def retry_unrecorded(self) -> bool:
        """Write the outcomes the outbox refused before; False (logged) if it still does."""
        try:
            await self.writer.run(partial(_finish, self.unrecorded))
        except sqlite3.Error as exc:
            self._failed(exc)
            return False
        self._recovered()
        self.unrecorded = []
        return True

    def _failed(self, exc: Exception) -> None:
        self.runtime.error(f"outbox: {exc}")
        if not self._trouble:
            self._trouble = True
            log.error(
                "the relay cannot use the outbox (%s): a full disk, a lock held by another "
                "process or failing storage; retrying every %.0f s, mails already sent may "
                "be sent again (with their Message-ID)",
                exc,
                DISK_RETRY,
            )

    def _recovered(self) -> None:
        if self._trouble:
            self._trouble = False
            log.warning("the relay can write to the outbox again")

    def expired(self, item: Claimed, now: Stamp, max_age: float) -> Outcome | None:
        """A dead outcome for `item` when it waited past outbox.max_age; None otherwise."""
        received, _ = item.alert.received.corrected(now)
        age = now.wall - received
        if age <= max_age:
            return None
        self.runtime.attempts["expired"] += 1
        log.warning(
            "alert %s expired undelivered after %.1f days; dead-lettered (see `mailgw queue dead`)",
            item.alert.id,
            age / 86400,
        )
        return Outcome(
            item.key,
            State.DEAD,
            error=f"expired: undelivered after {age / 86400:.1f} days (outbox.max_age)",
            count_attempt=False,
        )
