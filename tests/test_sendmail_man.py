"""The man pages mailgw-sendmail ships: sendmail(8), mailq(1), newaliases(8), listed
for dh_installman, valid roff, and saying what the commands do."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from gateway import sendmail

DEBIAN = Path(__file__).resolve().parent.parent / "deploy" / "debian"
PAGES = ["sendmail.8", "mailq.1", "newaliases.8"]


def test_every_page_is_listed_for_the_package() -> None:
    listed = (DEBIAN / "mailgw-sendmail.manpages").read_text().split()
    assert listed == [f"debian/man/{p}" for p in PAGES]
    for page in PAGES:
        assert (DEBIAN / "man" / page).is_file()


@pytest.mark.skipif(shutil.which("man") is None, reason="man-db is not installed")
@pytest.mark.parametrize("page", PAGES)
def test_a_page_renders_without_a_warning(page: str) -> None:
    env = {**os.environ, "LC_ALL": "C.UTF-8", "MANWIDTH": "80", "MAN_DISABLE_SECCOMP": "1"}
    r = subprocess.run(
        ["man", "--warnings", "-l", str(DEBIAN / "man" / page)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0 and r.stderr == "", r.stderr
    name = page.split(".")[0]
    assert re.search(rf"^NAME\n\s+{name} - ", r.stdout, re.M), r.stdout[:300]


def test_sendmail8_names_every_exit_code_the_command_returns() -> None:
    text = (DEBIAN / "man" / "sendmail.8").read_text()
    codes = {v for k, v in vars(sendmail).items() if k.startswith("EX_") and v not in (70,)}
    for code in codes:
        assert f".B {code}\n" in text, code
