"""`sendmail`: the command line cron, smartd, mdadm and apt tools mail through.

It drops the message, whole and unparsed, into the maildrop spool
(/var/spool/mailgw/maildrop by default) and exits 0 once the file is on the disk; the
daemon picks it up, parses it as untrusted input and stores it in the outbox
(gateway/maildrop.py). Why a spool and not a socket or a setgid helper: see
ARCHITECTURE.md ("The way in for local mail").

This module runs once per mail, often from cron under any user: it imports nothing
but `os` and `sys` (no gateway.config, no email package; `python -X importtime` shows
it), so its start-up is the interpreter's. Argument parsing is sans-IO (`parse_args`).

The spool's format: gateway/sendmail_drop.py.
"""

from __future__ import annotations

import os
import sys

from gateway.sendmail_drop import (
    MAX_RCPTS,
    Invocation,
    SpoolBroken,
    _clean,
    allow_to,
    allowed,
    drop,
    envelope,
    header_addresses,
    max_size,
    user,
)

DEFAULT_MAILDROP = "/var/spool/mailgw/maildrop"

# sysexits.h, as sendmail returns them
EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_CANTCREAT = 73
EX_TEMPFAIL = 75
EX_NOPERM = 77

# Options that take a value, attached (-fuser) or as the next argument (-f user); the
# union of sendmail's and Postfix's. Every other letter is a flag; unknown ones are
# ignored, as sendmail does, so a tool written for another MTA still gets its mail out.
_WITH_VALUE = frozenset("ABCFLNORVXbfhopr")


def parse_args(argv: list[str], prog: str = "sendmail") -> Invocation:
    """sendmail's command line → an Invocation. Never raises: anything unknown is
    ignored, as the real sendmail does (`-oem`, `-odi`, `-v`, `-N never`...)."""
    inv = Invocation()
    base = prog.rsplit("/", 1)[-1]
    if base == "mailq":
        inv.mode = "p"
    elif base == "newaliases":
        inv.mode = "i"
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            inv.recipients.extend(argv[i:])
            break
        if not arg.startswith("-") or arg == "-":
            inv.recipients.append(arg)
            continue
        j = 1
        while j < len(arg):
            letter = arg[j]
            j += 1
            if letter not in _WITH_VALUE:
                if letter == "t":
                    inv.extract = True
                elif letter == "i":
                    inv.dot_ends = False
                else:
                    inv.ignored.append("-" + letter)
                continue
            value = arg[j:]
            if not value and i < len(argv):
                value = argv[i]
                i += 1
            _option(inv, letter, value)
            break
    inv.recipients = [r for r in (_clean(r).strip() for r in inv.recipients) if r]
    return inv


def _option(inv: Invocation, letter: str, value: str) -> None:
    if letter in "fr":
        inv.sender = _clean(value).strip()
    elif letter == "F":
        inv.fullname = _clean(value).strip()
    elif letter == "o" and value[:1] == "i":
        inv.dot_ends = False  # -oi (and -oitrue): not -oem, -odi, -oQ...
    elif letter == "b" and value[:1] in ("m", "p", "s", "i", "d", "v", "a"):
        inv.mode = value[0]
    else:
        inv.ignored.append(f"-{letter}{value}")


def cut_at_dot(data: bytes) -> bytes:
    """Without -i, a line holding only '.' ends the message (RFC 821-style, as
    sendmail); what follows it is not part of the mail."""
    if data.startswith((b".\n", b".\r\n")) or data in (b".", b".\r"):
        return b""
    for end in (b"\n.\n", b"\n.\r\n"):
        k = data.find(end)
        if k >= 0:
            data = data[: k + 1]
    if data.endswith((b"\n.", b"\n.\r")):
        data = data[: data.rfind(b"\n") + 1]
    return data


def read_message(stream: object, limit: int) -> bytes | None:
    """Up to `limit` bytes of stdin; None if there are more (never truncated)."""
    read = stream.read  # type: ignore[attr-defined]
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = read(min(1 << 16, limit + 1 - size))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return None


def _say(text: str) -> None:
    sys.stderr.write(f"sendmail: {text}\n")


def deliver(inv: Invocation, stdin: object, maildrop: str) -> int:
    if not inv.recipients and not inv.extract:
        _say("no recipients given; name them or use -t to take them from the headers")
        return EX_USAGE
    if len(inv.recipients) > MAX_RCPTS:
        _say(
            f"message refused: {len(inv.recipients)} recipients, at most {MAX_RCPTS} per "
            "message; split the list or use an alias; nothing was queued"
        )
        return EX_DATAERR
    if stdin is None:  # `sendmail x <&-`: no stdin at all
        _say("no message: standard input is closed; nothing was queued")
        return EX_NOINPUT
    limit = max_size(maildrop)
    data = read_message(stdin, limit)
    if data is None:
        _say(
            f"message refused: larger than the limit of {limit} bytes "
            "([sendmail] max_size in /etc/mailgw/gateway.toml); nothing was queued"
        )
        return EX_DATAERR
    if inv.dot_ends:
        data = cut_at_dot(data)
    if not data.strip():  # the daemon would refuse it: say so now, with an exit code
        _say("message refused: it is empty (nothing on standard input); nothing was queued")
        return EX_DATAERR
    rcpts = list(inv.recipients)
    if inv.extract:
        found = header_addresses(data, MAX_RCPTS)
        rcpts = list(dict.fromkeys(rcpts + (found or [])))
        if found is None or len(rcpts) > MAX_RCPTS:
            _say(
                f"message refused: more than {MAX_RCPTS} recipients in its To, Cc and Bcc "
                "with -t; split the list or use an alias; nothing was queued"
            )
            return EX_DATAERR
    patterns = allow_to(maildrop)
    outside = [r for r in rcpts if "@" in r and not allowed(r, patterns)]
    if outside:
        _say(
            f"message refused: {outside[0]} is not an address local mail may go to "
            "([sendmail] allow_to in /etc/mailgw/gateway.toml); nothing was queued"
        )
        return EX_NOPERM
    try:
        drop(maildrop, envelope(inv, user()) + data)
    except SpoolBroken as exc:
        _say(f"{exc}; nothing was queued (ask the administrator to reinstall mailgw-sendmail)")
        return EX_CANTCREAT
    except FileNotFoundError:
        _say(f"{maildrop} does not exist; is mailgw installed? Nothing was queued")
        return EX_UNAVAILABLE
    except PermissionError as exc:
        _say(f"cannot write to {maildrop} ({exc.strerror}); it must be mode 3733 (mailgw)")
        return EX_CANTCREAT
    except OSError as exc:
        _say(f"could not queue the message in {maildrop}: {exc}; nothing was queued")
        return EX_TEMPFAIL
    return EX_OK


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    inv = parse_args(args, sys.argv[0] if sys.argv else "sendmail")
    maildrop = os.environ.get("MAILGW_MAILDROP") or DEFAULT_MAILDROP
    # sys.stdin/stdout are None when the descriptor is closed (`sendmail x <&-`).
    stdin = sys.stdin.buffer if sys.stdin is not None else None
    if inv.mode == "m":
        return deliver(inv, stdin, maildrop)
    if inv.mode == "i":
        # Nothing to build: the daemon reads /etc/aliases as it is at each pickup.
        sys.stdout.write(
            "newaliases: nothing to do: mailgw reads /etc/aliases as it is when it picks "
            "up each mail (and [sendmail.aliases] in /etc/mailgw/gateway.toml, which wins)\n"
        )
        return EX_OK
    if inv.mode == "s":
        from gateway.sendmail_smtp import serve

        if stdin is None or sys.stdout is None:
            _say("-bs needs standard input and output; one of them is closed")
            return EX_NOINPUT
        return serve(inv, stdin, sys.stdout.buffer, maildrop)
    if inv.mode == "p":
        from gateway.sendmail_queue import list_waiting

        return list_waiting(maildrop)
    _say(f"-b{inv.mode} is not supported by mailgw (only -bm, -bp, -bs, -bi)")
    return EX_USAGE


if __name__ == "__main__":
    sys.exit(main())
