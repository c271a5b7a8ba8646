"""The one door into the outbox for every source: route, count, group-commit."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.alert import Alert
from gateway.outbox import Routed
from gateway.routing import Router
from gateway.status import Runtime
from gateway.writer import Done, Writer


class Ingest:
    def __init__(self, writer: Writer, router: Router, runtime: Runtime) -> None:
        self.writer = writer
        self.router = router
        self.runtime = runtime

    def prepare(self, alert: Alert, seen_key: str | None = None) -> Routed:
        for note in alert.notes:
            self.runtime.sanitised[note] += 1
        self.runtime.ingested[alert.source] += 1
        return Routed(alert, self.router.route(alert), seen_key)

    def submit(
        self, alerts: Sequence[tuple[Alert, str | None]], done: Done, linger: float = 0.0
    ) -> None:
        """From any thread: store, then call `done` (after the commit) in the writer thread."""
        self.writer.submit([self.prepare(a, key) for a, key in alerts], done, linger)

    async def add(self, alerts: Sequence[Alert]) -> list[str]:
        return await self.writer.add([self.prepare(a) for a in alerts])

    @property
    def full(self) -> bool:
        return self.writer.full
