"""The daemon: wires sources → outbox → relay in one asyncio loop.

Every long-running piece is a task in one TaskGroup, so a crash in any of them
surfaces and stops the daemon (systemd restarts it) rather than dying quietly
in a forgotten task. Shutdown order keeps invariant 1: stop intake, let the
writer finish the commit in flight (its callbacks send the acks), then close
connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Protocol

from gateway import systemd
from gateway.config import Config
from gateway.errors import GatewayError
from gateway.ingest import Ingest
from gateway.outbox import Outbox
from gateway.routing import Router
from gateway.status import Runtime
from gateway.writer import Writer

log = logging.getLogger(__name__)


class Component(Protocol):
    name: str

    async def run(self) -> None: ...

    def close(self) -> None: ...


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.runtime = Runtime()
        self.router = Router(config.routes, config.gateway.default_route)
        self.stopping = asyncio.Event()
        self.components: list[Component] = []
        self.outbox: Outbox | None = None
        self.writer: Writer | None = None
        self.ingest: Ingest | None = None
        self.relay: object | None = None
        self.status_path = config.gateway.runtime_dir / "status.json"

    # --- life cycle ------------------------------------------------------------

    def open(self) -> None:
        cfg = self.config
        self.outbox = Outbox(
            cfg.outbox_path,
            max_messages=cfg.outbox.max_messages,
            allow_volatile=cfg.outbox.allow_volatile,
            policies=cfg.storm_policies,
        )
        self.writer = Writer(
            self.outbox,
            max_group=cfg.outbox.commit_batch,
            commit_interval=cfg.outbox.commit_interval,
        )
        self.writer.start()
        self.ingest = Ingest(self.writer, self.router, self.runtime)
        self._build_components()

    def _build_components(self) -> None:
        assert self.writer is not None and self.ingest is not None
        cfg = self.config
        if cfg.smtp is not None:
            from gateway.relay import Relay

            relay = Relay(cfg, self.writer, self.router, self.runtime)
            self.relay = relay
            self.writer.on_commit = relay.wake_threadsafe
            self.components.append(relay)
        else:
            log.warning("no [smtp] section: alerts are stored but not relayed")
        if cfg.mqtt is not None:
            from gateway.sources.mqtt import MqttSource

            self.components.append(MqttSource(cfg, self.ingest, self.runtime))
        if cfg.serial:
            from gateway.sources.serial import SerialHub, SerialSource

            hub = SerialHub()  # one thread reads every device-path port
            for port in cfg.serial:
                self.components.append(SerialSource(cfg, port, self.ingest, self.runtime, hub=hub))

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        try:
            self.open()
        except GatewayError as exc:
            log.critical("%s", exc)
            return 1
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop, sig)
        loop.add_signal_handler(signal.SIGUSR1, self.flush)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        self._prepare_runtime_dir()
        log.info("mailgw started: %s", self.config.summary())
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(c.run(), name=c.name) for c in self.components]
                tasks.append(tg.create_task(self._housekeeping(), name="housekeeping"))
                tasks.append(tg.create_task(self._watchdog(), name="watchdog"))
                systemd.notify("READY=1", f"STATUS={self._status_line()}")
                await self.stopping.wait()
                systemd.notify("STOPPING=1")
                for t in tasks:
                    t.cancel()
        finally:
            await self._shutdown()
        return 0

    def _on_stop(self, sig: signal.Signals) -> None:
        if not self.stopping.is_set():
            log.info(
                "received %s: stopping intake, finishing the commit in flight",
                signal.Signals(sig).name,
            )
        self.stopping.set()

    async def _shutdown(self) -> None:
        start = time.monotonic()
        if self.writer is not None:
            # Drains everything already submitted: those alerts commit and get acked.
            await asyncio.to_thread(self.writer.stop)
            if self.outbox is not None and self.writer.alive is False:
                with contextlib.suppress(Exception):
                    n = self.outbox.release_all()
                    if n:
                        log.info("%d deliveries in flight were put back in the queue", n)
        for c in self.components:
            try:
                c.close()
            except Exception as exc:  # one failing close must not skip the rest
                log.warning("closing %s: %s", c.name, exc)
        if self.outbox is not None:
            self.outbox.close()
        with contextlib.suppress(OSError):
            self.status_path.unlink()
        log.info("mailgw stopped in %.1f s", time.monotonic() - start)

    def flush(self) -> None:
        log.info("flush requested: probing the smarthost and retrying the queue now")
        if self.relay is not None:
            self.relay.flush()  # type: ignore[attr-defined]

    def reload(self) -> None:
        from gateway import config as config_mod

        try:
            new = config_mod.load(self.config.path) if self.config.path else None
        except GatewayError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            return
        if new is None:
            return
        self.router.__init__(new.routes, new.gateway.default_route)  # type: ignore[misc]
        if self.outbox is not None:
            self.outbox.policies = new.storm_policies  # one reference swap: the writer reads it
        self.config = new
        if self.relay is not None:
            self.relay.reload(new)  # type: ignore[attr-defined]
        log.info(
            "reloaded routes and templates (%d routes); connection settings take effect on restart",
            len(new.routes),
        )

    # --- background duties -------------------------------------------------------

    def _prepare_runtime_dir(self) -> None:
        try:
            self.config.gateway.runtime_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as exc:
            log.warning(
                "cannot create %s (%s): `mailgw status` will not see the daemon's counters",
                self.config.gateway.runtime_dir,
                exc,
            )

    def _status_line(self) -> str:
        live = self.outbox.live if self.outbox else 0
        return f"{live} undelivered, uplink {self.runtime.uplink}"

    async def _housekeeping(self) -> None:
        assert self.writer is not None
        last_prune = 0.0
        last_metrics = -1e9
        while True:
            self.runtime.outbox_full = self.writer.full
            with contextlib.suppress(OSError):
                self.runtime.write(self.status_path)
            systemd.notify(f"STATUS={self._status_line()}")
            if self.config.metrics.textfile and time.monotonic() - last_metrics >= 10:
                last_metrics = time.monotonic()
                await self._write_metrics(self.config.metrics.textfile)
            if time.monotonic() - last_prune > 60:
                last_prune = time.monotonic()
                await self._prune()
                await self._call(lambda ob: ob.refresh_live())
            await asyncio.sleep(2.0)

    async def _write_metrics(self, path: Path) -> None:
        from gateway import metrics, status

        def build() -> None:
            snapshot = self.runtime.snapshot()
            report = status.report(self.config.outbox_path, self.status_path, live=snapshot)
            metrics.write_textfile(path, report)

        try:
            # Counting by state scans the queue: off the loop, in a thread.
            await asyncio.to_thread(build)
        except OSError as exc:
            log.warning("cannot write the metrics file %s: %s", path, exc)

    async def _prune(self) -> None:
        """Prune in small transactions so ingest never waits long behind it."""
        cutoff = time.time() - self.config.outbox.sent_retention
        pruned = 0
        while (n := await self._call(partial(_prune, cutoff))) == _PRUNE_CHUNK:
            pruned += n
            await asyncio.sleep(0)
        pruned += n or 0
        dropped = await self._call(Outbox.drop_free_shards)
        if pruned or dropped:
            log.debug("pruned %d sent deliveries, dropped %d alert shards", pruned, dropped or 0)

    async def _call(self, fn: Callable[[Outbox], int | None]) -> int | None:
        assert self.writer is not None
        try:
            return await self.writer.run(fn)
        except Exception as exc:
            log.error("outbox housekeeping failed: %s", exc)
            return None

    def healthy(self) -> str | None:
        """Why the daemon is not healthy, or None. A stuck thread must stop the pings."""
        now = time.monotonic()
        if self.writer is None or not self.writer.alive or now - self.writer.heartbeat > 15:
            return "the outbox writer is stuck"
        hb = getattr(self.relay, "heartbeat", None)
        limit = getattr(self.relay, "stall_limit", 120.0)
        if hb is not None and now - hb > limit:
            return "the relay is stuck"
        return None

    async def _watchdog(self) -> None:
        interval = systemd.watchdog_interval()
        if interval is None:
            await self.stopping.wait()
            return
        warned = False
        while True:
            if (
                os.environ.get("MAILGW_TEST_FREEZE_LOOP")
                and Path(os.environ["MAILGW_TEST_FREEZE_LOOP"]).exists()
            ):
                time.sleep(3600)  # test hook: a frozen event loop, for the watchdog test
            why = self.healthy()
            if why is None:
                systemd.notify("WATCHDOG=1")
                warned = False
            elif not warned:
                log.error("%s: withholding watchdog pings so systemd restarts the service", why)
                warned = True
            await asyncio.sleep(interval)


_PRUNE_CHUNK = 500


def _prune(cutoff: float, ob: Outbox) -> int:
    return ob.prune(cutoff, limit=_PRUNE_CHUNK)


def run(config: Config) -> int:
    return asyncio.run(_main(config))


async def _main(config: Config) -> int:
    return await Daemon(config).run()
