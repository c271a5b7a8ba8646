"""The one door into the outbox for every source: route, count, group-commit.

Counters are kept here, after the commit, so that `ingested` means stored: a store
that fails shows as a failure in status, not as alerts taken in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from gateway.alert import Alert
from gateway.errors import OutboxFull
from gateway.outbox import MqttKey, Routed
from gateway.routing import Router
from gateway.status import Runtime
from gateway.writer import Done, Stored, Writer


class Ingest:
    def __init__(self, writer: Writer, router: Router, runtime: Runtime) -> None:
        self.writer = writer
        self.router = router  # replaced whole on reload: read it once per alert
        self.runtime = runtime

    def prepare(
        self, alert: Alert, seen_key: str | None = None, mqtt: MqttKey | None = None
    ) -> Routed:
        for note in alert.notes:
            self.runtime.sanitised[note] += 1
        self.runtime.received[alert.source] += 1
        return Routed(alert, self.router.route(alert), seen_key, mqtt)

    def submit(
        self, alerts: Sequence[tuple[Alert, str | None]], done: Done, linger: float = 0.0
    ) -> None:
        """From any thread: store, then call `done` (after the commit) in the writer thread."""
        self.submit_routed([self.prepare(a, key) for a, key in alerts], done, linger)

    def submit_routed(self, batch: Sequence[Routed], done: Done, linger: float = 0.0) -> None:
        def counted(result: Stored | BaseException) -> None:  # the writer's thread
            self._count(batch, result)
            done(result)

        self.writer.submit(batch, counted, linger)

    def after_commit(self, hook: Callable[[], None]) -> None:
        """Call `hook` in the writer's thread once the callbacks of a group have run:
        sources that collect acknowledgements in their callbacks send them there."""
        self.writer.after_group.append(hook)

    def _count(self, batch: Sequence[Routed], result: Stored | BaseException) -> None:
        rt = self.runtime
        if isinstance(result, Stored):
            dupes = set(result.duplicates)
            for i, r in enumerate(batch):
                if i in result.rejected:
                    rt.reject(f"{r.alert.source}_unstorable")
                elif r.mqtt is not None and r.mqtt.name in dupes:
                    rt.mqtt_redelivery_recognised += 1
                elif not dupes or r.seen_key not in dupes:
                    rt.ingested[r.alert.source] += 1
        elif not isinstance(result, OutboxFull):
            rt.store_failures += len(batch)
