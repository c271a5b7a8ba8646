"""The one door into the outbox for every source: route, count, group-commit.

Counters are kept here, after the commit, so that `ingested` means stored: a store
that fails shows as a failure in status, not as alerts taken in.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence

from gateway.alert import Alert
from gateway.config import Policy
from gateway.errors import OutboxFull
from gateway.outbox import MqttKey, Outbox, Routed
from gateway.outbox.room import UNROUTED_SHARE_FULL
from gateway.outbox.writer import Done, Stored, Writer
from gateway.receipts import Ask
from gateway.routing import Router, render
from gateway.runtime import Runtime

log = logging.getLogger(__name__)


def storm_keys(
    alert: Alert, deliveries: Sequence[tuple[str, int]], policies: Mapping[str, Policy]
) -> tuple[tuple[str, str], ...]:
    """The alert's dedupe key on each of its routes that dedupes: the route's key
    template filled with the alert (routing.render: names only), hashed to a fixed size."""
    keys = []
    for route, _ in deliveries:
        policy = policies.get(route)
        if policy is not None and policy.active and policy.dedupe_window:
            text = render(policy.key, alert.template_values())
            keys.append((route, hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()))
    return tuple(keys)


def routed(
    alert: Alert,
    router: Router,
    policies: Mapping[str, Policy],
    seen_key: str | None = None,
    mqtt: MqttKey | None = None,
    receipt: Ask | None = None,
) -> Routed:
    """An alert with its deliveries and dedupe keys: what the outbox stores."""
    deliveries = router.route(alert)
    keys = storm_keys(alert, deliveries, policies) if policies else ()
    return Routed(alert, deliveries, seen_key, storm_keys=keys, mqtt=mqtt, receipt=receipt)


class Ingest:
    def __init__(
        self,
        writer: Writer,
        router: Router,
        runtime: Runtime,
        policies: Mapping[str, Policy] | None = None,
    ) -> None:
        self.writer = writer
        # Each replaced whole on reload (reference swaps): read once per alert.
        self.router = router
        self.policies: Mapping[str, Policy] = policies or {}
        self.runtime = runtime
        # Told in the writer's thread of every batch a source handed in, stored or not:
        # a source that spoke is alive (the silence watch, gateway/watch.py).
        self.observers: list[Callable[[Sequence[Alert]], None]] = []

    def prepare(
        self,
        alert: Alert,
        seen_key: str | None = None,
        mqtt: MqttKey | None = None,
        receipt: Ask | None = None,
    ) -> Routed:
        for note in alert.notes:
            self.runtime.sanitised[note] += 1
        self.runtime.received[alert.source] += 1
        return routed(alert, self.router, self.policies, seen_key, mqtt, receipt)

    def submit(
        self,
        alerts: Sequence[tuple[Alert, str | None]],
        done: Done,
        linger: float = 0.0,
        receipts: Sequence[Ask | None] = (),
    ) -> None:
        """From any thread: store, then call `done` (after the commit) in the writer thread.
        `receipts`: each alert's receipt request, if any are asked for."""
        if receipts:
            batch = [
                self.prepare(a, key, receipt=ask)
                for (a, key), ask in zip(alerts, receipts, strict=True)
            ]
        else:
            batch = [self.prepare(a, key) for a, key in alerts]
        self.submit_routed(batch, done, linger)

    def submit_routed(self, batch: Sequence[Routed], done: Done, linger: float = 0.0) -> None:
        def counted(result: Stored | BaseException) -> None:  # the writer's thread
            self._count(batch, result)
            done(result)
            for observe in self.observers:
                observe([r.alert for r in batch])

        self.writer.submit(batch, counted, linger)

    def settle_mqtt(
        self, keys: Iterable[tuple[int, bytes, int]], keep_conn: int | None = None
    ) -> None:
        """Forget MQTT deliveries the broker is known to have had our PUBACK for
        (Outbox.mqtt_settled), with the next group; nobody waits for it."""
        keys = list(keys)

        def forget(outbox: Outbox) -> int:
            return outbox.mqtt_settled(keys, keep_conn)

        def logged(fut: concurrent.futures.Future[int]) -> None:
            exc = fut.exception()
            if exc is not None:
                # The rows stay: a later sweep removes them (a duplicate at worst).
                log.warning("could not forget acknowledged MQTT messages: %s", exc)

        self.writer.call(forget).add_done_callback(logged)

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
                elif r.alert.id in result.not_kept:
                    # Acknowledged and watched, not kept: its share of the outbox is full.
                    rt.reject(UNROUTED_SHARE_FULL)
                elif r.mqtt is not None and r.mqtt.name in dupes:
                    rt.mqtt_redelivery_recognised += 1
                elif not dupes or r.seen_key not in dupes:
                    rt.ingested[r.alert.source] += 1
        elif not isinstance(result, OutboxFull):
            rt.store_failures += len(batch)
