"""The same .deb on arm64 and armhf (the Raspberry Pi's architectures), Debian 13, run
under qemu-user-static: install (the venv built on the "device" by its own python3),
then the daemon delivers an MQTT alert end to end. Functional only: emulation says
nothing about speed. The daemon runs in the chroot rather than under a booted systemd,
which the other system tests cover on amd64. (`make test-system`)"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.parts import Mosquitto, Pki, SmtpServer, wait_for
from tests.system.fleet import PASSWORD, arrived, config, publish
from tests.system.machine import Machine, can_emulate

pytestmark = pytest.mark.system
CREDS = "/run/mailgw-creds"


@pytest.fixture(params=["arm64", "armhf"])
def arm(request: pytest.FixtureRequest) -> Iterator[Machine]:
    arch = request.param
    if not can_emulate(arch):
        pytest.fail(f"cannot run {arch} binaries: apt-get install qemu-user-static")
    m = Machine(f"arm-{arch}", suite="trixie", arch=arch)
    yield m
    m.destroy()


@pytest.mark.timeout(900)  # emulated: pip and compileall run about 10 times slower
def test_installs_and_delivers_under_emulation(
    arm: Machine, debs: tuple[Path, Path], parts: tuple[Pki, SmtpServer, Mosquitto]
) -> None:
    pki, smtp, broker = parts
    assert arm.chroot("dpkg --print-architecture").stdout.strip() == arm.arch
    deb = debs[1]
    arm.put(f"/root/{deb.name}", deb.read_bytes())
    install = arm.chroot(f"dpkg -i /root/{deb.name}")
    assert "mailgw: built /opt/mailgw for Python 3.13." in install.stderr, install
    arm.put("/etc/mailgw/gateway.toml", config(smtp, broker, serial=False), 0o640)
    arm.put("/etc/mailgw/ca.pem", pki.ca_file.read_bytes(), 0o644)
    arm.put("/etc/hosts", "127.0.0.1 localhost\n::1 localhost ip6-localhost\n")
    arm.put(f"{CREDS}/smtp-password", PASSWORD + "\n", 0o400)
    arm.chroot(f"chown root:mailgw /etc/mailgw/gateway.toml && chown mailgw {CREDS}/*")
    assert arm.chroot("mailgw check-config").stdout.startswith("ok:")

    # As the unit would run it: the service user, the credential in CREDENTIALS_DIRECTORY.
    daemon = arm.chroot_spawn(
        "install -d -o mailgw -g mailgw -m 0700 /var/lib/mailgw /run/mailgw && "
        f"exec runuser -u mailgw -- env CREDENTIALS_DIRECTORY={CREDS} "
        "/opt/mailgw/bin/mailgw run -c /etc/mailgw/gateway.toml"
    )
    try:
        wait_for(
            lambda: "connected to the MQTT broker" in arm.console.read_text(errors="replace"),
            120,
            f"the daemon's MQTT session on {arm.arch}",
        )
        text = f"cold room door open, from {arm.arch}"
        publish(broker, [text])
        arrived(smtp, [text], timeout=120)
        mail = next(r for r in smtp.received if text in str(r.message["Subject"]))
        assert mail.auth_user is not None and mail.tls
    finally:
        stop(daemon)


def stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
