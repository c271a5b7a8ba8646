"""Debian root file systems for the system tests: first a chroot (dpkg, upgrade,
purge), then booted with systemd as PID 1 by systemd-nspawn, sharing the host's
network so the daemon inside reaches the broker and smarthost the tests run on
127.0.0.1. Recipe and traps: ../shared/SYSTEMD.md.

The debootstrap root is built once and cached; every test module gets a fresh copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = "systemd,systemd-sysv,dbus,procps,python3,ca-certificates"
CACHE = Path(os.environ.get("MAILGW_SYSTEM_CACHE", "/var/cache/mailgw-system"))
# Debian 12 and 13 (Raspberry Pi OS bookworm and trixie); arm roots run under
# qemu-user-static through binfmt_misc.
SUITES = ("bookworm", "trixie")


def base_root(suite: str = "bookworm", arch: str = "amd64") -> Path:
    """The cached debootstrap root, built when missing (about 70 s for amd64; several
    minutes for an emulated arm root)."""
    tag = hashlib.sha256(PACKAGES.encode()).hexdigest()[:8]
    root = CACHE / f"{suite}-{arch}-{tag}"
    if (root / ".complete").exists():
        return root
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = CACHE / f"{suite}-{arch}-{tag}.building"
    shutil.rmtree(tmp, ignore_errors=True)
    log = CACHE / f"debootstrap-{suite}-{arch}.log"
    argv = ["debootstrap", "--variant=minbase", f"--arch={arch}", f"--include={PACKAGES}"]
    with log.open("wb") as out:
        rc = subprocess.call([*argv, suite, str(tmp)], stdout=out, stderr=subprocess.STDOUT)
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-10:]
        raise RuntimeError(f"debootstrap {suite} {arch} failed:\n" + "\n".join(tail))
    (tmp / ".complete").touch()
    tmp.rename(root)
    return root


def can_emulate(arch: str) -> bool:
    """Whether this kernel runs `arch` binaries (qemu-user-static registered with the
    F flag, so a chroot needs no copy of the emulator)."""
    name = {"arm64": "qemu-aarch64", "armhf": "qemu-arm"}[arch]
    entry = Path("/proc/sys/fs/binfmt_misc") / name
    with contextlib.suppress(OSError):
        text = entry.read_text()
        return (
            text.startswith("enabled")
            and "flags: " in text
            and "F" in text.split("flags: ", 1)[1].split("\n", 1)[0]
        )
    return False


class Machine:
    """A copy of the base root: `chroot()` before boot, `run()` after."""

    def __init__(self, name: str, suite: str = "bookworm", arch: str = "amd64") -> None:
        self.name, self.suite, self.arch = name, suite, arch
        self.path = Path(tempfile.mkdtemp(prefix=f"mailgw-{name}-", dir="/var/tmp"))
        base = f"{base_root(suite, arch)}/."
        subprocess.run(["cp", "-a", "--reflink=auto", base, str(self.path)], check=True)
        (self.path / "etc/hostname").write_text(f"{name}\n")
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.pid1: int | None = None
        self.console = self.path.parent / f"{self.path.name}.console.log"

    # --- as a chroot ------------------------------------------------------------------

    def chroot(
        self, script: str, check: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a shell script in the root with /dev and /proc, in a private mount
        namespace (so nothing stays mounted when it ends)."""
        proc = subprocess.run(
            self._chroot_argv(script, env), capture_output=True, text=True, timeout=600
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"in chroot, exit {proc.returncode}:\n$ {script}\n{proc.stdout}{proc.stderr}"
            )
        return proc

    def chroot_spawn(
        self, script: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """A long-running script in the root (not booted), in its own process group,
        output to <root>.console.log."""
        with self.console.open("ab") as out:
            return subprocess.Popen(
                self._chroot_argv(script, env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _chroot_argv(self, script: str, env: dict[str, str] | None) -> list[str]:
        wrapper = (
            f'mount --rbind /dev "{self.path}/dev" && '
            f'mount -t proc proc "{self.path}/proc" && '
            f'exec chroot "{self.path}" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin '
            "LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "
            + " ".join(f"{k}={v}" for k, v in (env or {}).items())
            + ' /bin/sh -ec "$0"'
        )
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", wrapper, script]

    def put(self, path: str, data: bytes | str, mode: int = 0o644) -> Path:
        target = self.path / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data.encode() if isinstance(data, str) else data)
        target.chmod(mode)
        return target

    # --- booted -----------------------------------------------------------------------

    def boot(self, timeout: float = 60.0) -> None:
        # Without the unified hierarchy and the bpf system call, DevicePolicy= and
        # IPAddressDeny= would silently not be enforced inside.
        env = dict(os.environ, SYSTEMD_NSPAWN_UNIFIED_HIERARCHY="1")
        with self.console.open("wb") as out:
            self.nspawn = subprocess.Popen(
                [
                    "systemd-nspawn",
                    "--boot",
                    "--quiet",
                    "--register=no",
                    "--keep-unit",
                    "--system-call-filter=bpf",
                    "--console=read-only",
                    # A host name: letters, digits and inner '-' only.
                    f"--machine=mailgw-{self.name}-{self.path.stat().st_ino:x}",
                    "-D",
                    str(self.path),
                ],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while self.pid1 is None:
            if self.nspawn.poll() is not None:
                raise RuntimeError(f"nspawn exited: {self.console.read_text(errors='replace')}")
            if time.monotonic() > deadline:
                raise RuntimeError("the container's init did not appear")
            self.pid1 = self._find_init(self.nspawn.pid)
            time.sleep(0.05)
        # systemctl cannot connect until PID 1 has set up its socket: ask until it answers.
        state = ""
        while state not in ("running", "degraded"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the container did not finish booting: {state!r}")
            left = max(1, int(deadline - time.monotonic()))
            state = self.run(
                f"timeout {left} systemctl is-system-running --wait", check=False
            ).stdout.strip()
            if state in ("", "offline", "unknown"):
                time.sleep(0.1)

    @staticmethod
    def _find_init(nspawn_pid: int) -> int | None:
        """The descendant of nspawn that is PID 1 in its own PID namespace."""
        todo = [nspawn_pid]
        while todo:
            pid = todo.pop()
            with contextlib.suppress(OSError):
                status = Path(f"/proc/{pid}/status").read_text()
                for line in status.splitlines():
                    ids = line.split()
                    # "NSpid: <host pid> ... 1": PID 1 in a namespace below the host's.
                    if ids[:1] == ["NSpid:"] and len(ids) > 2 and ids[-1] == "1":
                        return pid
                for task in Path(f"/proc/{pid}/task").iterdir():
                    children = (task / "children").read_text().split()
                    todo.extend(int(c) for c in children)
        return None

    def run(
        self, script: str, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """A shell script inside the booted container, as its root."""
        assert self.pid1 is not None, "boot() first"
        env = [
            "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG=C.UTF-8",
            "DEBIAN_FRONTEND=noninteractive",
            "SYSTEMD_PAGER=",
            "SYSTEMD_COLORS=0",
        ]
        enter = ["nsenter", "-t", str(self.pid1), "-a", "/usr/bin/env", "-i"]
        proc = subprocess.run(
            [*enter, *env, "/bin/sh", "-ec", script],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"in container, exit {proc.returncode}:\n$ {script}\n{proc.stdout}{proc.stderr}"
            )
        return proc

    def spawn(self, argv: list[str]) -> subprocess.Popen[str]:
        """A long-running process inside the container, talking over pipes."""
        assert self.pid1 is not None, "boot() first"
        return subprocess.Popen(
            ["nsenter", "-t", str(self.pid1), "-a", *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def poweroff(self) -> None:
        if self.nspawn is None or self.nspawn.poll() is not None:
            return
        # SIGTERM makes nspawn ask the container's systemd for a clean shutdown.
        self.nspawn.send_signal(signal.SIGTERM)
        try:
            self.nspawn.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.nspawn.pid, signal.SIGKILL)
            self.nspawn.wait(10)

    def destroy(self) -> None:
        self.poweroff()
        shutil.rmtree(self.path, ignore_errors=True)
        self.console.unlink(missing_ok=True)
