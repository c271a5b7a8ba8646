"""Link and route changes, from the kernel: the moment the uplink may be back.

A modem that reconnects, a Wi-Fi that rejoins, a cellular link that gets its route
back: each shows as an rtnetlink message (RTM_NEWLINK, RTM_NEWADDR, RTM_NEWROUTE...).
We only listen; every message (a burst settles for SETTLE seconds) calls `on_change`,
and the relay probes the smarthost then instead of at its next scheduled probe. Where
netlink cannot be opened (a sandbox without AF_NETLINK), the scheduled probes remain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable

log = logging.getLogger(__name__)

# rtnetlink multicast groups (linux/rtnetlink.h): links, IPv4/IPv6 addresses and routes.
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
GROUPS = (
    RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE
)
SETTLE = 1.0  # a route change comes as a burst; probe once it has settled


class NetWatch:
    name = "netwatch"

    def __init__(self, on_change: Callable[[], None]) -> None:
        self.on_change = on_change
        self.changes = 0
        self._sock: socket.socket | None = None

    def _open(self) -> socket.socket | None:
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        except (OSError, AttributeError) as exc:
            log.info("not watching link changes (%s): the uplink is probed on schedule", exc)
            return None
        try:
            sock.bind((0, GROUPS))
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            log.info("not watching link changes (%s): the uplink is probed on schedule", exc)
            return None
        return sock

    async def run(self) -> None:
        sock = self._sock = self._open()
        if sock is None:
            await asyncio.Event().wait()  # nothing to watch; wait to be cancelled
            return
        loop = asyncio.get_running_loop()
        event = asyncio.Event()

        def readable() -> None:
            # ENOBUFS (we fell behind a burst) is a change too: drain and probe.
            with contextlib.suppress(OSError):
                while sock.recv(65536):
                    pass
            event.set()

        loop.add_reader(sock.fileno(), readable)
        try:
            while True:
                await event.wait()
                # Let the burst settle: the new route is usable once it is all in place.
                while True:
                    event.clear()
                    try:
                        async with asyncio.timeout(SETTLE):
                            await event.wait()
                    except TimeoutError:
                        break
                self.changes += 1
                log.debug("network change seen: probing the uplink now if it is down")
                self.on_change()
        finally:
            loop.remove_reader(sock.fileno())
            sock.close()
            self._sock = None

    def close(self) -> None:
        pass  # the socket is closed by run()'s finally
