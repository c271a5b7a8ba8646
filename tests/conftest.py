"""Shared fixtures: configs, CLI runs, and the real parts (built in tests/parts.py): a
throwaway CA, a Mosquitto, a pty pair, the daemon as a process, the relay in-process.
Each fixture cleans up what it started."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.parts import DaemonProcess, Gateway, Mosquitto, Pki, Pty

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


# --- the daemon as a process, and what it talks to (tests/parts.py) ------------------


@pytest.fixture
def launch_daemon(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """launch_daemon(config, ready=("mqtt", ...)) → a started `mailgw run`, ready when its
    status file shows it (and the named sources connected); terminated after the test."""
    from tests.parts import DaemonProcess

    made: list[DaemonProcess] = []

    def launch(
        config: Path, ready: tuple[str, ...] | None = None, log: str = "daemon.log"
    ) -> DaemonProcess:
        d = DaemonProcess(config, tmp_path / log).start()
        made.append(d)
        if ready is not None:
            d.wait_ready(ready)
        return d

    yield launch
    for d in made:
        if d.alive:
            d.terminate()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A Mosquitto on a free loopback port."""
    from tests.parts import Mosquitto

    b = Mosquitto(tmp_path / "mosquitto").start()
    yield b
    b.stop()


@pytest.fixture
def pty(tmp_path: Path) -> Iterator[Pty]:
    """A pty pair whose device end the gateway opens as tmp_path/ttyTEST."""
    from tests.parts import Pty

    p = Pty(tmp_path / "ttyTEST")
    yield p
    p.close()


# --- the relay in-process against a real smarthost (tests/parts.py) ------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throwaway CA and a server certificate for 127.0.0.1/localhost."""
    from tests.parts import make_pki

    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    from tests.parts import write_password

    return write_password(tmp_path / "pw")


@pytest.fixture
def make_gateway(tmp_path: Path, password_file: Path) -> Iterator[Callable[..., Gateway]]:
    """make_gateway(smtp_toml, routes=..., extra=...) → a started Gateway, stopped after."""
    from tests.parts import Gateway

    made: list[Gateway] = []

    def make(smtp_toml: str, **kw: str) -> Gateway:
        if (
            "username" in smtp_toml
            and "password_file" not in smtp_toml
            and "token" not in smtp_toml
        ):
            smtp_toml += f'password_file = "{password_file}"\n'
        gw = Gateway(tmp_path, smtp_toml, **kw).start()
        made.append(gw)
        return gw

    yield make
    for gw in made:
        gw.stop()
