"""`mailgw smtp-test` with a failover list: each smarthost reported, or the one named."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import run_cli
from tests.parts import Pki, SmtpServer, smtp_conf


def test_each_smarthost_is_tested_and_reported(
    pki: Pki, tmp_path: Path, password_file: Path
) -> None:
    primary = SmtpServer(pki, "starttls")  # never started: refuses connections
    with SmtpServer(pki, "starttls") as fallback:
        cfg = tmp_path / "gw.toml"
        cfg.write_text(
            f'[gateway]\nstate_dir = "{tmp_path}/s"\n[smtp]\n'
            + smtp_conf(primary, pki)
            + f'password_file = "{password_file}"\n'
            + f'[[smtp.fallback]]\nhost = "127.0.0.1"\nport = {fallback.port}\n'
            + f'ca_file = "{pki.ca_file}"\nusername = "gw@example.com"\n'
            + f'password_file = "{password_file}"\n'
        )
        r = run_cli("smtp-test", "-c", str(cfg))
        out = r.stdout
        assert r.returncode == 1, out + r.stderr
        assert f"--- 127.0.0.1:{primary.port} (primary, [smtp])" in out
        assert f"--- 127.0.0.1:{fallback.port} (fallback 1, [[smtp.fallback]] #1)" in out
        assert "[FAIL] connect" in out and "logged in as gw@example.com" in out
        assert f"1 of 2 smarthosts passed; failed: 127.0.0.1:{primary.port}" in out

        r = run_cli("smtp-test", "-c", str(cfg), "--host", "1", "--send-to", "me@example.com")
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"127.0.0.1:{primary.port}" not in r.stdout
        (got,) = fallback.wait_for(1)
        assert got.recipients == ["me@example.com"]

        r = run_cli("smtp-test", "-c", str(cfg), "--host", "nowhere.example")
        assert r.returncode == 2 and "no smarthost 'nowhere.example'" in r.stderr
