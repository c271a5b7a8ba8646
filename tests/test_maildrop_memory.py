"""A local mail is in the daemon once: read once at pickup (parsed from views of the
file's bytes, stored into its blob in pieces) and read once at relay (its header
rewritten in place). The real daemon, `sendmail` run as nobody, a real smarthost that
is down while the mails are picked up and up when they are relayed; the peak RSS of
each phase over what the daemon held before it."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.maildrop_parse import (
    _FIELD,
    MAX_FIELDS,
    MAX_HEADER,
    BadDrop,
    header_block,
    parse_drop,
    split_at,
)
from gateway.sendmail_compose import rewrite_head, rewrite_in_place
from tests.parts import DaemonProcess, Pki, SmtpServer, wait_for
from tests.test_sendmail_daemon import config, sendmail, spool  # noqa: F401  (fixture)

MIB = 1024 * 1024
MAX_SIZE = 10 * MIB  # sendmail.max_size's default
# One copy of the message, and room for what is not the message: the header block's
# parse and rewrite (a few times its 1 MiB bound), SQLite's page cache, a piece in
# flight. A second copy of the message would make it 20 MiB.
ONE_COPY = MAX_SIZE + 6 * MIB


def _shapes() -> dict[str, bytes]:
    """The worst shapes of a max_size message, each just inside the bounds."""
    top = b"To: root\nSubject: %s\n\n"
    half = b"a" * ((MAX_HEADER // MAX_FIELDS - 40) // 2)
    pad = b"X-Pad: " + half + b"\n " + half + b"\n"
    big_head = b"To: root\nSubject: big-header\n" + pad * (MAX_FIELDS - 10) + b"\n"
    fill = MAX_SIZE - 4096
    return {
        "short-lines": top % b"short-lines" + b"\n" * (fill - 64),
        "big-header": big_head + b"x\n" * ((fill - len(big_head)) // 2),
        "one-line": top % b"one-line" + b"y" * (fill - 64) + b"\n",
    }


# --- the parser: views, not copies -----------------------------------------------------


@pytest.mark.parametrize("shape", ["short-lines", "big-header", "one-line"])
def test_parse_drop_copies_the_envelope_and_header_not_the_message(shape: str) -> None:
    data = bytearray(b"MAILGW-DROP 1\nU alice\nF \nN \nT 1\n\n" + _shapes()[shape])
    tracemalloc.start()
    try:
        drop = parse_drop(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(drop.message) == len(_shapes()[shape])
    assert drop.head.startswith(b"To: root\nSubject: ")
    assert peak < 3 * MIB  # the header block (1 MiB at most) and its copy as bytes


def _split_at_by_lines(data: bytes, bounded: bool) -> tuple[int, int]:
    """split_at as it was written first, each line sliced out: the reference."""
    pos, n, fields = 0, len(data), 0
    limit = MAX_HEADER + 1 if bounded else n
    while pos < n:
        nl = data.find(b"\n", pos, pos + limit)
        line_end = nl + 1 if nl >= 0 else min(n, pos + limit)
        line = data[pos:line_end].rstrip(b"\r\n")
        if not line:
            return pos, line_end
        folded = pos > 0 and line[:1] in (b" ", b"\t")
        mbox = pos == 0 and line.startswith(b"From ") and _FIELD.match(line) is None
        if not (folded or mbox or _FIELD.match(line)):
            return pos, pos
        fields += not folded
        if bounded and (line_end > MAX_HEADER or fields > MAX_FIELDS):
            raise BadDrop("over")
        pos = line_end
    return n, n


_line = st.one_of(
    st.from_regex(rb"[A-Za-z-]{1,8} ?: ?[ -~\r]{0,12}", fullmatch=True),
    st.from_regex(rb"[ \t][ -~\r]{0,12}", fullmatch=True),
    st.sampled_from([b"", b"\r", b"From x", b"From : y", b"no field", b"\r\r"]),
    st.binary(max_size=12),
)


@given(st.lists(_line, max_size=8), st.binary(max_size=40), st.booleans())
@settings(max_examples=400)
def test_split_at_cuts_where_the_line_by_line_reading_does(
    lines: list[bytes], tail: bytes, cr_ends: bool
) -> None:
    eol = b"\r" if cr_ends else b"\n"
    data = eol.join(lines) + eol + tail
    if cr_ends:
        data = data.replace(b"\n", b"")  # a message of CR line ends has no LF at all
    converted = data.replace(b"\r", b"\n") if cr_ends else data
    for bounded in (False, True):
        try:
            want: tuple[int, int] | None = _split_at_by_lines(converted, bounded)
        except BadDrop:
            want = None
        for buf in (data, bytearray(data), memoryview(data)):
            try:
                got: tuple[int, int] | None = split_at(buf, bounded, eol=eol)
            except BadDrop:
                got = None
            assert got == want
    with contextlib.suppress(BadDrop):
        head = header_block(memoryview(data))
        assert head == converted[: _split_at_by_lines(converted, True)[0]]


_KW: dict[str, Any] = {
    "sender": "Gateway <gw@example.com>",
    "fullname": "",
    "message_id": "<id@gw>",
    "date": "Mon, 07 Dec 2026 23:00:00 +0000",
    "uid": 1000,
    "mailname": "host.example",
}


@given(st.lists(_line, max_size=8), st.binary(max_size=40), st.booleans())
@settings(max_examples=300)
def test_the_header_rewritten_in_place_is_the_rewritten_mail(
    lines: list[bytes], tail: bytes, cr_ends: bool
) -> None:
    eol = b"\r" if cr_ends else b"\n"
    message = eol.join(lines) + eol + tail
    if cr_ends:
        message = message.replace(b"\n", b"")
    try:
        head, body = rewrite_head(message, **_KW)
    except BadDrop:
        head, body = b"", memoryview(b"")
    buf = bytearray(message)
    try:
        rewrite_in_place(buf, **_KW)
    except BadDrop:
        assert head == b""
        return
    assert buf == head + bytes(body)


# --- the daemon: one copy at pickup, one at relay ---------------------------------------


def _vm(pid: int, key: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    assert m is not None, key
    return int(m.group(1)) * 1024


def _reset_peak(pid: int) -> int:
    """Start the process's peak RSS (VmHWM) again from now; its RSS now."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return _vm(pid, "VmRSS")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to reset another process's peak")
def test_a_max_size_local_mail_is_in_the_daemon_once_at_pickup_and_at_relay(
    tmp_path: Path,
    pki: Pki,
    spool: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import aiosmtpd.smtp

    shapes = _shapes()
    monkeypatch.setattr(aiosmtpd.smtp.SMTP, "line_length_limit", 2 * MAX_SIZE)
    smtp = SmtpServer(pki, "starttls").start()
    cfg = config(tmp_path, pki, smtp.port, spool)
    cfg.write_text(cfg.read_text().replace('timeout = "1s"', 'timeout = "60s"'))
    gw = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    assert gw.proc is not None
    pid = gw.proc.pid
    try:
        gw.wait_ready()
        # A small mail first, so that what one session costs (TLS, the CA file) is in
        # the daemon before anything is measured; then the smarthost is down while
        # the large ones are picked up.
        assert sendmail(spool, ["-t", "-oi"], b"To: root\nSubject: warm-up\n\nx\n").returncode == 0
        wait_for(lambda: len(smtp.received) == 1 or not gw.alive, timeout=60, what="warm-up")
        smtp.stop()
        for n, (name, message) in enumerate(shapes.items(), 2):
            before = _reset_peak(pid)
            r = sendmail(spool, ["-t", "-oi"], message)
            assert r.returncode == 0, (name, r.stderr)

            def picked(n: int = n) -> bool:
                return gw.log_text().count(" queued for ") >= n or not gw.alive

            wait_for(picked, timeout=120, what=f"the pickup of {name}")
            assert gw.alive, gw.log_text()[-2000:]
            over = _vm(pid, "VmHWM") - before
            print(f"pickup of {name}: peak {over / MIB:.1f} MiB over the RSS before")
            assert over < ONE_COPY, f"pickup of {name}: {over / MIB:.1f} MiB"
        assert len(smtp.received) == 1
        with smtp:
            assert smtp._controller is not None
            smtp._controller.SMTP_kwargs["data_size_limit"] = 4 * MAX_SIZE
            before = _reset_peak(pid)
            os.kill(pid, signal.SIGUSR1)  # `mailgw flush`: try now
            wait_for(
                lambda: len(smtp.received) > len(shapes) or not gw.alive,
                timeout=240,
                what="the three mails",
            )
            over = _vm(pid, "VmHWM") - before
            assert gw.alive, gw.log_text()[-2000:]
            got = {str(m.message["Subject"]): m.data for m in smtp.received}
            for name, message in shapes.items():
                sent = message.split(b"\n\n", 1)[1].replace(b"\n", b"\r\n")
                assert got[name].split(b"\r\n\r\n", 1)[1] == sent, name
        print(f"relay of the three: peak {over / MIB:.1f} MiB over the RSS before")
        assert over < ONE_COPY, f"relay: {over / MIB:.1f} MiB"
    finally:
        gw.terminate()
        smtp.stop()
