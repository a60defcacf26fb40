"""PII detection and redaction on realistic Chinese and English text; checksums decide for IDs and cards."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from deeptune_trainer.data.pii import (
    DETECTORS,
    PLACEHOLDERS,
    Detector,
    luhn_valid,
    may_hold,
    redact,
    valid_id_card,
)

ALL = list(PLACEHOLDERS)
VALID_ID = "11010519491231002X"
INVALID_ID = "110105194912310021"  # right shape and date, wrong check character (and not Luhn-valid)
VALID_CARD = "6222021234567894"
INVALID_CARD = "6222021234567890"


def test_checksums() -> None:
    assert valid_id_card(VALID_ID)
    assert valid_id_card(VALID_ID.lower())
    assert not valid_id_card(INVALID_ID)
    assert not valid_id_card("110105194913310025")  # month 13
    assert luhn_valid(VALID_CARD) and luhn_valid("4111111111111111") and luhn_valid("6212261202011584589")
    assert not luhn_valid(INVALID_CARD)


def test_chinese_customer_service_exchange() -> None:
    text = (
        f"您好，我的手机是13812345678，身份证{VALID_ID}，银行卡{VALID_CARD}，"
        "邮箱zhangsan@example.com，登录IP是192.168.1.10。"
    )
    redacted, found = redact(text, ALL)
    assert (
        redacted == "您好，我的手机是[PHONE]，身份证[ID_CARD]，银行卡[BANK_CARD]，邮箱[EMAIL]，登录IP是[IP]。"
    )
    assert found == Counter({"phone": 1, "idCard": 1, "bankCard": 1, "email": 1, "ipAddress": 1})


def test_invalid_checksums_are_left_alone() -> None:
    text = f"身份证号{INVALID_ID}有误，卡号{INVALID_CARD}也不对"
    assert redact(text, ALL) == (text, Counter())


@pytest.mark.parametrize(
    "phone",
    [
        "13812345678",
        "+8613812345678",
        "+86 138-1234-5678",
        "0086 13712345678",
        "138 1234 5678",
        "010-62345678",
    ],
)
def test_mainland_phone_formats(phone: str) -> None:
    assert redact(f"请拨打{phone}联系我", ["phone"]) == ("请拨打[PHONE]联系我", Counter({"phone": 1}))


@pytest.mark.parametrize("phone", ["+1 (415) 555-2671", "415-555-2671", "(415) 555-2671", "+44 20 7946 0958"])
def test_international_phone_formats(phone: str) -> None:
    assert redact(f"Call me at {phone} tomorrow.", ["phone"]) == (
        "Call me at [PHONE] tomorrow.",
        Counter({"phone": 1}),
    )


@pytest.mark.parametrize(
    "text",
    [
        "order 12812345678901",
        "mobile 12345678901",
        "version 1.2.3",
        "在2023-10-01下单",
        "+12 345",
        "价格 13800 元",
    ],
)
def test_things_that_are_not_phone_numbers(text: str) -> None:
    assert redact(text, ["phone"]) == (text, Counter())


def test_bank_card_grouped_and_19_digit() -> None:
    text = "Card 4111 1111 1111 1111, UnionPay 6212 2612 0201 1584 589 and 4111-1111-1111-1112."
    redacted, found = redact(text, ["bankCard"])
    assert redacted == "Card [BANK_CARD], UnionPay [BANK_CARD] and 4111-1111-1111-1112."
    assert found == Counter({"bankCard": 2})


def test_email_wins_over_the_phone_number_in_it() -> None:
    text = "QQ邮箱13812345678@qq.com，或 Zhang.San+cs@mail.example.com.cn."
    assert redact(text, ALL) == ("QQ邮箱[EMAIL]，或 [EMAIL].", Counter({"email": 2}))


def test_ip_addresses() -> None:
    text = (
        "servers 10.0.0.1, 256.1.1.1, 2001:db8::8a2e:370:7334 and fe80::1; "
        "not std::vector, 12:30:45 or 1.2.3.4.5"
    )
    redacted, found = redact(text, ["ipAddress"])
    assert redacted == "servers [IP], 256.1.1.1, [IP] and [IP]; not std::vector, 12:30:45 or 1.2.3.4.5"
    assert found == Counter({"ipAddress": 3})


def test_only_requested_types_are_redacted() -> None:
    text = f"手机13812345678 邮箱a@b.cn 身份证{VALID_ID}"
    assert redact(text, ["email"]) == (f"手机13812345678 邮箱[EMAIL] 身份证{VALID_ID}", Counter({"email": 1}))
    assert redact(text, []) == (text, Counter())


PII_PIECES = [
    "13812345678", "+86 138 1234 5678", "010-62345678", "(555) 123-4567", "110105194912310026",
    "4111 1111 1111 1111", "192.168.1.20", "fe80::1ff:fe23:4567:890a", "a::b", "li.wei@example.com",
    "订单号 2026120400017", "12:30", "v1.2.3", "E=mc²", "您好", "call me", " ", "：", "@", "7",
]  # fmt: skip


def _redact_without_gates(text: str, kinds: list[str]) -> tuple[str, Counter[str]]:
    """Every detector's patterns run on every text: what the gates in `redact` must never change."""
    found: Counter[str] = Counter()
    for detector in DETECTORS:
        if detector.kind not in kinds:
            continue
        for pattern in detector.patterns:

            def replace(match: re.Match[str], detector: Detector = detector) -> str:
                if not detector.valid(match.group()):
                    return match.group()
                found[detector.kind] += 1
                return PLACEHOLDERS[detector.kind]

            text = pattern.sub(replace, text)
    return text, found


def test_the_quick_checks_before_each_detector_never_change_what_is_found() -> None:
    rng = random.Random(5)
    kinds = list(PLACEHOLDERS)
    for _ in range(3000):
        text = "".join(rng.choice(PII_PIECES) for _ in range(rng.randint(1, 6)))
        assert redact(text, kinds) == _redact_without_gates(text, kinds), text


def test_one_check_of_a_whole_row_never_skips_a_part_that_holds_personal_data() -> None:
    # The cleaner asks `may_hold` once of a row's texts joined; a row it lets go must be one where no
    # part would have been redacted.
    rng = random.Random(6)
    kinds = list(PLACEHOLDERS)
    skipped = 0
    for _ in range(3000):
        parts = ["".join(rng.choice(PII_PIECES) for _ in range(rng.randint(0, 3))) for _ in range(3)]
        if not may_hold("\n".join(parts), kinds):
            skipped += 1
            assert [redact(part, kinds) for part in parts] == [(part, Counter()) for part in parts], parts
    assert skipped > 100
