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
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from gateway import state_lock, systemd
from gateway.config import Config
from gateway.errors import GatewayError, OutboxFull, StoreUnavailable, ThreadDied
from gateway.ingest import Ingest
from gateway.outbox import Outbox
from gateway.outbox.room import room_of
from gateway.outbox.writer import Writer
from gateway.routing import Router
from gateway.runtime import Runtime

if TYPE_CHECKING:
    from gateway.maildrop import Maildrop
    from gateway.relay import Relay
    from gateway.watch import Watches

log = logging.getLogger(__name__)

# Storing has failed this long (a locked file, I/O errors; not a full outbox, which is
# back-pressure by design): stop the watchdog pings so that systemd restarts us.
STORE_STUCK_AFTER = 120.0
STORE_RETRIED_WITHIN = 15.0  # sources retry every second or so while storing fails
OPEN_RETRY_MAX = 10.0  # seconds between attempts to open an outbox that is unavailable
THREAD_CHECK_EVERY = 1.0
# After SIGTERM the process is gone within this, whatever its threads are doing: under
# the unit's TimeoutStopSec (20 s), after which systemd would SIGKILL it mid-whatever.
EXIT_WITHIN = 15.0


class Component(Protocol):
    name: str

    async def run(self) -> None: ...

    def close(self) -> None: ...


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.runtime = Runtime(state_dir=str(config.gateway.state_dir))
        self.router = Router(config.routes, config.gateway.default_route)
        self.stopping = asyncio.Event()
        self.components: list[Component] = []
        self.outbox: Outbox | None = None
        self.writer: Writer | None = None
        self.ingest: Ingest | None = None
        self.relay: Relay | None = None
        self.maildrop: Maildrop | None = None
        self.watches: Watches | None = None
        self.status_path = config.gateway.runtime_dir / "status.json"
        self.exit_code = 0
        self.state_lock: state_lock.StateLock | None = None
        self.stop_asked: float | None = None  # monotonic time of SIGTERM

    # --- life cycle ------------------------------------------------------------

    def _open_outbox(self) -> Outbox:
        cfg = self.config
        if self.state_lock is None:
            # First: one daemon per state_dir (AlreadyRunning ends this one), before the
            # outbox is opened, its rows recovered or any server is called.
            self.state_lock = state_lock.take(cfg.gateway.state_dir, cfg.gateway.runtime_dir)
        return Outbox(
            cfg.outbox_path,
            max_messages=cfg.outbox.max_messages,
            allow_volatile=cfg.outbox.allow_volatile,
            policies=cfg.storm_policies,
            room=room_of(cfg.outbox),
        )

    async def _wait_for_outbox(self) -> Outbox | None:
        """Open the outbox, waiting out a locked file, a full disk or I/O errors.

        None if asked to stop meanwhile. Such a file is healthy as far as anyone knows:
        what it holds must be sent once it can be read, so it is never moved aside
        for this (only real corruption is, in Outbox). systemd is told we are still
        starting, and why, so it neither kills us nor restarts us in a loop.
        """
        delay, said, since = 1.0, "", time.time()
        while not self.stopping.is_set():
            try:
                outbox = await self._open_unless_stopped()
                if outbox is None:
                    return None
            except (StoreUnavailable, OutboxFull, OSError) as exc:
                # OSError: the state directory cannot be made or a corrupt file cannot
                # be moved aside (a read-only remount after an SD card error).
                if str(exc) != said:
                    said = str(exc)
                    log.error(
                        "%s. Waiting for it (trying again every %.0f s at most); nothing "
                        "queued is discarded",
                        exc,
                        OPEN_RETRY_MAX,
                    )
                self.runtime.store_error = f"cannot open the outbox: {exc}"
                self.runtime.store_failing_since = since
                with contextlib.suppress(OSError):
                    self.runtime.write(self.status_path)
                systemd.notify(
                    f"STATUS=waiting for the outbox: {exc}",
                    f"EXTEND_TIMEOUT_USEC={int((delay + 30) * 1e6)}",
                    "WATCHDOG=1",
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), delay)
                delay = min(OPEN_RETRY_MAX, delay * 2)
                continue
            if said:
                log.warning("the outbox %s opened after %.0f s", outbox.path, time.time() - since)
            self.runtime.store_error = None
            self.runtime.store_failing_since = None
            return outbox
        return None

    async def _open_unless_stopped(self) -> Outbox | None:
        """_open_outbox in a thread, or None as soon as we are asked to stop: an open
        that hangs (a file system that does not answer) must not keep a SIGTERM
        waiting. Its thread is abandoned at exit (_leave)."""
        opening = asyncio.ensure_future(asyncio.to_thread(self._open_outbox))
        stop = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait({opening, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if opening.done():
            return opening.result()
        # Whatever it ends with is of no use now; retrieved, so it is not logged.
        opening.add_done_callback(lambda f: f.cancelled() or f.exception())
        return None

    def open(self, outbox: Outbox) -> None:
        cfg = self.config
        self.outbox = outbox
        self.writer = Writer(
            self.outbox,
            max_group=cfg.outbox.commit_batch,
            commit_interval=cfg.outbox.commit_interval,
        )
        self.writer.start()
        self.ingest = Ingest(self.writer, self.router, self.runtime, cfg.storm_policies)
        self._build_components()

    def _build_components(self) -> None:
        assert self.writer is not None and self.ingest is not None
        cfg = self.config
        if cfg.smtp is not None:
            from gateway.netwatch import NetWatch
            from gateway.relay import Relay

            relay = Relay(cfg, self.writer, self.router, self.runtime)
            self.relay = relay
            self.writer.on_commit = relay.wake_threadsafe
            self.components.append(relay)
            # A link or route change may mean the uplink is back: probe at once.
            self.components.append(NetWatch(relay.nudge))
            if cfg.smtp.drain_within is not None:  # a too-long backlog is folded (#20)
                from gateway.drainer import Drainer

                self.components.append(
                    Drainer(cfg, self.writer, self.runtime, lambda: self.router.by_name)
                )
        else:
            log.warning("no [smtp] section: alerts are stored but not relayed")
        from gateway.maildrop import Maildrop  # local mail from `sendmail`

        self.maildrop = Maildrop(cfg, self.writer, self.runtime)
        self.components.append(self.maildrop)
        if cfg.mqtt is not None:
            from gateway.sources.mqtt import MqttSource

            mqtt = MqttSource(cfg, self.ingest, self.runtime)
            if self.relay is not None:
                # The broker is back: so, perhaps, is the uplink (often the same link).
                mqtt.on_connected = self.relay.nudge_threadsafe
            self.components.append(mqtt)
        if cfg.serial:
            from gateway.sources.serial import SerialHub, SerialSource

            hub = SerialHub(self.ingest)  # one thread reads every device-path port
            for port in cfg.serial:
                self.components.append(SerialSource(cfg, port, self.ingest, self.runtime, hub=hub))

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop, sig)
        # Taken before the outbox is waited for (a full disk, a lock: possibly minutes):
        # each copes with the parts not built yet.
        loop.add_signal_handler(signal.SIGUSR1, self.flush)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        self._prepare_runtime_dir()
        try:
            outbox = await self._wait_for_outbox()
            if outbox is None:
                return 0
            self.open(outbox)
            await self._start_watches()
        except GatewayError as exc:
            log.critical("%s", exc)
            return 1
        log.info("mailgw started: %s", self.config.summary())
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(c.run(), name=c.name) for c in self.components]
                tasks.append(tg.create_task(self._housekeeping(), name="housekeeping"))
                tasks.append(tg.create_task(self._watchdog(), name="watchdog"))
                tasks.append(tg.create_task(self._watch_writer(), name="outbox-writer"))
                systemd.notify("READY=1", f"STATUS={self._status_line()}")
                await self.stopping.wait()
                systemd.notify("STOPPING=1")
                for t in tasks:
                    t.cancel()
        except* ThreadDied as group:
            for died in group.exceptions:
                log.critical("%s; stopping so that systemd restarts the daemon", died)
            self.exit_code = 1
        finally:
            await self._shutdown()
        return self.exit_code

    async def _start_watches(self) -> None:
        """Silence rules, self-alerts, heartbeat, if configured: their state is read from the
        outbox before any source runs, so a restart neither forgets nor re-fires."""
        assert self.writer is not None and self.ingest is not None
        cfg = self.config
        from gateway.watch import Watches

        watches = Watches(cfg, self.ingest, self.runtime)
        if not watches.active:
            return
        try:
            await self.writer.run(watches.restore)
        except Exception as exc:  # the watches start afresh; intake matters more
            log.error("could not read the silence and self-alert state back: %s", exc)
        self.ingest.observers.append(watches.observed)
        self.watches = watches

    async def _watch_writer(self) -> None:
        """The writer thread is owned here: if it ends before we stop, so does the daemon."""
        assert self.writer is not None
        writer = self.writer
        while writer.alive:
            self.runtime.threads["outbox-writer"] = "alive"
            await asyncio.sleep(THREAD_CHECK_EVERY)
        if self.stopping.is_set():
            return
        self.runtime.threads["outbox-writer"] = f"dead: {writer.died!r}"
        with contextlib.suppress(OSError):
            self.runtime.write(self.status_path)
        raise ThreadDied(f"the outbox writer thread has died ({writer.died!r})")

    def _on_stop(self, sig: signal.Signals) -> None:
        if not self.stopping.is_set():
            self.stop_asked = time.monotonic()
            log.info(
                "received %s: stopping intake, finishing the commit in flight",
                signal.Signals(sig).name,
            )
        self.stopping.set()

    async def _shutdown(self) -> None:
        start = time.monotonic()
        if self.watches is not None:
            self.watches.save_now()  # queued before the writer's stop: it is drained
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
            self.relay.flush()

    def reload(self) -> None:
        from gateway import config as config_mod

        try:
            new = config_mod.load(self.config.path) if self.config.path else None
        except GatewayError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            return
        if new is None:
            return
        try:
            router = Router(new.routes, new.gateway.default_route)
        except Exception as exc:  # check-config passed; still, never half a router
            log.error("reload refused, keeping the running configuration: %s", exc)
            return
        # Reference swaps only: a source thread reading the router mid-reload sees the
        # old one or the new one, each whole (never routes without their severities).
        self.router = router
        if self.ingest is not None:
            self.ingest.router = router
            self.ingest.policies = new.storm_policies
        if self.outbox is not None:
            self.outbox.policies = new.storm_policies  # one reference swap: the writer reads it
        self.config = new
        if self.relay is not None:
            self.relay.reload(new, router)
        if self.maildrop is not None:
            self.maildrop.reload(new)  # aliases, max_size; the maildrop's path on restart
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
            failing = self.writer.failing_since
            self.runtime.store_error = self.writer.last_failure if failing is not None else None
            self.runtime.store_failing_since = (
                None if failing is None else time.time() - (time.monotonic() - failing)
            )
            with contextlib.suppress(OSError):
                self.runtime.write(self.status_path)
            if self.watches is not None and self.outbox is not None:
                try:
                    self.watches.tick(self.outbox.live)
                except Exception:  # a bug in a watch must not end housekeeping
                    log.exception("the silence and self-alert watch failed")
            systemd.notify(f"STATUS={self._status_line()}")
            if self.config.metrics.textfile and time.monotonic() - last_metrics >= 10:
                last_metrics = time.monotonic()
                await self._write_metrics(self.config.metrics.textfile)
            if time.monotonic() - last_prune > 60:
                last_prune = time.monotonic()
                await self._prune()
                await self._call(lambda ob: ob.refresh_live())
            # Silence and self-alerts are judged on this tick: finer when they are on.
            await asyncio.sleep(1.0 if self.watches is not None else 2.0)

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
        failing = self.writer.failing_since
        # Failing for long, and still failing: a single failure followed by quiet (no
        # alert retried since) says nothing about the store now.
        if (
            failing is not None
            and now - failing > STORE_STUCK_AFTER
            and now - self.writer.last_failure_at < STORE_RETRIED_WITHIN
        ):
            return f"the outbox has failed to store alerts for {now - failing:.0f} s"
        if self.relay is not None and now - self.relay.heartbeat > self.relay.stall_limit:
            return "the relay is stuck"
        dead = [f"{k} ({v})" for k, v in self.runtime.threads.items() if v != "alive"]
        if dead:
            return "threads have died: " + ", ".join(dead)
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
    # The loop's thread pool is ours, so that its end can be bounded (_leave): the
    # implicit one is joined at exit however long its calls block.
    executor = ThreadPoolExecutor(thread_name_prefix="mailgw-io")
    asyncio.get_running_loop().set_default_executor(executor)
    daemon = Daemon(config)
    code = await daemon.run()
    _leave(daemon, executor, code)
    return code


def _leave(daemon: Daemon, executor: ThreadPoolExecutor, code: int) -> None:
    """After the orderly shutdown, make sure the process ends by systemd's stop deadline:
    a thread still blocked in a call (a file system that hangs, a server that never
    answers) would otherwise keep the interpreter alive after "stopped" until SIGKILL.
    The outbox writer is the exception: it is waited for, whatever it takes, so that the
    process never ends in the middle of a commit."""
    writer = daemon.writer
    if writer is not None and writer.alive:
        log.warning("waiting for the outbox writer to finish its commit before exiting")
        writer.thread.join()
    deadline = (daemon.stop_asked or time.monotonic()) + EXIT_WITHIN
    if daemon.outbox is None:
        # Stopped while still opening it: nothing was taken in, nothing is to finish,
        # and a thread still in the open is blocked (it would have returned).
        deadline = time.monotonic()
    executor.shutdown(wait=False)  # idle workers end now, busy ones when their call returns
    me = threading.current_thread()
    others = [t for t in threading.enumerate() if t is not me and not t.daemon]
    for t in others:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in others if t.is_alive()]
    if not stuck:
        return
    log.warning(
        "exiting with %d thread(s) still blocked in a call (%s): their work is abandoned; %s",
        len(stuck),
        ", ".join(stuck),
        "the outbox was closed in order before"
        if daemon.outbox is not None
        else "the outbox was still being opened, nothing had been taken in",
    )
    logging.shutdown()
    os._exit(code)
