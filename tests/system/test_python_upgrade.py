"""A Debian 12 device whose Python changes under it, as the upgrade to Debian 13 does
(3.11 to 3.13): the package's dpkg trigger rebuilds /opt/mailgw for the new interpreter,
the old one can go, and the alerts queued before are delivered after, with the config
untouched. (`make test-system`; fetches Debian 13's python3 from the archive.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.parts import Mosquitto, Pki, SmtpServer
from tests.system.fleet import PASSWORD, arrived, config
from tests.system.machine import Machine

pytestmark = pytest.mark.system

TRIXIE = """\
Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
"""


@pytest.fixture
def device(debs: tuple[Path, Path]) -> Iterator[Machine]:
    m = Machine("pyup", suite="bookworm")
    m.put(f"/root/{debs[1].name}", debs[1].read_bytes())
    yield m
    m.destroy()


@pytest.mark.timeout(600)  # fetches Debian 13's python3 from the archive
def test_python_upgrade_rebuilds_the_venv_and_keeps_the_queue(
    device: Machine, debs: tuple[Path, Path], parts: tuple[Pki, SmtpServer, Mosquitto]
) -> None:
    pki, smtp, broker = parts
    install = device.chroot(f"dpkg -i /root/{debs[1].name}")
    assert "mailgw: built /opt/mailgw for Python 3.11." in install.stderr, install
    device.put("/etc/mailgw/gateway.toml", config(smtp, broker, serial=False), 0o640)
    device.put("/etc/mailgw/ca.pem", pki.ca_file.read_bytes(), 0o644)
    device.put("/etc/mailgw/smtp-password", PASSWORD + "\n", 0o600)
    device.put("/etc/hosts", "127.0.0.1 localhost\n::1 localhost ip6-localhost\n")
    device.chroot("chown root:mailgw /etc/mailgw/gateway.toml")
    # Alerts wait in the outbox while the device is offline (not booted: nothing sends).
    device.chroot("install -d -o mailgw -g mailgw -m 0700 /var/lib/mailgw")
    texts = [f"queued before the python upgrade {i}" for i in range(3)]
    for text in texts:
        device.chroot(
            f"runuser -u mailgw -- mailgw send --severity critical --sensor door '{text}'"
        )
    edited = device.chroot("sha256sum /etc/mailgw/gateway.toml").stdout

    # Debian 13's python3 replaces 3.11 as /usr/bin/python3; dpkg runs the trigger.
    device.put("/etc/resolv.conf", Path("/etc/resolv.conf").read_bytes())
    device.put("/etc/apt/sources.list.d/trixie.sources", TRIXIE)
    upgrade = device.chroot(
        "apt-get update -q >/dev/null && apt-get install -y -q -t trixie python3 2>&1"
    )
    assert "Processing triggers for mailgw" in upgrade.stdout, upgrade.stdout
    assert "mailgw: built /opt/mailgw for Python 3.13." in upgrade.stdout, upgrade.stdout
    assert device.chroot("readlink -f /opt/mailgw/bin/python3").stdout == "/usr/bin/python3.13\n"
    # The old interpreter can go; the gateway no longer needs it.
    device.chroot("apt-get purge -y -q python3.11 python3.11-minimal libpython3.11-stdlib")
    device.chroot("test ! -e /usr/bin/python3.11")
    queue = device.chroot("runuser -u mailgw -- mailgw queue list").stdout
    assert all(t in queue for t in texts), queue
    assert device.chroot("sha256sum /etc/mailgw/gateway.toml").stdout == edited

    # Booted on the new Python, it delivers what waited.
    device.boot()
    arrived(smtp, texts)
    pid = device.run("systemctl show -p MainPID --value mailgw").stdout.strip()
    exe = device.run(f"readlink /proc/{pid}/exe").stdout.strip()
    assert exe == "/usr/bin/python3.13", exe
