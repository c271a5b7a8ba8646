"""The `mailgw` command: argument parsing and output; the work lives elsewhere.

Exit codes: 0 ok, 1 runtime failure, 2 bad usage or invalid configuration.
The queue subcommands are in cli_queue.py; finding and signalling the daemon
(`flush`) in cli_signal.py.
Heavy modules are imported inside the subcommand that needs them, so that
`mailgw status` on a Pi answers in a blink.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from gateway import __version__
from gateway.cli_queue import as_outbox_owner, cmd_queue, open_outbox
from gateway.cli_signal import signal_daemon, status_path
from gateway.config import DEFAULT_PATH, Config, load
from gateway.errors import ConfigError, GatewayError, OutboxFull


def _config(args: argparse.Namespace) -> Config:
    return load(args.config)


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
        if cfg.silence:
            _show_silence(cfg, args.topic, getattr(args, "sensor", None))
        return 0
    print(f"ok: {cfg.path}: {cfg.summary()}")
    return 0


def _show_silence(cfg: Config, topic: str, sensor: str | None) -> None:
    from gateway.config import format_duration
    from gateway.silence import rule_for

    sensor = sensor or topic.rsplit("/", 1)[-1]
    rule = rule_for(cfg.silence, topic, sensor)
    if rule is None:
        print(f"{topic} (sensor {sensor}): no silence rule watches it")
        return
    where = f"route {rule.route}" if rule.route else "routed by its topic"
    print(
        f"{topic} (sensor {sensor}) → silence rule {rule.name}: a report expected every "
        f"{format_duration(rule.expect_every)}; else a {rule.severity} alert on "
        f"gateway/{cfg.gateway.device_id}/silence/{topic}, {where}"
    )


def cmd_run(args: argparse.Namespace) -> int:
    # A reload or flush asked for while the daemon is still starting (`systemctl reload`
    # right after a start, an operator's `mailgw flush`) must not end it: by default
    # SIGHUP and SIGUSR1 terminate a process. Ignored until the loop takes them over;
    # the configuration read below is the one a reload would have read anyway.
    for sig in (signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    from gateway import heap, service, systemd

    cfg = _config(args)
    systemd.setup_logging(args.log_level)
    heap.pin_mmap_threshold()  # message-sized buffers go back to the system when done
    # `kill -USR2 <pid>` writes every thread's stack to the journal: for a stuck daemon.
    faulthandler.register(signal.SIGUSR2, all_threads=True)
    return service.run(cfg)


def cmd_send(args: argparse.Namespace) -> int:
    from gateway.alert import Draft, clean_sensor, normalize, parse_severity
    from gateway.ingest import routed
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
    ob = open_outbox(cfg, storm=True)
    try:
        ob.add([routed(alert, router, cfg.storm_policies)])
    except OutboxFull as exc:
        print(f"mailgw send: not stored: {exc}", file=sys.stderr)
        return 1
    finally:
        ob.close()
    print(alert.id)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from gateway import status
    from gateway.outbox.room import room_of

    cfg = _config(args)
    as_outbox_owner(cfg)
    while True:
        report = status.report(cfg.outbox_path, status_path(cfg), room=room_of(cfg.outbox))
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


def cmd_flush(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if not signal_daemon(cfg):
        return 1
    print("asked the daemon to probe the smarthost and retry the queue now")
    return 0


def cmd_smtp_test(args: argparse.Namespace) -> int:
    from gateway.smtptest import run_smtp_test

    return run_smtp_test(_config(args), args.send_to, args.host)


def cmd_oauth(args: argparse.Namespace) -> int:
    """`mailgw oauth login`: a refresh token by the device grant, kept where the daemon
    reads it (state_dir, as its owner)."""
    from gateway.oauth_device import login

    cfg = _config(args)
    oauth = cfg.smtp.oauth if cfg.smtp else None
    if oauth is None or oauth.device_url is None:
        print('mailgw: set [smtp.oauth] device_url (and grant = "refresh_token")', file=sys.stderr)
        return 2
    as_outbox_owner(cfg)
    cache = cfg.gateway.state_dir / "oauth-token.json"
    assert cfg.smtp is not None
    login(oauth, cfg.smtp.timeout, cache, sys.stdout)
    print(f"signed in; the token is kept in {cache}. If the daemon waits, run `mailgw flush`.")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    return run_demo(ci=args.ci)


def cmd_firstboot(args: argparse.Namespace) -> int:
    from gateway.firstboot import Owner, take

    try:
        outcome = take(args.boot, args.etc, Owner.system())
    except OSError as exc:
        raise GatewayError(f"firstboot: {exc}") from None
    if outcome.code:
        print(f"mailgw firstboot: {outcome.summary}", file=sys.stderr)
        for problem in outcome.problems:
            print(f"  {problem}", file=sys.stderr)
    elif outcome.summary:
        print(f"mailgw firstboot: {outcome.summary}")
    return outcome.code


def _add_daemon_commands(add: Callable[[str, str], argparse.ArgumentParser]) -> None:
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
    sp.add_argument("--sensor", help="for silence rules (default: the topic's last level)")
    sp.set_defaults(func=cmd_check_config)

    sp = add("send", "store an alert durably (like sendmail); reads stdin without MESSAGE")
    sp.add_argument("--sensor", required=True)
    sp.add_argument("--severity", required=True, help="debug, info, warning or critical")
    sp.add_argument("--topic", help="default local/SENSOR")
    sp.add_argument("message", nargs="*")
    sp.set_defaults(func=cmd_send)


def _add_operator_commands(add: Callable[[str, str], argparse.ArgumentParser]) -> None:
    sp = add("status", "queue depth, uplink, last success and error, rejections")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    sp.add_argument("--interval", type=float, default=2.0)
    sp.set_defaults(func=cmd_status)

    sp = add("queue", "list, show, retry, delete or export queued messages")
    sp.add_argument(
        "action", choices=["list", "show", "retry", "delete", "dead", "export", "salvage"]
    )
    sp.add_argument("id", nargs="?", help="an alert id; for salvage, the moved-aside file")
    sp.add_argument("--all", action="store_true", help="retry: every queued and dead message")
    sp.add_argument(
        "--state", choices=["queued", "sending", "held", "sent", "dead", "unrouted", "suppressed"]
    )
    sp.add_argument("--limit", type=int, default=100)
    sp.add_argument("--json", action="store_true")
    sp.add_argument(
        "--format", choices=["json", "csv"], default="json", help="export: json (default) or csv"
    )
    sp.set_defaults(func=cmd_queue)

    sp = add("flush", "ask the running daemon to probe the smarthost and retry now")
    sp.set_defaults(func=cmd_flush)


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

    _add_daemon_commands(add)
    _add_operator_commands(add)

    sp = sub.add_parser("demo", help="a self-contained end-to-end demonstration")
    sp.add_argument("--ci", action="store_true", help="short and non-interactive")
    sp.set_defaults(func=cmd_demo)

    sp = sub.add_parser(
        "firstboot",
        help="take a mailgw.toml dropped on the boot partition (run as root, at boot)",
        description="Install BOOT/mailgw.toml as ETC/gateway.toml if check-config accepts "
        "it, moving any SMTP password off the card to ETC/smtp-password first. Exit 0: "
        "taken, or nothing to do; 1: rejected (the reasons in BOOT/mailgw.toml.rejected).",
    )
    sp.add_argument("--boot", type=Path, default=Path("/boot/firmware"), metavar="DIR")
    sp.add_argument("--etc", type=Path, default=DEFAULT_PATH.parent, metavar="DIR")
    sp.set_defaults(func=cmd_firstboot)

    sp = add("oauth", "OAuth2 for the smarthost: `login` signs in by a code (RFC 8628)")
    sp.add_argument("action", choices=["login"])
    sp.set_defaults(func=cmd_oauth)

    sub.add_parser(
        "sendmail",
        add_help=False,
        help="sendmail's command line (-t, -i, -f, -F, -bp, -bs; recipients): queue local mail",
    )
    sp = add("smtp-test", "diagnose the smarthost: DNS, connect, TLS, AUTH, optional test mail")
    sp.add_argument("--send-to", metavar="ADDR", help="also send a test mail to ADDR")
    sp.add_argument(
        "--host",
        metavar="HOST",
        help="test only this smarthost (host, host:port, 0 = primary, "
        "1.. = fallback); default: each in turn",
    )
    sp.set_defaults(func=cmd_smtp_test)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["sendmail"]:  # sendmail's own options, not argparse's (gateway/sendmail.py)
        from gateway.sendmail import main as sendmail

        return sendmail(argv[1:])
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
