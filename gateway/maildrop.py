"""The daemon's pickup of local mail: maildrop files → the outbox (one per message).

`sendmail` (gateway/sendmail.py) leaves each message as a file in the maildrop, a
directory anyone may write to and only mailgw may list (mode 3733). This component
looks there every POLL seconds (a listdir of a nearly always empty directory: a few
microseconds), and for each complete file: reads it as untrusted input, stores the
message with its envelope in one FULL transaction, then unlinks it. A crash between
the commit and the unlink is harmless: the outbox remembers the file's random name
(raw_message.drop_name) and the next pickup only unlinks it.

Who sent it is the file's owner, which the kernel sets and no caller can forge (the
unit has no PrivateUsers=, so this is the real uid: per-user limits depend on it).

A file that can never become a mail (not a regular file, a link, too large, not our
format, never completed within STALE, naming an address outside sendmail.allow_to) is
moved to `rejected/` next to the maildrop with a counted rejection (status:
maildrop_<why>) and a log line, one per user and reason while it keeps happening;
nothing is deleted, and one bad file never stops the pickup of the others. A store
that fails (outbox full, disk trouble) leaves the file where it is for the next round:
nothing is lost.

Local mail is a guest (DESIGN.md, invariant 14): each user (uid) has a rate
(sendmail.rate, gateway/maildrop_limits.py); a complete file over it waits in the
spool, counted once (maildrop_over_rate), and is taken when the rate allows.

The scan stays cheap whatever sits in the spool: the directory is listed again only
when it changed (or every RELIST seconds), a file is looked at when it first appears,
and an unfinished one again after a delay that doubles up to LOOK_MAX, at most
MAX_LOOKS a round. STALE counts from the first sighting (or the file's mtime, if
older), so touching a file never keeps it waiting longer.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import heapq
import itertools
import logging
import math
import os
import pwd
import sqlite3
import stat
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from gateway.alert import Alert, Severity, clean_sensor, new_alert_id
from gateway.clock import Stamp
from gateway.config import Config
from gateway.errors import GatewayError, LocalRoomFull, StoreUnavailable, Unstorable
from gateway.etc_aliases import MAX_FILE, EtcAliases
from gateway.etc_aliases import parse as parse_etc_aliases
from gateway.maildrop_limits import Episodes, UserRate
from gateway.maildrop_parse import (
    BadDrop,
    clean_recipients,
    header_recipients,
    parse_drop,
    plan,
    subject,
)
from gateway.outbox import Outbox, raw
from gateway.outbox.writer import Writer
from gateway.runtime import Runtime
from gateway.sendmail_drop import ALLOW_FILE, MAX_RCPTS, allowed, read_published

log = logging.getLogger(__name__)

POLL = 0.5
STALE = 3600.0  # a file still unfinished after this long was abandoned by its writer
LIMIT_FILE = ".max_size"
OVER_SHARE_RETRY = 5.0  # a file refused for lack of local mail's room is tried this often
RELIST = 60.0  # list an unchanged directory again after this long anyway
# `sendmail` writes its file in one go: an unfinished one is looked at again after
# LOOK_FIRST, then the delay doubles up to LOOK_MAX; at most MAX_LOOKS such looks a
# round, so a user's 100,000 unfinished files cost others' mail nothing.
LOOK_FIRST = 0.5
LOOK_MAX = 300.0
MAX_LOOKS = 200
# What the pickup remembers about files costs a few hundred bytes each (the name, its
# next look, its place in the rate's queue): bounded so that a user who fills the spool
# with files cannot grow the daemon to its MemoryMax= and into an OOM restart loop.
# 1,000 files is far more than a user's cron ever leaves waiting (20 a minute for 50
# minutes); 20,000 in all keeps the tracking under ~10 MiB. Files beyond are not
# remembered: a later listing looks at them again once there is room.
MAX_TRACKED_PER_UID = 1_000
MAX_TRACKED = 20_000


def _owner_name(uid: int) -> str:
    """The user name of a uid, or the number."""
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return str(uid)


def _read_into(fd: int, buf: bytearray, at: int) -> int:
    """Read from `fd` into `buf` from `at` on; the bytes read (0 at the end)."""
    with memoryview(buf) as whole, whole[at:] as rest:
        return os.readv(fd, [rest])


class Rejected(Exception):
    def __init__(self, kind: str, why: str, uid: int = -1) -> None:
        super().__init__(why)
        self.kind = kind
        self.uid = uid


class _OverRate(Exception):
    def __init__(self, uid: int) -> None:
        super().__init__(uid)
        self.uid = uid


@dataclass(slots=True)
class _Unfinished:
    first: float  # wall time of the first sighting (or the file's mtime, if older)
    due: float  # monotonic time of the next look
    wait: float  # the delay after that look


@dataclass(frozen=True, slots=True)
class Picked:
    alert: Alert
    message: raw.RawMessage
    plan: raw.RawPlan
    problems: tuple[str, ...]

    def without_data(self) -> Picked:
        """What the pickup still needs once the message is stored: not its bytes."""
        return replace(self, message=replace(self.message, data=b""))


def _store(box: list[Picked], ob: Outbox) -> bool:
    # Taken out of its box: the writer thread may keep a call's function until its
    # next call, and the message must not outlive its store (the next file is read
    # meanwhile, and would be a second copy in the daemon).
    p = box.pop()
    return raw.store(ob, p.alert, p.message, p.plan)


class Maildrop:
    name = "maildrop"

    def __init__(self, config: Config, writer: Writer, runtime: Runtime) -> None:
        self.config = config
        self.writer = writer
        self.runtime = runtime
        self.dir = config.sendmail.maildrop
        self.rejected_dir = self.dir.parent / "rejected"
        self.picked = 0
        self._missing_logged = False
        self._store_failing = False
        self._round_failed: str | None = None  # what the last failed round said
        self._stuck: set[str] = set()  # rejected, yet could not be moved aside: said once
        # Left for lack of local mail's room → when to try it again: counted once, and
        # retried now and then rather than every round (each try is a read and a write
        # transaction, which a flood of waiting files must not take from alerts).
        self._over_share: dict[str, float] = {}
        self._known: set[str] = set()  # every name of the last listing that is tracked
        self._uid_of: dict[str, int] = {}  # tracked name → its owner, for the caps
        self._too_many: set[int] = set()  # uids with files beyond the caps (-1: all users)
        self._listed: tuple[int, int] | None = None  # the directory's (ino, mtime) then
        self._listed_at = 0.0
        self._again: set[str] = set()  # complete, not taken yet (a store that failed)
        self._unfinished: dict[str, _Unfinished] = {}
        self._looks: list[tuple[float, str]] = []  # (due, name) of unfinished files, a heap
        self._held: dict[str, int] = {}  # complete files over their user's rate → uid
        self._held_by: dict[int, dict[str, None]] = {}  # uid → its held names, oldest first
        self._rate = self._new_rate(config)
        self._episodes = Episodes()
        # A user over the rate is one episode from the first mail held to the last
        # taken, however long that is: never closed by quiet, only by _caught_up.
        self._over = Episodes(quiet=math.inf)
        self._blocked: dict[str, tuple[int, int]] = {}  # published name → what is in the way
        self._publish_failed: dict[str, tuple[str, str | None]] = {}  # name → the failure said
        self._etc: tuple[tuple[int, int, int], EtcAliases] | None = None

    @staticmethod
    def _new_rate(config: Config) -> UserRate | None:
        s = config.sendmail
        return UserRate(s.rate[0], s.rate[1], s.burst) if s.rate else None

    def reload(self, config: Config) -> None:
        old = self.config.sendmail
        self.config = config
        if (old.rate, old.burst) != (config.sendmail.rate, config.sendmail.burst):
            self._rate = self._new_rate(config)

    def close(self) -> None:
        pass

    async def run(self) -> None:
        while True:
            try:
                await self.scan()
                self._round_failed = None
            except OSError as exc:  # the directory itself: say so, keep trying
                self._failed_round(f"cannot read the maildrop {self.dir}: {exc}; retrying")
            except Exception as exc:
                # Nothing a local user leaves in the spool may end this task (and with
                # it the daemon): said once while it keeps happening, and tried again.
                self._failed_round(
                    f"the maildrop pickup failed ({exc!r}); local mail waits in {self.dir} "
                    "and is tried again",
                    exc,
                )
            await asyncio.sleep(POLL)

    def _failed_round(self, text: str, exc: BaseException | None = None) -> None:
        if text == self._round_failed:
            return
        self._round_failed = text
        log.error("%s", text, exc_info=exc)

    async def scan(self) -> int:
        """One round: every complete file stored or rejected; how many were stored."""
        # Files left for lack of local mail's room whose retry is due are looked at again.
        mono = time.monotonic()
        self._again.update(n for n, t in self._over_share.items() if t <= mono)
        names, over = await asyncio.to_thread(self._list)
        for name, uid in over:
            self._hold(name, uid)
        stored = 0
        self._log_ended()
        for i, name in enumerate(names):
            if name in self._stuck or self._over_share.get(name, 0.0) > time.monotonic():
                continue
            try:
                picked = await asyncio.to_thread(self._read, name)
            except Rejected as rej:
                await asyncio.to_thread(self._reject, name, rej)
                continue
            except _OverRate as over:
                self._hold(name, over.uid)
                continue
            except Exception as exc:
                # Whatever else reading or parsing one file raises is that file's fault
                # (its content is anyone's): it is set aside, never retried into a loop.
                why = Rejected("malformed", f"it cannot be read as mail ({exc!r})", self._uid(name))
                await asyncio.to_thread(self._reject, name, why)
                continue
            if picked is None:
                continue
            box, picked = [picked], picked.without_data()
            try:
                added = await self.writer.run(partial(_store, box))
            except LocalRoomFull as exc:
                self._refused(name, exc)
                continue  # another user's file may still fit
            except (GatewayError, OSError) as exc:
                if _its_own_fault(exc):
                    # The message's own values cannot be stored (the disk is fine):
                    # this file is rejected, the others go on.
                    why = Rejected("unstorable", f"it cannot be stored ({exc})", picked.message.uid)
                    await asyncio.to_thread(self._reject, name, why)
                    continue
                if not self._store_failing:
                    log.error(
                        "cannot store local mail from the maildrop yet (%s); it stays in %s "
                        "and is retried",
                        exc,
                        self.dir,
                    )
                self._store_failing = True
                self._again.update(n for n in names[i:] if n not in self._held)
                return stored
            self._store_failing = False
            await asyncio.to_thread(self._unlink, name)
            if not added:  # the same content is in the outbox already (raw.store)
                log.info(
                    "maildrop file %s was stored before (a pickup interrupted before its "
                    "removal); removed now, not queued again",
                    name,
                )
                continue
            stored += 1
            self.picked += 1
            self._log_stored(picked)
            self._caught_up(name, picked.message.uid)
        return stored

    def _refused(self, name: str, exc: LocalRoomFull) -> None:
        """Local mail over its share stays in the maildrop until room returns: counted
        once per file, said once while any wait, not on every round that retries."""
        known = name in self._over_share
        first = not self._over_share  # none waited: a new episode begins
        self._over_share[name] = time.monotonic() + OVER_SHARE_RETRY
        if known:
            return
        if first:
            log.warning(
                "local mail waits in %s: %s; it is stored when room returns (counted in "
                "status as %s)",
                self.dir,
                exc,
                exc.reason,
            )
        self.runtime.reject(exc.reason)

    def _hold(self, name: str, uid: int) -> None:
        if name in self._held:
            return  # counted when it first waited
        self._held[name] = uid
        self._held_by.setdefault(uid, {})[name] = None
        self.runtime.reject("maildrop_over_rate")
        if self._over.happened(uid, "over_rate", time.monotonic()):
            s = self.config.sendmail
            count, period = s.rate or (0, 0.0)
            log.warning(
                "local mail from uid %d (%s) is over sendmail.rate (%d per %g s, burst %d): "
                "its mails wait in %s and are taken as the rate allows; nothing is lost",
                uid,
                _owner_name(uid),
                count,
                period,
                s.burst,
                self.dir,
            )

    def _unhold(self, name: str) -> int | None:
        uid = self._held.pop(name, None)
        if uid is not None:
            mine = self._held_by[uid]
            del mine[name]
            if not mine:
                del self._held_by[uid]
        return uid

    def _caught_up(self, name: str, uid: int) -> None:
        if self._unhold(name) is None or uid in self._held_by:
            return
        waited = self._over.end(uid, "over_rate")
        log.info(
            "local mail from uid %d (%s) caught up with sendmail.rate: %d mail(s) waited",
            uid,
            _owner_name(uid),
            waited,
        )

    def _log_ended(self) -> None:
        for uid, reason, count, length in self._episodes.ended(time.monotonic()):
            if count <= 1:
                continue  # the one was logged when it happened
            log.warning(
                "%d maildrop file(s) from uid %d (%s) were rejected (%s) in %.0f s; the "
                "first was logged, all are in %s",
                count,
                uid,
                _owner_name(uid),
                reason,
                length,
                self.rejected_dir,
            )

    def _log_stored(self, p: Picked) -> None:
        where = [*p.plan.routes, *p.plan.addresses] or ["nowhere: unrouted, see mailgw queue"]
        log.info(
            "local mail %s from uid %d (%d bytes) queued for %s",
            p.alert.id,
            p.message.uid,
            p.alert.fields["size"],
            ", ".join(where),
        )
        for problem in p.problems:
            log.warning("local mail %s: recipient left out: %s", p.alert.id, problem)

    # --- the thread side ----------------------------------------------------------

    def _list(self) -> tuple[list[str], list[tuple[str, int]]]:
        """The names worth reading this round (see the module's docstring), and the
        complete files found over their user's rate (held without being read)."""
        try:
            names = self._listing()
        except FileNotFoundError:
            if not self._missing_logged:
                log.info(
                    "the maildrop %s does not exist: `sendmail` has nowhere to leave mail "
                    "(the mailgw package creates it; see OPERATIONS.md)",
                    self.dir,
                )
                self._missing_logged = True
            return [], []
        self._missing_logged = False
        s = self.config.sendmail
        self._publish(LIMIT_FILE, str(s.max_size).encode())
        self._publish(ALLOW_FILE, "".join(f"{p}\n" for p in s.allow_to).encode())
        mono = time.monotonic()
        out: list[str] = []
        over: list[tuple[str, int]] = []
        # What each user may still send this round: a user's flood of complete files
        # is held here, one lstat each, not read one by one ahead of others' mail.
        budget: dict[int, int] = {}

        def consider(n: str) -> None:
            uid = self._peek(n)
            if uid is None:
                return
            if uid >= 0 and self._rate is not None and n not in self._over_share:
                left = budget.setdefault(uid, self._rate.available(uid, mono))
                if left <= 0:
                    over.append((n, uid))
                    return
                budget[uid] = left - 1
            out.append(n)

        # Held files first (they are older) for users with tokens again: as many as
        # they may send now, so a user's 100,000 held files cost nothing while their
        # bucket is empty.
        for uid, mine in self._held_by.items():
            left = len(mine) if self._rate is None else self._rate.available(uid, mono)
            take = list(itertools.islice(mine, max(0, left)))
            budget[uid] = left - len(take)
            out.extend(take)
        for n in names:  # new names, and retries
            consider(n)
        # Unfinished files whose next look is due, the earliest first, MAX_LOOKS a round.
        looks = 0
        while self._looks and self._looks[0][0] <= mono and looks < MAX_LOOKS:
            due, n = heapq.heappop(self._looks)
            u = self._unfinished.get(n)
            if u is None or u.due != due:
                continue  # gone, or a later look was planned since
            looks += 1
            consider(n)
        return out, over

    def _peek(self, name: str) -> int | None:
        """None for a file still being written (looked at again later) or gone: told
        apart here, in the listing's thread, so a spool full of them costs one lstat
        each and no round trip to the event loop. Else its owner, or -1 for what is
        not a complete regular file (read to be rejected, whoever made it)."""
        try:
            st = os.lstat(self.dir / name)
        except FileNotFoundError:
            self._known.discard(name)
            return None
        if not stat.S_ISREG(st.st_mode):
            return -1
        if st.st_mode & stat.S_IRGRP:
            return st.st_uid
        try:
            self._not_yet(name, st.st_mtime, st.st_uid)
        except Rejected:
            return -1  # stale: _read says so and moves it aside
        return None

    def _listing(self) -> list[str]:
        """The names to look at for the first time (and those to look at again after
        a store failed). The spool is listed again only when the directory changed: a
        name cannot appear without changing its mtime. Within a second of a change,
        and every RELIST seconds, listed anyway (mtimes are coarser than the writes)."""
        st = os.stat(self.dir)
        key = (st.st_ino, st.st_mtime_ns)
        mono, wall = time.monotonic(), time.time()
        again = sorted(self._again)
        self._again.clear()
        if key == self._listed and wall - st.st_mtime > 1.0 and mono - self._listed_at < RELIST:
            return again
        present, new, skipped = self._scan_dir()
        self._listed, self._listed_at = key, mono
        gone = self._known - present
        self._known = present | set(new)
        for n in gone:
            self._unfinished.pop(n, None)
            self._over_share.pop(n, None)
            self._unhold(n)
            self._stuck.discard(n)
        self._too_many_episodes(skipped)
        self._over.keep_only(set(self._held_by))  # a user who removed theirs
        return sorted(set(again) | set(new))

    def _scan_dir(self) -> tuple[set[str], list[str], dict[int, int]]:
        """The tracked names still there, the names to track from now on, and how
        many files of each uid were left untracked (beyond the caps). One entry at a
        time: memory is the tracked names, never the whole listing."""
        present: set[str] = set()
        new: list[str] = []
        skipped: dict[int, int] = {}
        uid_of: dict[str, int] = {}
        per_uid: dict[int, int] = {}
        with os.scandir(self.dir) as entries:
            for e in entries:
                n = e.name
                if n.startswith("."):
                    continue
                uid = self._uid_of.get(n)
                if uid is not None and n in self._known:
                    present.add(n)
                else:
                    try:
                        uid = e.stat(follow_symlinks=False).st_uid
                    except OSError:
                        continue  # gone already
                    if per_uid.get(uid, 0) >= MAX_TRACKED_PER_UID or len(uid_of) >= MAX_TRACKED:
                        skipped[uid] = skipped.get(uid, 0) + 1
                        continue
                    new.append(n)
                uid_of[n] = uid
                per_uid[uid] = per_uid.get(uid, 0) + 1
        # Tracked names kept over the cap by an earlier listing stay tracked: a
        # listing only ever adds what fits.
        self._uid_of = uid_of
        return present, sorted(new), skipped

    def _too_many_episodes(self, skipped: dict[int, int]) -> None:
        """Said and counted once per uid while its files are beyond the caps."""
        for uid, count in skipped.items():
            if uid in self._too_many:
                continue
            self._too_many.add(uid)
            self.runtime.reject("maildrop_too_many")
            log.warning(
                "uid %d (%s) has more files in %s than the pickup keeps track of (%d a "
                "user, %d in all): %d are left for later rounds, looked at as the others "
                "are taken (nothing is lost)",
                uid,
                _owner_name(uid),
                self.dir,
                MAX_TRACKED_PER_UID,
                MAX_TRACKED,
                count,
            )
        for uid in self._too_many - set(skipped):
            self._too_many.discard(uid)
            log.info("the pickup keeps track of every file from uid %d again", uid)

    def _publish(self, name: str, want: bytes) -> None:
        """Tell `sendmail` a limit, so it can refuse early with an exit code."""
        path = self.dir / name
        # Only our own regular file counts (read without blocking or following links);
        # anything else a local user left there is replaced, atomically, below.
        if read_published(str(path), (os.geteuid(),), len(want) + 1) == want:
            return
        try:
            st = os.lstat(path)
            there = (st.st_ino, st.st_mtime_ns) if not stat.S_ISREG(st.st_mode) else None
        except OSError:
            there = None
        if there is not None and self._blocked.get(name) == there:
            return  # the same thing is still in the way: said and counted once
        # A fresh random name, created exclusively: anyone may create files here, and a
        # file someone else made in advance must never become the published limit.
        tmp = self.dir / f"{name}.{os.urandom(8).hex()}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            try:
                os.write(fd, want)
                os.fchmod(fd, 0o644)  # readable by every caller, whatever the umask
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)  # never leave a temp file behind, round after round
            if there is None:
                # The disk (full, read-only) or someone else's regular file in the way
                # (the spool's sticky bit keeps us from replacing it): tried every
                # round, said and counted once while the same failure lasts.
                why = (errno.errorcode.get(exc.errno or 0, str(exc.errno)), exc.strerror)
                if self._publish_failed.get(name) == why:
                    return
                self._publish_failed[name] = why
                self.runtime.reject("maildrop_publish_failed")
                log.warning(
                    "cannot write %s (%s); sendmail uses its defaults (the daemon still "
                    "applies the limits); said once while this lasts",
                    path,
                    exc,
                )
                return
            self._blocked[name] = there
            self.runtime.reject("maildrop_planted")
            log.error(
                "%s is not a file mailgw wrote (%s): sendmail cannot learn the limits "
                "from it and uses its defaults (the daemon still applies them); remove "
                "it (rm -r) and mailgw writes its own",
                path,
                exc.strerror,
            )
            return
        self._blocked.pop(name, None)
        if self._publish_failed.pop(name, None) is not None:
            log.info("wrote %s again: sendmail knows the limits", path)

    def _read(self, name: str) -> Picked | None:
        path = self.dir / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            self._known.discard(name)
            return None
        owner = st.st_uid
        if stat.S_ISLNK(st.st_mode):
            raise Rejected("link", "a symbolic link", owner)
        if not stat.S_ISREG(st.st_mode):
            raise Rejected("not_file", "not a regular file", owner)
        if not st.st_mode & stat.S_IRGRP:  # its writer has not finished (gateway/sendmail.py)
            self._not_yet(name, st.st_mtime, owner)
            return None
        self._unfinished.pop(name, None)
        # A retry for local mail's room took its token the first time: not again.
        retry = name in self._over_share
        if not retry and self._rate is not None and not self._rate.take(owner, time.monotonic()):
            raise _OverRate(owner)
        limit = self.config.sendmail.max_size
        try:
            data, uid = self._read_bounded(path, limit)
        except Rejected as rej:
            rej.uid = owner
            raise
        try:
            drop = parse_drop(data)
        except BadDrop as exc:
            raise Rejected("malformed", str(exc), uid) from None
        if len(drop.message) > limit:
            raise Rejected("too_large", f"{len(drop.message)} bytes, max_size is {limit}", uid)
        head = drop.head
        rcpts = list(drop.recipients)
        if drop.extract:
            try:
                rcpts += header_recipients(head)
            except BadDrop as exc:
                raise Rejected("malformed", str(exc), uid) from None
            rcpts = list(dict.fromkeys(rcpts))
            if len(rcpts) > MAX_RCPTS:
                raise Rejected("malformed", f"{len(rcpts)} recipients (at most {MAX_RCPTS})", uid)
        try:
            # From here on each address is the string it will be delivered to: the
            # allow-list is checked on exactly that, never on the text as written.
            rcpts = clean_recipients(rcpts)
        except BadDrop as exc:
            raise Rejected("bad_address", str(exc), uid) from None
        patterns = self.config.sendmail.allow_to
        outside = [r for r in rcpts if "@" in r and not allowed(r, patterns)]
        if outside:
            raise Rejected(
                "not_allowed",
                f"{outside[0]!r} is outside sendmail.allow_to"
                + (f" (and {len(outside) - 1} more)" if len(outside) > 1 else ""),
                uid,
            )
        where, problems = plan(
            self._through_etc_aliases(rcpts),
            self.config.sendmail,
            self.config.gateway.default_route,
        )
        return Picked(
            self._alert(drop.user, uid, subject(head), drop.fullname, len(drop.message)),
            raw.RawMessage(name, uid, drop.sender, tuple(rcpts), drop.message),
            where,
            tuple(problems),
        )

    def _not_yet(self, name: str, mtime: float, uid: int) -> None:
        mono, wall = time.monotonic(), time.time()
        u = self._unfinished.get(name)
        if u is None:
            u = self._unfinished[name] = _Unfinished(min(wall, mtime), mono, LOOK_FIRST)
        if wall - u.first > STALE:
            raise Rejected("incomplete", f"still unfinished after {STALE:.0f} s", uid)
        u.due = mono + u.wait
        u.wait = min(LOOK_MAX, u.wait * 2)
        heapq.heappush(self._looks, (u.due, name))

    def _through_etc_aliases(self, rcpts: list[str]) -> list[str]:
        """Local names through /etc/aliases, unless [sendmail.aliases] names them
        exactly (which wins; the order is in gateway/etc_aliases.py)."""
        local = [r for r in rcpts if "@" not in r]
        if not local:
            return rcpts
        etc = self._etc_aliases()
        if not etc.table:
            return rcpts
        own = dict(self.config.sendmail.aliases)
        out: list[str] = []
        for r in rcpts or ["root"]:
            name = r.strip().strip("<>").lower()
            if "@" in r or name in own:
                out.append(r)
                continue
            addresses, names = etc.expand(name)
            out.extend(addresses)
            out.extend(names)
        return list(dict.fromkeys(out))

    def _etc_aliases(self) -> EtcAliases:
        path = self.config.sendmail.aliases_file
        if path is None:
            return EtcAliases()
        try:
            st = os.stat(path)
        except OSError:
            return EtcAliases()  # no /etc/aliases: [sendmail.aliases] alone
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._etc is not None and self._etc[0] == key:
            return self._etc[1]
        try:
            text = _read_aliases(str(path)).decode("utf-8", "replace")
        except OSError as exc:
            log.warning("cannot read %s (%s); local names go by [sendmail.aliases]", path, exc)
            text = ""
        etc = parse_etc_aliases(text)
        for why in etc.skipped:
            log.warning("%s: %s; left out", path, why)
        log.info("read %d alias(es) from %s for local mail", len(etc.table), path)
        self._etc = (key, etc)
        return etc

    def _read_bounded(self, path: Path, limit: int) -> tuple[bytearray, int]:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise Rejected("link", "a symbolic link") from None
            raise Rejected("unreadable", f"cannot be read: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise Rejected("not_file", "not a regular file")
            if st.st_nlink != 1:
                # A hard link to someone else's file would be taken for their mail.
                raise Rejected("link", f"a file with {st.st_nlink} links")
            cap = limit + 256 * 1024  # the message and its envelope
            if st.st_size > cap:
                raise Rejected("too_large", f"{st.st_size} bytes, max_size is {limit}")
            # Read once, into one buffer of the file's size: the message is in the daemon
            # once from here to the outbox (parse_drop and raw.store take views of it).
            # One byte more than the size, so that a file that grew since is noticed.
            buf = bytearray(st.st_size + 1)
            size = 0
            while True:
                if size == len(buf):
                    if size > cap:
                        raise Rejected("too_large", f"over {cap} bytes, max_size is {limit}")
                    buf.extend(bytes(min(max(size, 1 << 16), cap + 1 - size)))
                got = _read_into(fd, buf, size)
                if not got:
                    break
                size += got
            if size > cap:
                raise Rejected("too_large", f"over {cap} bytes, max_size is {limit}")
            del buf[size:]
            return buf, st.st_uid
        finally:
            os.close(fd)

    def _alert(self, user: str, uid: int, subj: str, fullname: str, size: int) -> Alert:
        # The sensor is the file's owner, which the kernel set: the U line is whatever
        # the client wrote (LOGNAME) and is kept only as an informational field.
        who = clean_sensor(_owner_name(uid)) or "unknown"
        fields: dict[str, str | int] = {"uid": uid, "size": size}
        if user:
            fields["claimed_user"] = user[:64]
        if fullname:
            fields["fullname"] = fullname[:200]
        return Alert(
            id=new_alert_id(),
            topic=f"sendmail/{who}",
            source="sendmail",
            sensor=who,
            severity=Severity.INFO,
            message=subj or "(no subject)",
            received=Stamp.now(),
            fields=fields,
        )

    def _unlink(self, name: str) -> None:
        # Forgotten: the same name made again later is a new file (listed as new).
        self._forget(name)
        try:
            os.unlink(self.dir / name)
        except FileNotFoundError:
            pass
        except OSError as exc:
            # Stored already (a later pickup would only find it in raw_message again):
            # said once, not every round.
            self._stuck.add(name)
            log.error(
                "stored local mail %s but cannot remove it from %s: %s; remove it by hand",
                name,
                self.dir,
                exc,
            )

    def _forget(self, name: str) -> None:
        """Nothing more to track for a file that is gone from the spool."""
        self._known.discard(name)
        self._unfinished.pop(name, None)
        self._over_share.pop(name, None)
        self._unhold(name)

    def _uid(self, name: str) -> int:
        try:
            return os.lstat(self.dir / name).st_uid
        except OSError:
            return -1

    def _reject(self, name: str, rej: Rejected) -> None:
        self.runtime.reject(f"maildrop_{rej.kind}")
        self._forget(name)
        tell = self._episodes.happened(rej.uid, rej.kind, time.monotonic())
        try:
            self.rejected_dir.mkdir(mode=0o700, exist_ok=True)
            dest = self.rejected_dir / f"{time.strftime('%Y%m%dT%H%M%S')}-{name}"
            os.rename(self.dir / name, dest)
        except OSError as exc:
            log.error(
                "maildrop file %s rejected (%s) and cannot be moved aside (%s); remove it",
                name,
                rej,
                exc,
            )
            self._stuck.add(name)
            return
        if tell:  # the first of an episode; its count when it ends (_log_ended)
            log.error(
                "maildrop file %s from uid %d (%s) rejected: %s; moved to %s (nothing "
                "was queued from it)",
                name,
                rej.uid,
                _owner_name(rej.uid),
                rej,
                dest,
            )


def _its_own_fault(exc: BaseException) -> bool:
    """Whether a failed store was the message's doing (a value the database cannot
    hold) rather than the disk's or the database's (locked, I/O error, full)."""
    if isinstance(exc, Unstorable):
        return True
    if not isinstance(exc, StoreUnavailable):
        return False
    cause = exc.__cause__
    if isinstance(cause, sqlite3.OperationalError | sqlite3.DatabaseError | OSError):
        return isinstance(cause, sqlite3.DataError)
    return isinstance(cause, ValueError | TypeError | OverflowError | sqlite3.InterfaceError)


def _read_aliases(path: str) -> bytes:
    """At most MAX_FILE bytes of a regular file; never blocks (a FIFO or a device named
    by aliases_file would stop local mail's pickup for good)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        chunks: list[bytes] = []
        size = 0
        while size < MAX_FILE and (chunk := os.read(fd, MAX_FILE - size)):
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
