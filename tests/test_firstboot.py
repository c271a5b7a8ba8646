"""`mailgw firstboot`: a config dropped on the boot partition, taken or rejected, and
never a readable password left on the card. Real files in temporary directories; the
real command in a subprocess where the exit code and the output are the contract."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gateway.config import parse
from gateway.errors import ConfigError
from gateway.firstboot import Owner, recover_card, shred, take
from gateway.firstboot_text import MAX_CONFIG, Stripped, strip_passwords
from tests.conftest import run_cli

SECRET = "Zq9-h\u00fcnter2-S3cr3t"
SECRET_BYTES = SECRET.encode()


def config(state: Path, smtp: str = "", *, username: bool = True, extra: str = "") -> str:
    user = 'username = "gw@example.com"\n' if username else ""
    return (
        "# dropped on the card by the installer\n"
        f'[gateway]\ndevice_id = "truck-7"\nstate_dir = "{state}"\ndefault_route = "ops"\n\n'
        '[smtp]\nhost = "smtp.example.com"\nfrom = "gw@example.com"\n'
        f"{user}{smtp}\n"
        '[[route]]\nname = "ops"\nmatch = "#"\nto = ["ops@example.com"]\n'
        f"{extra}"
    )


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    boot, etc = tmp_path / "boot", tmp_path / "etc"
    boot.mkdir()
    return boot, etc


ENCODINGS = ("utf-8", "utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be")


def card_leaks(boot: Path, secret: bytes = SECRET_BYTES) -> list[str]:
    """Every file on the card that still holds the password's bytes, in any encoding a
    card's file may be saved in (grep -r for each)."""
    forms = [secret.decode().encode(codec) for codec in ENCODINGS]
    return [
        p.name
        for p in boot.rglob("*")
        if p.is_file() and not p.is_symlink() and any(f in p.read_bytes() for f in forms)
    ]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- taken ---------------------------------------------------------------------------


def test_taken_with_the_password_inline(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    boot, etc = dirs
    text = config(tmp_path / "state", f'password = "{SECRET}"   # the mailbox\'s\n')
    (boot / "mailgw.toml").write_text(text)

    out = take(boot, etc)

    assert out.code == 0 and out.problems == ()
    assert "took" in out.summary and SECRET not in out.summary
    assert (etc / "smtp-password").read_text() == SECRET + "\n"
    assert mode(etc / "smtp-password") == 0o600
    assert mode(etc / "gateway.toml") == 0o640
    # Every other byte kept, on the card and in /etc; the line became a comment.
    expected = text.replace(
        f'password = "{SECRET}"   # the mailbox\'s',
        f"# password moved to {etc}/smtp-password by mailgw firstboot",
    )
    assert (etc / "gateway.toml").read_text() == expected
    assert (boot / "mailgw.toml.taken").read_text() == expected
    assert not (boot / "mailgw.toml").exists()
    assert card_leaks(boot) == []
    # What was installed is what check-config accepts, and the daemon finds the
    # password as its credential (no password_file).
    cfg = parse(expected)
    assert cfg.smtp is not None and cfg.smtp.password_file is None


def test_taken_with_the_password_beside_by_the_real_command(
    dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    boot, etc = dirs
    text = config(tmp_path / "state")
    (boot / "mailgw.toml").write_text(text)
    (boot / "mailgw-smtp-password").write_text(SECRET + "\r\n")

    r = run_cli("firstboot", "--boot", str(boot), "--etc", str(etc))

    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mailgw firstboot: took ")
    assert r.stderr == "" and SECRET not in r.stdout
    assert (etc / "smtp-password").read_text() == SECRET + "\n"
    assert (etc / "gateway.toml").read_text() == text
    assert sorted(p.name for p in boot.iterdir()) == ["mailgw.toml.taken"]
    assert card_leaks(boot) == []

    # Run again (every boot runs it while the unit's condition holds): nothing to do.
    before = {p: p.read_bytes() for d in (boot, etc) for p in d.iterdir()}
    r = run_cli("firstboot", "--boot", str(boot), "--etc", str(etc))
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    assert {p: p.read_bytes() for d in (boot, etc) for p in d.iterdir()} == before


def test_the_same_password_in_both_places_is_taken(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    boot, etc = dirs
    (boot / "mailgw.toml").write_text(config(tmp_path / "s", f'password = "{SECRET}"\n'))
    (boot / "mailgw-smtp-password").write_text(SECRET + "\n")
    out = take(boot, etc)
    assert out.code == 0, out.problems
    assert (etc / "smtp-password").read_text() == SECRET + "\n"
    assert card_leaks(boot) == []


def test_two_different_passwords_install_neither(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    boot, etc = dirs
    (boot / "mailgw.toml").write_text(config(tmp_path / "s", f'password = "{SECRET}"\n'))
    (boot / "mailgw-smtp-password").write_text("other-Pw-42\n")
    out = take(boot, etc)
    assert out.code == 1
    assert any("two different SMTP passwords" in p for p in out.problems)
    assert not (etc / "smtp-password").exists() and not (etc / "gateway.toml").exists()
    assert card_leaks(boot) == [] and card_leaks(boot, b"other-Pw-42") == []


def test_a_password_alone_goes_to_etc(dirs: tuple[Path, Path]) -> None:
    boot, etc = dirs
    (boot / "mailgw-smtp-password").write_bytes(b"\xef\xbb\xbf" + SECRET_BYTES)
    out = take(boot, etc)
    assert out.code == 0 and "moved the SMTP password" in out.summary
    assert (etc / "smtp-password").read_text() == SECRET + "\n"
    assert list(boot.iterdir()) == []


def test_nothing_on_the_card_is_nothing_to_do(dirs: tuple[Path, Path]) -> None:
    boot, etc = dirs
    out = take(boot, etc)
    assert (out.code, out.summary) == (0, "")
    assert not etc.exists()


def test_only_the_password_lines_made_it_invalid(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    """`password` is a first-boot key: check-config refuses it, firstboot takes it off."""
    boot, etc = dirs
    text = config(tmp_path / "s", f'password = "{SECRET}"\n')
    with pytest.raises(ConfigError, match=r"smtp\.password: unknown key"):
        parse(text)
    (boot / "mailgw.toml").write_text(text)
    assert take(boot, etc).code == 0


def test_previous_config_is_kept_when_it_differs(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    boot, etc = dirs
    etc.mkdir()
    (etc / "gateway.toml").write_text("# the package's example\n")
    text = config(tmp_path / "s", f'password = "{SECRET}"\n')
    (boot / "mailgw.toml").write_text(text)
    out = take(boot, etc)
    assert out.code == 0 and "gateway.toml.before-firstboot" in out.summary
    assert (etc / "gateway.toml.before-firstboot").read_text() == "# the package's example\n"

    # The same config again: nothing to keep.
    (etc / "gateway.toml.before-firstboot").unlink()
    (boot / "mailgw.toml.taken").rename(boot / "mailgw.toml")
    out = take(boot, etc)
    assert out.code == 0 and "before-firstboot" not in out.summary
    assert not (etc / "gateway.toml.before-firstboot").exists()


def test_crlf_and_a_bom_from_notepad(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    boot, etc = dirs
    text = config(tmp_path / "s", f'password = "{SECRET}"\n')
    raw = b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode()
    (boot / "mailgw.toml").write_bytes(raw)
    out = take(boot, etc)
    assert out.code == 0, out.problems
    installed = (etc / "gateway.toml").read_bytes()
    assert not installed.startswith(b"\xef\xbb\xbf") and b"\r" not in installed
    parse(installed.decode())
    # The card keeps its own bytes (BOM, CRLF), less the password.
    taken = (boot / "mailgw.toml.taken").read_bytes()
    assert taken.startswith(b"\xef\xbb\xbf") and taken.count(b"\r\n") == raw.count(b"\r\n")
    assert card_leaks(boot) == []


def test_a_bom_on_the_password_line_itself() -> None:
    raw = b'\xef\xbb\xbf[smtp]\r\npassword = "x1"\r\n'
    s = strip_passwords(b'\xef\xbb\xbfpassword = "x1"\r\n', b"#gone")
    assert s.text == b"\xef\xbb\xbf#gone\r\n" and s.found[0].value == "x1"
    assert strip_passwords(raw, b"#gone").found[0].table == "smtp"


# --- rejected ------------------------------------------------------------------------


def test_rejected_with_the_reason_and_the_password_off_the_card(
    dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    boot, etc = dirs
    etc.mkdir()
    (etc / "gateway.toml").write_text("# running config\n")
    text = config(tmp_path / "s", f'password = "{SECRET}"\nport = 99999\n')
    (boot / "mailgw.toml").write_text(text)

    r = run_cli("firstboot", "--boot", str(boot), "--etc", str(etc))

    assert r.returncode == 1 and r.stdout == ""
    assert "rejected" in r.stderr and "smtp.port" in r.stderr
    assert SECRET not in r.stderr
    note = (boot / "mailgw.toml.rejected").read_text()
    port_line = text.splitlines().index("port = 99999") + 1
    assert f"{boot / 'mailgw.toml'}:{port_line}: smtp.port" in note
    assert "moved to" in note and "What to do" in note and "UTC" in note
    assert (etc / "gateway.toml").read_text() == "# running config\n"
    assert (etc / "smtp-password").read_text() == SECRET + "\n"
    assert (boot / "mailgw.toml").exists()
    assert card_leaks(boot) == []

    # Fixed on the card: the next boot takes it and the note goes.
    fixed = (boot / "mailgw.toml").read_text().replace("port = 99999\n", "")
    (boot / "mailgw.toml").write_text(fixed)
    out = take(boot, etc)
    assert out.code == 0, out.problems
    assert not (boot / "mailgw.toml.rejected").exists()
    assert (etc / "gateway.toml").read_text() == fixed


@pytest.mark.parametrize(
    ("smtp", "username", "why"),
    [
        (f'password = "{SECRET}"\n', False, "smtp.username: not set"),
        (
            f'password = "{SECRET}"\npassword_file = "/run/pw"\n',
            True,
            "smtp.password_file: set, and a password was given",
        ),
        ('password = ""\n', True, "is empty"),
        ('password = "a\\nb"\n', True, "must be one line"),
        ("password = 42\n", True, "could not be read"),
        ("", True, "no password was given"),
    ],
)
def test_password_problems(
    dirs: tuple[Path, Path], tmp_path: Path, smtp: str, username: bool, why: str
) -> None:
    boot, etc = dirs
    (boot / "mailgw.toml").write_text(config(tmp_path / "s", smtp, username=username))
    out = take(boot, etc)
    assert out.code == 1
    assert any(why in p for p in out.problems), out.problems
    assert not (etc / "gateway.toml").exists()
    assert card_leaks(boot) == []


def test_no_password_given_but_one_installed_before(
    dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    boot, etc = dirs
    etc.mkdir()
    (etc / "smtp-password").write_text("earlier\n")
    (boot / "mailgw.toml").write_text(config(tmp_path / "s"))
    assert take(boot, etc).code == 0
    assert (etc / "smtp-password").read_text() == "earlier\n"


def test_password_file_naming_the_credential_is_refused(
    dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    boot, etc = dirs
    smtp = f'password_file = "{etc}/smtp-password"\n'
    (boot / "mailgw-smtp-password").write_text(SECRET)
    (boot / "mailgw.toml").write_text(config(tmp_path / "s", smtp))
    out = take(boot, etc)
    assert out.code == 1
    assert any("credential smtp-password" in p for p in out.problems), out.problems


def test_relative_paths_are_checked_from_the_daemons_directory(
    dirs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    boot, etc = dirs
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ca-nowhere-else.pem").write_text("x")
    smtp = f'password = "{SECRET}"\nca_file = "ca-nowhere-else.pem"\n'
    (boot / "mailgw.toml").write_text(config(tmp_path / "s", smtp))
    out = take(boot, etc)
    assert out.code == 1
    assert any("ca-nowhere-else.pem does not exist" in p for p in out.problems), out.problems


def test_oversized(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    boot, etc = dirs
    padding = ("# " + "x" * 76 + "\n") * (MAX_CONFIG // 80 + 10)
    (boot / "mailgw.toml").write_text(config(tmp_path / "s", f'password = "{SECRET}"\n') + padding)
    out = take(boot, etc)
    assert out.code == 1 and any("too large" in p for p in out.problems)
    assert card_leaks(boot) == []
    assert (etc / "smtp-password").read_text() == SECRET + "\n"


def test_not_utf8(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    boot, etc = dirs
    text = config(tmp_path / "s", f'password = "{SECRET}"\n').encode()
    (boot / "mailgw.toml").write_bytes(text.replace(b"truck-7", b"truck-\xe9"))
    out = take(boot, etc)
    assert out.code == 1 and any("line 3: not UTF-8" in p for p in out.problems)
    assert card_leaks(boot) == []


def test_a_password_anywhere_else_is_removed_not_kept(
    dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    boot, etc = dirs
    extra = f'\n[mqtt]\nhost = "127.0.0.1"\npassword = "{SECRET}"\n'
    (boot / "mailgw.toml").write_text(config(tmp_path / "s", extra=extra))
    (etc).mkdir()
    (etc / "smtp-password").write_text("smtp's own\n")
    out = take(boot, etc)
    assert out.code == 1
    assert any("mqtt.password: not a setting" in p for p in out.problems), out.problems
    assert card_leaks(boot) == []
    assert (etc / "smtp-password").read_text() == "smtp's own\n"


def test_a_multiline_password_goes_whole(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    boot, etc = dirs
    smtp = f'password = """\n{SECRET}"""\nport = 587\n'
    (boot / "mailgw.toml").write_text(config(tmp_path / "s", smtp))
    out = take(boot, etc)
    assert out.code == 0, out.problems
    assert (etc / "smtp-password").read_text() == SECRET + "\n"
    assert "port = 587" in (etc / "gateway.toml").read_text()
    assert card_leaks(boot) == []


def test_a_password_not_on_its_own_line_takes_the_file_off_the_card(
    dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    boot, etc = dirs
    text = config(tmp_path / "s").replace(
        '[smtp]\nhost = "smtp.example.com"\nfrom = "gw@example.com"\nusername = "gw@example.com"\n',
        'smtp = { host = "smtp.example.com", from = "gw@example.com", '
        f'username = "gw@example.com", password = "{SECRET}" }}\n',
    )
    (boot / "mailgw.toml").write_text(text)
    out = take(boot, etc)
    assert out.code == 1
    assert any("not on a line of its own" in p for p in out.problems), out.problems
    assert card_leaks(boot) == [] and not (boot / "mailgw.toml").exists()
    assert mode(etc / "mailgw.toml.from-card") == 0o600


# --- power cuts, arbitrary bytes ----------------------------------------------------


def test_a_cut_while_rewriting_the_card_rolls_forward(tmp_path: Path) -> None:
    card = tmp_path / "mailgw.toml"
    card.write_bytes(bytes(300))  # zeroed in place, not yet replaced
    (tmp_path / "mailgw.toml.firstboot-new").write_text("# the new text\n")
    recover_card(card)
    assert card.read_text() == "# the new text\n"
    # Cut before the old one was zeroed: the old one stays, to be done again.
    card.write_text(f'password = "{SECRET}"\n')
    (tmp_path / "mailgw.toml.firstboot-new").write_text("# half\n")
    recover_card(card)
    assert SECRET in card.read_text() and not (tmp_path / "mailgw.toml.firstboot-new").exists()


def test_strip_keeps_every_other_byte() -> None:
    raw = b"a = 1\r\n[smtp]\n  \"password\" = 'x'\nb = 2"
    assert strip_passwords(raw, b"#m") == Stripped(
        b"a = 1\r\n[smtp]\n#m\nb = 2", strip_passwords(raw, b"#m").found
    )
    assert [(f.table, f.line, f.value) for f in strip_passwords(raw, b"#m").found] == [
        ("smtp", 3, "x")
    ]


def _run_in_fresh_dirs(card: bytes | None, beside: bytes | None) -> tuple[list[str], int]:
    with tempfile.TemporaryDirectory() as d:
        boot, etc = Path(d) / "boot", Path(d) / "etc"
        boot.mkdir()
        if card is not None:
            (boot / "mailgw.toml").write_bytes(card)
        if beside is not None:
            (boot / "mailgw-smtp-password").write_bytes(beside)
        out = take(boot, etc, Owner())
        assert out.code in (0, 1)
        assert all(SECRET not in p for p in out.problems) and SECRET not in out.summary
        leaks = card_leaks(boot)
        if (etc / "gateway.toml").exists():
            assert SECRET_BYTES not in (etc / "gateway.toml").read_bytes()
        return leaks, out.code


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400), st.binary(max_size=400), st.sampled_from([b"\n", b"\r\n"]))
def test_arbitrary_bytes_never_crash_nor_keep_the_password(
    before: bytes, after: bytes, eol: bytes
) -> None:
    assume(SECRET_BYTES not in before + after)
    line = b"\n[smtp]" + eol + b'password = "' + SECRET_BYTES + b'"' + eol
    leaks, _ = _run_in_fresh_dirs(before + line + after, None)
    assert leaks == []


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_arbitrary_bytes_beside_a_password_file(card: bytes) -> None:
    assume(SECRET_BYTES not in card)
    leaks, _ = _run_in_fresh_dirs(card, SECRET_BYTES + b"\n")
    assert leaks == []


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_text_never_crashes(text: str) -> None:
    leaks, _ = _run_in_fresh_dirs(text.encode("utf-8", "surrogatepass"), None)
    assert leaks == []


def test_files_are_not_readable_by_others_while_written(
    dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    """The secret's temporary file is created 0600, not chmod-ed after the write."""
    boot, etc = dirs
    old = os.umask(0)
    try:
        (boot / "mailgw.toml").write_text(config(tmp_path / "s", f'password = "{SECRET}"\n'))
        assert take(boot, etc).code == 0
    finally:
        os.umask(old)
    assert mode(etc / "smtp-password") == 0o600 and mode(etc / "gateway.toml") == 0o640
    assert mode(etc) == 0o750


def test_a_bad_password_alone_is_refused_and_still_removed(dirs: tuple[Path, Path]) -> None:
    boot, etc = dirs
    (boot / "mailgw-smtp-password").write_bytes(b"line one\nline\xfftwo\n")
    out = take(boot, etc)
    assert out.code == 1 and any("not UTF-8" in p for p in out.problems)
    note = (boot / "mailgw-smtp-password.rejected").read_text()
    assert "write the password alone on one line" in note
    assert sorted(p.name for p in boot.iterdir()) == ["mailgw-smtp-password.rejected"]
    assert not (etc / "smtp-password").exists()


# --- any encoding, any line end, any syntax ------------------------------------------

# What editors on any computer save: Notepad's UTF-8 (with BOM) and "Unicode" (UTF-16 LE
# with BOM), "Unicode big endian", UTF-16 without a BOM, classic Mac line ends.
SAVED_AS = {
    "utf-8": ("utf-8", b""),
    "utf-8-bom": ("utf-8", b"\xef\xbb\xbf"),
    "utf-16-le-bom": ("utf-16-le", b"\xff\xfe"),
    "utf-16-be-bom": ("utf-16-be", b"\xfe\xff"),
    "utf-16-le": ("utf-16-le", b""),
    "utf-16-be": ("utf-16-be", b""),
}


def saved(text: str, how: str, eol: str) -> bytes:
    codec, bom = SAVED_AS[how]
    return bom + text.replace("\n", eol).encode(codec)


@pytest.mark.parametrize("eol", ["\n", "\r\n", "\r"], ids=["lf", "crlf", "cr"])
@pytest.mark.parametrize("how", list(SAVED_AS))
def test_taken_whatever_the_encoding_and_line_ends(
    dirs: tuple[Path, Path], tmp_path: Path, how: str, eol: str
) -> None:
    boot, etc = dirs
    raw = saved(config(tmp_path / "s", f'password = "{SECRET}"\n'), how, eol)
    (boot / "mailgw.toml").write_bytes(raw)

    out = take(boot, etc)

    assert out.code == 0, out.problems
    assert card_leaks(boot) == []
    assert (etc / "smtp-password").read_text() == SECRET + "\n"
    installed = (etc / "gateway.toml").read_bytes()
    assert b"\r" not in installed and b"\0" not in installed
    parse(installed.decode())
    # The card's copy is written back in its own encoding, with its own line ends.
    codec, bom = SAVED_AS[how]
    taken = (boot / "mailgw.toml.taken").read_bytes()
    assert taken.startswith(bom)
    back = taken[len(bom) :].decode(codec)
    assert "# password moved to" in back and back.count(eol) == raw[len(bom) :].decode(codec).count(
        eol
    )


@pytest.mark.parametrize("how", ["utf-8", "utf-16-le-bom", "utf-16-be-bom"])
def test_a_syntax_error_elsewhere_still_takes_the_password_off(
    dirs: tuple[Path, Path], tmp_path: Path, how: str
) -> None:
    boot, etc = dirs
    text = config(tmp_path / "s", f'password = "{SECRET}"\nport = = 587\n')
    (boot / "mailgw.toml").write_bytes(saved(text, how, "\r\n"))

    out = take(boot, etc)

    assert out.code == 1 and out.problems
    assert card_leaks(boot) == []
    assert (etc / "smtp-password").read_text() == SECRET + "\n"
    note = (boot / "mailgw.toml.rejected").read_text()
    assert f"moved to {etc / 'smtp-password'} and removed from this card" in note


@pytest.mark.parametrize("how", ["utf-8", "utf-16-le-bom"])
def test_an_inline_table_password_in_a_broken_file_leaves_the_card(
    dirs: tuple[Path, Path], tmp_path: Path, how: str
) -> None:
    boot, etc = dirs
    text = (
        config(tmp_path / "s").replace(
            '[smtp]\nhost = "smtp.example.com"\nfrom = "gw@example.com"\n'
            'username = "gw@example.com"\n',
            f'smtp = {{ host = "smtp.example.com", password = "{SECRET}" }}\n',
        )
        + "\n[mqtt\nhost = oops\n"
    )
    raw = saved(text, how, "\n")
    (boot / "mailgw.toml").write_bytes(raw)

    out = take(boot, etc)

    assert out.code == 1
    assert card_leaks(boot) == [] and not (boot / "mailgw.toml").exists()
    kept = etc / "mailgw.toml.from-card"
    assert kept.read_bytes() == raw and mode(kept) == 0o600
    note = (boot / "mailgw.toml.rejected").read_text()
    assert f"moved off this card to {kept}" in note


def test_a_string_that_reads_like_an_inline_password_is_not_one(
    dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    boot, etc = dirs
    extra = '\n[[route]]\nname = "b"\nmatch = "x/#"\nto = ["a@example.com"]\n'
    extra += 'subject = "{sensor}, password = reset"\n'
    (boot / "mailgw.toml").write_text(
        config(tmp_path / "s", f'password = "{SECRET}"\n', extra=extra)
    )
    out = take(boot, etc)
    assert out.code == 0, out.problems


# --- power cuts and links ------------------------------------------------------------


@pytest.mark.parametrize("zeroed", [300, 4096], ids=["whole", "begun"])
def test_a_cut_after_zeroing_the_password_file_then_a_good_config_boots(
    dirs: tuple[Path, Path], tmp_path: Path, zeroed: int
) -> None:
    """The cut fell between `shred`'s zeroing and its unlink (or inside the zeroing)."""
    boot, etc = dirs
    beside = boot / "mailgw-smtp-password"
    beside.write_bytes(bytes(min(zeroed, 300)) + (b"tail-of-old-pw" if zeroed > 300 else b""))
    if zeroed > 300:
        # Zeroing begun, not finished: only the marker `shred` writes first says so.
        (boot / "mailgw-smtp-password.firstboot-shred").write_bytes(b"")
    (boot / "mailgw.toml").write_text(config(tmp_path / "s", f'password = "{SECRET}"\n'))

    r = run_cli("firstboot", "--boot", str(boot), "--etc", str(etc))

    assert r.returncode == 0, r.stderr
    assert (etc / "smtp-password").read_text() == SECRET + "\n"
    assert sorted(p.name for p in boot.iterdir()) == ["mailgw.toml.taken"]


def test_a_cut_after_zeroing_the_card_config_is_no_config(dirs: tuple[Path, Path]) -> None:
    boot, etc = dirs
    (boot / "mailgw.toml").write_bytes(bytes(200))
    assert take(boot, etc) == take(boot, etc)
    assert list(boot.iterdir()) == []


def test_shred_refuses_a_link(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("precious\n")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(Exception, match="symbolic link"):
        shred(tmp_path / "link")
    assert target.read_text() == "precious\n"


@pytest.mark.parametrize("name", ["mailgw-smtp-password", "mailgw.toml"])
def test_a_link_on_the_card_is_refused_and_its_target_untouched(
    dirs: tuple[Path, Path], tmp_path: Path, name: str
) -> None:
    boot, etc = dirs
    target = tmp_path / "shadow"
    target.write_text(f'password = "{SECRET}"\nroot:x:0:0\n')
    (boot / name).symlink_to(target)
    if name == "mailgw-smtp-password":
        (boot / "mailgw.toml").write_text(config(tmp_path / "s", 'password = "another-1"\n'))

    r = run_cli("firstboot", "--boot", str(boot), "--etc", str(etc))

    assert r.returncode == 1
    assert "symbolic link" in r.stderr or "symbolic link" in (boot / f"{name}.rejected").read_text()
    assert target.read_text() == f'password = "{SECRET}"\nroot:x:0:0\n'
    assert (boot / name).is_symlink()
    assert "symbolic link" in (boot / f"{name}.rejected").read_text()
    assert card_leaks(boot, b"another-1") == []
    assert not (etc / "gateway.toml").exists()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.text(max_size=200),
    st.text(max_size=200),
    st.sampled_from(list(SAVED_AS)),
    st.sampled_from(["\n", "\r\n", "\r"]),
    st.booleans(),
)
def test_arbitrary_text_in_any_encoding_keeps_no_password(
    before: str, after: str, how: str, eol: str, inline: bool
) -> None:
    assume(SECRET not in before + after)
    line = f'smtp = {{ password = "{SECRET}" }}\n' if inline else f'[smtp]\npassword = "{SECRET}"\n'
    codec, bom = SAVED_AS[how]
    raw = bom + (before + "\n" + line + after).replace("\n", eol).encode(codec, "surrogatepass")
    leaks, _ = _run_in_fresh_dirs(raw, None)
    assert leaks == []


# --- installer mistakes: nothing of the password stays, and the note says what is true ---

# Every way an installer has been seen to leave a password where a line scan alone
# misses it: commented out, a key spelled with TOML escapes, UTF-32, a key after a
# header or another key on the same line, a value that is not UTF-8 running over lines.
MISTAKES = {
    "commented": ("utf-8", 'password = "x"\n# password = "{pw}"\n'),
    "commented-twice": ("utf-8", '  ## password = "{pw}"\n'),
    "escaped-key": ("utf-8", '"pass\\u0077ord" = "{pw}"\n'),
    "escaped-key-upper": ("utf-8", '"\\u0050ASSWORD" = "{pw}"\n'),
    "escaped-dotted": ("utf-8", 'smtp."pass\\U00000077ord" = "{pw}"\n'),
    "utf-32-bom": ("utf-32", 'password = "{pw}"\n'),
    "utf-32-le": ("utf-32-le", 'password = "{pw}"\n'),
    "utf-32-be": ("utf-32-be", 'password = "{pw}"\n'),
    "header-same-line": ("utf-8", '[mqtt] password = "{pw}"\n'),
    "two-keys-one-line": ("utf-8", 'port = 587  password = "{pw}"\n'),
    "after-a-string": ("utf-8", 'note = """x\n""" ; password = "{pw}"\n'),
    "cp1252-multiline": ("cp1252", 'password = """Gr\u00fc\u00dfe\n{pw}"""\n'),
}


@pytest.mark.parametrize("name", list(MISTAKES))
def test_an_installer_mistake_keeps_no_password_on_the_card(
    dirs: tuple[Path, Path], tmp_path: Path, name: str
) -> None:
    boot, etc = dirs
    codec, smtp = MISTAKES[name]
    pw = "Zq9-hunter2-S3cr3t"  # ASCII, so that cp1252 can write it too
    (boot / "mailgw.toml").write_bytes(config(tmp_path / "s", smtp.format(pw=pw)).encode(codec))

    out = take(boot, etc)

    assert card_leaks(boot, pw.encode()) == [], out
    installed = etc / "gateway.toml"
    assert not installed.exists() or pw.encode() not in installed.read_bytes()
    if out.code == 1:
        note = (boot / "mailgw.toml.rejected").read_text()
        assert ("removed from this card" in note) or ("moved off this card" in note), note


def test_a_commented_password_beside_a_password_file_is_not_kept(
    dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    boot, etc = dirs
    old = "OldPW-456"
    (boot / "mailgw.toml").write_text(config(tmp_path / "s", f'# password = "{old}"\n'))
    (boot / "mailgw-smtp-password").write_text(SECRET + "\n")

    out = take(boot, etc)

    assert out.code == 0, out.problems
    assert (etc / "smtp-password").read_text() == SECRET + "\n"
    assert card_leaks(boot, old.encode()) == [] and card_leaks(boot) == []
    assert old not in (etc / "gateway.toml").read_text()


def test_a_note_never_says_removed_when_it_was_not(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    """A line the scan cannot take apart: the whole file leaves the card, and the note
    says so (not that the password was removed from it)."""
    boot, etc = dirs
    text = config(tmp_path / "s", f'port = 587  password = "{SECRET}"\n')
    (boot / "mailgw.toml").write_text(text)

    out = take(boot, etc)

    assert out.code == 1
    assert not (boot / "mailgw.toml").exists() and card_leaks(boot) == []
    kept = etc / "mailgw.toml.from-card"
    assert kept.read_text() == text and mode(kept) == 0o600
    note = (boot / "mailgw.toml.rejected").read_text()
    assert f"moved off this card to {kept}" in note
    assert "removed from this card" not in note


def test_a_password_file_named_in_the_config_stays(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    """The word alone is no password: `password_file`, a path ending in "password" and a
    comment about it are settings and words, and a file holding them is taken."""
    boot, etc = dirs
    (tmp_path / "password").write_text("pw\n")
    (tmp_path / "password").chmod(0o600)
    smtp = f'password_file = "{tmp_path / "password"}"  # the password, not here\n'
    (boot / "mailgw.toml").write_text(config(tmp_path / "s", smtp))
    out = take(boot, etc)
    assert out.code == 0, out.problems


@pytest.mark.parametrize("codec", ["utf-32-be", "utf-32-le", "utf-32"])
def test_utf32_is_taken_not_taken_for_a_leftover(
    dirs: tuple[Path, Path], tmp_path: Path, codec: str
) -> None:
    """UTF-32 big endian without a BOM begins with NULs: it is a config all the same,
    never deleted as the leftover of an interrupted removal."""
    boot, etc = dirs
    (boot / "mailgw.toml").write_bytes(
        config(tmp_path / "s", f'password = "{SECRET}"\n').encode(codec)
    )

    out = take(boot, etc)

    assert out.code == 0, out.problems
    assert (etc / "smtp-password").read_text() == SECRET + "\n"
    parse((etc / "gateway.toml").read_text())
    assert card_leaks(boot) == [] and (boot / "mailgw.toml.taken").exists()


def test_a_file_beginning_with_nuls_is_not_deleted_without_the_marker(
    dirs: tuple[Path, Path],
) -> None:
    boot, etc = dirs
    (boot / "mailgw.toml").write_bytes(bytes(8) + b"not zeroed")
    out = take(boot, etc)
    assert out.code == 1, out
    assert (boot / "mailgw.toml.rejected").exists()


def test_shred_leaves_no_marker(tmp_path: Path) -> None:
    f = tmp_path / "mailgw-smtp-password"
    f.write_text("x\n")
    shred(f)
    assert list(tmp_path.iterdir()) == []


def _escaped(word: str, picks: list[int]) -> str:
    """`word` with some letters written as TOML escapes (\\u or \\U) or in capitals."""
    forms = [
        lambda c: c,
        lambda c: c.upper(),
        lambda c: f"\\u{ord(c):04x}",
        lambda c: f"\\U{ord(c):08X}",
    ]
    return "".join(forms[p](c) for p, c in zip(picks, word, strict=True))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.integers(0, 3), min_size=8, max_size=8),
    st.sampled_from(["", "[smtp] ", "# ", "#", "port = 587 ", "smtp.", "x = '''a\n''' "]),
    st.sampled_from(["utf-8", "utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be", "utf-32"]),
    st.booleans(),
)
def test_any_spelling_of_the_key_keeps_no_password(
    picks: list[int], before: str, codec: str, quoted: bool
) -> None:
    key = _escaped("password", picks)
    if "\\" in key or quoted:
        key = f'"{key}"'
    text = f'[gateway]\ndevice_id = "t"\n[smtp]\nhost = "h"\n{before}{key} = "{SECRET}"\n'
    leaks, _ = _run_in_fresh_dirs(text.encode(codec), None)
    assert leaks == []
