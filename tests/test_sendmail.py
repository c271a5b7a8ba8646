"""`sendmail` without a daemon: the command line (sans-IO, property-tested), the spool
file's format both ways, the header rewrite, routing through aliases, [sendmail]
refusals, and the raw message's storage in the outbox."""

from __future__ import annotations

import contextlib
import io
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import ConfigError, parse
from gateway.config.sendmail import Alias, SendmailSection
from gateway.maildrop_parse import (
    BadDrop,
    header_recipients,
    parse_drop,
    plan,
    split_message,
    subject,
)
from gateway.outbox import Outbox, Routed, raw
from gateway.sendmail import cut_at_dot, deliver, main, parse_args, read_message
from gateway.sendmail_compose import rewrite
from gateway.sendmail_drop import envelope
from gateway.sendmail_smtp import serve
from tests.parts import alert

# --- the command line ----------------------------------------------------------------


def test_crons_command_line() -> None:
    inv = parse_args(["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "-oi", "-t", "-f", "root"])
    assert (inv.mode, inv.sender, inv.fullname, inv.extract, inv.dot_ends) == (
        "m",
        "root",
        "CronDaemon",
        True,
        False,
    )
    assert inv.recipients == []


@pytest.mark.parametrize(
    ("argv", "want"),
    [
        (["-fbob@x", "a@x"], ("bob@x", ["a@x"], True)),
        (["-r", "bob@x", "a@x", "b"], ("bob@x", ["a@x", "b"], True)),
        (["-ti", "a@x"], ("", ["a@x"], False)),  # clustered flags, as getopt
        (["-oem", "-odi", "-v", "-Z", "-N", "never", "a@x"], ("", ["a@x"], True)),
        (["--", "-notanoption"], ("", ["-notanoption"], True)),
        (["-f"], ("", [], True)),  # a value missing at the end: nothing, no crash
    ],
)
def test_options(argv: list[str], want: tuple[str, list[str], bool]) -> None:
    inv = parse_args(argv)
    assert (inv.sender, inv.recipients, inv.dot_ends) == want


def test_modes() -> None:
    assert parse_args(["-bp"]).mode == "p"
    assert parse_args([], "/usr/bin/mailq").mode == "p"
    assert parse_args([], "newaliases").mode == "i"
    assert parse_args(["-bs"]).mode == "s"
    assert parse_args(["-bd"]).mode == "d"  # refused by main, not by the parser


@given(st.lists(st.text(max_size=30), max_size=12), st.text(max_size=20))
@settings(max_examples=400)
def test_any_command_line_parses_and_yields_clean_values(argv: list[str], prog: str) -> None:
    inv = parse_args(argv, prog)
    for value in (inv.sender, inv.fullname, *inv.recipients):
        assert "\n" not in value and "\r" not in value and "\x00" not in value
    assert inv.mode in "mpsidva"


# --- reading the message -----------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "want"),
    [
        (b"a\n.\nb\n", b"a\n"),
        (b"a\r\n.\r\nb", b"a\r\n"),
        (b".\nall gone", b""),
        (b"a\n..\nb\n", b"a\n..\nb\n"),  # not a lone dot
        (b"a\n.", b"a\n"),
    ],
)
def test_a_lone_dot_ends_the_message_without_i(data: bytes, want: bytes) -> None:
    assert cut_at_dot(data) == want


@given(st.binary(max_size=200))
def test_cut_at_dot_keeps_a_prefix(data: bytes) -> None:
    cut = cut_at_dot(data)
    assert data.startswith(cut)
    assert b"\n.\n" not in cut and b"\n.\r\n" not in cut


def test_read_message_refuses_rather_than_truncates() -> None:
    assert read_message(io.BytesIO(b"x" * 100), 100) == b"x" * 100
    assert read_message(io.BytesIO(b"x" * 101), 100) is None


@pytest.fixture
def drop(tmp_path: Path) -> Path:
    d = tmp_path / "maildrop"
    d.mkdir()
    d.chmod(0o3733)
    return d


def test_deliver_writes_a_complete_file_the_daemon_can_parse(drop: Path) -> None:
    inv = parse_args(["-t", "-oi", "-f", "me@x", "-F", "Me", "extra@example.com"])
    data = b"To: a@example.com, B <b@example.com>\nBcc: c@example.com\n\nbody\n.\n"
    assert deliver(inv, io.BytesIO(data), str(drop)) == 0
    (f,) = list(drop.iterdir())
    assert stat.S_IMODE(f.stat().st_mode) == 0o640  # complete, group-readable
    got = parse_drop(f.read_bytes())
    assert (got.sender, got.fullname, got.extract) == ("me@x", "Me", True)
    assert got.recipients == ("extra@example.com",)
    assert got.message == data  # -oi: the dot line stays
    head, _ = split_message(got.message)
    assert header_recipients(head) == ["a@example.com", "b@example.com", "c@example.com"]


def test_deliver_refusals(drop: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (drop / ".max_size").write_text("1024")
    assert deliver(parse_args(["-oi", "a@x"]), io.BytesIO(b"x" * 2000), str(drop)) == 65
    assert "larger than the limit of 1024 bytes" in capsys.readouterr().err
    assert deliver(parse_args(["-oi"]), io.BytesIO(b"x"), str(drop)) == 64  # no recipient
    assert deliver(parse_args(["a@x"]), io.BytesIO(b"x"), str(drop / "nope")) == 69
    assert [p.name for p in drop.iterdir()] == [".max_size"]  # nothing queued
    assert main(["-bd"]) == 64


def test_sendmail_bs_speaks_enough_smtp(drop: Path) -> None:
    script = (
        b"EHLO me\r\nMAIL FROM:<me@x>\r\nRCPT TO:<a@example.com>\r\nDATA\r\n"
        b"Subject: s\r\n\r\n..dotted\r\n.\r\nRCPT TO:<b@x>\r\nQUIT\r\n"
    )
    out = io.BytesIO()
    assert serve(parse_args(["-bs"]), io.BytesIO(script), out, str(drop)) == 0
    replies = [line[:3] for line in out.getvalue().split(b"\r\n") if line]
    assert replies == [b"220", b"250", b"250", b"250", b"354", b"250", b"503", b"221"]
    (f,) = list(drop.iterdir())
    got = parse_drop(f.read_bytes())
    assert got.recipients == ("a@example.com",)
    assert got.message == b"Subject: s\r\n\r\n.dotted\r\n"  # dot-stuffing undone


# --- the spool file, as the daemon reads it -------------------------------------------


@given(
    st.text(max_size=40),
    st.text(max_size=40),
    st.lists(st.text(min_size=1, max_size=40), max_size=5),
    st.binary(min_size=1, max_size=100),
)
def test_envelope_round_trips(sender: str, name: str, rcpts: list[str], body: bytes) -> None:
    inv = parse_args(["-f", sender, "-F", name, "--", *rcpts])
    data = envelope(inv, "alice") + b"x" + body
    got = parse_drop(data)
    assert got.sender == inv.sender
    assert got.recipients == tuple(
        r.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for r in inv.recipients
    )
    assert got.message == b"x" + body


@given(st.binary(max_size=300))
@settings(max_examples=300)
def test_any_bytes_are_a_drop_or_a_bad_drop(data: bytes) -> None:
    with contextlib.suppress(BadDrop):
        parse_drop(data)
    with contextlib.suppress(BadDrop):
        parse_drop(b"MAILGW-DROP 1\n" + data)


@given(
    st.lists(st.from_regex(r"[A-Za-z-]{1,10}: [ -~]{0,30}", fullmatch=True), max_size=6),
    st.binary(max_size=200),
)
def test_the_body_is_every_byte_after_the_blank_line(fields: list[str], body: bytes) -> None:
    head = "".join(f + "\r\n" for f in fields).encode()
    assert split_message(head + b"\r\n" + body) == (head, body)


def test_subject_is_decoded_and_never_raises() -> None:
    assert subject(b"Subject: =?utf-8?q?caf=C3=A9?=\n") == "café"
    assert subject(b"Subject: =?bogus?q?x?=\n") == "=?bogus?q?x?="
    assert subject(b"") == ""


# --- the rewrite -----------------------------------------------------------------------


def _rw(data: bytes) -> bytes:
    return rewrite(
        data,
        sender="Gateway <gw@example.com>",
        fullname="",
        message_id="<id.sendmail@gw.mailgw>",
        date="Mon, 30 Nov 2026 16:00:00 +0000",
        uid=1000,
    )


def test_rewrite_changes_the_headers_it_must_and_no_byte_of_the_body() -> None:
    body = b"line one\r\n\r\n.\r\n\xff\xfe 8-bit\r\n"
    out = _rw(
        b"From: Alice <alice@host>\r\nTo: root\r\nBcc: secret@x\r\nSender: x@y\r\n\r\n" + body
    )
    head, sent_body = out.split(b"\r\n\r\n", 1)
    assert sent_body == body
    lines = head.split(b"\r\n")
    assert b"From: Alice <gw@example.com>" in lines
    assert b"X-Original-From: Alice <alice@host>" in lines
    assert b"Reply-To: Alice <alice@host>" in lines
    assert b"Message-ID: <id.sendmail@gw.mailgw>" in lines
    assert b"Date: Mon, 30 Nov 2026 16:00:00 +0000" in lines
    assert b"X-Mailgw-Submitted-By: uid 1000" in lines
    assert not any(line.startswith((b"Bcc:", b"Sender:")) for line in lines)


def test_rewrite_keeps_message_id_date_and_reply_to() -> None:
    data = b"From: a@h\nReply-To: b@h\nMessage-ID: <own@h>\nDate: Sun, 1 Nov 2026 0:00 +0000\n\nx\n"
    head = _rw(data).split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert head.count(b"Message-ID: <own@h>") == 1
    assert [h for h in head if h.startswith(b"Reply-To")] == [b"Reply-To: b@h"]
    assert sum(h.startswith(b"Date:") for h in head) == 1


def test_rewrite_adds_a_from_when_there_is_none() -> None:
    out = _rw(b"Subject: x\n\nbody\n")
    assert out.startswith(b"From: Gateway <gw@example.com>\r\n")  # smtp.from's name kept
    assert out.endswith(b"\r\n\r\nbody\r\n")


@given(st.binary(max_size=400))
@settings(max_examples=300)
def test_rewrite_never_raises_and_always_sends_crlf(data: bytes) -> None:
    out = _rw(data)
    assert b"\n" not in out.replace(b"\r\n", b"")


# --- routing ---------------------------------------------------------------------------

SECTION = SendmailSection(
    aliases=(
        ("root", Alias(routes=("ops",))),
        ("cron", Alias(routes=("ops",), addresses=("night@example.com",))),
    )
)


def test_plan_routes_local_names_through_aliases_and_keeps_addresses() -> None:
    where, problems = plan(["root", "Cron", "<a@example.com>", "a@example.com"], SECTION)
    assert where.routes == ("ops",)
    assert where.addresses == ("night@example.com", "a@example.com")
    assert problems == []


def test_plan_without_a_catch_all_reports_unknown_names_and_bad_addresses() -> None:
    where, problems = plan(["alice", "bad@@x"], SECTION)
    assert where.routes == () and where.addresses == ()
    assert len(problems) == 2
    star = SendmailSection(aliases=(("*", Alias(addresses=("all@example.com",))),))
    assert plan(["alice"], star)[0].addresses == ("all@example.com",)
    assert plan([], SECTION)[0].routes == ("ops",)  # no recipient at all: root's
    assert plan(["alice"], SECTION, "fallback")[0].routes == ("fallback",)  # default_route


# --- [sendmail] ------------------------------------------------------------------------

ROUTE = '[[route]]\nname = "ops"\nmatch = "#"\nto = ["ops@example.com"]\n'


def test_config_accepts_a_full_section() -> None:
    cfg = parse(
        ROUTE + '[sendmail]\nmax_size = "2 MiB"\nmaildrop = "/srv/drop"\npriority = 3\n'
        '[sendmail.aliases]\nroot = "ops"\ncron = ["ops", "Night <n@example.com>"]\n"*" = "ops"\n'
    )
    s = cfg.sendmail
    assert (s.max_size, str(s.maildrop), s.priority) == (2 * 1024 * 1024, "/srv/drop", 3)
    assert s.alias("CRON") == Alias(("ops",), ("n@example.com",))
    assert s.alias("someone") == Alias(("ops",))
    assert parse("").sendmail.max_size == 10 * 1024 * 1024


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('max_size = "1 GiB"', "sendmail.max_size: 1073741824 bytes is over the largest"),
        ('max_size = "100"', "sendmail.max_size: must be between"),
        ('maildrop = "relative/dir"', "must be an absolute path"),
        ("priority = 12", "sendmail.priority: must be between"),
        ("bogus = 1", "sendmail.bogus: unknown key"),
        ("aliases = 3", "sendmail.aliases: must be a table"),
        ('aliases = { root = "nope" }', "'nope' names no route"),
        ('aliases = { "a b" = "ops" }', "a local name"),
        ('aliases = { root = "x@" }', "is not a mail address"),
        ("aliases = { root = [] }", "a route name, an address, or a list"),
        ("aliases = { root = 5 }", "a route name, an address, or a list"),
    ],
)
def test_config_refusals(text: str, why: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse(ROUTE + "[sendmail]\n" + text + "\n")
    assert why in str(exc.value)


# --- storage -----------------------------------------------------------------------------


def test_a_raw_message_is_stored_once_with_raw_deliveries(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "outbox.db", allow_volatile=True)
    a = alert("local mail", topic="sendmail/root")
    msg = raw.RawMessage("abc123", 0, "root", ("root", "x@example.com"), b"Subject: s\n\n\xff\n")
    where = raw.RawPlan(("ops",), ("x@example.com",), 1)
    assert raw.store(ob, a, msg, where) is True
    assert raw.store(ob, a, msg, where) is False  # the same maildrop file again: skipped
    assert ob.live == 2
    claimed = sorted(ob.claim(10), key=lambda c: c.route)
    assert [(c.route, c.kind, c.rcpts) for c in claimed] == [
        ("@sendmail", "raw", ("x@example.com",)),
        ("ops", "raw", None),
    ]
    assert raw.load(ob.conn, claimed[0].seq) == msg
    assert [w[1] for w in raw.waiting(ob.conn)] == ["sending", "sending"]
    ob.close()


def test_nothing_routed_is_kept_unrouted(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "outbox.db", allow_volatile=True)
    msg = raw.RawMessage("n1", 0, "", (), b"x\n")
    assert raw.store(ob, alert("m"), msg, raw.RawPlan())
    assert ob.conn.execute("SELECT state, kind FROM delivery").fetchall() == [("unrouted", "raw")]
    ob.close()


def test_the_maildrop_default_is_what_the_command_uses() -> None:
    from gateway.sendmail import DEFAULT_MAILDROP

    assert Path(DEFAULT_MAILDROP) == SendmailSection().maildrop
    assert os.path.isabs(DEFAULT_MAILDROP)


# --- the pickup, in process ----------------------------------------------------------------


def test_a_full_outbox_leaves_the_file_in_the_maildrop_until_there_is_room(
    tmp_path: Path, drop: Path
) -> None:
    import asyncio

    from gateway.maildrop import Maildrop
    from gateway.outbox.writer import Writer
    from gateway.runtime import Runtime
    from gateway.sendmail_drop import drop as write_drop

    cfg = parse(ROUTE + f'[sendmail]\nmaildrop = "{drop}"\n[sendmail.aliases]\nroot = "ops"\n')
    ob = Outbox(tmp_path / "outbox.db", allow_volatile=True, max_messages=1)
    ob.add([routed_one()])  # the one place there is
    writer = Writer(ob)
    writer.start()
    try:
        pickup = Maildrop(cfg, writer, Runtime())
        name = write_drop(str(drop), envelope(parse_args(["root"]), "root") + b"Subject: s\n\nx\n")
        assert asyncio.run(pickup.scan()) == 0
        assert (drop / name).exists()  # kept: nothing is lost, it is retried
        ob.max_messages = 10
        assert asyncio.run(pickup.scan()) == 1
        assert not (drop / name).exists()
        assert (drop / ".max_size").read_text() == str(10 * 1024 * 1024)
    finally:
        writer.stop()
        ob.close()


def routed_one() -> Routed:
    from tests.parts import routed

    return routed("taking the place")
