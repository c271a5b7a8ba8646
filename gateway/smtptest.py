"""`mailgw smtp-test`: diagnose the path to each smarthost, one step at a time.

Each step prints what it found, so a field engineer can tell a DNS failure from
a blocked port 25, an expired certificate from a wrong password. Every smarthost of
the failover list ([smtp], then each [[smtp.fallback]]) is tested in turn, or the one
named by --host; the exit status is 0 only when each tested passes.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time

from gateway.compose import test_message
from gateway.config import Config, SmtpSection
from gateway.replies import Accepted, explain
from gateway.smtp import SmtpSession, UplinkDown


def _step(ok: bool, name: str, detail: str) -> bool:
    mark = "ok  " if ok else "FAIL"
    print(f"[{mark}] {name:10} {detail}")
    return ok


def _role(i: int) -> str:
    return "primary, [smtp]" if i == 0 else f"fallback {i}, [[smtp.fallback]] #{i}"


def pick(hosts: tuple[SmtpSection, ...], wanted: str | None) -> list[tuple[int, SmtpSection]]:
    """The smarthosts to test: all, or the one `wanted` names ("primary", a fallback's
    number, its host or host:port)."""
    listed = list(enumerate(hosts))
    if wanted is None:
        return listed
    w = wanted.strip().lower()
    return [
        (i, h)
        for i, h in listed
        if w in (h.host.lower(), h.where.lower(), str(i)) or (w == "primary" and i == 0)
    ]


async def _run(cfg: Config, send_to: str | None, wanted: str | None = None) -> int:
    smtp = cfg.smtp
    if smtp is None:
        print("mailgw smtp-test: the configuration has no [smtp] section", file=sys.stderr)
        return 2
    chosen = pick(smtp.hosts, wanted)
    if not chosen:
        names = ", ".join(f"{h.where} ({i})" for i, h in enumerate(smtp.hosts))
        print(
            f"mailgw smtp-test: no smarthost {wanted!r}; configured: {names} "
            "(name one by host, host:port, its number or 'primary')",
            file=sys.stderr,
        )
        return 2
    if len(smtp.hosts) == 1:
        return await _test(cfg, smtp, send_to)
    failed = []
    for i, host in chosen:
        print(f"--- {host.where} ({_role(i)})")
        if await _test(cfg, host, send_to) != 0:
            failed.append(host.where)
    if len(chosen) > 1:
        print(
            f"{len(chosen) - len(failed)} of {len(chosen)} smarthosts passed"
            + (f"; failed: {', '.join(failed)}" if failed else "")
        )
    return 1 if failed else 0


async def _test(cfg: Config, smtp: SmtpSection, send_to: str | None) -> int:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            smtp.host, smtp.port, type=socket.SOCK_STREAM
        )
    except OSError as exc:
        _step(False, "resolve", f"{smtp.host}: {exc} (no DNS yet? a typo in smtp.host?)")
        return 1
    addrs = sorted({str(i[4][0]) for i in infos})
    _step(True, "resolve", f"{smtp.host} → {', '.join(addrs)}")
    t0 = time.monotonic()
    try:
        with socket.create_connection((smtp.host, smtp.port), timeout=smtp.timeout):
            pass
    except OSError as exc:
        hint = " (mobile carriers often block port 25: use 587 or 465)" if smtp.port == 25 else ""
        _step(False, "connect", f"{smtp.host}:{smtp.port}: {exc}{hint}")
        return 1
    _step(True, "connect", f"{smtp.host}:{smtp.port} in {(time.monotonic() - t0) * 1000:.0f} ms")
    session = SmtpSession(smtp, socket.getfqdn())
    try:
        await session.open()
    except UplinkDown as exc:
        _step(False, "session", str(exc))
        return 1
    try:
        if smtp.tls == "none":
            _step(True, "tls", "none (loopback smarthost, as configured)")
        else:
            t = session.tls
            _step(True, "tls", f"{t.version}, {t.cipher}; certificate verified")
            print(f"{'':16}subject: {t.peer_subject}")
            print(f"{'':16}issuer:  {t.peer_issuer}")
            print(f"{'':16}expires: {t.peer_expires}")
        exts = ", ".join(sorted(k.upper() for k in session.extensions))
        _step(True, "ehlo", exts or "(no extensions)")
        if smtp.username:
            _step(True, "auth", f"logged in as {smtp.username} ({session.auth_mechanism})")
        else:
            _step(True, "auth", "not configured (no smtp.username)")
        if send_to:
            msg = test_message(smtp.sender, send_to, cfg.gateway.device_id)
            result = await session.deliver(msg, session_sender(smtp.sender), (send_to,))
            if not isinstance(result, Accepted):
                _step(False, "send", f"to {send_to}: {explain(result)}")
                return 1
            if result.refused:
                _step(False, "send", f"refused: {explain(result)}")
                return 1
            _step(True, "send", f"to {send_to}: {result.reply.text}")
    finally:
        await session.close()
    print("all checks passed")
    return 0


def session_sender(sender: str) -> str:
    from email.utils import parseaddr

    return parseaddr(sender)[1]


def run_smtp_test(cfg: Config, send_to: str | None, host: str | None = None) -> int:
    return asyncio.run(_run(cfg, send_to, host))
