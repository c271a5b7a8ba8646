"""mailgw-sendmail in Debian 12 and 13 roots: mailgw installed next to another MTA (nullmailer,
from the Debian mirror) leaves it alone; mailgw-sendmail installed instead of it
replaces it the Debian way (Provides/Conflicts/Replaces: mail-transport-agent); then,
booted under the shipped unit, a cron-style mail from a non-root user reaches the
smarthost on the host's loopback. (`make package` first; needs root and the mirror.)
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.parts import Mosquitto, Pki, SmtpServer, wait_for
from tests.system.fleet import config
from tests.system.machine import SUITES, Machine

pytestmark = pytest.mark.system
ROOT = Path(__file__).resolve().parents[2]
CARD = "/boot/firmware/mailgw.toml"
SENDMAIL_TOML = '\n[sendmail]\n[sendmail.aliases]\nroot = "ops"\n"*" = "ops"\n'


def dist(name: str) -> Path:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    deb = ROOT / "dist" / f"{name}_{version}_all.deb"
    if not deb.exists():
        pytest.fail(f"{deb} is missing: run `make package` first")
    return deb


@pytest.fixture(scope="module", params=SUITES)
def mta(request: pytest.FixtureRequest) -> Iterator[Machine]:
    m = Machine("mta", suite=request.param)
    try:
        for name in ("mailgw", "mailgw-sendmail"):
            deb = dist(name)
            m.put(f"/root/{name}.deb", deb.read_bytes())
        yield m
    finally:
        m.destroy()


def installed(m: Machine, package: str) -> bool:
    out = m.chroot(f"dpkg-query -W -f='${{Status}}' {package} || true").stdout
    return out == "install ok installed"


def owner(m: Machine, path: str) -> str:
    return m.chroot(f"dpkg -S {path} | cut -d: -f1").stdout.strip()


def test_next_to_and_instead_of_another_mta_then_mail_from_cron_arrives(
    mta: Machine, parts: tuple[Pki, SmtpServer, Mosquitto]
) -> None:
    pki, smtp, broker = parts
    # Another MTA first, as a device image may have one.
    mta.chroot("apt-get install -y -q --no-install-recommends nullmailer >/dev/null")
    assert owner(mta, "/usr/sbin/sendmail") == "nullmailer"

    # mailgw alone: next to it, nothing of nullmailer's touched; the maildrop is there.
    mta.chroot("dpkg -i /root/mailgw.deb")
    assert installed(mta, "nullmailer")
    assert owner(mta, "/usr/sbin/sendmail") == "nullmailer"
    modes = mta.chroot(
        "stat -c '%n %a %U:%G' /var/spool/mailgw /var/spool/mailgw/maildrop"
        " /var/spool/mailgw/rejected"
    ).stdout.splitlines()
    assert modes == [
        "/var/spool/mailgw 755 mailgw:mailgw",
        "/var/spool/mailgw/maildrop 3733 mailgw:mailgw",
        "/var/spool/mailgw/rejected 700 mailgw:mailgw",
    ]

    # mailgw-sendmail instead of it: apt removes nullmailer (one MTA at a time).
    run = mta.chroot("apt-get install -y -q /root/mailgw-sendmail.deb")
    assert "Removing nullmailer" in run.stdout, run.stdout
    assert not installed(mta, "nullmailer")
    assert owner(mta, "/usr/sbin/sendmail") == "mailgw-sendmail"
    assert mta.chroot("readlink /usr/lib/sendmail").stdout.strip() == "../sbin/sendmail"
    # Putting nullmailer back would remove us the same way (apt's plan, not carried out).
    plan = mta.chroot("apt-get install -s -q nullmailer").stdout
    assert "Remv mailgw-sendmail" in plan, plan

    # Booted, under the shipped unit (ProtectSystem=strict, no PrivateUsers): cron's mail.
    mta.put(CARD, config(smtp, broker, serial=False, password=True) + SENDMAIL_TOML, 0o755)
    mta.put("/etc/mailgw/ca.pem", pki.ca_file.read_bytes(), 0o644)
    mta.put("/etc/hosts", "127.0.0.1 localhost\n::1 localhost ip6-localhost\n")
    mta.chroot("useradd -m alice")
    mta.boot()
    wait_for(
        lambda: mta.run("systemctl is-active mailgw", check=False).stdout.strip() == "active",
        60,
        "mailgw.service active",
    )
    before = len(smtp.received)
    # printf's format: \\n a line end, %% one %
    mail = (
        "From: alice (Cron Daemon)\\nTo: root\\nSubject: Cron <alice@mta> df -h\\n\\n93%% full\\n"
    )
    sent = mta.run(
        f"runuser -u alice -- sh -c \"printf '{mail}' | /usr/sbin/sendmail -FCronDaemon -i -t\""
        " && echo rc=$?"
    )
    assert sent.stdout.strip() == "rc=0", sent
    wait_for(lambda: len(smtp.received) > before, 60, "the cron mail at the smarthost")
    got = smtp.received[before]
    assert got.message["Subject"] == "Cron <alice@mta> df -h"
    assert got.recipients == ["ops@box.example"]
    assert got.sender == "mailgw@box.example"
    assert got.data.endswith(b"\r\n\r\n93% full\r\n")
    # The daemon sees alice's real uid (the per-user rate depends on it), not 65534.
    alice = mta.run("id -u alice").stdout.strip()
    assert got.message["X-Mailgw-Submitted-By"] == f"uid {alice}"
    # root reads the queue through mailq, from the same package
    assert "Mail queue is empty" in mta.run("mailq").stdout
