"""`sendmail -bs`: SMTP on stdin/stdout, for the few tools that speak it to sendmail.

Just enough of RFC 5321 for a local client: HELO/EHLO, MAIL, RCPT, DATA, RSET, NOOP,
QUIT. Each message goes to the maildrop exactly as `sendmail` would leave it; the
reply to DATA is 250 only once its file is on the disk.
"""

from __future__ import annotations

import os
from typing import BinaryIO

from gateway.sendmail_drop import Invocation, drop, envelope, max_size, user


def _addr(arg: str, verb: str) -> str | None:
    head, _, rest = arg.partition(":")
    if head.strip().upper() != verb.strip():
        return None
    rest = rest.strip()
    if rest.startswith("<"):
        rest = rest[1 : rest.find(">")] if ">" in rest else rest[1:]
    return rest.split(" ", 1)[0]


def serve(inv: Invocation, stdin: BinaryIO, stdout: BinaryIO, maildrop: str) -> int:
    limit = max_size(maildrop)

    def reply(text: str) -> None:
        stdout.write(text.encode() + b"\r\n")
        stdout.flush()

    host = os.uname().nodename
    reply(f"220 {host} mailgw sendmail -bs")
    sender: str | None = None
    rcpts: list[str] = []
    while line := stdin.readline(4096):
        cmd = line.decode("utf-8", "replace").strip()
        verb = cmd[:4].upper()
        if verb in ("HELO", "EHLO"):
            reply(f"250 {host}")
        elif verb == "MAIL" and (a := _addr(cmd[4:], " FROM")) is not None:
            sender, rcpts = a, []
            reply("250 2.1.0 Ok")
        elif verb == "RCPT" and sender is not None and (a := _addr(cmd[4:], " TO")):
            rcpts.append(a)
            reply("250 2.1.5 Ok")
        elif verb == "DATA" and sender is not None and rcpts:
            reply("354 End data with <CR><LF>.<CR><LF>")
            reply(_data(inv, stdin, maildrop, limit, sender, rcpts))
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
) -> str:
    lines: list[bytes] = []
    size = 0
    too_big = False
    while line := stdin.readline(1 << 16):
        if line.rstrip(b"\r\n") == b".":
            break
        if line.startswith(b"."):
            line = line[1:]  # RFC 5321 4.5.2: dot-stuffing undone
        size += len(line)
        if size > limit:
            too_big = True
        elif not too_big:
            lines.append(line)
    if too_big:
        return f"552 5.3.4 Message larger than the limit of {limit} bytes; nothing was queued"
    mail = Invocation()
    mail.sender, mail.fullname, mail.recipients = sender, inv.fullname, rcpts
    try:
        drop(maildrop, envelope(mail, user()) + b"".join(lines))
    except OSError as exc:
        return f"451 4.3.0 Could not queue the message: {exc.strerror or exc}"
    return "250 2.0.0 Ok: queued"
