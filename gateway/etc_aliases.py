"""Debian's /etc/aliases (aliases(5)), read for local mail's local names (sans-IO).

    # /etc/aliases
    postmaster: root
    root: me@example.com, ops@example.com

The daemon reads the file as it is at each pickup (a stat per poll: re-read only when
it changed), so `newaliases` has nothing to build. Only what mailgw can deliver is
kept: addresses and other local names. Pipes (`|cmd`), files (`/path`) and
`:include:` would run or write as root under a real MTA; mailgw delivers only mail,
so they are skipped with a reason.

The order for a local name (gateway/maildrop.py): an exact name in [sendmail.aliases]
wins; else this file, following local names through it (bounded, loops cut); the
names it ends on go through [sendmail.aliases] (exact, then "*"), as any local name.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field

MAX_FILE = 1024 * 1024  # Debian's is a few lines; anything larger is not read past this
MAX_DEPTH = 8  # sendmail's own bound on alias nesting is 10
MAX_TARGETS = 256  # as many as a message may name (sendmail_drop.MAX_RCPTS)
_NAME = re.compile(r"[A-Za-z0-9._+-]{1,64}")


@dataclass(frozen=True, slots=True)
class EtcAliases:
    table: tuple[tuple[str, tuple[str, ...]], ...] = ()
    skipped: tuple[str, ...] = ()  # lines or targets left out, with why
    # The table by name, built once (expand runs for every local recipient).
    index: dict[str, tuple[str, ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "index", dict(self.table))

    def expand(self, name: str) -> tuple[list[str], list[str]]:
        """A local name → (addresses, local names this file does not define). A name
        the file does not know comes back as itself. A name reached twice (two
        aliases naming it) is expanded once; only a real loop (a name reached through
        itself) or MAX_DEPTH ends on the name."""
        addresses: dict[str, None] = {}
        locals_: dict[str, None] = {}
        seen: set[str] = set()
        # (name, the names it was reached through): at most MAX_DEPTH of them
        todo: deque[tuple[str, tuple[str, ...]]] = deque([(name.lower(), ())])
        while todo and len(addresses) + len(locals_) <= MAX_TARGETS:
            cur, path = todo.popleft()
            targets = self.index.get(cur)
            if targets is None or cur in path or len(path) >= MAX_DEPTH:
                locals_[cur] = None  # unknown, a loop or too deep: ends on the name itself
                continue
            if cur in seen:
                continue  # expanded already through another alias
            seen.add(cur)
            below = (*path, cur)
            for t in targets:
                if "@" in t:
                    addresses[t] = None
                elif t.lower() == cur:  # "root: root" is the name itself (a mailbox)
                    locals_[cur] = None
                else:
                    todo.append((t.lower(), below))
        return list(addresses), list(locals_)


def parse(text: str) -> EtcAliases:
    """aliases(5) text → the table; never raises."""
    entries: list[tuple[str, list[str]]] = []
    skipped: list[str] = []
    logical: list[tuple[int, str]] = []
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[:1] in (" ", "\t") and logical:
            logical[-1] = (logical[-1][0], logical[-1][1] + " " + line.strip())
        else:
            logical.append((no, line))
    for no, line in logical:
        name, sep, rest = line.partition(":")
        name = name.strip().strip('"').lower()
        if not sep or not _NAME.fullmatch(name):
            skipped.append(f"line {no}: not 'name: target, ...'")
            continue
        targets: list[str] = []
        for item in rest.split(","):
            item = item.strip().strip('"').strip()
            if not item:
                continue
            if item[0] in "|/" or item.startswith(":include:"):
                skipped.append(f"line {no}: {name}: {item[:40]!r} (mailgw delivers only mail)")
                continue
            addr = item.strip("<>")
            if "@" in addr or _NAME.fullmatch(addr):
                targets.append(addr)
            else:
                skipped.append(f"line {no}: {name}: {item[:40]!r} is not an address")
        if targets:
            entries.append((name, targets[:MAX_TARGETS]))
    table = {n: tuple(t) for n, t in entries}  # a later line wins, as in newaliases
    return EtcAliases(tuple(table.items()), tuple(skipped))
