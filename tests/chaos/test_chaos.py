"""Fault injection against the real daemon: an acknowledged alert reaches an inbox.

The daemon runs as `mailgw run` with a real Mosquitto, a real STARTTLS+AUTH smarthost
and a simulated serial device on a pty. While MQTT and serial alerts stream in, faults
are injected at random moments from a seeded RNG (the seed is printed; rerun with
MAILGW_CHAOS_SEED=N): kill -9 of the gateway, smarthost outages, 4xx bursts, broker
restarts, the serial port vanishing, a token endpoint that trickles its answers (the
runs with an even seed log in with OAuth2), the outbox reaching its bound (an outage long
enough to fill outbox.max_messages), a local user flooding `sendmail` (held to its
rate, never in the alerts' way), and the disk filling up (the state directory is a
32 MiB tmpfs, filled to the last byte by a ballast file; skipped, with the reason
printed, where a tmpfs cannot be mounted). At the end every alert its sender saw
acknowledged (broker PUBACK for MQTT, `$ACK` for serial) must have reached the
smarthost, copies of one delivery must share their Message-ID, nothing never sent may
appear, the outbox must pass `PRAGMA integrity_check`, and the daemon must not have
died of any fault but kill -9.

`make test` runs a short run (MAILGW_CHAOS_FAULTS, default 30 faults); `make soak`
runs the long one (500).
"""

from __future__ import annotations

import collections
import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from firmware_bridge.device import Device
from gateway.sendmail_drop import Invocation, drop, envelope
from tests.parts import (
    OPS_ROUTE,
    DaemonProcess,
    Mosquitto,
    Pty,
    Publisher,
    SmtpServer,
    gateway_toml,
    make_pki,
    mosquitto_binary,
    wait_for,
    write_password,
)
from tests.token_endpoint import TokenEndpoint

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed")


MAX_MESSAGES = 400
LOCAL_RATE = (30, 60.0)  # [sendmail] rate for the local flood: 30/min
LOCAL_BURST = 10


def small_filesystem(path: Path, stack: contextlib.ExitStack) -> bool:
    """Mount a 32 MiB tmpfs at `path` for the disk-full fault; False where we cannot."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        print("chaos: not root, so no small file system: the disk_full fault is skipped")
        return False
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32m,mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        print(f"chaos: cannot mount a tmpfs ({r.stderr.strip()}): disk_full is skipped")
        return False
    stack.callback(subprocess.run, ["umount", "-l", str(path)], check=False)
    return True


@contextlib.contextmanager
def ballast(where: Path) -> Iterator[None]:
    """Fill the file system until nothing is left, for as long as the block runs."""
    path = where / "ballast"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        free = os.statvfs(where)
        with contextlib.suppress(OSError):
            os.posix_fallocate(fd, 0, free.f_bavail * free.f_frsize)
        yield
    finally:
        os.close(fd)
        path.unlink()


def post_mortem(gw: DaemonProcess, tmp_path: Path) -> str:
    """What a failed run leaves to read: status, the outbox's states, stacks, the log's end."""
    status = gw.status()
    try:
        conn = sqlite3.connect(f"file:{tmp_path / 'state' / 'outbox.db'}?mode=ro", uri=True)
        states = dict(conn.execute("SELECT state, count(*) FROM delivery GROUP BY state"))
        conn.close()
    except sqlite3.Error as exc:
        states = {"error": str(exc)}
    if gw.alive and gw.proc is not None:
        gw.proc.send_signal(signal.SIGUSR2)  # the daemon writes every thread's stack to its log
        time.sleep(1.0)
    return f"status: {status}\noutbox: {states}\ndaemon log (end):\n{gw.log_text()[-6000:]}"


def chaos(tmp_path: Path, faults: int, seed: int) -> dict[str, object]:
    with contextlib.ExitStack() as stack:
        return _chaos(stack, tmp_path, faults, seed)


def _chaos(
    stack: contextlib.ExitStack, tmp_path: Path, faults: int, seed: int
) -> dict[str, object]:
    rng = random.Random(seed)
    pki = make_pki(tmp_path / "pki")
    smtp = SmtpServer(pki, "starttls").start()
    stack.callback(smtp.stop)
    broker = Mosquitto(tmp_path / "mosquitto").start()
    stack.callback(broker.stop)
    pty = Pty(tmp_path / "ttyCHAOS")
    stack.callback(pty.close)
    pw = write_password(tmp_path / "pw")
    small = small_filesystem(tmp_path / "state", stack)
    spool = tmp_path / "spool" / "maildrop"
    spool.mkdir(parents=True)
    spool.chmod(0o3733)
    # Half the runs (even seeds) log in with OAuth2 tokens from a real token endpoint,
    # and draw its fault too: an endpoint that trickles its answers.
    tokens: TokenEndpoint | None = None
    login = f'password_file = "{pw}"\n'
    if seed % 2 == 0:
        tokens = TokenEndpoint(pki).start()
        stack.callback(tokens.stop)
        smtp.check_token = tokens.check
        secret = write_password(tmp_path / "client-secret")
        secret.write_text(tokens.client_secret + "\n")
        login = (
            'auth_retry = "5s"\n'  # a token revoked between its fetch and its use
            f'[smtp.oauth]\ntoken_url = "{tokens.url}"\nclient_id = "{tokens.client_id}"\n'
            f'client_secret_file = "{secret}"\nca_file = "{pki.ca_file}"\n'
            'scope = "https://outlook.office365.com/.default"\n'
        )
    cfg = tmp_path / "gw.toml"
    cfg.write_text(
        gateway_toml(tmp_path, "chaos")
        # A low bound, so that outages fill the outbox; tmpfs only for the disk-full fault.
        + f"[outbox]\nmax_messages = {MAX_MESSAGES}\nallow_volatile = {str(small).lower()}\n"
        # The faults here (a full disk, a full outbox) raise self-alerts by design; this
        # suite accounts for the sensors' alerts only (tests/test_silence_daemon.py
        # covers the self-alerts).
        + "[selfalerts]\nenabled = false\n"
        f'[smtp]\nhost = "127.0.0.1"\nport = {smtp.port}\nfrom = "gw@example.com"\n'
        f'username = "gw@example.com"\nca_file = "{pki.ca_file}"\n'
        'timeout = "2s"\nmin_backoff = "1s"\nmax_backoff = "2s"\nprobe_max = "2s"\n'
        + login
        + f'[mqtt]\nport = {broker.port}\ntopics = ["alerts/#"]\n'
        f'[[serial]]\nport = "{pty.link}"\nname = "chaos"\n'
        f'[sendmail]\nmaildrop = "{spool}"\nrate = "{LOCAL_RATE[0]}/min"\n'
        f'burst = {LOCAL_BURST}\n[sendmail.aliases]\n"*" = "ops"\n'
        + OPS_ROUTE
        + 'subject = "{message}"\n'
    )
    gw = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    gw.wait_ready(("mqtt", "serial:chaos"), timeout=30)
    pub = Publisher(broker.port)
    stack.callback(pub.close)
    dev = Device(pty.master, device_id="chaos-dev", retry_min=0.3, retry_max=2.0).start()
    stack.callback(dev.stop)
    serial_sent: dict[int, str] = {}
    stop = threading.Event()

    def produce() -> None:
        i = 0
        while not stop.is_set():
            pub.publish("alerts/chaos/x", f"mqtt {i}")
            if i % 3 == 0:
                text = f"serial {i}"
                serial_sent[dev.alert("s", "warning", text)] = text
            i += 1
            time.sleep(0.01)

    producer = threading.Thread(target=produce)
    producer.start()
    injected: collections.Counter[str] = collections.Counter()
    kinds = [
        "kill9",
        "smtp_outage",
        "smtp_4xx",
        "broker_restart",
        "serial_vanish",
        "outbox_full",
        "poison",
        "locked_at_start",
        "sighup",
        "local_flood",
    ]
    local_sent: set[str] = set()
    started = time.monotonic()
    if small:
        kinds += ["disk_full", "full_at_start"]
    if tokens is not None:
        kinds += ["slow_token"]
    poison_sent: dict[str, str] = {}  # payload → the subject it arrives with (repaired)
    full_seen = 0
    slow_seen = 0  # slow_token faults that held a token request
    exits: collections.Counter[str] = collections.Counter()
    try:
        for _ in range(faults):
            time.sleep(rng.uniform(0.2, 1.0))
            kind = rng.choice(kinds)
            injected[kind] += 1
            if kind == "outbox_full":
                # An outage long enough for the backlog to reach outbox.max_messages.
                smtp.stop()
                with contextlib.suppress(AssertionError):
                    wait_for(lambda: (gw.status() or {}).get("outbox_full") is True, 10)
                    full_seen += 1
                time.sleep(rng.uniform(0.2, 1.0))
                smtp.start()
            elif kind == "disk_full":
                with ballast(tmp_path / "state"):
                    time.sleep(rng.uniform(0.3, 2.0))
            elif kind == "kill9":
                gw.kill9()
                time.sleep(rng.uniform(0.0, 0.5))
                gw.start()
            elif kind == "smtp_outage":
                smtp.stop()
                time.sleep(rng.uniform(0.2, 2.0))
                smtp.start()
            elif kind == "smtp_4xx":
                smtp.script.data_replies = ["451 4.3.0 chaos"] * rng.randint(1, 5)
            elif kind == "broker_restart":
                broker.restart()
            elif kind == "serial_vanish":
                pty.unplug()
                time.sleep(rng.uniform(0.1, 1.0))
                dev.reattach(pty.plug())
            elif kind == "poison":
                # Valid JSON that is not valid Unicode: repaired (U+FFFD), stored, mailed.
                n = len(poison_sent)
                payload = f'{{"message": "poison {n} \\ud800"}}'
                pub.publish("alerts/chaos/x", payload)
                poison_sent[payload] = f"poison {n} \ufffd"
            elif kind == "locked_at_start":
                # Another process holds the outbox, past SQLite's busy timeout at times.
                gw.kill9()
                holder = sqlite3.connect(tmp_path / "state" / "outbox.db", isolation_level=None)
                holder.execute("PRAGMA locking_mode = EXCLUSIVE")
                holder.execute("BEGIN EXCLUSIVE")
                holder.execute("UPDATE meta SET value = value WHERE key = 'next_seq'")
                gw.start()
                time.sleep(rng.uniform(0.5, 12.0))
                holder.execute("ROLLBACK")
                holder.close()
            elif kind == "full_at_start":
                gw.kill9()
                with ballast(tmp_path / "state"):
                    gw.start()
                    time.sleep(rng.uniform(0.5, 3.0))
            elif kind == "slow_token":
                # The endpoint sends a byte a second; the token in use is revoked and the
                # smarthost restarted, so the next login needs a new token meanwhile.
                assert tokens is not None
                tokens.trickle = 0.5
                tokens.forget_tokens()
                smtp.stop()
                smtp.start()
                with contextlib.suppress(AssertionError):  # the relay may be held meanwhile
                    wait_for(lambda: tokens.trickling > 0, 8, "a token request trickling")
                    slow_seen += 1
                time.sleep(rng.uniform(0.5, 3.0))  # past the deadline (smtp.timeout) at times
                tokens.trickle = None
            elif kind == "sighup":
                assert gw.proc is not None
                gw.proc.send_signal(signal.SIGHUP)
            elif kind == "local_flood":
                # One local user (root here) pours mail into the maildrop at once.
                inv = Invocation()
                inv.recipients = ["root"]
                for _ in range(rng.randint(50, 200)):
                    text = f"local {len(local_sent)}"
                    drop(str(spool), envelope(inv, "root") + f"Subject: {text}\n\nx\n".encode())
                    local_sent.add(text)
            if kind != "kill9" and not gw.alive:
                exits[kind] += 1  # the daemon died of a fault it should ride out
                # Say why it ended, next to the seed, before the run goes on.
                tail = gw.log_text().splitlines()[-40:]
                rc = gw.proc.returncode if gw.proc is not None else None
                print(f"daemon ended (rc {rc}) during {kind}:\n  " + "\n  ".join(tail))
                gw.start()
    finally:
        stop.set()
        producer.join(30)
    # Let everything settle: every acked alert must come through.
    if not gw.alive:
        gw.start()
    wait_for(lambda: pub.settled, 60, "every publish acked or failed")
    dev.wait_acked(timeout=60)
    acked = set(pub.acked) | {serial_sent[s] for s in dev.acked if s in serial_sent}
    acked = (acked - set(poison_sent)) | {poison_sent[p] for p in poison_sent if p in acked}
    subjects_seen: set[str] = set()

    def all_delivered() -> bool:
        # Incremental: parsing every mail's headers on each poll would dominate the run.
        for r in smtp.received[len(subjects_seen_count) :]:
            subjects_seen.add(str(r.message["Subject"]))
            subjects_seen_count.append(1)
        return acked <= subjects_seen

    subjects_seen_count: list[int] = []
    try:
        # A long run leaves a backlog in the broker that drains at the relay's rate:
        # wait as long as delivery makes progress, fail after 60 s without any.
        while not all_delivered():
            before = len(subjects_seen)
            with contextlib.suppress(AssertionError):
                wait_for(lambda b=before: all_delivered() or len(subjects_seen) > b, 60)
            if len(subjects_seen) == before and not all_delivered():
                raise AssertionError("no progress for 60 s")
    except AssertionError:
        missing = sorted(acked - subjects_seen)
        raise AssertionError(
            f"seed {seed}: {len(missing)} acknowledged alerts never arrived "
            f"({sum(m.startswith('mqtt') for m in missing)} of them MQTT), e.g. {missing[:10]}"
            f"\n{post_mortem(gw, tmp_path)}"
        ) from None
    received = list(smtp.received)
    assert gw.terminate() == 0
    conn = sqlite3.connect(tmp_path / "state" / "outbox.db")
    integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
    conn.close()

    by_id: dict[str, set[str]] = collections.defaultdict(set)
    by_subject: dict[str, set[str]] = collections.defaultdict(set)
    for r in received:
        by_id[r.message_id].add(str(r.message["Subject"]))
        by_subject[str(r.message["Subject"])].add(r.message_id)
    published = {text for text, _ in pub._sent} | set(serial_sent.values())
    published |= set(poison_sent.values()) | local_sent
    subjects = collections.Counter(str(r.message["Subject"]) for r in received)
    # The buckets live in the daemon's memory: each start gives a user a fresh burst.
    starts = 1 + sum(injected[k] for k in ("kill9", "locked_at_start", "full_at_start"))
    starts += sum(exits.values())
    local_allowed = (
        LOCAL_BURST * starts + LOCAL_RATE[0] * (time.monotonic() - started) / LOCAL_RATE[1]
    )
    return {
        "seed": seed,
        "faults": dict(injected),
        "acked": len(acked),
        "delivered": len(set(subjects) & acked),
        "mails": len(received),
        "duplicated": sum(n - 1 for n in subjects.values() if n > 1),
        "lost": len(acked - set(subjects)),
        "invented": sorted(set(subjects) - published)[:5],
        "mixed_message_ids": [m for m, s in by_id.items() if len(s) > 1][:5],
        # Copies by content: every alert text is unique, so a text mailed under two
        # Message-IDs was stored twice (an MQTT redelivery taken for a new alert).
        "copies_new_id": [t for t, ids in by_subject.items() if len(ids) > 1][:5],
        "broker_restarts": injected["broker_restart"],
        "duplicates_per_kill9": round(
            sum(n - 1 for n in subjects.values() if n > 1) / max(1, injected["kill9"]), 1
        ),
        "integrity": integrity,
        "outbox_full_seen": full_seen,
        "slow_token_seen": slow_seen,
        "daemon_exits": dict(exits),
        "moved_aside": [p.name for p in (tmp_path / "state").glob("*.corrupt-*")],
        "local_sent": len(local_sent),
        "local_mailed": len(set(subjects) & local_sent),
        "local_allowed": int(local_allowed) + 1,  # a burst per start + rate over the run
    }


def _run(tmp_path: Path, faults: int) -> None:
    seed = int(os.environ.get("MAILGW_CHAOS_SEED", random.randrange(1 << 30)))
    print(f"\nchaos seed {seed} (rerun: MAILGW_CHAOS_SEED={seed})")
    result = chaos(tmp_path, faults, seed)
    print("chaos summary:")
    for key, value in result.items():
        print(f"  {key:18} {value}")
    assert result["lost"] == 0
    assert result["invented"] == []
    assert result["mixed_message_ids"] == []
    # A copy under a new Message-ID means the gateway stored a message twice. The one
    # way that is not the gateway's doing: a broker restarted before it acknowledged a
    # publisher, which then publishes again, a new message to every subscriber (MQTT
    # QoS 1 is at-least-once end to end). Serial copies are never excused.
    serial_copies = [t for t in result["copies_new_id"] if t.startswith("serial ")]
    assert serial_copies == []
    if not result["broker_restarts"]:
        assert result["copies_new_id"] == []
    assert result["integrity"] == "ok"
    assert result["daemon_exits"] == {}
    assert result["moved_aside"] == []  # a locked or full disk is never taken for corruption
    assert sum(result["faults"].values()) == faults  # type: ignore[attr-defined]
    # A local flood is held to its rate (the rest waits in the spool), never more.
    assert result["local_mailed"] <= result["local_allowed"]  # type: ignore[operator]


@pytest.mark.timeout(400)
def test_chaos_short(tmp_path: Path) -> None:
    _run(tmp_path, int(os.environ.get("MAILGW_CHAOS_FAULTS", "30")))


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_chaos_soak(tmp_path: Path) -> None:
    _run(tmp_path, 500)
