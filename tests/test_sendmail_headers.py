"""Local mail's header block: its bounds at pickup, the rewrite's header rules (local
names qualified as Debian's MTAs do, smtp.from's name kept), and the relay's pieces
(header + body view, then DATA in pieces) equal to the whole rewrite."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.maildrop_parse import MAX_FIELDS, MAX_HEADER, BadDrop, parse_drop
from gateway.sendmail_compose import mail_name, rewrite, rewrite_head
from gateway.smtp_data import pieces

MIB = 1024 * 1024


def _rw(data: bytes, sender: str = "Gateway <gw@example.com>") -> list[bytes]:
    out = rewrite(
        data,
        sender=sender,
        fullname="",
        message_id="<m@x>",
        date="D",
        uid=7,
        mailname="gw.example.net",
    )
    return out.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


def _drop(message: bytes) -> bytes:
    return b"MAILGW-DROP 1\nU nobody\nT 1\n\n" + message


# --- the rules -------------------------------------------------------------------------


def test_cron_from_a_local_name_is_qualified_and_gets_no_reply_to() -> None:
    head = _rw(b"From: root (Cron Daemon)\nTo: root\nSubject: s\n\nb\n")
    assert b"From: Cron Daemon <gw@example.com>" in head
    assert b"X-Original-From: Cron Daemon <root@gw.example.net>" in head
    assert not any(h.startswith(b"Reply-To") for h in head)
    assert b"To: root@gw.example.net" in head


def test_a_bare_local_from_keeps_smtp_froms_display_name() -> None:
    head = _rw(b"From: root\nSubject: s\n\nb\n")
    assert head[0] == b"From: Gateway <gw@example.com>"
    assert b"X-Original-From: root@gw.example.net" in head
    assert not any(h.startswith(b"Reply-To") for h in head)


def test_qualified_addresses_are_kept_byte_for_byte_and_answered() -> None:
    head = _rw(b"From: Alice <alice@host.example>\nTo: Bob <b@x.example>, c@y\nCc: admin\n\nb\n")
    assert b"To: Bob <b@x.example>, c@y" in head
    assert b"Cc: admin@gw.example.net" in head
    assert b"Reply-To: Alice <alice@host.example>" in head


def test_mail_name_is_etc_mailname_else_the_fqdn(tmp_path: Path) -> None:
    name = tmp_path / "mailname"
    name.write_text("mail.example.org\n")
    assert mail_name(name) == "mail.example.org"
    name.write_text("not a name; rm -rf /\n")
    assert mail_name(name) != "not a name; rm -rf /"
    assert mail_name(tmp_path / "missing")


# --- bounds at pickup --------------------------------------------------------------------


def test_a_header_block_over_its_bounds_is_refused_with_its_reason() -> None:
    many = b"".join(b"a%d: x\n" % i for i in range(MAX_FIELDS + 1))
    with pytest.raises(BadDrop, match=f"{MAX_FIELDS} fields"):
        parse_drop(_drop(many + b"\nbody\n"))
    wide = b"Subject: " + b"x" * MAX_HEADER + b"\n"
    with pytest.raises(BadDrop, match=f"{MAX_HEADER} bytes"):
        parse_drop(_drop(wide + b"\nbody\n"))
    # The brief's reproducer: 10 MiB of "a:" lines, refused after reading 1000 of them.
    huge = _drop(b"a:\n" * (10 * MIB // 3) + b"\nbody\n")
    tracemalloc.start()
    try:
        with pytest.raises(BadDrop):
            parse_drop(huge)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 11 * MIB  # the message's own copy, not a field list


def test_a_header_block_just_inside_its_bounds_is_taken() -> None:
    pad = b"X-Pad: " + b"a" * 400 + b"\n"
    drop = parse_drop(_drop(pad * (MAX_FIELDS - 1) + b"\nbody\n"))
    assert bytes(drop.message).endswith(b"\n\nbody\n")


def test_a_message_stored_before_the_bounds_is_not_rewritten() -> None:
    with pytest.raises(BadDrop):
        rewrite_head(
            b"a:\n" * (MAX_FIELDS + 1) + b"\nb\n",
            sender="gw@x",
            fullname="",
            message_id="<m>",
            date="D",
            uid=1,
        )


# --- the relay's pieces equal the whole ----------------------------------------------------


@settings(max_examples=300)
@given(st.binary(max_size=600), st.integers(min_value=1, max_value=40))
def test_head_and_body_view_in_pieces_send_what_the_whole_rewrite_would(
    data: bytes, piece: int
) -> None:
    kw = dict(sender="gw@x", fullname="", message_id="<m>", date="D", uid=1, mailname="h")
    try:
        head, body = rewrite_head(data, **kw)  # type: ignore[arg-type]
    except BadDrop:
        return
    sent = b"".join(pieces(b"".join((head, body)), piece))
    whole = rewrite(data, **kw)  # type: ignore[arg-type]
    assert sent == PERIOD_REGEX.sub(b"..", normalize_message_line_endings(whole)) + b".\r\n"


# --- whatever a local user writes, the rewrite either works or is a BadDrop ----------------


def test_a_non_ascii_local_name_is_left_as_it_came() -> None:
    head = _rw("To: jérôme\nCc: Zoë <zoë>, admin\nSubject: hi\n\nbody\n".encode())
    assert "To: jérôme".encode() in head
    assert "Cc: Zoë <zoë>, admin".encode() in head  # not qualified: it has no ASCII form


def test_a_non_ascii_local_from_gets_no_reply_to() -> None:
    head = _rw("From: jérôme\nSubject: hi\n\nbody\n".encode())
    assert head[0] == b"From: Gateway <gw@example.com>"
    assert "X-Original-From: jérôme".encode() in head
    assert not any(h.startswith(b"Reply-To") for h in head)


_FIELD_NAMES = st.sampled_from([b"From", b"To", b"Cc", b"Bcc", b"Reply-To", b"Subject", b"X"])
_FIELD_TEXT = st.one_of(
    st.text(max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.binary(max_size=60),
)


@settings(max_examples=400)
@given(
    st.lists(st.tuples(_FIELD_NAMES, _FIELD_TEXT), max_size=6),
    st.text(max_size=30),
    st.sampled_from(["gw@x", "Gateway <gw@example.com>", "Zoë <gw@example.com>"]),
)
def test_any_header_fields_rewrite_or_are_a_bad_drop(
    fields: list[tuple[bytes, bytes]], fullname: str, sender: str
) -> None:
    data = b"".join(name + b": " + text + b"\n" for name, text in fields) + b"\nbody\n"
    try:
        head, _ = rewrite_head(
            data,
            sender=sender,
            fullname=fullname,
            message_id="<m>",
            date="D",
            uid=1,
            mailname="gw.example.net",
        )
    except BadDrop:
        return
    assert head.endswith(b"\r\n\r\n")
