"""Each smarthost in status.json, `mailgw status` and the metrics (pure: no daemon)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from gateway import metrics, status
from gateway.runtime import Runtime

HOSTS = [
    {
        "host": "smtp.office365.com:587",
        "role": "primary",
        "active": False,
        "state": "auth_failed",
        "sessions": 0,
        "limit": 3,
        "last_error": "smtp.office365.com:587 refused the login",
        "next_probe_at": None,
        "hold": "refused",
        "sent": 10,
    },
    {
        "host": "mail.example.net:465",
        "role": "fallback 1",
        "active": True,
        "state": "up",
        "sessions": 2,
        "limit": 4,
        "last_error": None,
        "next_probe_at": None,
        "hold": None,
        "sent": 5,
    },
]


def test_the_relay_is_up_while_any_smarthost_is() -> None:
    rt = Runtime()
    rt.hosts = [dict(h) for h in HOSTS]
    rt.sum_hosts()
    assert rt.uplink == "up" and rt.relay_hold is None and rt.next_probe_at is None
    rt.hosts[1].update(state="down", next_probe_at=123.0)
    rt.hosts[0]["next_probe_at"] = 456.0
    rt.sum_hosts()
    # None up: the primary's state, the earliest next try of any.
    assert (rt.uplink, rt.relay_hold, rt.next_probe_at) == ("auth_failed", "refused", 123.0)


def test_status_shows_each_smarthost(tmp_path: Path) -> None:
    rt = Runtime()
    rt.hosts = [dict(h) for h in HOSTS]
    rt.sum_hosts()
    path = tmp_path / "status.json"
    rt.write(path)
    raw = status.read_runtime(path)
    assert raw is not None
    assert [h["host"] for h in raw["smarthosts"]] == [h["host"] for h in HOSTS]
    report = status.report(tmp_path / "none.db", path)
    text = status.render(report)
    assert "smarthost  smtp.office365.com:587 (primary): auth_failed" in text
    assert "last error: smtp.office365.com:587 refused the login" in text
    assert "smarthost *mail.example.net:465 (fallback 1): up; 2 of 4 sessions open, 5 sent" in text


def test_status_drops_a_malformed_host_line(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    snap = Runtime().snapshot()
    snap["smarthosts"] = [3, {"host": 5}, {"host": "a:25", "sessions": "many", "active": 1}]
    path.write_text(json.dumps(snap))
    raw = status.read_runtime(path)
    assert raw is not None
    (only,) = raw["smarthosts"]
    assert only["host"] == "a:25" and only["sessions"] == 0 and only["active"] is False
    assert os.getpid() == raw["pid"] and time.time() >= raw["started_at"]


def test_metrics_carry_a_host_label() -> None:
    text = metrics.render({"uplink": "up", "smarthosts": HOSTS})
    got = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    primary = (("host", "smtp.office365.com:587"), ("role", "primary"))
    fallback = (("host", "mail.example.net:465"), ("role", "fallback 1"))
    assert got[("mailgw_smarthost_up", primary)] == 0
    assert got[("mailgw_smarthost_up", fallback)] == 1
    assert got[("mailgw_smarthost_active", fallback)] == 1
    assert got[("mailgw_smarthost_sessions", fallback)] == 2
    assert got[("mailgw_smarthost_sent_total", primary)] == 10


def test_status_json_carries_the_drain_plans_folds(tmp_path: Path) -> None:
    rt = Runtime()
    rt.drain = {"drain_within": "30 min", "folds": 2, "folded": 900, "digests": 3, "last": 5.0}
    path = tmp_path / "status.json"
    rt.write(path)
    report = status.report(tmp_path / "none.db", path)
    assert report["drain"] == rt.drain
    assert "drain      900 alerts folded into 3 digests in 2 folds" in status.render(report)
    snap = Runtime().snapshot()
    snap["drain"] = {"drain_within": 5, "folds": "x"}  # not the daemon's: dropped
    path.write_text(json.dumps(snap))
    assert status.report(tmp_path / "none.db", path)["drain"] == {}


def test_a_primary_whose_wait_is_over_is_shown_tried_with_the_next_message(
    tmp_path: Path,
) -> None:
    # Failover: the fallback carries the mail; the primary's backoff ended a while ago
    # and it is tried with the next session, not "in 0s" for ever.
    rt = Runtime()
    rt.hosts = [dict(h) for h in HOSTS]
    rt.hosts[0].update(state="down", hold=None, next_probe_at=time.time() - 120)
    rt.sum_hosts()
    path = tmp_path / "status.json"
    rt.write(path)
    text = status.render(status.report(tmp_path / "none.db", path))
    assert "next try in 0s" not in text
    assert "smtp.office365.com:587 (primary): down, tried again with the next message" in text
    rt.hosts[0]["next_probe_at"] = time.time() + 300
    rt.write(path)
    text = status.render(status.report(tmp_path / "none.db", path))
    assert "(primary): down, next try in 4m" in text or "(primary): down, next try in 5m" in text
