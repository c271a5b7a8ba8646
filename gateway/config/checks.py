"""Checks of the config's other kinds of value: hosts, MQTT strings, secret and TLS files.

Each returns why a value cannot work, or None; the builders attach the key and line.
Where it can, a check does what the daemon will do later (read the secret as UTF-8,
load the certificates), so a value that would stop the daemon is refused by
check-config instead.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from pathlib import Path

# A host to connect to may be a local name (/etc/hosts), where '_' is common.
_HOST_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def is_loopback_host(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_host(host: str) -> str | None:
    """Why `host` cannot be connected to (a name or an IP address), or None."""
    if host.startswith("["):
        return f"{host!r}: write an IP address without brackets"
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    hint = "; put the port in `port`" if ":" in host else ""
    try:
        encoded = host.encode("idna").decode("ascii")
    except UnicodeError:
        return f"{host!r} is not a host name or IP address{hint}"
    labels = encoded.removesuffix(".").split(".")
    if len(encoded) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        return f"{host!r} is not a host name or IP address{hint}"
    return None


def mqtt_string_problem(text: str) -> str | None:
    """Why a broker would refuse `text` as an MQTT UTF-8 string, or None.

    MQTT 3.1.1 §1.5.3 (MQTT 5 §1.5.4): no U+0000, at most 65535 bytes; Mosquitto also
    refuses control characters and non-characters, and drops the connection of a client
    that sends one, so a subscription holding one would loop through reconnects.
    """
    if len(text.encode("utf-8")) > 65535:
        return "is longer than MQTT's 65535 bytes"
    for ch in text:
        cp = ord(ch)
        if cp <= 0x1F or 0x7F <= cp <= 0x9F:
            return f"{text!r} contains the control character U+{cp:04X}"
        if 0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE:
            return f"{text!r} contains the non-character U+{cp:04X}"
    return None


def check_topic_filter(text: str) -> str | None:
    """Validate an MQTT topic filter (MQTT 3.1.1 §4.7.1)."""
    if not text:
        return "a topic filter cannot be empty"
    if "\0" in text:
        return "a topic filter cannot contain NUL"
    if why := mqtt_string_problem(text):
        return why
    levels = text.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return f"{text!r}: '#' must be a whole level and the last one"
        if "+" in level and level != "+":
            return f"{text!r}: '+' must be a whole level"
    return None


def secret_file_problem(path: Path) -> str | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return f"{path} does not exist; create it with the secret on one line (chmod 600)"
    except PermissionError:
        return None  # not ours to read at check time; the daemon's user may read it
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    if st.st_mode & 0o007:
        mode = stat.S_IMODE(st.st_mode)
        return f"{path} is readable by others (mode {mode:04o}); chmod 600 it (or 640 root:mailgw)"
    try:
        raw = path.read_bytes()
    except OSError:
        return None  # as above: the daemon's user may be able to read it
    # The daemon reads the secret as UTF-8 text. Say nothing about where the decoding
    # failed: the offending byte is part of the secret.
    try:
        secret = raw.decode("utf-8")
    except UnicodeDecodeError:
        return f"{path} is not UTF-8 text; save the secret as UTF-8 (one line)"
    if not secret.strip():
        return f"{path} is empty; write the secret there on one line (chmod 600)"
    return None


def tls_files_problems(
    ca_file: Path | None, cert_file: Path | None = None, key_file: Path | None = None
) -> list[tuple[str, str]]:
    """Load the TLS files as the daemon will, so a bad one is a config error, not a crash
    when the source or the relay builds its context. Unreadable here is not an error:
    the daemon's user may read what the checking user cannot."""
    import ssl  # only when there are TLS files: check-config and the CLI start faster

    problems: list[tuple[str, str]] = []
    if ca_file is not None and ca_file.is_file() and os.access(ca_file, os.R_OK):
        try:
            ssl.create_default_context(cafile=str(ca_file))
        except (ssl.SSLError, OSError, ValueError) as exc:
            problems.append(("ca_file", f"{ca_file} holds no usable CA certificate: {exc}"))
    readable = [p for p in (cert_file, key_file) if p is not None]
    if cert_file is not None and all(p.is_file() and os.access(p, os.R_OK) for p in readable):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            ctx.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
        except (ssl.SSLError, OSError, ValueError) as exc:
            problems.append(
                (
                    "cert_file",
                    f"{cert_file} cannot be loaded with its key: {exc}; check the PEM files",
                )
            )
    return problems
