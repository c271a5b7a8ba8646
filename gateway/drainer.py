"""The drain task: looks at the backlog now and then, and folds it when it is too long.

Every CHECK_EVERY seconds, and at once when the uplink comes back, one count of the
queued mails (through the writer: a walk of a partial index). Only when they would take
longer than smtp.drain_within at smtp.rate_limit is the backlog read closely and folded
(gateway/drain.py decides, gateway/outbox/drain_fold.py applies it in one transaction).
Most backlogs build up while the uplink is down, so the fold usually happens before the
first mail goes: when the smarthost is back, the critical alerts go first, then a few
digests, and the inbox has the whole picture within minutes.

A failure here is logged and tried again at the next check: the relay sends the
backlog unfolded meanwhile, which is slow but loses nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection

from gateway.config import Config
from gateway.drain import human_time, summary
from gateway.outbox.drain_fold import Folded, fold
from gateway.outbox.writer import Writer
from gateway.pace import describe
from gateway.runtime import Runtime

log = logging.getLogger(__name__)

CHECK_EVERY = 10.0
TICK = 1.0  # how often the uplink's state is looked at between checks


class Drainer:
    name = "drain"

    def __init__(
        self,
        config: Config,
        writer: Writer,
        runtime: Runtime,
        routes: Callable[[], Collection[str]],
    ) -> None:
        assert config.smtp is not None and config.smtp.rate_limit is not None
        assert config.smtp.drain_within is not None
        self.rate = config.smtp.rate_limit
        self.within = config.smtp.drain_within
        self.device_id = config.gateway.device_id
        self.writer = writer
        self.runtime = runtime
        self.routes = routes  # the routes of the running config (a reload may change them)
        self.rate_text = describe(*self.rate)
        self._failing = False
        runtime.drain = {
            "drain_within": human_time(self.within),
            "folds": 0,
            "folded": 0,
            "digests": 0,
            "last": None,
        }

    async def run(self) -> None:
        last_check = -CHECK_EVERY
        uplink = self.runtime.uplink
        while True:
            now = time.monotonic()
            back = uplink != "up" and self.runtime.uplink == "up"
            uplink = self.runtime.uplink
            if back or now - last_check >= CHECK_EVERY:
                last_check = now
                await self.check()
            await asyncio.sleep(TICK)

    async def check(self) -> Folded | None:
        """One look at the backlog; the fold if one was made."""
        routes = frozenset(self.routes())
        try:
            done = await self.writer.run(
                lambda ob: fold(
                    ob,
                    rate=self.rate,
                    within=self.within,
                    routes=routes,
                    device_id=self.device_id,
                    rate_text=self.rate_text,
                )
            )
        except Exception as exc:  # the queue drains unfolded meanwhile: slow, not lost
            if not self._failing:  # once, not every 10 s while the store fails
                log.error(
                    "drain plan: could not fold the backlog (%s); the relay sends it as it "
                    "is meanwhile, and the fold is tried again every %.0f s",
                    exc,
                    CHECK_EVERY,
                )
            self._failing = True
            return None
        self._failing = False
        if done is not None:
            p = done.plan
            log.warning("%s", summary(p, self.rate_text, self.within))
            d = self.runtime.drain
            d["folds"] += 1
            d["folded"] += p.folded
            d["digests"] += sum(p.digests.values())
            d["last"] = time.time()
        return done

    def close(self) -> None:
        pass
