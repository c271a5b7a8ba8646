"""`mailgw smtp-test` (gateway/smtptest.py) against a real server, then without one."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import run_cli
from tests.parts import Pki, SmtpServer, smtp_conf


def test_smtp_test_command(pki: Pki, tmp_path: Path, password_file: Path) -> None:
    with SmtpServer(pki, "starttls") as server:
        cfg = tmp_path / "gw.toml"
        cfg.write_text(
            f'[gateway]\nstate_dir = "{tmp_path}/s"\n[smtp]\n'
            + smtp_conf(server, pki)
            + f'password_file = "{password_file}"\n'
        )
        r = run_cli("smtp-test", "-c", str(cfg), "--send-to", "me@example.com")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "TLSv1.3" in r.stdout or "TLSv1.2" in r.stdout
        assert "certificate verified" in r.stdout and "logged in as gw@example.com" in r.stdout
        (got,) = server.wait_for(1)
        assert got.recipients == ["me@example.com"]
    with SmtpServer(pki, "starttls", offer_starttls=False) as server:
        cfg.write_text(
            f'[gateway]\nstate_dir = "{tmp_path}/s"\n[smtp]\n'
            + smtp_conf(server, pki)
            + f'password_file = "{password_file}"\n'
        )
        r = run_cli("smtp-test", "-c", str(cfg))
        assert r.returncode == 1 and "does not offer STARTTLS" in r.stdout
    r = run_cli("smtp-test", "-c", str(cfg))  # the server is gone now
    assert r.returncode == 1 and "[FAIL] connect" in r.stdout
