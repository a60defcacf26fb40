"""Metrics against values computed by hand, and batched generation."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from deeptune.api.finetunejob import GenerationSpec
from deeptune_trainer.data.sample import Message, Sample
from deeptune_trainer.evaluation import (
    accuracy,
    bleu,
    compare,
    evaluate,
    exact_match,
    generate,
    generation_rows,
    macro_f1,
    normalize,
    perplexity,
    rouge,
)
from deeptune_trainer.formatting import tokenize_sample


def _sample(prompt: str, answer: str, label: str | None = None) -> Sample:
    return Sample(messages=(Message("user", prompt), Message("assistant", answer)), label=label)


def test_bleu_english_by_hand() -> None:
    # 1- to 4-gram precisions 5/6, 4/5, 3/4, 2/3; same length, so no brevity penalty.
    expected = 100 * (5 / 6 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25
    assert bleu(["a b c d e f"], ["a b c d e g"]) == pytest.approx(expected, abs=1e-9)


def test_bleu_chinese_is_scored_by_characters() -> None:
    # Every n-gram of the 6-character answer is right; the 7-character reference gives a brevity
    # penalty exp(1 - 7/6). Without character tokenization both would be one wrong "word": 0.
    assert bleu(["我爱北京天安"], ["我爱北京天安门"]) == pytest.approx(100 * math.exp(1 - 7 / 6), abs=1e-9)
    assert bleu(["我爱北京天安门"], ["我爱北京天安门"]) == pytest.approx(100)


def test_rouge_english_by_hand() -> None:
    scores = rouge(["the cat"], ["the cat sat"])
    # ROUGE-1: P 2/2, R 2/3 → F 0.8; ROUGE-2: P 1/1, R 1/2 → F 2/3; LCS 2 → as ROUGE-1.
    assert scores == pytest.approx({"rouge1": 0.8, "rouge2": 2 / 3, "rougeL": 0.8})


def test_rouge_chinese_by_characters() -> None:
    scores = rouge(["我爱上海"], ["我爱北京"])
    # Characters 我 爱 shared of 4 → 0.5; bigrams: 我爱 of 3 → 1/3; LCS 我爱 → 0.5.
    assert scores == pytest.approx({"rouge1": 0.5, "rouge2": 1 / 3, "rougeL": 0.5})


def test_rouge_averages_rows() -> None:
    assert rouge(["a b", "x"], ["a b", "y"])["rouge1"] == pytest.approx(0.5)


def test_normalize_and_exact_match() -> None:
    assert normalize("  The  Cat, sleeps! ") == "the cat sleeps"
    assert normalize("天气很好。") == normalize("天气很好")  # full-width punctuation
    assert normalize("ＡＢＣ") == "abc"  # full-width letters (NFKC)
    assert exact_match(
        ["The cat sleeps.", "狗在跑", "no"], ["the cat sleeps", "狗在跑！", "yes"]
    ) == pytest.approx(2 / 3)


def test_accuracy_and_macro_f1_by_hand() -> None:
    predictions = ["pos", "pos", "neg", "neg", "pos", "something else"]
    labels = ["pos", "neg", "neg", "neg", "pos", "neu"]
    assert accuracy(predictions, labels) == pytest.approx(4 / 6)
    # pos: tp 2 fp 1 fn 0 → 4/5; neg: tp 2 fp 0 fn 1 → 4/5; neu: tp 0 fp 0 fn 1 → 0.
    assert macro_f1(predictions, labels) == pytest.approx((0.8 + 0.8 + 0.0) / 3)


class _FavoursEos(torch.nn.Module):
    """A stand-in model: every position gives eos 3 times the probability of any other token."""

    def __init__(self, vocab: int, eos: int) -> None:
        super().__init__()
        self.vocab, self.eos = vocab, eos
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids: torch.Tensor, **_: Any) -> SimpleNamespace:
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.eos] = math.log(3)
        return SimpleNamespace(logits=logits)


def test_perplexity_counts_target_tokens_only(tiny_llama_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = _FavoursEos(len(tokenizer), tokenizer.eos_token_id)
    samples = [_sample("topic: 猫 blue", "the cat sleeps"), _sample("dog", "狗在跑")]
    # Each target ends with one eos (p = 3/(V+2)); its other tokens get p = 1/(V+2). Prompt tokens
    # would pull the figure toward V+2 if they were counted. (float32 logits: 1e-5 relative.)
    targets = [sum(label != -100 for label in tokenize_sample(s, tokenizer, 64).labels) for s in samples]
    norm = len(tokenizer) + 2
    nll = sum((n - 1) * math.log(norm) + math.log(norm / 3) for n in targets)
    expected = math.exp(nll / sum(targets))
    assert perplexity(model, tokenizer, samples, max_length=64, batch_size=1) == pytest.approx(
        expected, rel=1e-5
    )
    assert perplexity(model, tokenizer, samples, max_length=64, batch_size=2) == pytest.approx(
        expected, rel=1e-5
    )


def test_batched_generation_matches_one_by_one(tiny_llama_dir: Path) -> None:
    """Left padding must not change what a row generates."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    samples = [_sample("topic: 猫 blue river", "x"), _sample("dog", "x"), _sample("雨 山 书", "x")]
    greedy = GenerationSpec(max_new_tokens=6)
    batched = generate(model, tokenizer, samples, greedy, max_length=64, batch_size=3)
    single = [generate(model, tokenizer, [s], greedy, max_length=64, batch_size=1)[0] for s in samples]
    assert batched == single
    assert all(isinstance(text, str) for text in batched)


def test_evaluate_reports_requested_metrics(tiny_llama_dir: Path, make_spec: Any) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    spec = make_spec(evaluation={"metrics": ["perplexity", "rouge", "accuracy", "f1"], "maxSamples": 2})
    samples = [_sample("a", "pos", label="pos"), _sample("b", "neg", label="neg"), _sample("c", "pos")]
    scores = evaluate(model, tokenizer, samples, spec)
    assert set(scores) == {"perplexity", "rouge1", "rouge2", "rougeL", "accuracy", "f1"}
    assert scores["perplexity"] > 1


def test_compare_gives_the_delta() -> None:
    results = compare({"bleu": 40.0, "exactMatch": 0.5}, {"bleu": 10.0, "exactMatch": 0.0}, samples=20)
    assert results.delta == {"bleu": 30.0, "exactMatch": 0.5}
    assert results.samples == 20
    assert compare({"bleu": 1.0}, None, samples=3).delta is None


def test_generation_metrics_sample_the_split_with_the_seed_not_its_first_rows(make_spec: Any) -> None:
    """A validation file sorted by topic would otherwise be scored on its first topic only."""
    rows = [
        Sample(messages=(Message("user", f"q{n}"), Message("assistant", "a" if n < 50 else "b")), line=n + 1)
        for n in range(100)
    ]
    spec = make_spec(evaluation={"maxSamples": 20}, hyperparameters={"seed": 7})
    chosen = generation_rows(rows, spec)
    assert len(chosen) == 20 and chosen == generation_rows(rows, spec)  # the same for both models
    assert [row.line for row in chosen] == sorted(row.line for row in chosen)
    assert {row.target for row in chosen} == {"a", "b"}, "both halves of the sorted file"
    other_seed = generation_rows(rows, make_spec(evaluation={"maxSamples": 20}, hyperparameters={"seed": 8}))
    assert other_seed != chosen
    assert generation_rows(rows[:10], spec) == rows[:10]
