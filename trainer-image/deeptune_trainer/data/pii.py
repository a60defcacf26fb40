"""Detecting personal data (e-mail, phone, PRC ID card, bank card, IP address) and redacting it.

Numbers with a checksum (ID cards: ISO 7064 MOD 11-2; bank cards: Luhn) are only taken when the
checksum holds, so order numbers and other long digit runs are left alone. Detectors run in a fixed
order (e-mail first, as e.g. `13812345678@qq.com` is an address, not a phone number) on text that
earlier detectors already redacted.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass

from deeptune.api.finetunejob import PiiType

PLACEHOLDERS: dict[PiiType, str] = {
    "email": "[EMAIL]",
    "idCard": "[ID_CARD]",
    "phone": "[PHONE]",
    "bankCard": "[BANK_CARD]",
    "ipAddress": "[IP]",
}

_EDGE = r"(?<![0-9A-Za-z])"
_END = r"(?![0-9A-Za-z])"
# ASCII digits only ([0-9], not \d): NFKC has already turned full-width digits into ASCII ones.
EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![A-Za-z0-9-])"
)
ID_CARD = re.compile(_EDGE + r"[1-9][0-9]{16}[0-9Xx]" + _END)
PHONE = re.compile(
    r"(?<![0-9A-Za-z+])(?:"
    r"(?:(?:\+|00)86[ -]?)?1[3-9][0-9](?:[ -]?[0-9]{4}){2}"  # mainland mobile, optional +86
    r"|\+[1-9][0-9]{0,2}(?:[ -]?\([0-9]{1,4}\))?(?:[ -]?[0-9]{1,5}){2,5}"  # international, +country code
    r"|\(?0[1-9][0-9]{1,2}\)?[ -][0-9]{7,8}"  # mainland landline, e.g. 010-62345678
    r"|\([0-9]{3}\) ?[0-9]{3}-[0-9]{4}|[0-9]{3}-[0-9]{3}-[0-9]{4}"  # North American
    r")" + _END
)
BANK_CARD = re.compile(
    _EDGE
    + r"(?:[0-9]{13,19}|[0-9]{4}(?:[ -][0-9]{4}){2,3}(?:[ -][0-9]{3})?|[0-9]{4}[ -][0-9]{6}[ -][0-9]{5})"
    + _END
)
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
IPV4 = re.compile(rf"(?<![0-9.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\.?[0-9])")
IPV6 = re.compile(r"(?<![0-9A-Za-z:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![0-9A-Za-z:])")

PHONE_MIN_DIGITS = 8
"""Every PHONE pattern needs at least this many digits: a mobile 11, a landline 10, a North American
number 10, and an international one 8 (fewer is refused by _valid_phone)."""

ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
ID_CHECK_CHARS = "10X98765432"


def valid_id_card(number: str) -> bool:
    """An 18-character PRC resident ID: a real birth date and the ISO 7064 MOD 11-2 check character."""
    try:
        datetime.date(int(number[6:10]), int(number[10:12]), int(number[12:14]))
    except ValueError:
        return False
    total = sum(int(digit) * weight for digit, weight in zip(number[:17], ID_WEIGHTS, strict=True))
    return ID_CHECK_CHARS[total % 11] == number[17].upper()


def luhn_valid(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char) * (2 if position % 2 else 1)
        total += value - 9 if value > 9 else value
    return total % 10 == 0


def _digits(text: str) -> str:
    return "".join(char for char in text if char.isdigit())


def _valid_phone(text: str) -> bool:
    # An E.164 number has at most 15 digits; fewer than 8 is not a reachable number.
    return not text.startswith("+") or 8 <= len(_digits(text)) <= 15


def _valid_bank_card(text: str) -> bool:
    digits = _digits(text)
    return 13 <= len(digits) <= 19 and luhn_valid(digits)


def _valid_ipv6(text: str) -> bool:
    # At least four hex digits, so C++'s `a::b` and clock times are not taken for addresses.
    if sum(char not in ":" for char in text) < 4:
        return False
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Detector:
    kind: PiiType
    patterns: tuple[re.Pattern[str], ...]
    valid: Callable[[str], bool]
    may_occur: Callable[[str, int], bool]
    """Whether the text (with this many ASCII digits) could hold a match at all: what every match
    needs, checked first because most rows hold no personal data and the patterns cost ~5 µs each."""


DETECTORS: tuple[Detector, ...] = (
    Detector("email", (EMAIL,), lambda _: True, lambda text, _: "@" in text),
    Detector("idCard", (ID_CARD,), valid_id_card, lambda _, digits: digits >= 17),
    # The shortest phone number taken has 8 digits (an international one: _valid_phone), the others more.
    Detector("phone", (PHONE,), _valid_phone, lambda _, digits: digits >= PHONE_MIN_DIGITS),
    Detector("bankCard", (BANK_CARD,), _valid_bank_card, lambda _, digits: digits >= 13),
    Detector(
        "ipAddress",
        (IPV4, IPV6),
        lambda text: ":" not in text or _valid_ipv6(text),
        lambda text, digits: (digits >= 4 and text.count(".") >= 3) or text.count(":") >= 2,
    ),
)


_DIGIT = re.compile("[0-9]")


def _digit_count(text: str) -> int:
    return len(_DIGIT.findall(text))


def may_hold(text: str, kinds: Collection[PiiType]) -> bool:
    """Whether any detector of these kinds could match in the text. Each check grows with the text's
    digits, dots, colons and at signs, so text joined from several holds a match only if one of its
    parts may: one check serves a whole row."""
    digits = _digit_count(text)
    return any(detector.may_occur(text, digits) and detector.kind in kinds for detector in DETECTORS)


def redact(text: str, kinds: Collection[PiiType]) -> tuple[str, Counter[PiiType]]:
    """The text with each detected item of the given kinds replaced by its placeholder, and how many
    items of each kind were found."""
    found: Counter[PiiType] = Counter()
    digits = _digit_count(text)
    for detector in DETECTORS:
        if detector.kind not in kinds or not detector.may_occur(text, digits):
            continue

        def replace(match: re.Match[str], detector: Detector = detector) -> str:
            if not detector.valid(match.group()):
                return match.group()
            found[detector.kind] += 1
            return PLACEHOLDERS[detector.kind]

        for pattern in detector.patterns:
            text = pattern.sub(replace, text)
    return text, found
