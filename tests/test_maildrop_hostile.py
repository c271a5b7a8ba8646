"""Local mail against files and headers made to break the pickup, in process: a
Subject no decoder reads, an exception from one file, a store that fails for one
message's values, recipients that read as one address to a glob and another to a
parser, /etc/aliases diamonds, waits for room, published limits that cannot be
written. (The same, end to end with the daemon: tests/test_sendmail_local.py.)"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway import maildrop
from gateway.config import parse
from gateway.config.sendmail import SendmailSection
from gateway.errors import LocalRoomFull, StoreUnavailable
from gateway.etc_aliases import parse as parse_aliases
from gateway.maildrop import Maildrop
from gateway.maildrop_parse import BadDrop, clean_recipients, plan, subject
from gateway.runtime import Runtime
from gateway.sendmail_drop import allowed

ROUTE = '[[route]]\nname = "ops"\nmatch = "#"\nto = ["ops@example.com"]\n'
EXAMPLE = ("*@example.com",)
# What a fuzz of the client and the daemon found: a glob over the raw text sees
# @example.com, a parser reads evil@attacker.com.
SNEAKY = [
    "evil@attacker.com <@example.com>",
    "evil@attacker.com(@example.com",
    ':"evil@attacker.com(\\@example.com',
    '"x" <evil@attacker.com> @example.com',
    "evil@attacker.com,a@example.com",
    "evil@attacker.com (x@example.com)",
]


def _file(drop: Path, name: str, body: bytes, rcpt: str = "root") -> None:
    path = drop / name
    path.write_bytes(b"MAILGW-DROP 1\nU u\nF \nN \nR " + rcpt.encode() + b"\n\n" + body)
    path.chmod(0o640)


def _pickup(drop: Path, writer: Any = None, extra: str = "") -> tuple[Maildrop, Runtime]:
    cfg = parse(
        ROUTE + f'[sendmail]\nmaildrop = "{drop}"\n{extra}[sendmail.aliases]\n"*" = "ops"\n'
    )
    runtime = Runtime()
    return Maildrop(cfg, writer, runtime), runtime


@pytest.fixture
def drop(tmp_path: Path) -> Path:
    d = tmp_path / "maildrop"
    d.mkdir()
    return d


class FakeWriter:
    """Stores without an outbox; `refuse` decides, per picked mail, what is raised."""

    def __init__(self, refuse: Callable[[maildrop.Picked], BaseException | None]) -> None:
        self.refuse = refuse
        self.stored: list[str] = []

    async def run(self, fn: Any) -> bool:
        picked: maildrop.Picked = fn.args[0][-1]  # _store's box: [the picked mail]
        exc = self.refuse(picked)
        if exc is not None:
            raise exc
        self.stored.append(picked.alert.message)
        return True


# --- a Subject no decoder reads ------------------------------------------------------------


@given(st.binary(max_size=300))
@example(b"=?utf-8?b?x?=")
@example(b"=?unicode-escape?q?=5Cud800?=")
@example(b"=?raw-unicode-escape?q?=5Cud800?=")
@example(b"=?hex?q?41?=")
@example(b"a =?utf-8?q?=C3=A9?= \\ud800 b")
@settings(max_examples=300)
def test_a_subject_never_raises_and_is_always_storable_text(value: bytes) -> None:
    text = subject(b"Subject: " + value + b"\n")
    text.encode("utf-8")  # no lone surrogate: a UTF-8 column can hold it
    assert all(c >= " " for c in text) and len(text) <= 200


def test_a_subject_in_a_codec_that_is_not_text_is_shown_as_written() -> None:
    assert subject(b"Subject: =?utf-8?b?x?=\n") == "=?utf-8?b?x?="
    assert subject(b"Subject: =?unicode-escape?q?=5Cud800?=\n") == "=?unicode-escape?q?=5Cud800?="
    assert subject(b"Subject: caf\xc3\xa9 =?utf-8?q?=C3=A9t=C3=A9?=\n") == "café été"


# --- one file's exception, one message's unstorable values --------------------------------


def test_an_exception_from_reading_one_file_rejects_that_file_and_counts_it(
    drop: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = FakeWriter(lambda p: None)
    m, runtime = _pickup(drop, writer)
    _file(drop, "0" * 32, b"Subject: bomb\n\nx\n")
    _file(drop, "f" * 32, b"Subject: fine\n\nx\n")
    real = Maildrop._read

    def read(self: Maildrop, name: str) -> maildrop.Picked | None:
        if name == "0" * 32:
            raise RuntimeError("a parser bug")
        return real(self, name)

    monkeypatch.setattr(Maildrop, "_read", read)
    assert asyncio.run(m.scan()) == 1
    assert writer.stored == ["fine"]
    assert runtime.rejected["maildrop_malformed"] == 1
    assert [p.name.endswith("0" * 32) for p in (drop.parent / "rejected").iterdir()] == [True]


def test_the_pickup_task_outlives_any_exception_and_says_it_once(
    drop: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    m, _ = _pickup(drop)
    calls = 0

    async def scan() -> int:
        nonlocal calls
        calls += 1
        raise RuntimeError("unexpected")

    monkeypatch.setattr(m, "scan", scan)
    monkeypatch.setattr(maildrop, "POLL", 0.01)

    async def main() -> None:
        task = asyncio.create_task(m.run())
        deadline = asyncio.get_running_loop().time() + 10
        while calls < 5:
            assert asyncio.get_running_loop().time() < deadline
            assert not task.done(), task.exception()
            await asyncio.sleep(0.01)
        task.cancel()

    with caplog.at_level(logging.ERROR, "gateway.maildrop"):
        asyncio.run(main())
    assert caplog.text.count("the maildrop pickup failed") == 1


def test_a_message_whose_values_cannot_be_stored_is_rejected_and_the_others_go(
    drop: Path,
) -> None:
    def refuse(p: maildrop.Picked) -> BaseException | None:
        if p.alert.message != "poison":
            return None
        cause = UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")
        err = StoreUnavailable(f"cannot write the outbox: {cause}")
        err.__cause__ = cause
        return err

    writer = FakeWriter(refuse)
    m, runtime = _pickup(drop, writer)
    _file(drop, "0" * 32, b"Subject: poison\n\nx\n")  # sorts first
    for i in range(3):
        _file(drop, f"{i + 1}" * 32, b"Subject: cron %d\n\nx\n" % i)
    assert asyncio.run(m.scan()) == 3
    assert writer.stored == ["cron 0", "cron 1", "cron 2"]
    assert runtime.rejected["maildrop_unstorable"] == 1
    assert [p.name[-32:] for p in (drop.parent / "rejected").iterdir()] == ["0" * 32]


def test_a_failing_disk_still_stops_the_round_and_loses_nothing(drop: Path) -> None:
    failing = StoreUnavailable("cannot write the outbox: disk I/O error")
    failing.__cause__ = OSError(errno.EIO, "I/O error")
    m, runtime = _pickup(drop, FakeWriter(lambda p: failing))
    _file(drop, "a" * 32, b"Subject: a\n\nx\n")
    _file(drop, "b" * 32, b"Subject: b\n\nx\n")
    assert asyncio.run(m.scan()) == 0
    assert sorted(n for n in os.listdir(drop) if n[0] != ".") == ["a" * 32, "b" * 32]
    assert not runtime.rejected


# --- recipients: what is checked is what is delivered -------------------------------------


@given(st.one_of(st.sampled_from(SNEAKY), st.text(max_size=60), st.from_regex(r"[ -~]{0,40}")))
@example("evil@attacker.com <@example.com>")
@example("<ok@example.com>")
@settings(max_examples=1000)
def test_the_address_that_reaches_the_envelope_always_matches_allow_to(rcpt: str) -> None:
    try:
        clean = clean_recipients([rcpt])
    except BadDrop:
        return  # refused: nothing is delivered
    if any("@" in r and not allowed(r, EXAMPLE) for r in clean):
        return  # refused as outside allow_to (gateway/maildrop.py)
    where, _ = plan(clean, SendmailSection())
    assert all(allowed(a, EXAMPLE) and a.endswith("@example.com") for a in where.addresses)


def test_an_address_with_a_name_comment_or_route_around_it_is_refused_by_both_sides() -> None:
    for rcpt in SNEAKY:
        assert not allowed(rcpt, EXAMPLE), rcpt  # the client: exit 77
        with pytest.raises(BadDrop):
            clean_recipients([rcpt])  # the daemon: rejected, counted
    assert clean_recipients(["<ops@example.com>", "ops@example.com", "root"]) == [
        "ops@example.com",
        "root",
    ]


# --- /etc/aliases --------------------------------------------------------------------------


def test_an_aliases_diamond_goes_once_to_where_it_ends_and_a_loop_ends_on_its_name() -> None:
    etc = parse_aliases(
        "ops: alice, bob\nalice: root\nbob: root\nroot: admin@example.com\n"
        "a: b\nb: c\nc: a, c@example.com\n"
    )
    assert etc.expand("ops") == (["admin@example.com"], [])
    assert etc.expand("a") == (["c@example.com"], ["a"])


def test_a_fifo_as_aliases_file_does_not_block_the_pickup(drop: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "aliases"
    os.mkfifo(fifo)
    m, _ = _pickup(drop, FakeWriter(lambda p: None), extra=f'aliases_file = "{fifo}"\n')
    _file(drop, "a" * 32, b"Subject: a\n\nx\n", rcpt="backup")

    async def main() -> int:
        return await asyncio.wait_for(m.scan(), 10)

    assert asyncio.run(main()) == 1


# --- waiting for room ----------------------------------------------------------------------


def test_every_wait_for_room_is_said_once_and_a_retry_takes_no_rate_token(
    drop: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    full = [True]
    room = LocalRoomFull("local_share_full", "local mail holds its share")
    writer = FakeWriter(lambda p: room if full[0] else None)
    m, runtime = _pickup(drop, writer, extra='rate = "1/h"\nburst = 1\n')
    monkeypatch.setattr(maildrop, "OVER_SHARE_RETRY", 0.0)
    with caplog.at_level(logging.WARNING, "gateway.maildrop"):
        for episode in range(2):
            full[0] = True
            _file(drop, f"{episode}" * 32, b"Subject: e%d\n\nx\n" % episode, rcpt="root")
            # each episode's file is another user's: the rate is per uid
            os.chown(drop / (f"{episode}" * 32), 1000 + episode, -1)
            assert asyncio.run(m.scan()) == 0
            assert asyncio.run(m.scan()) == 0  # a retry: neither said nor counted again
            full[0] = False
            assert asyncio.run(m.scan()) == 1  # the retry used the token it took at first
    assert writer.stored == ["e0", "e1"]
    assert caplog.text.count("local mail waits in") == 2
    assert runtime.rejected["local_share_full"] == 2
    assert runtime.rejected["maildrop_over_rate"] == 0


# --- the published limits ------------------------------------------------------------------


def test_published_files_that_cannot_be_written_are_said_and_counted_once(
    drop: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    m, runtime = _pickup(drop, extra='allow_to = ["*@example.com"]\n')

    def replace(src: Any, dst: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(maildrop.os, "replace", replace)
    with caplog.at_level(logging.WARNING, "gateway.maildrop"):
        for _ in range(5):
            asyncio.run(m.scan())
            m._listed = None  # listed again, as after a change
    assert caplog.text.count("cannot write") == 2  # .max_size and .allow_to, once each
    assert runtime.rejected["maildrop_publish_failed"] == 2
    assert [n for n in os.listdir(drop) if n.startswith(".")] == []  # no temp litter
    monkeypatch.undo()
    asyncio.run(m.scan())
    assert (drop / ".max_size").exists() and (drop / ".allow_to").exists()


# --- a spool filled with files -------------------------------------------------------------


def test_files_beyond_the_caps_are_not_tracked_said_once_and_others_mail_goes(
    drop: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(maildrop, "MAX_TRACKED_PER_UID", 10)
    monkeypatch.setattr(maildrop, "MAX_TRACKED", 50)
    writer = FakeWriter(lambda p: None)
    m, runtime = _pickup(drop, writer)
    for i in range(300):  # one user's empty, unfinished files
        fd = os.open(drop / f"{i:032x}", os.O_WRONLY | os.O_CREAT, 0o600)
        os.fchown(fd, 65534, 65534)
        os.close(fd)
    _file(drop, "f" * 32, b"Subject: others\n\nx\n")
    os.chown(drop / ("f" * 32), 1, -1)
    with caplog.at_level(logging.WARNING, "gateway.maildrop"):
        for _ in range(5):
            asyncio.run(m.scan())
            m._listed = None  # listed again each round
    assert writer.stored == ["others"]
    assert len(m._known) <= 10 and len(m._unfinished) <= 10 and len(m._uid_of) <= 10
    assert runtime.rejected["maildrop_too_many"] == 1
    assert caplog.text.count("more files in") == 1
    assert len(os.listdir(drop)) >= 300  # nothing lost
