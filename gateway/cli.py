"""The `mailgw` command: argument parsing and output; the work lives elsewhere.

Exit codes: 0 ok, 1 runtime failure, 2 bad usage or invalid configuration.
Heavy modules are imported inside the subcommand that needs them, so that
`mailgw status` on a Pi answers in a blink.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import os
import re
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from gateway import __version__
from gateway.config import DEFAULT_PATH, Config, load
from gateway.errors import ConfigError, GatewayError, OutboxFull


def _config(args: argparse.Namespace) -> Config:
    return load(args.config)


def _as_outbox_owner(cfg: Config) -> None:
    """Run as the owner of state_dir when started as root (`sudo mailgw queue ...`).

    SQLite creates outbox.db-wal and -shm beside the database when it is not open
    elsewhere; root-owned ones would lock the daemon (user mailgw) out of its own outbox.
    """
    if os.geteuid() != 0:
        return
    try:
        st = cfg.gateway.state_dir.stat()
    except OSError:
        return
    if st.st_uid != 0:
        os.setgroups([])
        os.setgid(st.st_gid)
        os.setuid(st.st_uid)


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if args.topic:
        from gateway.alert import parse_severity
        from gateway.routing import Router
        from gateway.storm import describe as describe_storm

        sev = parse_severity(args.severity)
        if sev is None:
            print(f"unknown severity {args.severity!r}", file=sys.stderr)
            return 2
        router = Router(cfg.routes, cfg.gateway.default_route)
        chosen = router.matching(args.topic, sev)
        if not chosen and router.default is not None:
            print(
                f"{args.topic} [{sev}] matches no route; goes to default route "
                f"{router.default.name}"
            )
        elif not chosen:
            print(f"{args.topic} [{sev}] matches no route: it would be stored as unrouted")
        for r in chosen:
            print(
                f"{args.topic} [{sev}] → route {r.name} (match {r.match}, min "
                f"{r.min_severity}) to {', '.join(r.to + r.cc)}"
            )
            if r.storm.active:
                print(f"    storm control: {describe_storm(r.storm, sev)}")
        return 0
    print(f"ok: {cfg.path}: {cfg.summary()}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from gateway import service, systemd

    cfg = _config(args)
    systemd.setup_logging(args.log_level)
    # `kill -USR2 <pid>` writes every thread's stack to the journal: for a stuck daemon.
    faulthandler.register(signal.SIGUSR2, all_threads=True)
    return service.run(cfg)


def cmd_send(args: argparse.Namespace) -> int:
    from gateway.alert import Draft, clean_sensor, normalize, parse_severity
    from gateway.ingest import routed
    from gateway.outbox import Outbox
    from gateway.routing import Router

    cfg = _config(args)
    sev = parse_severity(args.severity)
    if sev is None:
        print(
            f"mailgw send: unknown severity {args.severity!r}; use debug, info, warning or "
            "critical",
            file=sys.stderr,
        )
        return 2
    # Bytes, not text, whatever the locale: normalize() decodes with replacement and
    # notes `non_utf8`, so a stray byte costs a character, not the alert. Arguments
    # that were not UTF-8 come back to their bytes the same way (surrogateescape).
    if args.message:
        payload = os.fsencode(" ".join(args.message))
    else:
        payload = sys.stdin.buffer.read() if sys.stdin is not None else b""
    if not payload.strip():
        print("mailgw send: empty message; give MESSAGE or pipe it on stdin", file=sys.stderr)
        return 2
    sensor = clean_sensor(args.sensor)
    topic = os.fsencode(args.topic).decode("utf-8", "replace") if args.topic else f"local/{sensor}"
    alert = normalize(
        payload.rstrip(b"\r\n"),
        Draft(topic=topic, source="local", sensor=sensor, severity=sev),
        parse_json=False,
    )
    router = Router(cfg.routes, cfg.gateway.default_route)
    _as_outbox_owner(cfg)
    ob = Outbox(
        cfg.outbox_path,
        max_messages=cfg.outbox.max_messages,
        allow_volatile=cfg.outbox.allow_volatile,
        recover=False,
        policies=cfg.storm_policies,
    )
    try:
        ob.add([routed(alert, router, cfg.storm_policies)])
    except OutboxFull as exc:
        print(f"mailgw send: not stored: {exc}", file=sys.stderr)
        return 1
    finally:
        ob.close()
    print(alert.id)
    return 0


def _paths(cfg: Config) -> tuple[Path, Path]:
    return cfg.outbox_path, cfg.gateway.runtime_dir / "status.json"


def cmd_status(args: argparse.Namespace) -> int:
    from gateway import status

    cfg = _config(args)
    _as_outbox_owner(cfg)
    while True:
        report = status.report(*_paths(cfg))
        if args.json:
            print(json.dumps(report, indent=2, sort_keys=True))
        else:
            if args.watch:
                print("\033[H\033[2J", end="")
            print(status.render(report))
        if not args.watch:
            return 0
        try:
            time.sleep(args.interval)
        except KeyboardInterrupt:
            return 0


# json.dumps escapes C0 controls itself; with ensure_ascii=False (readable non-ASCII
# text) DEL, the C1 controls (0x9b is CSI), the line separators and the bidi
# overrides would still reach the terminal raw. Outside strings JSON has none of
# them, so escaping them as \uXXXX keeps the output the same JSON value.
_JSON_RAW = re.compile(r"[\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _terminal_json(value: object) -> str:
    text = json.dumps(value, indent=2, ensure_ascii=False)
    return _JSON_RAW.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _open_rw(cfg: Config):  # type: ignore[no-untyped-def]
    from gateway import outbox

    if not cfg.outbox_path.exists():
        raise GatewayError(f"{cfg.outbox_path} does not exist: nothing is queued yet")
    _as_outbox_owner(cfg)
    return outbox.connect(cfg.outbox_path)


def cmd_salvage(cfg: Config, source: str | None) -> int:
    """Re-queue the undelivered alerts of a moved-aside (corrupt) outbox."""
    import sqlite3

    from gateway.outbox import Outbox
    from gateway.routing import Router
    from gateway.salvage import salvage

    if not source or not Path(source).is_file():
        print(
            "mailgw queue salvage: give the moved-aside file, e.g. "
            f"{cfg.outbox_path}.corrupt-20260101T000000",
            file=sys.stderr,
        )
        return 2
    _as_outbox_owner(cfg)
    ob = Outbox(
        cfg.outbox_path,
        max_messages=cfg.outbox.max_messages,
        allow_volatile=cfg.outbox.allow_volatile,
        recover=False,
    )
    router = Router(cfg.routes, cfg.gateway.default_route)
    try:
        report = salvage(Path(source), ob, router.route)
    except sqlite3.DatabaseError as exc:
        print(f"mailgw queue salvage: {source} cannot be read at all: {exc}", file=sys.stderr)
        return 1
    finally:
        ob.close()
    for err in report.errors:
        print(f"damaged: {err}", file=sys.stderr)
    print(
        f"{report.requeued} alerts queued again (same ids and Message-IDs), "
        f"{report.already_queued} already in the outbox, "
        f"{report.unknown_state} of them with unreadable delivery state (queued for their "
        f"routes now; may have been sent before), "
        f"{report.unreadable} undelivered alerts could not be read"
    )
    _signal_daemon(cfg, quiet=True)
    if report.damaged:
        print(
            "mailgw queue salvage: the file is damaged; what could be read is queued again",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_queue(args: argparse.Namespace) -> int:
    from gateway import outbox

    cfg = _config(args)
    if args.action == "salvage":
        return cmd_salvage(cfg, args.id)
    conn = _open_rw(cfg)
    try:
        if args.action in ("list", "dead"):
            states = (
                ["dead"]
                if args.action == "dead"
                else ([args.state] if args.state else ["queued", "sending", "dead", "unrouted"])
            )
            rows = outbox.listing(conn, states, args.limit)
            if args.json:
                print(json.dumps(rows, indent=2))
                return 0
            if not rows:
                print(f"no messages in state {', '.join(states)}")
                return 0
            from gateway.status import printable

            # Message and last_error are a sensor's and an SMTP server's words: shown
            # with their control characters escaped, so they cannot move the cursor,
            # clear the screen or forge other rows.
            print(f"{'ID':36}  {'STATE':8} {'ROUTE':10} {'TRIES':>5}  {'AGE':>6}  MESSAGE")
            for r in rows:
                age = time.time() - r["received_at"]
                msg = printable(r["message"].replace("\n", " ")[:40])
                print(
                    f"{printable(r['id']):36}  {r['state']:8} {printable(r['route'][:10]):10} "
                    f"{r['attempts']:5}  {int(age // 60):5}m  {msg}"
                )
                if r["last_error"]:
                    print(f"{'':38}└ {printable(r['last_error'][:70])}")
            return 0
        if args.action == "show":
            found = outbox.find(conn, args.id)
            if found is None:
                print(f"no alert with id {args.id}", file=sys.stderr)
                return 1
            alert, deliveries = found
            print(
                _terminal_json(
                    {
                        "id": alert.id,
                        "topic": alert.topic,
                        "source": alert.source,
                        "sensor": alert.sensor,
                        "severity": str(alert.severity),
                        "message": alert.message,
                        "event_time": alert.event_time,
                        "received_at": alert.received.wall,
                        "clock_synced": alert.received.synced,
                        "fields": dict(alert.fields),
                        "notes": list(alert.notes),
                        "deliveries": deliveries,
                    }
                )
            )
            return 0
        if args.action == "retry":
            if not args.all and not args.id:
                print("mailgw queue retry: give an ID or --all", file=sys.stderr)
                return 2
            n = outbox.retry(conn, None if args.all else args.id)
            print(f"{n} deliveries queued for immediate retry")
            _signal_daemon(cfg, quiet=True)
            return 0 if n or args.all else 1
        if args.action == "delete":
            n = outbox.delete(conn, args.id)
            if not n:
                print(f"no alert with id {args.id}", file=sys.stderr)
                return 1
            print(f"deleted alert {args.id} and its {n} deliveries")
            return 0
    finally:
        conn.close()
    return 2


def _is_daemon_cmdline(argv: list[str]) -> bool:
    """`mailgw run ...`, `python [opts] /path/mailgw run ...` or `python [opts] -m gateway run`.

    The console script is a Python script, so under systemd the kernel's argv is
    `python3 /opt/mailgw/bin/mailgw run -c ...`; argparse puts `run` first after it.
    """
    if not argv:
        return False
    rest: list[str] | None = None
    if os.path.basename(argv[0]) == "mailgw":
        rest = argv[1:]
    elif os.path.basename(argv[0]).startswith("python"):
        i = 1
        while i < len(argv):
            arg = argv[i]
            if arg == "-m":
                if argv[i + 1 : i + 2] in (["gateway"], ["gateway.__main__"]):
                    rest = argv[i + 2 :]
                break
            if arg in ("-X", "-W"):  # options that take a separate argument
                i += 2
            elif arg.startswith("-"):
                if arg == "-c":
                    break  # a -c program is not the daemon, whatever follows
                i += 1
            else:
                if os.path.basename(arg) == "mailgw":
                    rest = argv[i + 1 :]
                break
    return rest is not None and rest[:1] == ["run"]


def _daemon_problem(cfg: Config, pid: object) -> str | None:
    """Why `pid` is not the mailgw daemon that owns this state_dir, or None if it is.

    status.json sits in a directory the service account writes, and `mailgw flush`
    is often run as root: a pid of -1 there would signal every process on the
    machine, a negative one a process group, 0 our own group, and any other number
    some unrelated process. So the pid must be a plain number > 1 of a process that
    runs as the owner of the state directory (or of the outbox) and whose command
    line is `mailgw run`. The account can then at most make us signal a process of
    its own, which it could do itself.
    """
    if type(pid) is not int or pid <= 1:
        return f"the status file names pid {pid!r}, which is not a process id"
    proc = Path(f"/proc/{pid}")
    try:
        uid = _proc_uid(proc / "status")
        argv = [a.decode("utf-8", "replace") for a in (proc / "cmdline").read_bytes().split(b"\0")]
    except FileNotFoundError:
        return f"the status file names pid {pid}, which is not running"
    except (OSError, ValueError) as exc:
        return f"cannot inspect pid {pid}: {exc}"
    while argv and not argv[-1]:
        argv.pop()
    owners = set()
    for path in (cfg.gateway.state_dir, cfg.outbox_path):
        with contextlib.suppress(OSError):
            owners.add(path.stat().st_uid)
    if not owners:
        return f"{cfg.gateway.state_dir} does not exist, so no daemon runs on it"
    if uid not in owners:
        return (
            f"pid {pid} runs as uid {uid}, not as the owner of {cfg.gateway.state_dir} "
            f"(uid {', '.join(str(o) for o in sorted(owners))})"
        )
    if not _is_daemon_cmdline(argv):
        from gateway.status import printable

        shown = printable(" ".join(argv)[:200]) or "(no command line)"
        return f"pid {pid} is not a mailgw daemon: its command line is {shown}"
    return None


def _proc_uid(status_file: Path) -> int:
    """The real uid of a process, from /proc/PID/status: /proc/PID itself belongs to
    root when the process is not dumpable, its status line never lies."""
    for line in status_file.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise ValueError(f"no Uid line in {status_file}")


def _open_pidfd(pid: int) -> int | None:
    """A pidfd for `pid`, or None where the kernel or Python has none (then kill(2))."""
    if not hasattr(os, "pidfd_open"):
        return None
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        raise
    except OSError:
        return None


def _signal_daemon(cfg: Config, quiet: bool = False) -> bool:
    from gateway.status import read_runtime

    path = _paths(cfg)[1]
    rt = read_runtime(path)
    if rt is None:
        if not quiet and path.exists():
            print(
                f"mailgw: not signalling: {path} names no live daemon (stale or malformed), "
                "so the daemon looks not running; start it with `systemctl start mailgw`, "
                "or if it runs, use `systemctl kill -s USR1 mailgw`",
                file=sys.stderr,
            )
        elif not quiet:
            print(
                "mailgw: the daemon is not running (no live status in "
                f"{cfg.gateway.runtime_dir}); start it with `systemctl start mailgw`",
                file=sys.stderr,
            )
        return False
    pid = rt["pid"]
    # A pidfd pins the process we inspect: the signal cannot reach another process
    # that took the pid over between the check and the kill.
    problem: str | None
    try:
        pidfd = _open_pidfd(pid)
    except ProcessLookupError:
        pidfd, problem = None, f"the status file names pid {pid}, which is not running"
    else:
        problem = _daemon_problem(cfg, pid)
    try:
        if problem is not None:
            if not quiet:
                print(
                    f"mailgw: not signalling: {problem}. If the daemon runs under systemd, "
                    "use `systemctl kill -s USR1 mailgw`",
                    file=sys.stderr,
                )
            return False
        try:
            if pidfd is not None:
                signal.pidfd_send_signal(pidfd, signal.SIGUSR1)
            else:
                os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:
            if not quiet:
                print(f"mailgw: the daemon (pid {pid}) has just exited", file=sys.stderr)
            return False
        except PermissionError:
            if not quiet:
                print(
                    f"mailgw: not allowed to signal pid {pid}; run as root or use "
                    "`systemctl kill -s USR1 mailgw`",
                    file=sys.stderr,
                )
            return False
        return True
    finally:
        if pidfd is not None:
            os.close(pidfd)


def cmd_flush(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if not _signal_daemon(cfg):
        return 1
    print("asked the daemon to probe the smarthost and retry the queue now")
    return 0


def cmd_smtp_test(args: argparse.Namespace) -> int:
    from gateway.smtptest import run_smtp_test

    return run_smtp_test(_config(args), args.send_to)


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    return run_demo(ci=args.ci)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mailgw",
        description="A crash-safe mail gateway: MQTT and serial alerts to authenticated TLS email.",
    )
    p.add_argument("--version", action="version", version=f"mailgw {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.add_argument(
            "-c",
            "--config",
            type=Path,
            default=DEFAULT_PATH,
            help=f"configuration file (default {DEFAULT_PATH})",
        )
        return sp

    sp = add("run", "run the daemon in the foreground (systemd Type=notify)")
    sp.add_argument(
        "--log-level",
        default=os.environ.get("MAILGW_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
    )
    sp.set_defaults(func=cmd_run)

    sp = add("check-config", "validate the configuration; exit 2 if invalid")
    sp.add_argument("--topic", help="show which routes an alert on TOPIC would take")
    sp.add_argument("--severity", default="warning", help="with --topic (default warning)")
    sp.set_defaults(func=cmd_check_config)

    sp = add("route-test", "show which routes an alert on TOPIC would take")
    sp.add_argument("topic")
    sp.add_argument("--severity", default="warning")
    sp.set_defaults(func=cmd_check_config)

    sp = add("send", "store an alert durably (like sendmail); reads stdin without MESSAGE")
    sp.add_argument("--sensor", required=True)
    sp.add_argument("--severity", required=True, help="debug, info, warning or critical")
    sp.add_argument("--topic", help="default local/SENSOR")
    sp.add_argument("message", nargs="*")
    sp.set_defaults(func=cmd_send)

    sp = add("status", "queue depth, uplink, last success and error, rejections")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    sp.add_argument("--interval", type=float, default=2.0)
    sp.set_defaults(func=cmd_status)

    sp = add("queue", "list, show, retry or delete queued messages")
    sp.add_argument("action", choices=["list", "show", "retry", "delete", "dead", "salvage"])
    sp.add_argument("id", nargs="?", help="an alert id; for salvage, the moved-aside file")
    sp.add_argument("--all", action="store_true", help="retry: every queued and dead message")
    sp.add_argument(
        "--state", choices=["queued", "sending", "sent", "dead", "unrouted", "suppressed"]
    )
    sp.add_argument("--limit", type=int, default=100)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_queue)

    sp = add("flush", "ask the running daemon to probe the smarthost and retry now")
    sp.set_defaults(func=cmd_flush)

    sp = sub.add_parser("demo", help="a self-contained end-to-end demonstration")
    sp.add_argument("--ci", action="store_true", help="short and non-interactive")
    sp.set_defaults(func=cmd_demo)

    sp = add("smtp-test", "diagnose the smarthost: DNS, connect, TLS, AUTH, optional test mail")
    sp.add_argument("--send-to", metavar="ADDR", help="also send a test mail to ADDR")
    sp.set_defaults(func=cmd_smtp_test)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"{len(exc.problems)} problem(s) in the configuration", file=sys.stderr)
        return 2
    except GatewayError as exc:
        print(f"mailgw: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code
