"""Messages that `sendmail` submitted, stored whole (the `raw_message` table).

A sendmail message is not an alert to compose: it already is a mail, and its body and
attachments must reach the inbox byte for byte. So it is kept as the bytes that came
in, next to an ordinary alert row (which gives it an id, a place in the queue, expiry
and `mailgw queue` listings), and its deliveries have kind `raw`: the relay sends the
stored bytes after rewriting a few headers (gateway/sendmail_compose.py).

Deliveries: one per route an alias named (rcpts NULL: the route's recipients), and one
on the pseudo-route `@sendmail` (no configured route can be named so) whose rcpts are
the message's own addresses. Storm control does not apply: these are not alerts.

A message of max_size (10 MiB) is in the daemon once at a time: it is stored from the
caller's buffer in pieces into a zeroblob (an INSERT that binds it would copy it
twice: SQLite's own copy of the value and the record it builds), and read back in
pieces into the one buffer the relay sends from.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from gateway.alert import Alert
from gateway.errors import LocalRoomFull, OutboxFull
from gateway.outbox.faults import store_error
from gateway.outbox.held import local_held
from gateway.outbox.room import LOCAL_SHARE_FULL, local_refusal
from gateway.outbox.rows import _alert_row, shard_table
from gateway.outbox.store import Outbox, _BatchRows

ADDRESSES_ROUTE = "@sendmail"
PIECE = 1 << 16  # bytes of a message written to or read from its blob at a time


@dataclass(frozen=True, slots=True)
class RawMessage:
    drop_name: str  # the maildrop file it came from
    uid: int  # its owner, as the kernel says
    sender: str  # -f, as given (informational: the relay sends as smtp.from)
    rcpts: tuple[str, ...]  # every envelope recipient, as given or taken from headers
    # The message's bytes: the pickup's view of the file it read; what `load` read
    # (a buffer the relay rewrites the header of, in place).
    data: bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class RawPlan:
    """Where a message goes: routes (their own recipients) and/or addresses."""

    routes: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()
    priority: int = 5


def store(ob: Outbox, alert: Alert, raw: RawMessage, plan: RawPlan) -> bool:
    """Store the message and its deliveries in one FULL transaction (writer thread).

    False if this maildrop file was stored before (a pickup that crashed between the
    commit and the unlink): nothing is added. A file whose name was stored before with
    other content (a writer that reuses a fixed name) is a different mail: it is stored
    under reused_name(), which a later pickup of the same file finds again. Raises
    LocalRoomFull when local mail, or this uid's, holds its whole share of the outbox
    (gateway/outbox/room.py: alerts keep the rest), OutboxFull at the bound, or what
    store_error makes of a failing disk; then nothing is stored.
    """
    n = max(len(plan.routes) + (1 if plan.addresses else 0), 1)
    now = time.time()
    created: set[str] = set()
    try:
        with ob.transaction() as c:
            if _stored(c, raw):
                return False
            if _stored(c, raw, by_name_only=True):
                raw = replace(raw, drop_name=reused_name(raw))
                if _stored(c, raw, by_name_only=True):
                    return False
            # After the look-up: a file stored before is recognised even when its
            # user's share is full now, so it can leave the maildrop.
            _check_share(ob, c, raw.uid, n)
            ob._check_bound(n)
            row = c.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
            seq = int(row[0]) if row else 1
            rows = _BatchRows(next_seq=seq + 1)
            rows.alerts[shard_table(seq)] = [(seq, *_alert_row(alert))]
            created = ob._write(c, rows)
            deliveries: list[tuple[object, ...]] = [
                (seq, rt, "queued", plan.priority, now, None) for rt in plan.routes
            ]
            if plan.addresses:
                deliveries.append(
                    (seq, ADDRESSES_ROUTE, "queued", plan.priority, now, "\n".join(plan.addresses))
                )
            if not deliveries:
                deliveries.append((seq, "", "unrouted", plan.priority, now, None))
            c.executemany(
                "INSERT INTO delivery (alert_seq, route, state, priority, updated_at, rcpts, kind)"
                " VALUES (?, ?, ?, ?, ?, ?, 'raw')",
                deliveries,
            )
            c.execute(
                "INSERT INTO raw_message (alert_seq, drop_name, uid, sender, rcpts, data)"
                " VALUES (?, ?, ?, ?, ?, zeroblob(?))",
                (seq, raw.drop_name, raw.uid, raw.sender, "\n".join(raw.rcpts), len(raw.data)),
            )
            _write_blob(c, seq, raw.data)
    except OutboxFull:
        raise
    except BaseException as exc:
        err = store_error(exc, ob.path)
        if err is exc:
            raise
        raise err from exc
    ob._shards |= created
    ob.live += len(deliveries)
    return True


def _check_share(ob: Outbox, c: sqlite3.Connection, uid: int, adding: int) -> None:
    """Refuse local mail over its share. Counted in the transaction each time: local
    mail is rare and its rows few, and `mailgw queue delete` may have made room."""
    local, mine = local_held(c, uid)
    why = local_refusal(ob.room, local, mine, adding)
    if why is None:
        return
    room = ob.room
    if why == LOCAL_SHARE_FULL:
        text = (
            f"local mail holds {local} of the {room.local_limit} messages it may "
            f"(outbox.local_percent = {room.local_percent}% of max_messages); the rest is "
            "kept for alerts"
        )
    else:
        text = (
            f"uid {uid} holds {mine} of the {room.user_limit} local messages one user may "
            f"(outbox.local_user_percent = {room.local_user_percent}% of local mail's share)"
        )
    raise LocalRoomFull(why, text)


def reused_name(raw: RawMessage) -> str:
    """The name a reused maildrop name is stored under: derived from the content, so
    that the same file picked up again (after a crash before its unlink) is known."""
    digest = hashlib.sha256(b"%d\n" % raw.uid)
    digest.update(raw.data)
    return f"{raw.drop_name}~{digest.hexdigest()[:32]}"


def _stored(c: sqlite3.Connection, raw: RawMessage, *, by_name_only: bool = False) -> bool:
    row = c.execute(
        "SELECT alert_seq, uid, length(data) FROM raw_message WHERE drop_name = ?",
        (raw.drop_name,),
    ).fetchone()
    if row is None:
        return False
    if by_name_only:
        return True
    seq, uid, size = row
    return int(uid) == raw.uid and int(size) == len(raw.data) and _same_blob(c, seq, raw.data)


def _write_blob(c: sqlite3.Connection, seq: int, data: bytes | bytearray | memoryview) -> None:
    with memoryview(data) as view, c.blobopen("raw_message", "data", seq) as blob:
        for i in range(0, len(view), PIECE):
            blob.write(view[i : i + PIECE])


def _same_blob(c: sqlite3.Connection, seq: int, data: bytes | bytearray | memoryview) -> bool:
    """Whether the stored message is `data`, compared a piece at a time."""
    with memoryview(data) as view, c.blobopen("raw_message", "data", seq, readonly=True) as blob:
        for i in range(0, len(view), PIECE):
            if blob.read(PIECE) != view[i : i + PIECE]:
                return False
    return True


def load(c: sqlite3.Connection, seq: int) -> RawMessage | None:
    """The stored message, its bytes read in pieces into one buffer of their size (a
    SELECT of the column would hold SQLite's copy and Python's at once)."""
    row = c.execute(
        "SELECT drop_name, uid, sender, rcpts, length(data) FROM raw_message WHERE alert_seq = ?",
        (seq,),
    ).fetchone()
    if row is None:
        return None
    name, uid, sender, rcpts, size = row
    data = bytearray(int(size))
    with c.blobopen("raw_message", "data", seq, readonly=True) as blob:
        for i in range(0, len(data), PIECE):
            data[i : i + PIECE] = blob.read(PIECE)
    return RawMessage(name, int(uid), sender, tuple(rcpts.split("\n")) if rcpts else (), data)


def waiting(c: sqlite3.Connection) -> Sequence[tuple[str, str, int, str, str, str]]:
    """Undelivered sendmail messages for `sendmail -bp`: (alert id, state, size, sender,
    route, last error), oldest first."""
    rows = c.execute(
        "SELECT r.alert_seq, d.state, length(r.data), r.sender, d.route,"
        " coalesce(d.last_error, '') FROM raw_message r JOIN delivery d"
        " ON d.alert_seq = r.alert_seq WHERE d.state != 'sent' ORDER BY r.alert_seq"
    ).fetchall()
    return [(str(seq), st, int(size), snd, rt, err) for seq, st, size, snd, rt, err in rows]
