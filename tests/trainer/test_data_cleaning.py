"""Cleaning rules, one by one and in order, on Chinese and English rows, with their counts."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from deeptune.api.finetunejob import Cleaning
from deeptune_trainer.data.cleaning import Cleaner, CleaningStats, is_degenerate
from deeptune_trainer.data.sample import Message, Sample

VALID_ID = "11010519491231002X"


def _sample(prompt: str, completion: str, line: int = 0) -> Sample:
    return Sample((Message("user", prompt), Message("assistant", completion)), line=line)


def _rules(**overrides: Any) -> Cleaning:
    return Cleaning.model_validate({"nearDedup": {"enabled": False}, **overrides})


def _clean(rows: list[Sample], **overrides: Any) -> tuple[list[tuple[str, str]], CleaningStats]:
    kept, stats = Cleaner(_rules(**overrides)).clean(rows)
    return [(sample.messages[0].content, sample.target) for sample in kept], stats


def test_exact_dedup_compares_normalized_rows_and_answers_stay_as_written() -> None:
    rows = [
        _sample("你好", "您好，有什么可以帮您？"),
        _sample("你好 ", "您好,有什么可以帮您?"),
        _sample("Hi", "Hello！"),
    ]
    kept, stats = _clean(rows)
    assert kept == [("你好", "您好，有什么可以帮您？"), ("Hi", "Hello！")]
    assert (stats.rows_in, stats.exact_duplicates) == (3, 1)
    assert _clean(rows, normalization={"targets": True})[0][1] == ("Hi", "Hello!")


def test_answers_keep_what_normalization_would_change_in_meaning() -> None:
    """Found by a fine-tuning engineer: NFKC (on by default) rewrote targets."""
    answers = ["E=mc²", "x₁ + x₂", "面积 30㎡", "共１，２００元", "def f(a,  b):\n    return  a"]
    kept, _ = _clean([_sample(f"q{n}", answer) for n, answer in enumerate(answers)])
    assert [answer for _, answer in kept] == answers


def test_rows_differing_only_in_punctuation_case_or_width_are_duplicates() -> None:
    rows = [
        _sample("解释量子计算的基本原理", "量子比特可以处于叠加态。"),
        _sample("解释量子计算的基本原理？", "量子比特可以处于叠加态。"),
        _sample("What is a qubit?", "A unit of quantum information."),
        _sample("WHAT IS A QUBIT", "A unit of quantum information."),
        _sample("What is a qubit?", "The basic unit of quantum information."),  # another answer: kept
    ]
    kept, stats = _clean(rows)
    assert [question for question, _ in kept] == [
        "解释量子计算的基本原理",
        "What is a qubit?",
        "What is a qubit?",
    ]
    assert stats.exact_duplicates == 2


def test_exact_dedup_can_be_turned_off() -> None:
    rows = [_sample("q", "answer"), _sample("q", "answer")]
    assert len(_clean(rows, exactDedup=False)[0]) == 2


def test_length_bounds_use_the_target_for_min_and_the_whole_row_for_max() -> None:
    rows = [
        _sample("很长的问题" * 10, "好的"),
        _sample("q", "ok fine"),
        _sample("q" * 30, "a long enough answer"),
    ]
    kept, stats = _clean(rows, minChars=3, maxChars=40)
    assert kept == [("q", "ok fine")]
    assert (stats.too_short, stats.too_long) == (1, 1)


def test_degenerate_rows() -> None:
    assert is_degenerate(_sample("你好", ""))
    assert is_degenerate(_sample("你好", "  "))
    assert is_degenerate(_sample("What is AI?", "what is  AI?"))  # repeats the prompt
    assert is_degenerate(_sample("笑一个", "哈哈哈"))
    assert is_degenerate(_sample("Say something", "!!!!!!"))
    assert not is_degenerate(_sample("你好吗", "嗯嗯"))  # a real short reply
    assert not is_degenerate(_sample("55+56=?", "111"))  # a number, not noise
    assert not is_degenerate(_sample("你好", "您好！"))
    rows = [_sample("q", "q"), _sample("q", "aaaa"), _sample("q", "fine")]
    kept, stats = _clean(rows)
    assert (kept, stats.degenerate) == ([("q", "fine")], 2)
    assert len(_clean(rows, dropDegenerate=False)[0]) == 3


def test_a_target_repeating_its_prompt_is_found_whatever_the_quick_checks_skip() -> None:
    # The length and first-character checks only skip work; with characters whose case folds grow
    # (ß → ss, ΐ → three) and spaces anywhere, the answer must be the plain comparison's.
    rng = random.Random(8)
    pieces = ["ß", "ss", "SS", "ΐ", "ΐ", "a", "A", " ", "\u3000", "你", "!"]
    repeats = 0
    for _ in range(5000):
        prompt = "".join(rng.choices(pieces, k=rng.randint(0, 6)))
        target = "".join(rng.choices(pieces, k=rng.randint(1, 6)))
        bare = "".join(target.split())
        repeated = bool(bare) and bare.casefold() == "".join(prompt.split()).casefold()
        repeats += repeated
        if repeated:
            assert is_degenerate(_sample(prompt, target)), (prompt, target)
    assert repeats > 50


def test_pii_is_redacted_in_every_turn_and_counted_per_type() -> None:
    rows = [
        _sample(f"我的手机是13812345678，身份证{VALID_ID}", "收到，已为您登记 zhangsan@example.com。"),
        _sample("身份证110105194912310021对吗", "这个号码校验位不对。"),
    ]
    kept, stats = _clean(rows)
    assert kept == [
        ("我的手机是[PHONE]，身份证[ID_CARD]", "收到，已为您登记 [EMAIL]。"),
        ("身份证110105194912310021对吗", "这个号码校验位不对。"),
    ]
    assert stats.pii_redacted == 1
    assert stats.pii_found == Counter({"phone": 1, "idCard": 1, "email": 1})


def test_pii_drop_and_off() -> None:
    rows = [_sample("Email me at bob@example.com", "Sure."), _sample("Hi", "Hello.")]
    kept, stats = _clean(rows, pii={"action": "drop"})
    assert (kept, stats.pii_dropped, stats.pii_redacted) == ([("Hi", "Hello.")], 1, 0)
    kept, stats = _clean(rows, pii={"action": "off"})
    assert (len(kept), stats.pii_found) == (2, Counter())
    kept, _ = _clean(rows, pii={"types": ["phone"]})
    assert kept[0] == ("Email me at bob@example.com", "Sure.")


def test_redaction_happens_before_dedup() -> None:
    rows = [_sample("电话13812345678", "好的"), _sample("电话13912345678", "好的")]
    kept, stats = _clean(rows)
    assert (kept, stats.exact_duplicates) == ([("电话[PHONE]", "好的")], 1)


def test_near_dedup_runs_last_and_keeps_the_first_row() -> None:
    answer = "您的订单已经发货，预计三到五个工作日送达，请注意查收短信通知，如有问题请随时联系在线客服。"
    rows = [_sample("订单到哪了？", answer, 1), _sample("订单到哪了？", answer.replace("在线", "人工"), 2)]
    kept, stats = Cleaner(Cleaning.model_validate({"nearDedup": {"threshold": 0.7}})).clean(rows)
    assert [sample.line for sample in kept] == [1]
    assert stats.near_duplicates == 1
    assert stats.near_comparisons == 1


SYSTEM_PROMPT = (
    "You are the support assistant of Example Bank. Answer in the customer's language, be brief and"
    " polite, never ask for passwords or card numbers, and point to the branch finder for anything that"
    " needs a signature. "
) * 10  # ~2,000 characters, the same in every row


def test_a_long_shared_system_prompt_does_not_make_distinct_rows_near_duplicates() -> None:
    """Found by a fine-tuning engineer: seven distinct Q/A rows sharing a ~2,000-character system
    prompt lost 3 or 4 rows to near dedup, which fingerprinted the whole row."""
    pairs = [
        ("How do I reset my password?", "Use 'Forgot password' on the sign-in page."),
        ("Where is the nearest branch?", "The branch finder on our website lists them by postcode."),
        ("Can I raise my card limit?", "Yes, in the app under Cards, then Limits."),
        ("Is there a fee for transfers abroad?", "Transfers within the EU are free; others cost 5 EUR."),
        ("How do I close my account?", "Visit a branch with your ID; closing needs a signature."),
        ("What are your opening hours?", "Branches open 9 to 17 on weekdays."),
        ("Can I change my address online?", "Yes, under Profile, then Address, in the app."),
    ]
    rows = [
        Sample((Message("system", SYSTEM_PROMPT), Message("user", q), Message("assistant", a)), line=n + 1)
        for n, (q, a) in enumerate(pairs)
    ]
    kept, stats = Cleaner(Cleaning()).clean(rows)  # the defaults: near dedup on at 0.85
    assert len(kept) == 7 and stats.near_duplicates == 0


def test_a_shared_context_with_different_answers_is_kept_and_a_repeat_is_reported() -> None:
    context = (
        "Context: "
        + "The 2026 price list: basic plan 10 EUR, family plan 25 EUR, business plan 80 EUR. " * 12
    )
    rows = [
        _sample(context + "Question: what does the basic plan cost?", "10 EUR a month.", 1),
        _sample(
            context + "Question: what does the family plan cost?", "25 EUR a month for up to five people.", 2
        ),
        _sample(context + "Question: what does the basic plan cost, please?", "10 EUR a month.", 3),
    ]
    cleaner = Cleaner(Cleaning())
    kept, stats = cleaner.clean(rows, "dataset.source")
    assert [sample.line for sample in kept] == [1, 2]
    (example,) = stats.near_examples
    assert (example.source, example.line, example.kept_source, example.kept_line) == (
        "dataset.source",
        3,
        "dataset.source",
        1,
    )
    assert example.similarity >= 0.85 and example.preview.endswith("→ 10 EUR a month.")


def test_dedup_state_carries_over_between_batches() -> None:
    cleaner = Cleaner(_rules())
    cleaner.clean([_sample("q", "train answer")])
    kept, stats = cleaner.clean([_sample("q", "train answer"), _sample("q", "held-out answer")])
    assert [sample.target for sample in kept] == ["held-out answer"]
    assert stats.exact_duplicates == 1


def test_removals_name_each_rule_with_its_setting() -> None:
    stats = CleaningStats(too_short=40, exact_duplicates=80, near_duplicates=2)
    assert stats.removals(_rules(minChars=5)) == [
        "40 too short (minChars=5)",
        "80 exact duplicates",
        "2 near duplicates (threshold=0.85)",
    ]
    total = stats + CleaningStats(too_short=1, pii_found=Counter({"email": 2}))
    assert (total.too_short, total.exact_duplicates, total.pii_found) == (41, 80, Counter({"email": 2}))
