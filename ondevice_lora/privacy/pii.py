"""Find personal data in text before it is trained on: pattern rules with checksums.

Rules of our own, not a library: the candidates are regular expressions, and the kinds that
carry a checksum are confirmed by it (payment cards by Luhn, IBANs by ISO 7064 mod 97, IP
addresses by the `ipaddress` module), so "4111 1111 1111 1112" or a random 22-character code
is not reported. Names and street addresses have no such structure: they are found by cue
words ("Mr.", "my name is", "... Street") and reported as *uncertain*. Offline NER models
(spaCy, Presidio) would find more names, at the cost of a large model download; these rules
need nothing and are exact where a checksum exists.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

CERTAIN_KINDS = ("email", "phone", "card", "iban", "ipv4", "ipv6", "ssn")
UNCERTAIN_KINDS = ("name", "address")
KINDS = CERTAIN_KINDS + UNCERTAIN_KINDS


@dataclass(frozen=True)
class Finding:
    kind: str
    value: str
    line: int  # 1-based
    column: int  # 1-based, in characters
    certain: bool


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum of payment card numbers: every second digit from the right doubled."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_valid(iban: str) -> bool:
    """ISO 13616 IBAN check: move the first four characters to the end, letters to 10..35,
    and the number must be 1 modulo 97."""
    code = iban.replace(" ", "").upper()
    if not 15 <= len(code) <= 34:
        return False
    rearranged = code[4:] + code[:4]
    number = "".join(str(int(ch, 36)) for ch in rearranged)
    return int(number) % 97 == 1


def _card(match: re.Match) -> bool:
    digits = re.sub(r"\D", "", match.group())
    return 13 <= len(digits) <= 19 and luhn_valid(digits)


def _phone(match: re.Match) -> bool:
    digits = re.sub(r"\D", "", match.group())
    return 9 <= len(digits) <= 15


def _ipv4(match: re.Match) -> bool:
    try:
        ipaddress.IPv4Address(match.group())
    except ValueError:
        return False
    return True


def _ipv6(match: re.Match) -> bool:
    text = match.group()
    if text.count(":") < 2:
        return False
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


_STREET = (
    r"Street|St|Avenue|Ave|Road|Rd|Lane|Ln|Drive|Dr|Boulevard|Blvd|Court|Ct|Way|Place|Pl|"
    r"Terrace|Close|Square|Strasse|Straße|Rue"
)
# (kind, pattern, check or None). Order matters: a span taken by an earlier rule is not
# matched again (a card number is not also a phone number).
RULES = [
    ("email", re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"), None),
    ("iban", re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b"),
     lambda m: iban_valid(m.group())),
    ("card", re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])"), _card),
    ("ssn", re.compile(r"\b(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}\b"), None),
    ("ipv6", re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])"), _ipv6),
    ("ipv4", re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])"), _ipv4),
    ("phone", re.compile(
        r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}(?!\w)"
    ), _phone),
    ("address", re.compile(
        rf"\b\d{{1,5}} (?:[A-Z][a-zé]+ ){{1,3}}(?:{_STREET})\b\.?"
    ), None),
    ("name", re.compile(
        r"\b(?:(?:Mr|Mrs|Ms|Miss|Dr|Prof)\.? |(?:[Mm]y name is|I am called|[Cc]all me) )"
        r"(?P<value>[A-Z][a-z]+(?: [A-Z][a-z]+)?)"
    ), None),
]  # fmt: skip


def scan_text(text: str, line_offset: int = 0) -> list[Finding]:
    """Every finding in `text`, in order of position; lines count from line_offset + 1."""
    taken: list[tuple[int, int]] = []
    found = []
    for kind, pattern, check in RULES:
        for m in pattern.finditer(text):
            # A rule with a "value" group reports only that part (the name after "Mr.").
            group = "value" if "value" in pattern.groupindex else 0
            start, end = m.span(group)
            if any(start < e and s < end for s, e in taken):
                continue
            if check is not None and not check(m):
                continue
            taken.append((start, end))
            found.append((start, kind, m.group(group)))
    findings = []
    for start, kind, value in sorted(found):
        line = text.count("\n", 0, start)
        column = start - (text.rfind("\n", 0, start) + 1)
        findings.append(
            Finding(kind, value, line_offset + line + 1, column + 1, kind in CERTAIN_KINDS)
        )
    return findings
