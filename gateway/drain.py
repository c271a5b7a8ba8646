"""The drain plan for a backlog: pure, clock-free arithmetic over counts.

A smarthost that takes 30 mails a minute (`smtp.rate_limit`) needs 11 hours for a
weekend's 20,000 alerts sent one by one, and a critical alert that arrives meanwhile
waits behind whatever has the same priority. When the queued mails would take longer
than `smtp.drain_within` at that rate, the backlog is folded instead:

- a critical alert is never folded: it keeps its own mail (and a drain digest is sent
  at the lowest priority, so the criticals go first whatever a route's priority);
- every other queued alert of a route goes into that route's drain digests, at most
  DIGEST_CAP alerts a mail (so a mail stays a readable size: at most as many lines,
  each cut to 300 characters), as few digests as that allows;
- a route whose fold would not save a mail is left as it is.

Nothing is dropped: a folded alert is a line of a digest that says what it folds. The
plan here decides only counts; gateway/outbox/drain_fold.py applies it in one outbox
transaction, so a crash leaves the backlog folded or not, never half.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gateway.alert import Alert

DIGEST_CAP = 500  # alerts in one drain digest
# A drain digest's first alert is the gateway's own, saying why (drain_fold.py).
DRAIN_SOURCE, DRAIN_SENSOR = "gateway", "drain"


def is_drain_lead(alert: Alert) -> bool:
    return alert.source == DRAIN_SOURCE and alert.sensor == DRAIN_SENSOR


@dataclass(frozen=True, slots=True)
class RouteBacklog:
    """One route's queued mails, as the planner counts them.

    kept: mails that keep their own (critical alerts; a mail already half delivered;
    one carrying a critical repeat). foldable: queued mails that may be folded, and
    `alerts` the alerts they carry (a storm digest or a lead with repeats carries more
    than one).
    """

    kept: int = 0
    foldable: int = 0
    alerts: int = 0


@dataclass(frozen=True, slots=True)
class Plan:
    """What to fold: route → how many drain digests take its foldable alerts."""

    mails: int  # queued mails before the plan
    seconds: float  # how long they would take at the rate
    digests: Mapping[str, int]
    folded: int  # alerts folded into the digests
    kept: int  # mails kept as they are (criticals among them)
    mails_after: int
    seconds_after: float

    @property
    def any(self) -> bool:
        return bool(self.digests)


def send_time(mails: int, rate: tuple[int, float]) -> float:
    """Seconds to send `mails` at `rate` (count per period seconds)."""
    count, period = rate
    return mails * period / count


def digests_for(alerts: int, cap: int = DIGEST_CAP) -> int:
    return math.ceil(alerts / cap) if alerts > 0 else 0


def needed(mails: int, rate: tuple[int, float], within: float) -> bool:
    """Whether `mails` queued would take longer than `within` at `rate`: the cheap test,
    on a count alone, before the backlog is looked at closely."""
    return send_time(mails, rate) > within


def plan(
    backlog: Mapping[str, RouteBacklog],
    rate: tuple[int, float],
    within: float,
    cap: int = DIGEST_CAP,
) -> Plan | None:
    """The fold for `backlog`, or None when it drains within `within` at `rate` as it
    is (or folding would save no mail)."""
    mails = sum(b.kept + b.foldable for b in backlog.values())
    seconds = send_time(mails, rate)
    if seconds <= within:
        return None
    digests: dict[str, int] = {}
    folded = 0
    after = 0
    for route, b in sorted(backlog.items()):
        n = digests_for(b.alerts, cap)
        if 0 < n < b.foldable:
            digests[route] = n
            folded += b.alerts
            after += b.kept + n
        else:
            after += b.kept + b.foldable
    if not digests:
        return None
    kept = sum(b.kept for b in backlog.values())
    return Plan(mails, seconds, digests, folded, kept, after, send_time(after, rate))


def chunks(seqs: Sequence[int], n: int) -> list[list[int]]:
    """`seqs` (oldest first) cut into `n` runs of near-equal size, in order."""
    size, extra = divmod(len(seqs), n)
    out: list[list[int]] = []
    at = 0
    for i in range(n):
        step = size + (1 if i < extra else 0)
        out.append(list(seqs[at : at + step]))
        at += step
    return out


def human_time(seconds: float) -> str:
    """11 h, 40 min, 50 s: the precision a log line wants."""
    if seconds >= 5400:
        return f"{seconds / 3600:.0f} h"
    if seconds >= 90:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


def summary(p: Plan, rate_text: str, within: float) -> str:
    """The journal's one line for a fold."""
    routes = ", ".join(sorted(p.digests))
    return (
        f"drain plan: {p.mails:,} queued mails would take {human_time(p.seconds)} at "
        f"{rate_text}, longer than smtp.drain_within {human_time(within)}; {p.folded:,} "
        f"alerts of route{'s' if len(p.digests) > 1 else ''} {routes} folded into "
        f"{sum(p.digests.values())} digests, {p.kept:,} mails (every critical alert among "
        f"them) keep their own; the queue now takes about {human_time(p.seconds_after)}"
    )
