"""Link changes from the kernel wake the relay (gateway/netwatch.py), on a real netlink socket."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import uuid

import pytest

from gateway.netwatch import NetWatch


def test_a_new_address_is_seen_at_once() -> None:
    """An address appearing (as when a modem's link comes up) is a change."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("adding an address needs root and iproute2")
    octet = 100 + uuid.uuid4().int % 100
    address = f"127.77.{octet}.1/32"  # loopback range: no traffic leaves the machine
    seen = asyncio.Event()

    async def main() -> None:
        watch = NetWatch(seen.set)
        task = asyncio.create_task(watch.run())
        await asyncio.sleep(0.3)  # subscribed
        r = subprocess.run(["ip", "addr", "add", address, "dev", "lo"], capture_output=True)
        if r.returncode != 0:
            task.cancel()
            pytest.skip(f"cannot add an address here: {r.stderr.decode().strip()}")
        try:
            async with asyncio.timeout(5):
                await seen.wait()
        finally:
            subprocess.run(["ip", "addr", "del", address, "dev", "lo"], check=False)
            task.cancel()
        assert watch.changes == 1

    asyncio.run(main())
