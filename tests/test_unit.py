"""The systemd units, checked statically (the booted-container suite runs it for real)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "mailgw.service"
analyze = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(analyze is None, reason="systemd-analyze is not installed")


def test_exposure_score_at_most_1_5() -> None:
    assert analyze is not None
    r = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
    )
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
    assert m is not None, r.stdout[-2000:] + r.stderr
    score = float(m.group(1))
    print(f"systemd-analyze security: {score}")
    assert score <= 1.5  # tests/system checks the daemon still works under it
    # The same, as the threshold systemd-analyze itself enforces (0-100 scale).
    assert (
        subprocess.run(
            [analyze, "security", "--offline=yes", "--threshold=15", str(UNIT)], capture_output=True
        ).returncode
        == 0
    )


@pytest.mark.parametrize("name", ["mailgw.service", "mailgw-firstboot.service"])
def test_verify_is_clean(tmp_path: Path, name: str) -> None:
    """`verify` exits 0 on unknown keys, so any output at all is a failure here."""
    assert analyze is not None
    mailgw = Path(sys.executable).with_name("mailgw")
    unit = tmp_path / name
    # verify insists the ExecStart binary exists; point it at this checkout's.
    text = (UNIT.parent / name).read_text()
    unit.write_text(text.replace("/opt/mailgw/bin/mailgw", str(mailgw)))
    r = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == "" and r.stdout == "", r.stderr


def test_verify_would_catch_a_typo(tmp_path: Path) -> None:
    assert analyze is not None
    mailgw = Path(sys.executable).with_name("mailgw")
    unit = tmp_path / "mailgw.service"
    text = UNIT.read_text().replace("/opt/mailgw/bin/mailgw", str(mailgw))
    unit.write_text(text.replace("ProtectHome=yes", "ProtectHome=yes\nProtectHomme=yes"))
    r = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True)
    assert "Unknown key" in r.stderr


def test_the_daemon_sees_the_real_uid_of_local_mail() -> None:
    """Local mail's per-user limits and X-Mailgw-Submitted-By need each maildrop file's
    real owner: a private user namespace would show every user but root and mailgw as
    the overflow uid 65534, so the unit must not ask for one."""
    settings = [
        line.split("=", 1)
        for line in UNIT.read_text().splitlines()
        if line and not line.startswith("#") and "=" in line
    ]
    assert [v for k, v in settings if k == "PrivateUsers"] == []
    assert ("User", "mailgw") in [(k, v) for k, v in settings]
    assert ("CapabilityBoundingSet", "") in [(k, v) for k, v in settings]
