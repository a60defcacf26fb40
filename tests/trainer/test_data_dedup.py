"""Exact and near-duplicate detection: near-dup pairs found, distinct rows kept, cost far below n²."""

from __future__ import annotations

import random

import numpy as np
import pytest

from deeptune_trainer.data.dedup import (
    MinHasher,
    NearDuplicateIndex,
    NearMatch,
    exact_key,
    jaccard,
    lsh_bands,
    shingle_hashes,
    texts_window_hashes,
    window_hashes,
)

EN = "The quick brown fox jumps over the lazy dog near the river bank on a sunny afternoon."
ZH = "您好，您的订单已经发货，预计三到五个工作日送达，请注意查收短信通知，如有问题请随时联系客服。"


def test_exact_key_is_stable_and_distinguishes_texts() -> None:
    assert exact_key("你好") == exact_key("你好")
    assert exact_key("你好") != exact_key("你好。")
    assert len(exact_key(ZH * 100)) == 16


def test_shingles_are_character_ngrams() -> None:
    assert len(shingle_hashes("abcabc", 3)) == 3  # abc, bca, cab
    assert len(shingle_hashes("ab", 5)) == 1  # shorter than n: one shingle
    assert len(shingle_hashes("你好你好", 2)) == 2


def _one_text_windows(text: str, ngram: int) -> list[int]:
    """The n-gram hashes of one text, the plain way: what the joined computation must agree with."""
    codes = [ord(char) for char in text]
    width = min(ngram, len(codes))
    windows = []
    for start in range(len(codes) - width + 1):
        value = 0
        for code in codes[start : start + width]:
            value = (value * 1_000_003 + code) % 2**64
        windows.append(value)
    return _mix_reference(windows)


def _mix_reference(values: list[int]) -> list[int]:
    """splitmix64's finalizer on Python ints."""
    mixed = []
    for value in values:
        x = value ^ (value >> 30)
        x = (x * 0xBF58476D1CE4E5B9) % 2**64
        x ^= x >> 27
        x = (x * 0x94D049BB133111EB) % 2**64
        mixed.append(x ^ (x >> 31))
    return mixed


def test_windows_of_many_texts_are_each_texts_windows() -> None:
    texts = ["", "ab", "abcde", "abcdef", ZH, "😀 emoji 你好😀", EN, "x", "四个字儿"]
    hashes, sizes = texts_window_hashes(texts, 5)
    assert sizes.tolist() == [len(_one_text_windows(text, 5)) for text in texts]
    runs = np.split(hashes, np.cumsum(sizes)[:-1])
    assert [run.tolist() for run in runs] == [_one_text_windows(text, 5) for text in texts]
    assert [window_hashes(text, 5).tolist() for text in texts] == [
        _one_text_windows(text, 5) for text in texts
    ]


def test_signature_estimates_jaccard() -> None:
    hasher = MinHasher(ngram=3)
    a, b = "abcdefghij", "abcdefghXY"  # 3-grams: 8 each, 6 shared, 10 in union → J = 0.6
    estimate = float(np.mean(hasher.signature(a) == hasher.signature(b)))
    assert estimate == pytest.approx(0.6, abs=0.15)
    assert float(np.mean(hasher.signature(EN) == hasher.signature(ZH))) < 0.05


def test_bands_fit_the_signature_and_their_curve_crosses_near_the_threshold() -> None:
    for threshold in (0.5, 0.7, 0.85, 0.95):
        bands, rows = lsh_bands(threshold)
        assert bands * rows <= 128
        assert abs((1 / bands) ** (1 / rows) - threshold) < 0.1


def _index(threshold: float) -> NearDuplicateIndex[tuple[str, ...]]:
    return NearDuplicateIndex(threshold, ngram=5, parts=lambda row: row)


def test_near_duplicates_are_dropped_and_distinct_rows_kept() -> None:
    index = _index(0.7)
    rows = [
        EN,
        EN.replace("sunny", "bright"),  # one word changed: near duplicate
        ZH,
        ZH.replace("三到五", "三至五"),  # one character changed: near duplicate
        "A completely different sentence about training language models on Kubernetes clusters.",
        "完全不同的一句话：如何在 Kubernetes 集群上微调大语言模型。",
    ]
    assert [match is None for match in index.admit([(row,) for row in rows])] == [
        True,
        False,
        True,
        False,
        True,
        True,
    ]


def test_candidate_pairs_stay_far_below_all_pairs() -> None:
    rng = random.Random(7)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda"]
    index = _index(0.85)
    rows = [" ".join(rng.choice(words) for _ in range(30)) for _ in range(2000)]
    kept = sum(match is None for match in index.admit([(row,) for row in rows]))
    assert kept == 2000
    assert index.comparisons < 2000 * 1999 / 2 / 100


def test_empty_text_is_admitted_and_not_indexed() -> None:
    index = _index(0.85)
    assert index.admit([("", ""), ("",)]) == [None, None]
    assert index.comparisons == 0 and len(index) == 0


def test_every_part_must_nearly_repeat_for_a_near_duplicate() -> None:
    index = _index(0.8)
    first, other, repeat = index.admit(
        [
            (EN, "the answer is yes, with a long explanation of why it is yes"),
            (EN, "a different answer entirely, about clouds and about rain"),
            (EN, "the answer is yes, with a long explanation of why it is yes!"),
        ]
    )
    assert first is None and other is None
    assert repeat is not None and repeat.position == 0 and repeat.similarity >= 0.8


def test_a_match_reports_the_exact_jaccard_similarity() -> None:
    a, b = "abcdefghij", "abcdefghXY"  # 3-grams: 8 each, 6 shared, 10 in union
    assert jaccard(shingle_hashes(a, 3), shingle_hashes(b, 3)) == 0.6
    index = NearDuplicateIndex(0.5, ngram=3, parts=lambda row: row)
    assert index.admit([(a,), (b,)]) == [None, NearMatch(0, 0.6)]


def test_batches_find_what_row_by_row_admission_finds() -> None:
    """One batch of many rows and the same rows one at a time admit the same rows and match the same
    earlier ones: the batch's own repeats and earlier batches' are both found."""
    rng = random.Random(11)
    words = [*EN.lower().rstrip(".").split(), "订单", "发货", "客服", "退货", "发票", "短信"]
    rows: list[tuple[str, ...]] = []
    for _ in range(600):
        if rows and rng.random() < 0.3:
            question, answer = rng.choice(rows)
            rows.append((question, answer + rng.choice(["", " thanks", "!", " 谢谢"])))
        else:
            rows.append((" ".join(rng.sample(words, 8)), " ".join(rng.choices(words, k=20))))
    one_by_one = _index(0.85)
    expected = [one_by_one.admit([row])[0] for row in rows]
    batched = _index(0.85)
    found = batched.admit(rows[:250]) + batched.admit(rows[250:])
    assert found == expected
    assert 100 < sum(match is not None for match in found) < 250
    assert len(batched) == len(one_by_one) == sum(match is None for match in found)
