"""`mailgw flush` and the quiet nudge after `queue retry`/`salvage`: signal the daemon.

The pid comes from status.json, a file the service account writes, and these commands
are often run as root. So nothing is signalled until the pid is shown to be the
`mailgw run` that owns this state directory, and the signal goes through a pidfd
that pins the process we inspected.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

from gateway.config import Config


def status_path(cfg: Config) -> Path:
    """The daemon's status file: its pid, counters and sources."""
    return cfg.gateway.runtime_dir / "status.json"


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


def _say_not_running(cfg: Config, path: Path) -> None:
    if path.exists():
        print(
            f"mailgw: not signalling: {path} names no live daemon (stale or malformed), "
            "so the daemon looks not running; start it with `systemctl start mailgw`, "
            "or if it runs, use `systemctl kill -s USR1 mailgw`",
            file=sys.stderr,
        )
    else:
        print(
            "mailgw: the daemon is not running (no live status in "
            f"{cfg.gateway.runtime_dir}); start it with `systemctl start mailgw`",
            file=sys.stderr,
        )


def _send_usr1(pid: int, pidfd: int | None, quiet: bool) -> bool:
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


def signal_daemon(cfg: Config, quiet: bool = False) -> bool:
    """SIGUSR1 to the daemon of `cfg` (probe the smarthost, retry now); False if not sent.

    Unless `quiet`, says on stderr why it was not sent and what to do instead.
    """
    from gateway.status import other_daemon, read_runtime

    path = status_path(cfg)
    rt = read_runtime(path)
    if (other := other_daemon(rt, cfg.gateway.state_dir, path)) is not None:
        if not quiet:
            print(f"mailgw: not signalling: {other}", file=sys.stderr)
        return False
    if rt is None:
        if not quiet:
            _say_not_running(cfg, path)
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
        return _send_usr1(pid, pidfd, quiet)
    finally:
        if pidfd is not None:
            os.close(pidfd)
