"""Shared fixtures: configs, CLI runs, and (in tests/parts.py) the real parts."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def toml_config(state_dir: Path, extra: str = "", *, device_id: str = "test-gw") -> str:
    return (
        f'[gateway]\ndevice_id = "{device_id}"\nstate_dir = "{state_dir}"\n'
        f'runtime_dir = "{state_dir / "run"}"\n\n'
        f"{extra}\n"
    )


@pytest.fixture(autouse=True)
def _no_daemon_left_behind() -> Iterator[None]:
    """A test that fails half-way must not leave `mailgw run` processes around."""
    from tests.parts import DaemonProcess

    yield
    while DaemonProcess.started:
        d = DaemonProcess.started.pop()
        if d.alive:
            assert d.proc is not None
            d.proc.kill()
            d.proc.wait(10)


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    """write_config(extra_toml) → path of a config whose state lives in tmp_path."""

    def write(extra: str = "", name: str = "gateway.toml", **kw: str) -> Path:
        path = tmp_path / name
        path.write_text(toml_config(tmp_path / "state", extra, **kw))
        return path

    return write


def run_cli(
    *args: str, input: str | None = None, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
