"""Fixtures for the system tests (`make test-system`): the packages under test."""

from __future__ import annotations

import io
import os
import subprocess
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.parts import Mosquitto, Pki, SmtpServer, make_pki
from tests.system.fleet import PASSWORD, USER

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session", autouse=True)
def _root_only() -> None:
    if os.geteuid() != 0:
        pytest.fail("the system tests boot containers and use chroot: run them as root")


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Pki, SmtpServer, Mosquitto]]:
    """The host side of a device's world, on loopback: a test CA, a smarthost with
    STARTTLS and AUTH, a Mosquitto."""
    where = tmp_path_factory.mktemp("parts")
    pki = make_pki(where / "pki")
    smtp = SmtpServer(pki, "starttls", users={USER: PASSWORD}).start()
    broker = Mosquitto(where / "broker").start()
    yield pki, smtp, broker
    broker.stop()
    smtp.stop()


@pytest.fixture(scope="session")
def debs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(previous build, this build). The previous build is this one relabelled with a
    lower version: what the upgrade test exercises is the maintainer scripts and the
    data they must keep, which an older build would run the same way."""
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    new = ROOT / "dist" / f"mailgw_{version}_all.deb"
    if not new.exists():
        pytest.fail(f"{new} is missing: run `make test-system`, which builds it first")
    work = tmp_path_factory.mktemp("prev")
    subprocess.run(["dpkg-deb", "-R", str(new), str(work / "tree")], check=True)
    control = work / "tree/DEBIAN/control"
    control.write_text(
        control.read_text().replace(f"Version: {version}\n", f"Version: {version}~prev1\n")
    )
    # Wheels that differ (only in the zip comment), as an older build's would: the
    # upgrade must rebuild the venv.
    wheel = next((work / "tree/usr/share/mailgw/wheels").glob("mailgw-*.whl"))
    rewrite_with_comment(wheel, b"previous build")
    prev = work / f"mailgw_{version}~prev1_all.deb"
    subprocess.run(
        ["dpkg-deb", "-Zgzip", "-b", str(work / "tree"), str(prev)],
        check=True,
        capture_output=True,
    )
    return prev, new


def rewrite_with_comment(wheel: Path, comment: bytes) -> None:
    data = io.BytesIO()
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(data, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        dst.comment = comment
    wheel.write_bytes(data.getvalue())
