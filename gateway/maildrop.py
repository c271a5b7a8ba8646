"""The daemon's pickup of local mail: maildrop files → the outbox (one per message).

`sendmail` (gateway/sendmail.py) leaves each message as a file in the maildrop, a
directory anyone may write to and only mailgw may list (mode 3733). This component
looks there every POLL seconds (a listdir of a nearly always empty directory: a few
microseconds), and for each complete file: reads it as untrusted input, stores the
message with its envelope in one FULL transaction, then unlinks it. A crash between
the commit and the unlink is harmless: the outbox remembers the file's random name
(raw_message.drop_name) and the next pickup only unlinks it.

Who sent it is the file's owner, which the kernel sets and no caller can forge (under
the unit's PrivateUsers=, users other than root and mailgw show as the overflow uid).

A file that can never become a mail (not a regular file, a link, too large, not our
format, never completed within STALE) is moved to `rejected/` next to the maildrop
with a log line and a counted rejection (status: maildrop_<why>); nothing is deleted,
and one bad file never stops the pickup of the others. A store that fails (outbox
full, disk trouble) leaves the file where it is for the next round: nothing is lost.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import pwd
import stat
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from gateway.alert import Alert, Severity, clean_sensor, new_alert_id
from gateway.clock import Stamp
from gateway.config import Config
from gateway.errors import GatewayError, LocalRoomFull
from gateway.maildrop_parse import (
    BadDrop,
    header_recipients,
    parse_drop,
    plan,
    split_message,
    subject,
)
from gateway.outbox import Outbox, raw
from gateway.outbox.writer import Writer
from gateway.runtime import Runtime
from gateway.sendmail_drop import MAX_RCPTS, read_limit

log = logging.getLogger(__name__)

POLL = 0.5
STALE = 3600.0  # a file still unfinished after this long was abandoned by its writer
LIMIT_FILE = ".max_size"
OVER_SHARE_RETRY = 5.0  # a file refused for lack of local mail's room is tried this often


def _owner_name(uid: int) -> str:
    """The user name of a uid, or the number. Under the unit's PrivateUsers= every
    user but root and mailgw reads as the overflow uid 65534, usually "nobody"."""
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return str(uid)


class Rejected(Exception):
    def __init__(self, kind: str, why: str) -> None:
        super().__init__(why)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class Picked:
    alert: Alert
    message: raw.RawMessage
    plan: raw.RawPlan
    problems: tuple[str, ...]


def _store(p: Picked, ob: Outbox) -> bool:
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
        self._stuck: set[str] = set()  # rejected, yet could not be moved aside: said once
        # Left for lack of local mail's room → when to try it again: counted once, and
        # retried now and then rather than every round (each try is a read and a write
        # transaction, which a flood of waiting files must not take from alerts).
        self._over_share: dict[str, float] = {}

    def reload(self, config: Config) -> None:
        self.config = config

    def close(self) -> None:
        pass

    async def run(self) -> None:
        while True:
            try:
                await self.scan()
            except OSError as exc:  # the directory itself: say so, keep trying
                log.error("cannot read the maildrop %s: %s; retrying", self.dir, exc)
            await asyncio.sleep(POLL)

    async def scan(self) -> int:
        """One round: every complete file stored or rejected; how many were stored."""
        names = await asyncio.to_thread(self._list)
        present = set(names)
        self._over_share = {n: t for n, t in self._over_share.items() if n in present}
        stored = 0
        for name in names:
            if name in self._stuck or self._over_share.get(name, 0.0) > time.monotonic():
                continue
            try:
                picked = await asyncio.to_thread(self._read, name)
            except Rejected as rej:
                await asyncio.to_thread(self._reject, name, rej)
                continue
            if picked is None:
                continue
            try:
                added = await self.writer.run(partial(_store, picked))
            except LocalRoomFull as exc:
                self._refused(name, exc)
                continue  # another user's file may still fit
            except (GatewayError, OSError) as exc:
                if not self._store_failing:
                    log.error(
                        "cannot store local mail from the maildrop yet (%s); it stays in %s "
                        "and is retried",
                        exc,
                        self.dir,
                    )
                self._store_failing = True
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
        return stored

    def _refused(self, name: str, exc: LocalRoomFull) -> None:
        """Local mail over its share stays in the maildrop until room returns: counted
        once per file, said once while any wait, not on every round that retries."""
        known = name in self._over_share
        self._over_share[name] = time.monotonic() + OVER_SHARE_RETRY
        if known:
            return
        if len(self._over_share) == 1:
            log.warning(
                "local mail waits in %s: %s; it is stored when room returns (counted in "
                "status as %s)",
                self.dir,
                exc,
                exc.reason,
            )
        self.runtime.reject(exc.reason)

    def _log_stored(self, p: Picked) -> None:
        where = [*p.plan.routes, *p.plan.addresses] or ["nowhere: unrouted, see mailgw queue"]
        log.info(
            "local mail %s from uid %d (%d bytes) queued for %s",
            p.alert.id,
            p.message.uid,
            len(p.message.data),
            ", ".join(where),
        )
        for problem in p.problems:
            log.warning("local mail %s: recipient left out: %s", p.alert.id, problem)

    # --- the thread side ----------------------------------------------------------

    def _list(self) -> list[str]:
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            if not self._missing_logged:
                log.info(
                    "the maildrop %s does not exist: `sendmail` has nowhere to leave mail "
                    "(the mailgw package creates it; see OPERATIONS.md)",
                    self.dir,
                )
                self._missing_logged = True
            return []
        self._missing_logged = False
        self._publish_limit()
        return sorted(n for n in names if not n.startswith("."))

    def _publish_limit(self) -> None:
        """Tell `sendmail` the size limit, so it can refuse with an exit code."""
        path = self.dir / LIMIT_FILE
        want = str(self.config.sendmail.max_size).encode()
        # Only our own regular file counts (read without blocking or following links);
        # anything else a local user left there is replaced, atomically, below.
        if read_limit(str(path), (os.geteuid(),)) == self.config.sendmail.max_size:
            return
        # A fresh random name, created exclusively: anyone may create files here, and a
        # file someone else made in advance must never become the published limit.
        tmp = self.dir / f"{LIMIT_FILE}.{os.urandom(8).hex()}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            try:
                os.write(fd, want)
                os.fchmod(fd, 0o644)  # readable by every caller, whatever the umask
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot write %s (%s); sendmail uses its default limit", path, exc)

    def _read(self, name: str) -> Picked | None:
        path = self.dir / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(st.st_mode):
            raise Rejected("link", "a symbolic link")
        if not stat.S_ISREG(st.st_mode):
            raise Rejected("not_file", "not a regular file")
        if not st.st_mode & stat.S_IRGRP:  # its writer has not finished (gateway/sendmail.py)
            if time.time() - st.st_mtime > STALE:
                raise Rejected("incomplete", f"still unfinished after {STALE:.0f} s")
            return None
        limit = self.config.sendmail.max_size
        data, uid = self._read_bounded(path, limit)
        try:
            drop = parse_drop(data)
        except BadDrop as exc:
            raise Rejected("malformed", str(exc)) from None
        if len(drop.message) > limit:
            raise Rejected("too_large", f"{len(drop.message)} bytes, max_size is {limit}")
        head, _ = split_message(drop.message)
        rcpts = list(drop.recipients)
        if drop.extract:
            try:
                rcpts += header_recipients(head)
            except BadDrop as exc:
                raise Rejected("malformed", str(exc)) from None
            rcpts = list(dict.fromkeys(rcpts))
            if len(rcpts) > MAX_RCPTS:
                raise Rejected("malformed", f"{len(rcpts)} recipients (at most {MAX_RCPTS})")
        where, problems = plan(rcpts, self.config.sendmail, self.config.gateway.default_route)
        return Picked(
            self._alert(drop.user, uid, subject(head), drop.fullname, len(drop.message)),
            raw.RawMessage(name, uid, drop.sender, tuple(rcpts), drop.message),
            where,
            tuple(problems),
        )

    def _read_bounded(self, path: Path, limit: int) -> tuple[bytes, int]:
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
            chunks: list[bytes] = []
            size = 0
            while chunk := os.read(fd, min(1 << 20, cap + 1 - size)):
                chunks.append(chunk)
                size += len(chunk)
                if size > cap:
                    raise Rejected("too_large", f"over {cap} bytes, max_size is {limit}")
            return b"".join(chunks), st.st_uid
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

    def _reject(self, name: str, rej: Rejected) -> None:
        self.runtime.reject(f"maildrop_{rej.kind}")
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
        log.error(
            "maildrop file %s rejected: %s; moved to %s (nothing was queued from it)",
            name,
            rej,
            dest,
        )
