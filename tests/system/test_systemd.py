"""The package under a real systemd: Debian 12 and Debian 13 roots booted by
systemd-nspawn with the unit exactly as shipped, fed by a Mosquitto and a smarthost on
the host's loopback (the container shares the network) and a sensor on a pty inside.
(`make test-system`)

The tests share one booted container per Debian release and run in file order; each
leaves the service running under the shipped unit for the next.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.parts import Mosquitto, Pki, SmtpServer, wait_for
from tests.system.fleet import PASSWORD, TTY, USER, arrived, config, publish, subjects
from tests.system.machine import SUITES, Machine

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TOOLS = "/usr/local/lib/mailgw-test"
CARD = "/boot/firmware/mailgw.toml"


@pytest.fixture(scope="module", params=SUITES)
def box(
    request: pytest.FixtureRequest,
    debs: tuple[Path, Path],
    parts: tuple[Pki, SmtpServer, Mosquitto],
) -> Iterator[Machine]:
    pki, smtp, broker = parts
    m = Machine("box", suite=request.param)
    try:
        deb = debs[1]
        m.put(f"/root/{deb.name}", deb.read_bytes())
        m.chroot(f"dpkg -i /root/{deb.name}")
        # Flash and go: the config, password in it, on the card's boot partition; the
        # first-boot unit installs it before mailgw starts.
        m.put(CARD, config(smtp, broker, password=True), 0o755)
        m.put("/etc/mailgw/ca.pem", pki.ca_file.read_bytes(), 0o644)
        m.put("/etc/hosts", "127.0.0.1 localhost\n::1 localhost ip6-localhost\n")
        m.put(f"{TOOLS}/sim.py", (HERE / "sim.py").read_bytes())
        m.put(f"{TOOLS}/probe.py", (HERE / "probe.py").read_bytes())
        m.put("/home/operator/notes", "not for the gateway\n", 0o644)
        m.chroot("install -d -o mailgw -g mailgw /srv/mailgw-owned")
        m.boot()
        yield m
    finally:
        m.destroy()


# --- helpers ---------------------------------------------------------------------------


def show(m: Machine, *props: str) -> dict[str, str]:
    return show_unit(m, "mailgw", *props)


def show_unit(m: Machine, unit: str, *props: str) -> dict[str, str]:
    args = " ".join(f"-p {p}" for p in props)
    out = m.run(f"systemctl show {unit} {args}").stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def journal(m: Machine, args: str = "") -> str:
    return m.run(f"journalctl --no-pager -u mailgw {args}").stdout


def running(m: Machine) -> bool:
    state = show(m, "ActiveState", "SubState")
    return state == {"ActiveState": "active", "SubState": "running"}


def wait_running(m: Machine, timeout: float = 30) -> None:
    wait_for(lambda: running(m), timeout, "mailgw.service active (running)")


def wait_mqtt(m: Machine, since: int = 0) -> None:
    wait_for(
        lambda: journal(m, "-o cat").count("connected to the MQTT broker") > since,
        30,
        "the daemon's MQTT session",
    )


# --- the tests -------------------------------------------------------------------------


def test_the_card_config_was_taken_at_first_boot(box: Machine) -> None:
    result = show_unit(box, "mailgw-firstboot", "Result", "ExecMainStatus")
    assert result == {"Result": "success", "ExecMainStatus": "0"}, result
    modes = box.run(
        "stat -c '%n %U:%G %a' /etc/mailgw/gateway.toml /etc/mailgw/smtp-password"
    ).stdout.splitlines()
    assert modes == [
        "/etc/mailgw/gateway.toml root:mailgw 640",
        "/etc/mailgw/smtp-password root:root 600",
    ]
    assert box.run("cat /etc/mailgw/smtp-password").stdout.strip() == PASSWORD
    # Nothing on the card still holds the password; the taken file is renamed.
    assert box.run("ls /boot/firmware").stdout.split() == ["mailgw.toml.taken"]
    assert box.run(f"grep -rl '{PASSWORD}' /boot/firmware", check=False).stdout == ""
    assert "took" in box.run("journalctl --no-pager -o cat -u mailgw-firstboot").stdout
    assert box.run("mailgw check-config").stdout.startswith("ok: /etc/mailgw/gateway.toml")


def test_active_only_after_ready_under_the_shipped_unit(box: Machine) -> None:
    wait_running(box)
    # The unit exactly as shipped: no drop-ins, the same text.
    cat = box.run("systemctl cat mailgw").stdout
    # Debian 13's systemd names the merged-/usr path.
    assert cat.splitlines()[0] in (
        "# /lib/systemd/system/mailgw.service",
        "# /usr/lib/systemd/system/mailgw.service",
    )
    assert cat.split("\n", 1)[1].strip() == (ROOT / "systemd/mailgw.service").read_text().strip()
    props = show(box, "Type", "NotifyAccess", "WatchdogUSec", "NRestarts", "StatusText")
    assert props["Type"] == "notify" and props["WatchdogUSec"] == "1min"
    assert props["NRestarts"] == "0"
    assert "undelivered" in props["StatusText"]  # STATUS= from the daemon

    # systemd called it started only after the daemon said READY=1, which it says once
    # the outbox is open and the sources run.
    lines = journal(box, "-o cat").splitlines()
    ready = next(i for i, x in enumerate(lines) if x.startswith("mailgw started:"))
    started = next(i for i, x in enumerate(lines) if x.startswith("Started mailgw.service"))
    assert ready < started

    # Its state in StateDirectory, private to the service user.
    modes = box.run("stat -c '%n %U %a' /var/lib/mailgw /var/lib/mailgw/outbox.db").stdout
    assert modes.splitlines() == [
        "/var/lib/mailgw mailgw 700",
        "/var/lib/mailgw/outbox.db mailgw 600",
    ]

    # The exposure score of the unit as it runs here (systemd's own reading of it).
    sec = box.run("systemd-analyze security mailgw.service").stdout
    score = float(re.search(r"Overall exposure level for mailgw.service: ([\d.]+)", sec)[1])
    print(f"\nexposure of the running unit: {score}")
    assert score <= 1.5, sec


def test_mqtt_alert_reaches_the_smarthost_with_the_credential(
    box: Machine, parts: tuple[Pki, SmtpServer, Mosquitto]
) -> None:
    _, smtp, broker = parts
    wait_mqtt(box)
    publish(broker, ["boxed alert via mqtt"])
    arrived(smtp, ["boxed alert via mqtt"])
    mail = next(r for r in smtp.received if "boxed alert via mqtt" in str(r.message["Subject"]))
    # AUTH with the password from LoadCredential=, over STARTTLS.
    assert mail.auth_user == USER and mail.tls


def test_serial_alert_through_a_pty_gets_ack_and_mail(
    box: Machine, parts: tuple[Pki, SmtpServer, Mosquitto]
) -> None:
    _, smtp, _ = parts
    # The sensor: a pty owned root:dialout 0660, like a USB-serial adapter. The daemon
    # reaches it through SupplementaryGroups=dialout under DevicePolicy=closed.
    sim = box.spawn(["/opt/mailgw/bin/python3", f"{TOOLS}/sim.py", TTY])
    try:
        assert sim.stdout is not None and sim.stdin is not None
        assert sim.stdout.readline().startswith("ready /dev/pts/")
        # The port was missing at boot: reopen backoff may be long by now.
        box.run("systemctl restart mailgw")
        wait_running(box)
        sim.stdin.write("alert 3\n")
        sim.stdin.flush()
        assert sim.stdout.readline().strip() == "acked 3"  # every $ACK came back
        arrived(smtp, [f"door open {i}" for i in range(3)])
    finally:
        sim.kill()
        sim.wait(10)


def test_error_lines_reach_the_journal_with_their_priority(box: Machine) -> None:
    entries = [json.loads(x) for x in journal(box, "-p err -o json").splitlines()]
    ours = [e for e in entries if e.get("SYSLOG_IDENTIFIER") == "mailgw"]
    assert any(
        e["PRIORITY"] == "3" and e["MESSAGE"].startswith(f"cannot open serial port {TTY}")
        for e in ours
    ), ours
    # Info lines are not errors.
    assert not any("mailgw started" in e["MESSAGE"] for e in ours)
    infos = [json.loads(x) for x in journal(box, "-p info..info -o json").splitlines()]
    assert any(e["MESSAGE"].startswith("mailgw started") for e in infos)


def test_sigkill_mid_stream_loses_nothing(
    box: Machine, parts: tuple[Pki, SmtpServer, Mosquitto]
) -> None:
    _, smtp, broker = parts
    wait_mqtt(box)
    restarts = int(show(box, "NRestarts")["NRestarts"])
    connects = journal(box, "-o cat").count("connected to the MQTT broker")
    texts = [f"burst {i:03d}" for i in range(300)]
    publisher = threading.Thread(target=publish, args=(broker, texts, 0.005))
    publisher.start()
    wait_for(lambda: "burst 050" in " ".join(subjects(smtp)), 30, "the stream under way")
    box.run("systemctl kill -s SIGKILL mailgw")
    publisher.join(60)
    wait_for(
        lambda: int(show(box, "NRestarts")["NRestarts"]) == restarts + 1 and running(box),
        30,
        "the automatic restart",
    )
    wait_mqtt(box, since=connects)
    arrived(smtp, texts, timeout=90)
    assert "code=killed, status=9/KILL" in journal(box, "-o cat")


def test_watchdog_restarts_a_frozen_daemon(box: Machine) -> None:
    # A test hook freezes the event loop when a file exists; a drop-in sets it and a
    # short WatchdogSec. Removed again at the end: later tests see the shipped unit.
    dropin = "/run/systemd/system/mailgw.service.d/freeze.conf"
    box.run(
        f"mkdir -p {Path(dropin).parent} /run/mailgw-test && printf '%s\\n' '[Service]' "
        "'Environment=MAILGW_TEST_FREEZE_LOOP=/run/mailgw-test/freeze' 'WatchdogSec=3s' "
        f"> {dropin} && systemctl daemon-reload && systemctl restart mailgw"
    )
    try:
        wait_running(box)
        restarts = int(show(box, "NRestarts")["NRestarts"])
        box.run("touch /run/mailgw-test/freeze")
        wait_for(
            lambda: "Watchdog timeout" in journal(box, "-o cat"), 20, "systemd's watchdog timeout"
        )
        box.run("rm /run/mailgw-test/freeze")
        wait_for(
            lambda: int(show(box, "NRestarts")["NRestarts"]) > restarts and running(box),
            30,
            "the restart after the watchdog kill",
        )
    finally:
        box.run(f"rm -f {dropin} /run/mailgw-test/freeze && systemctl daemon-reload")
        box.run("systemctl restart mailgw")
    wait_running(box)


def probe(box: Machine, inside: bool) -> dict[str, str]:
    nodes = "/dev/mailgw-ttyS /dev/mailgw-console"
    run = (
        f"setpriv --reuid=mailgw --regid=mailgw --init-groups /opt/mailgw/bin/python3 "
        f"{TOOLS}/probe.py {nodes}"
    )
    if inside:
        # Join the service's cgroup (its device policy) and mount namespace (its view
        # of the file system), as the service user.
        pid = show(box, "MainPID")["MainPID"]
        run = (
            "echo $$ > /sys/fs/cgroup/system.slice/mailgw.service/cgroup.procs && "
            f"exec nsenter -t {pid} -m {run}"
        )
    out = box.run(run).stdout
    return dict(line.split() for line in out.splitlines())


def test_the_sandbox_holds(box: Machine) -> None:
    # ttyS is a class the unit allows; the console (5:1) is a tty class it does not.
    box.run(
        "mknod -m 0666 /dev/mailgw-ttyS c 4 64 2>/dev/null || true; "
        "mknod -m 0666 /dev/mailgw-console c 5 1 2>/dev/null || true"
    )
    wait_running(box)
    outside = probe(box, inside=False)
    inside = probe(box, inside=True)
    print(f"\nas mailgw outside the unit: {outside}\ninside the unit: {inside}")
    # The control: the same user outside the sandbox may do all of it...
    assert outside["write-elsewhere"] == "ok" and outside["read-home"] == "ok"
    assert outside["open-other-tty"] == "ok"
    # ...inside, only what the unit grants.
    assert inside["write-state"] == "ok"
    assert inside["write-elsewhere"] == "EROFS"
    assert inside["read-home"] in ("EACCES", "ENOENT")
    assert inside["open-other-tty"] == "EPERM"
    assert inside["open-allowed-tty"] == outside["open-allowed-tty"]


def test_a_missing_credential_is_reported_not_looped(
    box: Machine, parts: tuple[Pki, SmtpServer, Mosquitto]
) -> None:
    _, smtp, broker = parts
    box.run("systemctl stop mailgw && mv /etc/mailgw/smtp-password /root/smtp-password")
    try:
        connects = journal(box, "-o cat").count("connected to the MQTT broker")
        box.run("systemctl start mailgw")
        wait_running(box)
        wait_mqtt(box, since=connects)
        publish(broker, ["while the password is missing"])
        wait_for(
            lambda: (
                "/etc/mailgw/smtp-password (credential smtp-password) is empty or missing"
                in journal(box, "-p err -o cat")
            ),
            30,
            "the error that says what to do",
        )
        assert running(box)  # not a 243/CREDENTIALS restart loop
        queued = box.run("mailgw queue list").stdout
        assert "while the password is missing" in queued
    finally:
        box.run("mv /root/smtp-password /etc/mailgw/smtp-password")
    box.run("systemctl restart mailgw")
    arrived(smtp, ["while the password is missing"])


def test_a_card_config_that_fails_the_check_is_rejected_with_its_reason(box: Machine) -> None:
    before = box.run("sha256sum /etc/mailgw/gateway.toml").stdout
    bad = config_text_with(box, 'password = "card-secret-2"', "port = 99999")
    box.put(CARD, bad, 0o755)
    box.run("systemctl start mailgw-firstboot", check=False)
    result = show_unit(box, "mailgw-firstboot", "Result", "ExecMainStatus")
    assert result == {"Result": "exit-code", "ExecMainStatus": "1"}, result
    # Left on the card, the reason beside it, the password gone from it all the same.
    why = box.run("cat /boot/firmware/mailgw.toml.rejected").stdout
    assert "port" in why, why
    assert box.run("grep -rl card-secret-2 /boot/firmware", check=False).stdout == ""
    assert box.run("test -e /boot/firmware/mailgw.toml")
    assert box.run("sha256sum /etc/mailgw/gateway.toml").stdout == before
    assert running(box)  # the daemon runs on with the config it had
    box.run("rm -f /boot/firmware/mailgw.toml /boot/firmware/mailgw.toml.rejected")
    # The rejected password was still taken off the card: put the right one back.
    box.put("/etc/mailgw/smtp-password", PASSWORD + "\n", 0o600)


def config_text_with(box: Machine, password_line: str, port_line: str) -> str:
    """The installed config with a password line and the SMTP port replaced."""
    text = box.run("cat /etc/mailgw/gateway.toml").stdout
    text = re.sub(r"(?m)^port = \d+$", port_line, text, count=1)
    return text.replace("[smtp]\n", f"[smtp]\n{password_line}\n", 1)


def test_purge_keeps_a_nonempty_outbox_and_says_so(box: Machine) -> None:
    # The last test's mail is at the smarthost; its row says so a moment later.
    wait_for(
        lambda: json.loads(box.run("mailgw queue list --json").stdout) == [],
        30,
        "an outbox with nothing undelivered",
    )
    box.run("systemctl stop mailgw")
    box.run("runuser -u mailgw -- mailgw send --severity warning --sensor door 'left behind'")
    purge = box.run("apt-get purge -y mailgw 2>&1")
    # At least the one just sent (a self-alert may be waiting beside it).
    assert re.search(
        r"mailgw: kept /var/lib/mailgw: it holds [1-9]\d* undelivered", purge.stdout
    ), purge
    assert "outbox.db" in box.run("ls /var/lib/mailgw").stdout
    assert "could not be found" in box.run("systemctl status mailgw 2>&1", check=False).stdout
