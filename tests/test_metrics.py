"""The Prometheus textfile: parsed with prometheus_client, counters move as alerts flow."""

from __future__ import annotations

import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from gateway import metrics
from gateway.outbox.model import STATES
from tests.conftest import run_cli
from tests.parts import DaemonProcess, SmtpServer, make_pki


def samples(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(path.read_text()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_render_is_valid_exposition_format() -> None:
    text = metrics.render(
        {
            "queued": 3,
            "sent": 7,
            "relay_attempts": {"sent": 7},
            "rejected": {'we"ird\nreason': 1},
            "uplink": "up",
            "sources": {"mqtt": "connected"},
        }
    )
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["mailgw_outbox_messages"].type == "gauge"
    assert families["mailgw_relay_attempts"].type == "counter"
    got = {(s.name, tuple(s.labels.items())): s.value for f in families.values() for s in f.samples}
    assert got[("mailgw_outbox_messages", (("state", "queued"),))] == 3
    assert got[("mailgw_rejected_total", (("reason", 'we"ird\nreason'),))] == 1
    assert got[("mailgw_uplink_up", ())] == 1


def test_every_delivery_state_is_a_sample_held_too() -> None:
    report = {state: i + 1 for i, state in enumerate(STATES)}
    text = metrics.render(report)
    got = {
        s.labels["state"]: s.value
        for f in text_string_to_metric_families(text)
        if f.name == "mailgw_outbox_messages"
        for s in f.samples
    }
    assert {s: got.get(s) for s in STATES} == report
    assert got["held"] == report["held"]


def test_daemon_textfile_counters_move(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    prom = tmp_path / "textfile" / "mailgw.prom"
    prom.parent.mkdir()
    pw = tmp_path / "pw"
    pw.write_text("s3cret")
    pw.chmod(0o600)
    with SmtpServer(pki, "starttls") as smtp:
        cfg = tmp_path / "gw.toml"
        cfg.write_text(
            f'[gateway]\nstate_dir = "{tmp_path}/state"\nruntime_dir = "{tmp_path}/run"\n'
            f'[metrics]\ntextfile = "{prom}"\n'
            f'[smtp]\nhost = "127.0.0.1"\nport = {smtp.port}\nfrom = "gw@example.com"\n'
            f'username = "gw@example.com"\npassword_file = "{pw}"\nca_file = "{pki.ca_file}"\n'
            '[[route]]\nname = "ops"\nmatch = "#"\nto = ["ops@example.com"]\n'
        )
        gw = DaemonProcess(cfg, tmp_path / "daemon.log").start()
        try:
            gw.wait_ready()
            deadline = time.monotonic() + 20
            while not prom.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            before = samples(prom)
            assert before[("mailgw_outbox_messages", (("state", "sent"),))] == 0
            for i in range(3):
                run_cli("send", "-c", str(cfg), "--sensor", "s", "--severity", "info", f"m{i}")
            smtp.wait_for(3)
            key = ("mailgw_relay_attempts_total", (("result", "sent"),))
            deadline = time.monotonic() + 30
            while samples(prom).get(key) != 3 and time.monotonic() < deadline:
                time.sleep(0.2)
            after = samples(prom)
            assert after[key] == 3
            assert after[("mailgw_outbox_messages", (("state", "sent"),))] == 3
            assert after[("mailgw_uplink_up", ())] == 1
            assert after[("mailgw_last_success_timestamp_seconds", ())] > 0
        finally:
            gw.terminate()
