"""Exact and near-duplicate detection: near-dup pairs found, distinct rows kept, cost far below n²."""

from __future__ import annotations

import random

import numpy as np
import pytest

from deeptune_trainer.data.dedup import MinHasher, NearDuplicateIndex, exact_key, lsh_bands, shingle_hashes

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


def test_near_duplicates_are_dropped_and_distinct_rows_kept() -> None:
    index = NearDuplicateIndex(threshold=0.7, ngram=5)
    rows = [
        EN,
        EN.replace("sunny", "bright"),  # one word changed: near duplicate
        ZH,
        ZH.replace("三到五", "三至五"),  # one character changed: near duplicate
        "A completely different sentence about training language models on Kubernetes clusters.",
        "完全不同的一句话：如何在 Kubernetes 集群上微调大语言模型。",
    ]
    assert [index.match((row,)) is None for row in rows] == [True, False, True, False, True, True]


def test_candidate_pairs_stay_far_below_all_pairs() -> None:
    rng = random.Random(7)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda"]
    index = NearDuplicateIndex(threshold=0.85, ngram=5)
    rows = [" ".join(rng.choice(words) for _ in range(30)) for _ in range(2000)]
    kept = sum(index.match((row,)) is None for row in rows)
    assert kept == 2000
    assert index.comparisons < 2000 * 1999 / 2 / 100


def test_empty_text_is_admitted_and_not_indexed() -> None:
    index = NearDuplicateIndex(threshold=0.85, ngram=5)
    assert index.match(("", "")) is None and index.match(("",)) is None
    assert index.comparisons == 0 and len(index) == 0


def test_every_part_must_nearly_repeat_for_a_near_duplicate() -> None:
    index = NearDuplicateIndex(threshold=0.8, ngram=5)
    assert index.match((EN, "the answer is yes, with a long explanation of why it is yes")) is None
    assert index.match((EN, "a different answer entirely, about clouds and about rain")) is None
    repeat = index.match((EN, "the answer is yes, with a long explanation of why it is yes!"))
    assert repeat is not None and repeat.position == 0 and repeat.similarity >= 0.8
