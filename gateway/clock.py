"""Time on a device with no real-time clock.

Until NTP syncs, a Raspberry Pi's wall clock can be days off (fake-hwclock
restores the last shutdown time). So every receipt records three things: the
wall time as it was, the boot id, and CLOCK_BOOTTIME (monotonic, and unlike
CLOCK_MONOTONIC it keeps counting through suspend). If the clock was unsynced at
receipt and is synced by the time a mail is composed in the same boot, the true
receipt time is `now_wall - (now_boottime - boottime_at_receipt)`.

Scheduling (backoff, probes) uses time.monotonic() only, never wall time.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass
from pathlib import Path

_TIME_ERROR = 5  # adjtimex(2) return value: the clock is not synchronised
_SYNC_FLAG = Path("/run/systemd/timesync/synchronized")


_boot_id: str | None = None


def boot_id() -> str:
    """This boot's id; constant until reboot, so read once."""
    global _boot_id
    if _boot_id is None:
        try:
            _boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            _boot_id = "unknown"
    return _boot_id


def boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


_libc: ctypes.CDLL | None = None
_synced_cache: tuple[float, bool] = (-1e9, False)
_SYNC_RECHECK = 2.0  # seconds; every alert stamps the time, a syscall each was measurable


def clock_synced() -> bool:
    global _synced_cache
    checked, value = _synced_cache
    now = time.monotonic()
    if now - checked < _SYNC_RECHECK:
        return value
    value = _clock_synced()
    _synced_cache = (now, value)
    return value


def _clock_synced() -> bool:
    """True when the kernel says the wall clock is disciplined (NTP/timesyncd).

    adjtimex(2) with modes=0 changes nothing and returns the clock state;
    TIME_ERROR means unsynchronised. We pass a zeroed buffer larger than any
    architecture's struct timex rather than declaring the struct per ABI.
    """
    if _SYNC_FLAG.exists():
        return True
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        buf = ctypes.create_string_buffer(512)
        state = int(_libc.adjtimex(buf))
    except (OSError, AttributeError):
        return False
    return state >= 0 and state != _TIME_ERROR


@dataclass(frozen=True, slots=True)
class Stamp:
    """When something happened, with what is needed to correct it later."""

    wall: float
    boottime: float
    boot_id: str
    synced: bool

    @classmethod
    def now(cls, boot: str | None = None, synced: bool | None = None) -> Stamp:
        return cls(
            wall=time.time(),
            boottime=boottime(),
            boot_id=boot if boot is not None else boot_id(),
            synced=clock_synced() if synced is None else synced,
        )

    def corrected(self, now: Stamp) -> tuple[float, bool]:
        """(best wall time for this stamp, whether it can be trusted)."""
        if self.synced:
            return self.wall, True
        if now.synced and now.boot_id == self.boot_id:
            return now.wall - (now.boottime - self.boottime), True
        return self.wall, False
