"""deploy/build-venv as the postinst runs it, under a hostile environment: the admin's
PIP_* and PYTHON* variables must not reach the venv's build.

Real parts: the system's python3, Debian's pip wheel (python3-pip-whl), and a tiny
`mailgw` wheel standing in for the real one (the script only needs `gateway.cli` to
import). /opt is a private tmpfs (a mount namespace), so the machine's /opt is never
touched."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from tests.parts import can_unshare_mount

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "deploy" / "build-venv"
PIP_WHEELS = sorted(glob.glob("/usr/share/python-wheels/pip-*.whl"))

pytestmark = [
    pytest.mark.skipif(not PIP_WHEELS, reason="needs Debian's python3-pip-whl"),
    pytest.mark.skipif(not can_unshare_mount(), reason="needs root and a private mount namespace"),
]


def _fake_mailgw(wheels: Path) -> None:
    name = "mailgw-0.0.1"
    files = {
        "gateway/__init__.py": "",
        "gateway/cli.py": "def main() -> None:\n    pass\n",
        f"{name}.dist-info/METADATA": "Metadata-Version: 2.1\nName: mailgw\nVersion: 0.0.1\n",
        f"{name}.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = "".join(f"{path},,\n" for path in files) + f"{name}.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheels / f"{name}-py3-none-any.whl", "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
        z.writestr(f"{name}.dist-info/RECORD", record)


def test_build_venv_ignores_the_callers_pip_and_python_environment(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    shutil.copy(PIP_WHEELS[-1], wheels)
    _fake_mailgw(wheels)
    pip_conf = tmp_path / "pip.conf"
    pip_conf.write_text("[global]\nfind-links = /nonexistent/conf-links\n")
    evil = tmp_path / "evil"
    evil.mkdir()
    # Imported by any Python that takes PYTHONPATH: the build must not be one.
    (evil / "sitecustomize.py").write_text("raise SystemExit('PYTHONPATH reached the build')\n")
    env = {
        "PATH": os.environ["PATH"],
        "MAILGW_WHEELS": str(wheels),
        "PIP_FIND_LINKS": "/nonexistent/env-links",
        "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
        "PIP_CONFIG_FILE": str(pip_conf),
        "PIP_VERBOSE": "3",
        "PYTHONPATH": str(evil),
    }
    # The venv is checked inside the namespace: its private /opt is gone afterwards.
    inner = f'{SCRIPT} && env -i /opt/mailgw/bin/python3 -c "import gateway.cli" && echo BUILT-OK'
    run = subprocess.run(
        ["unshare", "--mount", "sh", "-c", f"mount -t tmpfs tmpfs /opt && {inner}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert "BUILT-OK" in run.stdout, out
    assert "mailgw: built /opt/mailgw for Python" in run.stderr, out
    assert "WARNING" not in out and "nonexistent" not in out, out
    assert "PYTHONPATH reached the build" not in out, out
