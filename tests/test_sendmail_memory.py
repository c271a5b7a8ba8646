"""A max_size local mail of the worst shape is relayed within the unit's memory
(DESIGN.md invariant 13): the real daemon in a memory cgroup of the unit's MemoryMax,
`sendmail` run as nobody, a real smarthost that must get each body byte for byte,
and an MQTT alert sent around them that must arrive too."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiosmtpd.smtp
import pytest

from gateway.maildrop_parse import MAX_FIELDS, MAX_HEADER
from tests.parts import DaemonProcess, Mosquitto, Pki, Publisher, SmtpServer, wait_for
from tests.test_sendmail_daemon import config, sendmail, spool  # noqa: F401  (fixture)

MIB = 1024 * 1024
MAX_SIZE = 10 * MIB  # sendmail.max_size's default
MEMORY_MAX = 128 * MIB  # systemd/mailgw.service
MEMORY_HIGH = 96 * MIB

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a memory cgroup")


def _memory_cgroup_root() -> Path | None:
    """Where this process's memory cgroup is (v2 unified or v1 memory), or None."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "memory" and Path("/sys/fs/cgroup/memory").is_dir():
            return Path("/sys/fs/cgroup/memory" + path)
        if controllers == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            return Path("/sys/fs/cgroup" + path)
    return None


@pytest.fixture
def memory_limit() -> Iterator[Callable[[int], None]]:
    """limit(pid): the process joins a fresh memory cgroup capped at MEMORY_MAX (swap
    too), as MemoryMax= caps the unit; removed after the test."""
    root = _memory_cgroup_root()
    if root is None or not os.access(root, os.W_OK):
        pytest.skip("no writable memory cgroup")
    group = root / f"mailgw-test-{os.getpid()}-{time.monotonic_ns()}"
    group.mkdir()
    v1 = (group / "memory.limit_in_bytes").exists()
    if v1:
        (group / "memory.limit_in_bytes").write_text(str(MEMORY_MAX))
        if (group / "memory.memsw.limit_in_bytes").exists():
            (group / "memory.memsw.limit_in_bytes").write_text(str(MEMORY_MAX))
    else:
        (group / "memory.max").write_text(str(MEMORY_MAX))
        (group / "memory.swap.max").write_text("0")

    def limit(pid: int) -> None:
        (group / "cgroup.procs").write_text(str(pid))

    yield limit
    deadline = time.monotonic() + 10
    while (group / "cgroup.procs").read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.05)
    group.rmdir()


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _shapes() -> dict[str, bytes]:
    """The three worst shapes of a max_size message, each just inside the bounds."""
    top = b"To: root\nSubject: %s\n\n"
    half = b"a" * ((MAX_HEADER // MAX_FIELDS - 40) // 2)
    pad = b"X-Pad: " + half + b"\n " + half + b"\n"  # folded: lines within SMTP's 1000
    big_head = b"To: root\nSubject: big-header\n" + pad * (MAX_FIELDS - 10) + b"\n"
    assert len(big_head) < MAX_HEADER
    fill = MAX_SIZE - 4096
    return {
        "short-lines": top % b"short-lines" + b"\n" * (fill - 64),
        "big-header": big_head + b"x\n" * ((fill - len(big_head)) // 2),
        "one-line": top % b"one-line" + b"y" * (fill - 64) + b"\n",
    }


def test_max_size_mails_of_the_worst_shapes_relay_within_the_units_memory(
    tmp_path: Path,
    pki: Pki,
    spool: Path,  # noqa: F811
    broker: Mosquitto,
    memory_limit: Callable[[int], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shapes = _shapes()
    # A smarthost that takes what the gateway takes (Gmail's 35 MB; Postfix's long
    # lines), so that each body can be compared byte for byte.
    monkeypatch.setattr(aiosmtpd.smtp.SMTP, "line_length_limit", 2 * MAX_SIZE)
    with SmtpServer(pki, "starttls") as smtp:
        assert smtp._controller is not None
        smtp._controller.SMTP_kwargs["data_size_limit"] = 4 * MAX_SIZE
        cfg = config(tmp_path, pki, smtp.port, spool)
        cfg.write_text(
            cfg.read_text().replace('timeout = "1s"', 'timeout = "60s"')
            + f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\n'
        )
        gw = DaemonProcess(cfg, tmp_path / "daemon.log").start()
        assert gw.proc is not None
        memory_limit(gw.proc.pid)
        gw.wait_ready(("mqtt",))
        pub = Publisher(broker.port)
        for name, message in shapes.items():
            r = sendmail(spool, ["-t", "-oi"], message)
            assert r.returncode == 0, (name, r.stderr)
            pub.publish("alerts/mem/x", f"alert after {name}")

        def arrived() -> set[str]:
            return {str(m.message["Subject"]).split(": ")[-1] for m in smtp.received}

        wanted = set(shapes) | {f"alert after {n}" for n in shapes}
        wait_for(
            lambda: wanted <= arrived() or not gw.alive,
            timeout=240,
            what="the three mails and the alerts",
        )
        assert gw.alive, f"the daemon died (OOM?):\n{gw.log_text()[-2000:]}"
        peak = _peak_rss(gw.proc.pid)
        by_subject = {str(m.message["Subject"]): m for m in smtp.received}
        for name, message in shapes.items():
            body = by_subject[name].data.split(b"\r\n\r\n", 1)[1]
            sent = message.split(b"\n\n", 1)[1].replace(b"\n", b"\r\n")
            assert body == sent, name
        assert gw.terminate() == 0
        pub.close()
    print(f"peak RSS of the daemon: {peak / MIB:.1f} MiB")
    assert peak < MEMORY_HIGH, f"peak RSS {peak / MIB:.1f} MiB"
