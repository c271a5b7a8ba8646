"""glibc's heap, set for a daemon that holds a message of megabytes now and then.

glibc serves a large allocation with its own mmap and returns it to the system when
freed, but each such free raises the threshold for the next ones (up to 32 MiB on 64
bits): after the first local mail, every message-sized buffer comes from the heap of
the thread that made it (the writer's, the loop's), where freed space is kept and
split, not given back. A few 10 MiB messages then leave the daemon's RSS at several
times what it holds, past the unit's MemoryHigh. A fixed threshold keeps every large
buffer an mmap of its own: memory comes back the moment the message is done.
"""

from __future__ import annotations

import contextlib
import ctypes

M_MMAP_THRESHOLD = -3  # <malloc.h>
THRESHOLD = 128 * 1024  # glibc's own starting value, fixed (setting it stops the rise)


def pin_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold; False where there is no glibc (musl, other libcs
    have their own policy and nothing to pin)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD))
    return False
