"""The .deb from `make package` in Debian 12 and Debian 13 chroots: install, upgrade over
a previous build with alerts in the outbox, purge. (`make test-system`; needs root.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.system.machine import SUITES, Machine

pytestmark = pytest.mark.system
PYTHON = {"bookworm": "3.11", "trixie": "3.13"}


@pytest.fixture(scope="module", params=SUITES)
def pkg(request: pytest.FixtureRequest, debs: tuple[Path, Path]) -> Machine:
    m = Machine("pkg", suite=request.param)
    for deb in debs:
        (m.path / "root" / deb.name).write_bytes(deb.read_bytes())
    yield m
    m.destroy()


def send(m: Machine, text: str) -> None:
    m.chroot(f"runuser -u mailgw -- mailgw send --severity critical --sensor door '{text}'")


def test_install_upgrade_with_queued_alerts_and_purge(
    pkg: Machine, debs: tuple[Path, Path]
) -> None:
    prev, new = debs
    run = pkg.chroot(f"dpkg -i /root/{prev.name}")
    assert f"Setting up mailgw ({version(prev)})" in run.stdout
    # The venv is built here, offline, for this system's Python.
    python = PYTHON[pkg.suite]
    assert f"mailgw: built /opt/mailgw for Python {python}." in run.stderr, run
    assert pkg.chroot("readlink -f /opt/mailgw/bin/python3").stdout == f"/usr/bin/python{python}\n"

    # The user, in dialout; the conffile and the credential as the unit expects them.
    assert "(dialout)" in pkg.chroot("id mailgw").stdout
    modes = pkg.chroot(
        "stat -c '%n %U:%G %a' /etc/mailgw /etc/mailgw/gateway.toml /etc/mailgw/smtp-password"
    ).stdout.split("\n")
    assert modes[:3] == [
        "/etc/mailgw root:mailgw 750",
        "/etc/mailgw/gateway.toml root:mailgw 640",
        "/etc/mailgw/smtp-password root:root 600",
    ]
    assert pkg.chroot("dpkg-query -W -f='${Conffiles}' mailgw").stdout.count("/etc/") == 2
    assert pkg.chroot("test -L /etc/systemd/system/multi-user.target.wants/mailgw.service")

    # The shipped config passes its own check; the unit verifies clean as installed.
    assert pkg.chroot("mailgw check-config").stdout.startswith("ok: /etc/mailgw/gateway.toml")
    for unit in ("mailgw.service", "mailgw-firstboot.service"):
        verify = pkg.chroot(f"systemd-analyze verify --man=no /lib/systemd/system/{unit}")
        assert verify.stdout + verify.stderr == ""

    # The operator edits the config and the device queues alerts (the smarthost is the
    # placeholder, so they stay queued), then the fleet upgrades it.
    pkg.chroot("echo '# site edit' >> /etc/mailgw/gateway.toml")
    pkg.chroot("install -d -o mailgw -g mailgw -m 0700 /var/lib/mailgw")
    for i in range(3):
        send(pkg, f"before upgrade {i}")
    run = pkg.chroot(f"dpkg -i /root/{new.name}")
    assert f"Setting up mailgw ({version(new)})" in run.stdout
    assert f"Unpacking mailgw ({version(new)}) over ({version(prev)})" in run.stdout
    # Other wheels, so a new venv; the same wheels again would leave it alone.
    assert f"mailgw: built /opt/mailgw for Python {python}." in run.stderr, run
    again = pkg.chroot(f"dpkg -i /root/{new.name}")
    assert "mailgw: built" not in again.stderr, again

    queue = pkg.chroot("runuser -u mailgw -- mailgw queue list").stdout
    assert all(f"before upgrade {i}" in queue for i in range(3)), queue
    assert pkg.chroot("tail -1 /etc/mailgw/gateway.toml").stdout == "# site edit\n"
    schema = pkg.chroot(
        "/opt/mailgw/bin/python3 -c 'import sqlite3; print(sqlite3.connect("
        '"/var/lib/mailgw/outbox.db").execute("PRAGMA user_version").fetchone()[0])\''
    ).stdout.strip()
    from gateway.outbox import SCHEMA_VERSION

    assert schema == str(SCHEMA_VERSION)

    # Purge, non-interactive: the undelivered alerts are kept, and it says so.
    purge = pkg.chroot("dpkg --purge mailgw")
    assert "kept /var/lib/mailgw: it holds 3 undelivered alerts" in purge.stderr, purge.stderr
    # Kept as it was, owned by the service user (counting it did not leave root's files).
    listing = pkg.chroot("stat -c '%n %U' /var/lib/mailgw/*").stdout.splitlines()
    assert "/var/lib/mailgw/outbox.db mailgw" in listing
    assert all(line.endswith(" mailgw") for line in listing), listing
    assert pkg.chroot("test ! -e /opt/mailgw && test ! -e /etc/mailgw")

    # Reinstalled, the same alerts are there to deliver. A fleet that wants purge to
    # delete them says so ahead of time with debconf.
    pkg.chroot(f"dpkg -i /root/{new.name}")
    assert "before upgrade 2" in pkg.chroot("runuser -u mailgw -- mailgw queue list").stdout
    pkg.chroot("echo 'mailgw mailgw/purge-outbox boolean true' | debconf-set-selections")
    purge = pkg.chroot("dpkg --purge mailgw")
    assert "deleted /var/lib/mailgw with 3 undelivered alerts" in purge.stderr, purge.stderr
    assert pkg.chroot("test ! -e /var/lib/mailgw")


def test_purge_of_an_empty_outbox_removes_it_silently(
    pkg: Machine, debs: tuple[Path, Path]
) -> None:
    pkg.chroot(f"dpkg -i /root/{debs[1].name}")
    pkg.chroot("install -d -o mailgw -g mailgw -m 0700 /var/lib/mailgw")
    send(pkg, "delivered soon")
    pkg.chroot(
        "/opt/mailgw/bin/python3 -c 'import sqlite3; c = sqlite3.connect("
        '"/var/lib/mailgw/outbox.db"); c.execute("UPDATE delivery SET state = \\"sent\\""); '
        "c.commit()'"
    )
    purge = pkg.chroot("dpkg --purge mailgw")
    assert "undelivered" not in purge.stderr
    assert pkg.chroot("test ! -e /var/lib/mailgw")


def version(deb: Path) -> str:
    m = re.match(r"mailgw_(.+)_all\.deb$", deb.name)
    assert m, deb
    return m.group(1)
