"""The daemon's own alerts: silences (gateway/silence.py), self-alerts
(gateway/selfwatch.py) and the heartbeat (gateway/heartbeat.py), fed from the
housekeeping tick and sent through the one door.

Every alert raised here goes through `Ingest` like a sensor's (routing, storm control,
the outbox), with source `gateway` and a topic under `gateway/<device_id>/`, so routes
and storm control apply as to any other. The watch row that records the change rides
the alert's own transaction (`Routed.marks`): after a crash either both are stored or
neither, so a silence is never lost and never fired twice.

Threads: observations arrive in the writer's thread (after each commit), commit results
too; the tick runs on the loop. One lock guards the two sans-IO watchers.

A source seen for the first time is written to the `watch` table at once, by the
writer's next operation, not at the next periodic save: a `kill -9` a moment after a
new sensor's first reading must not leave that sensor unwatched. How long the gateway
itself was down is learnt from the last of the periodic save (`alive_at`, every
SAVE_EVERY seconds, on the card) and the previous daemon's status file (every tick, on
tmpfs, kept across an automatic restart): the later one is the better bound.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from gateway import __version__
from gateway.alert import Alert, Draft, normalize, parse_severity
from gateway.clock import clock_synced
from gateway.config import Config
from gateway.heartbeat import Beat, is_due, summary
from gateway.ingest import Ingest, storm_keys
from gateway.outbox import Outbox, watch_state
from gateway.outbox.writer import Stored
from gateway.repeats import Repeats
from gateway.runtime import Runtime
from gateway.selfwatch import Bounds, Change, Condition, SelfWatch
from gateway.silence import (
    MAX_SOURCES,
    Event,
    Source,
    Watcher,
    describe,
    human,
    rule_for,
    source_key,
    split_key,
)

log = logging.getLogger(__name__)

SAVE_EVERY = 10.0  # seconds between saves of "last seen" and the daemon's sign of life


class Watches:
    def __init__(self, config: Config, ingest: Ingest, runtime: Runtime) -> None:
        self.config = config
        self.ingest = ingest
        self.runtime = runtime
        self.device = config.gateway.device_id
        self.silence = Watcher(config.silence)
        self.selfwatch = SelfWatch()
        self._lock = threading.Lock()
        # (topic, sensor) → (wall, path it came through), from commits
        self._seen: dict[tuple[str, str], tuple[float, str]] = {}
        self._pending: set[str] = set()  # sources whose change is not yet committed
        self._last_save = -1e9
        self._forget: list[tuple[str, str]] = []  # watch rows to delete with the next save
        # Changes whose alert could not be stored: said once, then ever more rarely.
        self._unstored = Repeats()
        self.started_mono = time.monotonic()
        self._last_tick: float | None = None
        self.beat = Beat(time.time()) if config.heartbeat.every else None
        self._beat_pending = False

    @property
    def active(self) -> bool:
        cfg = self.config
        return bool(cfg.silence) or cfg.selfalerts.enabled or cfg.heartbeat.every is not None

    # --- start: what the outbox remembers --------------------------------------------

    def restore(self, outbox: Outbox) -> None:
        """In the writer's thread, before intake: load the watches' state."""
        rows, alive_at = watch_state.load(outbox)
        now_wall, now_mono = time.time(), time.monotonic()
        gw = self.config.gateway
        alive_at = _last_alive(alive_at, gw.runtime_dir / "status.json", now_wall, gw.state_dir)
        down = max(0.0, now_wall - alive_at) if alive_at is not None else 0.0
        if down >= 1:
            log.info("the gateway was down for %s before this start", human(down))
        for kind, key, text in rows:
            try:
                state = json.loads(text)
                if kind == "silence":
                    if not self.silence.restore(key, Source(**state), down, now_mono):
                        self._forget.append((kind, key))  # its rule is gone from the config
                elif kind == "self":
                    self.selfwatch.restore(key, bool(state["raised"]), float(state["since"]))
                elif kind == "heartbeat" and self.beat is not None:
                    self.beat = Beat(**state)
                    self.beat.down += down
            except (ValueError, TypeError, KeyError) as exc:
                log.warning("ignoring an unreadable watch state %s/%s: %s", kind, key, exc)

    # --- observations (the writer's thread) ---------------------------------------------

    def observed(self, alerts: Sequence[Alert]) -> None:
        """A source spoke (its alerts were stored, or refused by a full outbox)."""
        rows = []
        with self._lock:
            for a in alerts:
                if a.source == "gateway":
                    continue
                key = source_key(a.topic, a.sensor)
                if key not in self.silence.sources and rule_for(
                    self.silence.rules, a.topic, a.sensor
                ):
                    # A new source: watched from now on, and remembered at once.
                    wall = a.received.wall
                    self.silence.observe(a.topic, a.sensor, wall, time.monotonic(), a.source)
                    if (src := self.silence.sources.get(key)) is not None:
                        rows.append(("silence", key, _source_json(src)))
                # Bounded like the watcher's table: a flood of invented topics costs
                # legitimate sources at most one tick's observation.
                elif len(self._seen) < MAX_SOURCES:
                    self._seen[(a.topic, a.sensor)] = (a.received.wall, a.source)
        if rows:
            self._write(rows, time.time(), [])

    # --- the tick (the loop) -------------------------------------------------------------

    def tick(self, outbox_live: int) -> None:
        now_wall, now_mono = time.time(), time.monotonic()
        with self._lock:
            self.silence.pause(self._unheard(), now_mono)
        self._judge_silence(now_wall, now_mono, due=True)
        if self.config.selfalerts.enabled:
            self._check_self(outbox_live, now_wall, now_mono)
        self._show()
        if self.beat is not None:
            self._heartbeat(now_wall, now_mono)
        self._last_tick = now_mono
        if now_mono - self._last_save >= SAVE_EVERY:
            self._last_save = now_mono
            self._save(now_wall)

    def _unheard(self) -> frozenset[str]:
        """The paths whose sources cannot be heard now. Only while the self-alert on the
        path speaks for them: without [selfalerts], a sensor's silence mail is the only
        sign that the broker is gone."""
        cfg = self.config
        if cfg.mqtt is None or not cfg.selfalerts.enabled:
            return frozenset()
        if self.runtime.sources.get("mqtt", "not connected") == "connected":
            return frozenset()
        return frozenset({"mqtt"})

    def _show(self) -> None:
        """What `mailgw status` shows: silent sources, raised conditions, since when."""
        with self._lock:
            shown = {
                f"silent {split_key(k)[0]}": f"since {_hhmm(src.last_wall)}"
                for k, src in self.silence.sources.items()
                if src.fired
            }
            shown.update(
                (f"raised {name}", f"since {_hhmm(c.raised_wall)}")
                for name, c in self.selfwatch.conditions.items()
                if c.raised
            )
        self.runtime.watch = shown

    def save_now(self) -> None:
        """At an orderly stop: the next start then knows exactly how long we were down,
        and every source that spoke since the last tick."""
        now_wall = time.time()
        self._judge_silence(now_wall, time.monotonic(), due=False)
        self._save(now_wall)

    def _judge_silence(self, now_wall: float, now_mono: float, due: bool) -> None:
        with self._lock:
            seen, self._seen = self._seen, {}
            events: list[Event] = []
            known = len(self.silence.sources)
            for (topic, sensor), (wall, via) in seen.items():
                events += self.silence.observe(topic, sensor, wall, now_mono, via)
            if len(self.silence.sources) != known:
                self._last_save = -1e9  # a new source: remember it at once, not in 10 s
            if due:
                events += self.silence.due(now_wall, now_mono)
            for e in events:
                self._pending.add(e.key)
        for e in events:
            self._send_silence(e)

    def _save(self, now_wall: float) -> None:
        with self._lock:
            rows = [
                ("silence", key, _source_json(src))
                for key, src in self.silence.sources.items()
                if key not in self._pending
            ]
            forget, self._forget = self._forget, []
            if self.beat is not None and not self._beat_pending:
                rows.append(("heartbeat", "heartbeat", json.dumps(dataclasses.asdict(self.beat))))
        self._write(rows, now_wall, forget)

    def _write(
        self, rows: list[tuple[str, str, str]], now_wall: float, forget: list[tuple[str, str]]
    ) -> None:
        def save(outbox: Outbox) -> None:
            watch_state.save(outbox, rows, now_wall, forget)

        def logged(fut: concurrent.futures.Future[None]) -> None:
            exc = fut.exception()
            with self._lock:
                said = (
                    self._unstored.over("state")
                    if exc is None
                    else self._unstored.occurred("state", time.monotonic())
                )
            if exc is not None and said is not None:
                log.warning("could not save the silence watch's state: %s", exc)
            elif exc is None and said:
                log.info("the silence watch's state is saved again")

        self.ingest.writer.call(save).add_done_callback(logged)

    # --- silence alerts -------------------------------------------------------------------

    def _send_silence(self, e: Event) -> None:
        topic, sensor = split_key(e.key)
        with self._lock:
            src = self.silence.sources[e.key]
            mark = ("silence", e.key, _source_json(src))
        alert = self._alert(
            f"gateway/{self.device}/silence/{topic}",
            sensor,
            e.rule.severity,
            describe(e),
            {
                "silence": e.kind,
                "silence_rule": e.rule.name,
                "source_topic": topic,
                "last_seen": e.last_wall,
                "quiet_s": round(e.quiet_for),
                "gateway_down_s": round(e.down_for),
            },
        )
        if f"silence {e.key}" not in self._unstored:  # a retry was said already
            log.warning("silence watch: %s", alert.message)

        def done(result: Stored | BaseException) -> None:
            with self._lock:
                self._pending.discard(e.key)
                if not isinstance(result, Stored) and e.kind == "silent":
                    self.silence.unfire(e.key)
            self._failed(f"silence {e.key}", result)

        self._submit(alert, e.rule.route, mark, done)

    # --- self-alerts ----------------------------------------------------------------------

    def _check_self(self, outbox_live: int, now_wall: float, now_mono: float) -> None:
        for name, holds, detail, after in self._conditions(outbox_live):
            sa = self.config.selfalerts
            bounds = Bounds(after, sa.clear_after, sa.min_interval)
            with self._lock:
                before = self.selfwatch.snapshot(name)
                change = self.selfwatch.update(name, holds, now_mono, now_wall, bounds, detail)
            if change is not None:
                self._send_self(change, before)

    def _conditions(self, live: int) -> list[tuple[str, bool, str, float]]:
        """(name, holds now, what it is, how long it must hold) for every condition."""
        sa, rt, writer = self.config.selfalerts, self.runtime, self.ingest.writer
        found: list[tuple[str, bool, str, float]] = []
        for port in self.config.serial:
            # Never connected since the start counts too: a port that never came is gone.
            state = rt.sources.get(f"serial:{port.name}", "not opened")
            what = f"serial port {port.name} ({port.port}) is {state}"
            found.append((f"serial/{port.name}", state != "connected", what, sa.serial_after))
        if self.config.mqtt is not None:
            state = rt.sources.get("mqtt", "not connected")
            what = f"the MQTT broker {self.config.mqtt.host}:{self.config.mqtt.port} is {state}"
            found.append(("mqtt", state != "connected", what, sa.mqtt_after))
        bound = self.config.outbox.max_messages
        found.append(
            (
                "outbox",
                live * 100 >= bound * sa.outbox_percent,
                f"the outbox holds {live} of at most {bound} undelivered messages",
                0.0,
            )
        )
        found.append(_disk(self.config.gateway.state_dir, sa.disk_free_percent))
        # Each text says how things are now: a resolve mail quotes the clear state.
        synced = clock_synced()
        clock = "the clock is " + ("synchronised" if synced else "not synchronised (NTP)")
        found.append(("clock", not synced, clock, sa.clock_after))
        # `auth_failed`: the relay's state when the smarthost refuses the account.
        auth = rt.uplink == "auth_failed"
        login = f"refuses our login: {rt.last_error}" if auth else "accepts our login"
        found.append(("auth", auth, f"the smarthost {login}", 0.0))
        failing = writer.failing_since is not None
        store = f"cannot store alerts: {writer.last_failure}" if failing else "stores alerts"
        found.append(("store", failing, f"the outbox {store}", sa.store_after))
        return found

    def _send_self(self, change: Change, before: Condition) -> None:
        sa = self.config.selfalerts
        with self._lock:
            cond = self.selfwatch.conditions[change.name]
            mark = (
                "self",
                change.name,
                json.dumps({"raised": cond.raised, "since": cond.raised_wall}),
            )
        if change.kind == "raised":
            text = change.detail
            if change.flaps > 0:
                text += f" (and came and went {change.flaps} more times meanwhile)"
        else:
            text = f"resolved after {human(change.lasted)}: {change.detail}"
        alert = self._alert(
            f"gateway/{self.device}/{change.name}",
            change.name.split("/")[0],
            sa.severity,
            text,
            {"selfalert": change.kind, "condition": change.name},
        )
        if f"self-alert {change.name}" not in self._unstored:  # a retry was said already
            log.warning("self-alert: %s", text)

        def done(result: Stored | BaseException) -> None:
            self._failed(f"self-alert {change.name}", result)
            if not isinstance(result, Stored):
                with self._lock:
                    self.selfwatch.put_back(change.name, before)

        self._submit(alert, sa.route, mark, done)

    def _failed(self, what: str, result: Stored | BaseException) -> None:
        """Log a change whose alert could not be stored once, then ever more rarely with
        a count (gateway/repeats.py): while the outbox fails, the tick tries again each
        second."""
        with self._lock:
            if isinstance(result, Stored):
                over = self._unstored.over(what)
            else:
                again = self._unstored.occurred(what, time.monotonic())
        if isinstance(result, Stored):
            if over:
                log.warning("the alert for %s is stored after all", what)
        elif again == 0:
            log.error(
                "could not store the alert for %s (%s); trying again every second", what, result
            )
        elif again is not None:
            log.error(
                "still cannot store the alert for %s (%s): %d more failed tries since it "
                "was last said; trying again every second",
                what,
                result,
                again,
            )

    # --- the heartbeat ---------------------------------------------------------------------

    def _heartbeat(self, now_wall: float, now_mono: float) -> None:
        beat, every = self.beat, self.config.heartbeat.every
        assert beat is not None and every is not None
        uplink_down = self.config.smtp is not None and self.runtime.uplink in (
            "down",
            "auth_failed",
        )
        with self._lock:
            if uplink_down and self._last_tick is not None:
                beat.offline += now_mono - self._last_tick
            if self._beat_pending or not is_due(beat, now_wall, every):
                return
            self._beat_pending = True
            since = Beat(beat.last, beat.offline, beat.down)  # what this heartbeat covers
        uptime = now_wall - self.runtime.started_at

        def counted(outbox: Outbox) -> dict[str, dict[str, int]]:
            return watch_state.activity(outbox, since.last)

        def ready(fut: concurrent.futures.Future[dict[str, dict[str, int]]]) -> None:
            if (exc := fut.exception()) is not None:  # the writer's thread
                self._beat_done(since, now_wall, exc)
                return
            message, fields = summary(since, fut.result(), uptime, __version__, now_wall)
            after = Beat(now_wall)
            mark = ("heartbeat", "heartbeat", json.dumps(dataclasses.asdict(after)))
            hb = self.config.heartbeat
            alert = self._alert(
                f"gateway/{self.device}/heartbeat", "heartbeat", hb.severity, message, dict(fields)
            )
            self._submit(alert, hb.route, mark, lambda r: self._beat_done(since, now_wall, r))

        self.ingest.writer.call(counted).add_done_callback(ready)

    def _beat_done(self, since: Beat, now_wall: float, result: Stored | BaseException) -> None:
        self._failed("heartbeat", result)
        with self._lock:
            self._beat_pending = False
            if isinstance(result, Stored) and self.beat is not None:
                # What accrued while the heartbeat was on its way belongs to the next one.
                self.beat = Beat(
                    now_wall,
                    max(0.0, self.beat.offline - since.offline),
                    max(0.0, self.beat.down - since.down),
                )

    # --- the one door ---------------------------------------------------------------------

    def _alert(
        self, topic: str, sensor: str, severity: str, message: str, fields: dict[str, object]
    ) -> Alert:
        sev = parse_severity(severity)
        assert sev is not None  # checked by the config
        draft = Draft(topic=topic, source="gateway", sensor=sensor, severity=sev)
        values = {k: v for k, v in fields.items() if isinstance(v, str | int | float | bool)}
        return normalize(message, draft, parse_json=False, fields=values)

    def _submit(
        self,
        alert: Alert,
        route: str | None,
        mark: tuple[str, str, str],
        done: Callable[[Stored | BaseException], None],
    ) -> None:
        ingest = self.ingest
        r = ingest.prepare(alert)
        if route is not None and (section := ingest.router.by_name.get(route)) is not None:
            prio = int(alert.severity) if section.priority is None else section.priority
            deliveries = ((route, prio),)
            keys = storm_keys(alert, deliveries, ingest.policies) if ingest.policies else ()
            r = dataclasses.replace(r, deliveries=deliveries, storm_keys=keys)
        r = dataclasses.replace(r, marks=(mark,))
        ingest.submit_routed([r], done)


def _disk(state_dir: Path, free_percent: int) -> tuple[str, bool, str, float]:
    try:
        usage = shutil.disk_usage(state_dir)
    except OSError:
        return ("disk", False, "", 0.0)
    free = usage.free * 100 / usage.total if usage.total else 100.0
    return (
        "disk",
        free < free_percent,
        f"the disk holding {state_dir} has {free:.1f} % free ({usage.free // 2**20} MiB)",
        0.0,
    )


def _last_alive(
    alive_at: float | None, status_path: Path, now_wall: float, state_dir: Path | None = None
) -> float | None:
    """The later of the outbox's `alive_at` and the previous daemon's status file (written
    every tick). The file is the service's own, but read as input: a value that is not a
    number or lies in the future is ignored, and so is the file of a daemon on another
    state_dir (sharing the runtime_dir): its life is not this outbox's."""
    try:
        raw = json.loads(status_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return alive_at
    theirs = raw.get("state_dir") if isinstance(raw, dict) else None
    if (
        state_dir is not None
        and isinstance(theirs, str)
        and os.path.realpath(theirs) != os.path.realpath(state_dir)
    ):
        return alive_at
    written = raw.get("written_at") if isinstance(raw, dict) else None
    if (
        not isinstance(written, int | float)
        or isinstance(written, bool)
        or not math.isfinite(written)
        or written > now_wall
    ):
        return alive_at
    return float(written) if alive_at is None else max(alive_at, float(written))


def _hhmm(wall: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(wall))


def _source_json(src: Source) -> str:
    return json.dumps(dataclasses.asdict(src))
