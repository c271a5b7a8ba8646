"""Mail addresses and domains, checked and brought to the form the relay sends.

mailgw speaks SMTP without SMTPUTF8, so every address that leaves the config is
ASCII: the domain IDNA-encoded, the local part a dot-atom. Anything a lenient
parser would quietly reinterpret (two addresses in one entry, a space, a line
break) is refused here, so that no config can change who gets mail by accident.
"""

from __future__ import annotations

import ipaddress
import re
from email.utils import getaddresses, parseaddr

# RFC 5321 §4.1.2: Dot-string = Atom *("." Atom), Atom = 1*atext (RFC 5322 §3.2.3).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*")
# RFC 5321 §4.1.2: sub-domain = Let-dig [Ldh-str]; a label is at most 63 octets (§4.5.3.1.2).
_LDH_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Python's "idna" codec is IDNA 2003, which maps these away (ß → ss, a joiner → nothing);
# IDNA 2008, which registries use, keeps them. straße.de and strasse.de are different
# domains, so encoding one silently would mail someone else.
_IDNA_DEVIATIONS = {
    "\u00df": "ß",
    "\u1e9e": "ẞ",
    "\u03c2": "ς",
    "\u200c": "a zero-width non-joiner",
    "\u200d": "a zero-width joiner",
}


def _address_literal_problem(text: str) -> str | None:
    """RFC 5321 §4.1.3: `[192.0.2.1]` or `[IPv6:2001:db8::1]`."""
    inner = text[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        return f"{text!r} is not an address literal (write e.g. [192.0.2.1] or [IPv6:2001:db8::1])"
    return None


def ascii_domain(domain: str) -> str:
    """A mail domain (RFC 5321 §4.1.2 Domain or address literal) in its all-ASCII form.

    A non-ASCII domain is IDNA-encoded (müller.de → xn--mller-kva.de): without
    SMTPUTF8, which we do not use, only that form may appear in RCPT TO and in headers.
    Raises ValueError saying what is wrong.
    """
    if domain.startswith("[") and domain.endswith("]"):
        if why := _address_literal_problem(domain):
            raise ValueError(why)
        return domain
    for ch, what in _IDNA_DEVIATIONS.items():
        if ch in domain:
            raise ValueError(
                f"the domain {domain!r} contains {what}, which IDNA encoders disagree on; "
                "write the domain in its xn-- form as your registrar shows it"
            )
    try:
        encoded = domain.encode("idna").decode("ascii")
    except UnicodeError as exc:
        reason = exc.__cause__ or exc
        raise ValueError(
            f"the domain {domain!r} cannot be encoded as an international domain name "
            f"(IDNA: {reason})"
        ) from None
    if len(encoded) > 253 or not all(_LDH_LABEL.fullmatch(label) for label in encoded.split(".")):
        raise ValueError(
            f"{domain!r} is not a domain name: use letters, digits and '-' "
            "(not first or last) between single dots, no trailing dot"
        )
    return encoded


def normalize_address(text: str) -> str:
    """One mail address from the config, as downstream code may use it: all ASCII.

    Returns `addr-spec` or `"Display Name" <addr-spec>` with the domain IDNA-encoded
    (the display name may stay non-ASCII: it is RFC 2047-encoded when composed).
    Raises ValueError when the text is not exactly one plain address, so that nothing
    in a parser's leniency changes who gets mail: parseaddr reads "a@x, b@x" as a@x
    and "a @x" as a@x; both are refused here, not silently trimmed.
    """
    if _CONTROL.search(text):
        raise ValueError(f"{text!r} contains a control character (line break, tab, NUL); remove it")
    found = [pair for pair in getaddresses([text]) if pair != ("", "")]
    if len(found) > 1:
        raise ValueError(
            f"{text!r} holds more than one address; write one address per list entry, "
            'e.g. ["a@example.com", "b@example.com"] (a display name with a comma must be '
            'quoted: "Ops, Night" <ops@example.com>)'
        )
    name, addr = found[0] if found else ("", "")
    local, at, domain = addr.rpartition("@")
    if not at or not local or not domain:
        raise ValueError(f"{text!r} is not a mail address (expected e.g. ops@example.com)")
    if addr not in text:
        raise ValueError(f"{text!r} would be read as {addr!r}; write the address without spaces")
    if not local.isascii():
        raise ValueError(
            f"{text!r}: a non-ASCII local part ({local!r}) needs SMTPUTF8, which mailgw does "
            "not use; use an ASCII address for this recipient"
        )
    if not _DOT_ATOM.fullmatch(local) or len(local) > 64:
        raise ValueError(
            f"{text!r}: the part before '@' may hold letters, digits, "
            "!#$%&'*+/=?^_`{|}~- and single dots not first or last (at most 64)"
        )
    try:
        ascii_addr = f"{local}@{ascii_domain(domain)}"
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc}") from None
    if not name:
        return ascii_addr
    quoted = name.replace("\\", "\\\\").replace('"', '\\"')
    result = f'"{quoted}" <{ascii_addr}>'
    if parseaddr(result) != (name, ascii_addr):
        raise ValueError(f"{text!r}: the display name cannot be kept; simplify it")
    return result


def check_address(text: str) -> str | None:
    """Return why `text` is not a usable mail address, or None if it is."""
    try:
        normalize_address(text)
    except ValueError as exc:
        return str(exc)
    return None


def check_helo_name(text: str) -> str | None:
    """RFC 5321 §4.1.1.1: EHLO takes a Domain or an address literal, in ASCII."""
    if text.startswith("[") and text.endswith("]"):
        return _address_literal_problem(text)
    if not text.isascii():
        try:
            return f"{text!r} is not ASCII; write its IDNA form {ascii_domain(text)!r}"
        except ValueError as exc:
            return str(exc)
    try:
        ascii_domain(text)
    except ValueError:
        return (
            f"{text!r} is not a host name: use letters, digits and '-' between single dots, "
            "or an address literal like [192.0.2.1]"
        )
    return None
