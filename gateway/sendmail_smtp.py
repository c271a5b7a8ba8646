"""`sendmail -bs`: SMTP on stdin/stdout, for the few tools that speak it to sendmail.

Just enough of RFC 5321 for a local client: HELO/EHLO, MAIL, RCPT, DATA, RSET, NOOP,
QUIT. Each message goes to the maildrop exactly as `sendmail` would leave it; the
reply to DATA is 250 only once its file is on the disk.
"""

from __future__ import annotations

import contextlib
import os
from typing import BinaryIO

from gateway.sendmail_drop import (
    MAX_ARG,
    MAX_RCPTS,
    Invocation,
    allow_to,
    allowed,
    drop,
    envelope,
    has_controls,
    max_size,
    user,
)

_BAD_ADDRESS = "501 5.1.3 Bad address: no control characters, at most 998 characters"


def _addr(arg: str, verb: str) -> str | None:
    head, _, rest = arg.partition(":")
    if head.strip().upper() != verb.strip():
        return None
    rest = rest.strip(" \t\r\n")
    if rest.startswith("<"):
        rest = rest[1 : rest.find(">")] if ">" in rest else rest[1:]
    return rest.split(" ", 1)[0]


def _bad(addr: str) -> bool:
    # What the daemon would refuse in an envelope line (gateway/maildrop_parse.py):
    # refused here with a 501, never answered 250 and then lost at pickup.
    return has_controls(addr) or len(addr) > MAX_ARG


def serve(inv: Invocation, stdin: BinaryIO, stdout: BinaryIO, maildrop: str) -> int:
    limit = max_size(maildrop)
    patterns = allow_to(maildrop)  # the daemon refuses the rest at pickup: say it here

    def reply(text: str) -> None:
        stdout.write(text.encode() + b"\r\n")
        stdout.flush()

    host = os.uname().nodename
    reply(f"220 {host} mailgw sendmail -bs")
    sender: str | None = None
    rcpts: list[str] = []
    while line := stdin.readline(4096):
        if not line.endswith(b"\n") and len(line) == 4096:
            # The rest of an overlong command must not run as a command of its own.
            while (more := stdin.readline(4096)) and not more.endswith(b"\n"):
                pass
            reply("500 5.5.2 Line too long")
            continue
        # Only the line end goes: a CR inside the line is the client's and is refused.
        cmd = line.decode("utf-8", "replace").rstrip("\r\n").strip(" \t")
        verb = cmd[:4].upper()
        if verb in ("HELO", "EHLO"):
            reply(f"250 {host}")
        elif verb == "MAIL" and (a := _addr(cmd[4:], " FROM")) is not None:
            if _bad(a):
                reply(_BAD_ADDRESS)
                continue
            sender, rcpts = a, []
            reply("250 2.1.0 Ok")
        elif verb == "RCPT" and sender is not None and (a := _addr(cmd[4:], " TO")):
            if _bad(a):
                reply(_BAD_ADDRESS)
            elif "@" in a and not allowed(a, patterns):
                reply("550 5.7.1 Not an address local mail may go to ([sendmail] allow_to)")
            elif len(rcpts) >= MAX_RCPTS:
                reply(f"452 4.5.3 Too many recipients (at most {MAX_RCPTS} per message)")
            else:
                rcpts.append(a)
                reply("250 2.1.5 Ok")
        elif verb == "DATA" and sender is not None and rcpts:
            reply("354 End data with <CR><LF>.<CR><LF>")
            answer = _data(inv, stdin, maildrop, limit, sender, rcpts)
            if answer is None:
                # The client went away before the final '.': a half message is not
                # queued, and there is nobody left to tell.
                with contextlib.suppress(OSError):
                    reply("421 4.4.2 Input ended inside DATA; nothing was queued")
                return 75  # EX_TEMPFAIL
            reply(answer)
            sender, rcpts = None, []
        elif verb == "RSET":
            sender, rcpts = None, []
            reply("250 2.0.0 Ok")
        elif verb == "NOOP":
            reply("250 2.0.0 Ok")
        elif verb == "QUIT":
            reply("221 2.0.0 Bye")
            break
        else:
            reply("503 5.5.1 Error: bad command or sequence")
    return 0


def _data(
    inv: Invocation, stdin: BinaryIO, maildrop: str, limit: int, sender: str, rcpts: list[str]
) -> str | None:
    """The reply to the message that follows DATA; None if the input ended before the
    line of one '.' (nothing is queued then)."""
    lines: list[bytes] = []
    size = 0
    too_big = False
    at_start = True  # reads are bounded: a long line comes in pieces, and the dot
    ended = False  # rules apply only to a piece that begins a line
    while piece := stdin.readline(1 << 16):
        if at_start and piece in (b".\r\n", b".\n"):
            ended = True
            break
        starts_line, at_start = at_start, piece.endswith(b"\n")
        if starts_line and piece.startswith(b"."):
            piece = piece[1:]  # RFC 5321 4.5.2: dot-stuffing undone
        size += len(piece)
        if size > limit:
            too_big = True
        elif not too_big:
            lines.append(piece)
    if not ended:
        return None
    if too_big:
        return f"552 5.3.4 Message larger than the limit of {limit} bytes; nothing was queued"
    if not b"".join(lines).strip():
        return "554 5.6.0 The message is empty; nothing was queued"
    mail = Invocation()
    mail.sender, mail.fullname, mail.recipients = sender, inv.fullname, rcpts
    try:
        drop(maildrop, envelope(mail, user()) + b"".join(lines))
    except OSError as exc:
        return f"451 4.3.0 Could not queue the message: {exc.strerror or exc}"
    return "250 2.0.0 Ok: queued"
