"""The sans-IO parts of local mail's limits: the per-user rate, log episodes,
/etc/aliases, the client's early reading of To/Cc/Bcc and its address patterns, and
the [sendmail] keys that configure them."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import ConfigError, load
from gateway.etc_aliases import MAX_TARGETS, parse
from gateway.maildrop_limits import Episodes, UserRate
from gateway.sendmail_drop import allowed, header_addresses
from tests.conftest import run_cli


@given(
    st.integers(1, 50),
    st.floats(1, 3600),
    st.integers(1, 50),
    st.lists(st.tuples(st.integers(0, 3), st.floats(0, 100)), max_size=300),
)
@settings(max_examples=200)
def test_a_uid_gets_at_most_burst_plus_the_rate_and_uids_are_independent(
    count: int, period: float, burst: int, events: list[tuple[int, float]]
) -> None:
    rate = UserRate(count, period, burst)
    now = 0.0
    granted: dict[int, int] = {}
    for uid, step in events:
        now += step
        if rate.take(uid, now):
            granted[uid] = granted.get(uid, 0) + 1
    for n in granted.values():
        assert n <= burst + count * now / period + 1e-6
    # Another uid, never seen, has its whole burst whatever the others did.
    assert sum(rate.take(99, now) for _ in range(burst + 1)) == burst


def test_a_clock_stepping_back_mints_no_tokens() -> None:
    rate = UserRate(1, 60, 1)
    assert rate.take(5, 1000.0)
    assert not rate.take(5, 10.0)
    assert not rate.take(5, 1000.0)


def test_an_episode_is_logged_once_and_told_when_it_ends() -> None:
    ep = Episodes(quiet=60)
    assert ep.happened(7, "not_allowed", 0.0)
    assert not any(ep.happened(7, "not_allowed", float(t)) for t in range(1, 50))
    assert ep.happened(8, "not_allowed", 1.0)  # another user: its own episode
    assert ep.ended(100.0) == [(8, "not_allowed", 1, 0.0)]  # quiet since 1.0
    assert ep.ended(110.0) == [(7, "not_allowed", 50, 49.0)]  # quiet since 49.0
    assert ep.happened(7, "not_allowed", 300.0)  # a new episode


def test_debian_aliases_are_followed_and_what_is_not_mail_is_skipped() -> None:
    etc = parse(
        "# /etc/aliases\n"
        "mailer-daemon: postmaster\n"
        "postmaster: root\n"
        "Root: me@example.com,\n"
        "\tops\n"
        "logs: /var/log/mail, |/bin/cat, :include:/etc/list\n"
        "loop1: loop2\nloop2: loop1\n"
        "nonsense line\n"
    )
    assert etc.expand("mailer-daemon") == (["me@example.com"], ["ops"])
    assert etc.expand("unknown") == ([], ["unknown"])
    assert etc.expand("loop1") == ([], ["loop1"])
    assert dict(etc.table).get("logs") is None
    assert len(etc.skipped) == 4


@given(st.text(max_size=2000))
@settings(max_examples=300)
def test_any_aliases_text_parses_and_expands_within_bounds(text: str) -> None:
    etc = parse(text)
    for name, _ in etc.table:
        addresses, names = etc.expand(name)
        assert len(addresses) + len(names) <= MAX_TARGETS + 1
        assert all("@" in a for a in addresses)


_addr = st.from_regex(r"[a-z0-9]{1,8}@[a-z]{1,6}\.example", fullmatch=True)
_display = st.sampled_from(["", "Jo", '"Doe, J"', "Ops (team, night)"])


@given(st.lists(st.tuples(_display, _addr), min_size=1, max_size=20), st.integers(1, 30))
@settings(max_examples=200)
def test_the_clients_count_of_to_cc_bcc_agrees_with_the_daemons_parser(
    items: list[tuple[str, str]], cap: int
) -> None:
    value = ", ".join(f"{d} <{a}>" if d else a for d, a in items)
    message = f"To: {value}\r\nSubject: s\r\n\r\nTo: not@header.example\r\n".encode()
    # The oracle is what was generated, not getaddresses: its reading of a comment with a
    # comma differs between CPython releases (Debian's 3.11.2 patches it).
    want = [a for _, a in items]
    got = header_addresses(message, cap)
    if len(want) > cap:
        assert got is None
    else:
        assert got == want


@given(st.binary(max_size=3000), st.integers(0, 300))
@settings(max_examples=300)
def test_the_clients_header_reading_never_raises(message: bytes, cap: int) -> None:
    got = header_addresses(message, cap)
    assert got is None or len(got) <= cap


_piece = st.text(alphabet="ab@.*", max_size=8)


@given(_piece, st.text(alphabet="ab@.", max_size=12))
@settings(max_examples=500)
def test_allow_to_patterns_match_as_fnmatch_with_only_star(pattern: str, address: str) -> None:
    assert allowed(address, (pattern,)) == fnmatch.fnmatchcase(address, pattern)


def test_no_patterns_allow_any_address_and_case_does_not_matter() -> None:
    assert allowed("x@y.example", ())
    assert allowed("Ops@Example.COM", ("*@example.com",))
    assert not allowed("ops@example.com.evil.example", ("*@example.com",))


BASE = """
[smtp]
host = "smtp.example.com"
username = "gw@example.com"
password_file = "{pw}"
from = "gw@example.com"
[[route]]
name = "ops"
match = "#"
to = ["ops@example.com"]
[sendmail]
"""


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ('rate = "lots"', "sendmail.rate: 'lots' is not a rate"),
        ('rate = "0/min"', "sendmail.rate"),
        ("burst = 0", "sendmail.burst: must be between 1 and 10000"),
        ('allow_to = ["example.com"]', "sendmail.allow_to: 'example.com' is not an address"),
        ('allow_to = "*@example.com"', "sendmail.allow_to: must be a list of strings"),
        ('aliases_file = "etc/aliases"', "sendmail.aliases_file: 'etc/aliases': must be an"),
        ('max_size = "25 MiB"', "sendmail.max_size: 26214400 bytes is over the largest"),
        ('max_size = "17 MiB"', "its unit allows 128 MiB (MemoryMax=)"),
        ('max_size = "16777217"', "sendmail.max_size: 16777217 bytes is over the largest"),
    ],
)
def test_check_config_refuses_what_local_mail_could_not_run_with(
    tmp_path: Path, line: str, says: str
) -> None:
    pw = tmp_path / "pw"
    pw.write_text("x")
    pw.chmod(0o600)
    cfg = tmp_path / "gw.toml"
    cfg.write_text(BASE.format(pw=pw) + line + "\n")
    with pytest.raises(ConfigError) as exc:
        load(cfg)
    text = str(exc.value)
    assert says in text
    assert f"gw.toml:{BASE.count(chr(10)) + 1}:" in text  # the key's line


def test_the_defaults_and_off(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("x")
    pw.chmod(0o600)
    cfg = tmp_path / "gw.toml"
    cfg.write_text(BASE.format(pw=pw))
    s = load(cfg).sendmail
    assert (s.rate, s.burst, s.allow_to, str(s.aliases_file)) == (
        (20, 60.0),
        20,
        (),
        "/etc/aliases",
    )
    cfg.write_text(BASE.format(pw=pw) + 'rate = "off"\nallow_to = ["*@Example.com"]\n')
    s = load(cfg).sendmail
    assert s.rate is None and s.allow_to == ("*@example.com",)


def test_episodes_of_users_whose_cause_is_gone_are_forgotten() -> None:
    ep = Episodes(quiet=float("inf"))
    assert ep.happened(1, "over_rate", 0.0)
    assert ep.happened(2, "over_rate", 0.0)
    ep.keep_only({2})
    assert ep.happened(1, "over_rate", 5.0)  # a new episode: logged again
    assert not ep.happened(2, "over_rate", 5.0)
    assert ep.ended(1e9) == []  # never closed by quiet


def test_touching_an_unfinished_file_does_not_reset_its_hour(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """STALE counts from the first sighting: a writer that keeps touching its
    unfinished file is still moved aside when the time is up (here 1 s, not 1 h)."""
    import asyncio
    import os

    from gateway import maildrop
    from gateway.config import parse
    from gateway.runtime import Runtime

    monkeypatch.setattr(maildrop, "STALE", 1.0)
    monkeypatch.setattr(maildrop, "LOOK_MAX", 0.2, raising=False)
    drop = tmp_path / "maildrop"
    drop.mkdir()
    cfg = parse(
        '[[route]]\nname = "ops"\nmatch = "#"\nto = ["ops@example.com"]\n'
        f'[sendmail]\nmaildrop = "{drop}"\n'
    )
    runtime = Runtime()
    m = maildrop.Maildrop(cfg, None, runtime)  # type: ignore[arg-type]  # nothing is stored
    unfinished = drop / "0123456789abcdef"
    unfinished.write_bytes(b"MAILGW-DROP 1\n")
    unfinished.chmod(0o600)

    async def rounds() -> None:
        deadline = asyncio.get_running_loop().time() + 10
        while runtime.rejected["maildrop_incomplete"] == 0:
            assert asyncio.get_running_loop().time() < deadline, "never moved aside"
            os.utime(unfinished)  # the writer touches it, again and again
            await m.scan()
            await asyncio.sleep(0.05)

    asyncio.run(rounds())
    assert not unfinished.exists()
    assert len(list((tmp_path / "rejected").iterdir())) == 1


def test_check_config_refuses_a_max_size_the_units_memory_cannot_hold(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("x")
    pw.chmod(0o600)
    cfg = tmp_path / "gw.toml"
    cfg.write_text(BASE.format(pw=pw) + 'max_size = "16 MiB"\n')
    assert load(cfg).sendmail.max_size == 16 * 1024 * 1024  # the cap itself is taken
    cfg.write_text(BASE.format(pw=pw) + 'max_size = "25 MiB"\n')
    r = run_cli("check-config", "-c", str(cfg))
    assert r.returncode == 2, (r.stdout, r.stderr)
    line = BASE.count("\n") + 1
    assert f"{cfg}:{line}: sendmail.max_size: " in r.stderr, r.stderr
    assert "MemoryMax" in r.stderr
