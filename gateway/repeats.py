"""When to say again what keeps happening, sans-IO: once, then ever more rarely.

A self-alert that cannot be stored is tried again at every tick (each second), and an
operator must hear that it keeps failing; but a line a second is 3,600 lines an hour on
an SD card, and it buries every other line in the journal. So a repeated event is said
the first time, then again only after AGAIN[0], AGAIN[1], ... seconds (the last gap
repeating), each time with how often it happened since it was last said.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# A minute, ten minutes, then hourly: soon enough to see that it persists, rarely
# enough that a day of it is a couple of dozen lines.
AGAIN = (60.0, 600.0, 3600.0)


@dataclass(slots=True)
class _Said:
    at: float  # monotonic time it was last said
    times: int = 1  # how often it was said
    unsaid: int = 0  # occurrences since it was last said


@dataclass(slots=True)
class Repeats:
    """Per key (what keeps happening): whether to log an occurrence now."""

    gaps: tuple[float, ...] = AGAIN
    _said: dict[str, _Said] = field(default_factory=dict)

    def occurred(self, key: str, now: float) -> int | None:
        """It happened again. None: keep quiet; else say it now, with this many other
        occurrences since it was last said (0 the first time)."""
        said = self._said.get(key)
        if said is None:
            self._said[key] = _Said(now)
            return 0
        said.unsaid += 1
        gap = self.gaps[min(said.times, len(self.gaps)) - 1]
        if now - said.at < gap:
            return None
        count, said.unsaid, said.at = said.unsaid, 0, now
        said.times += 1
        return count

    def over(self, key: str) -> bool:
        """It stopped happening; True if it had been said (so its end is worth saying)."""
        return self._said.pop(key, None) is not None

    def __contains__(self, key: str) -> bool:
        return key in self._said
