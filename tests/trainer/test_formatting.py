"""Tokenization with completion-only labels, truncation, padding and packing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from deeptune_trainer.data.sample import Message, Sample
from deeptune_trainer.formatting import (
    IGNORE_INDEX,
    Collator,
    ensure_chat_template,
    first_fit_decreasing,
    pack,
    prompt_ids,
    render_prompt,
    tokenize_sample,
    tokenize_samples,
)


def _sample(prompt: str, answer: str, system: str | None = None) -> Sample:
    turns = (Message("system", system),) if system else ()
    return Sample(messages=(*turns, Message("user", prompt), Message("assistant", answer)))


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture
def plain_tokenizer(tiny_llama_dir: Path) -> PreTrainedTokenizerBase:
    """The same tokenizer without a chat template, to exercise the fallback layout."""
    plain = AutoTokenizer.from_pretrained(tiny_llama_dir)
    plain.chat_template = None
    return plain


def _completion(tokenizer: PreTrainedTokenizerBase, input_ids: list[int], labels: list[int]) -> str:
    return str(
        tokenizer.decode(
            [token for token, label in zip(input_ids, labels, strict=True) if label != IGNORE_INDEX]
        )
    )


def test_loss_only_on_the_completion_and_its_eos(tokenizer: PreTrainedTokenizerBase) -> None:
    example = tokenize_sample(_sample("topic: 猫 blue", "the cat sleeps"), tokenizer, max_length=128)
    assert len(example.input_ids) == len(example.labels)
    completion = _completion(tokenizer, example.input_ids, example.labels)
    assert completion == " the cat sleeps<|end|>"
    first_target = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    assert all(label == IGNORE_INDEX for label in example.labels[:first_target])
    assert example.labels[-1] == tokenizer.eos_token_id
    # The prompt is exactly what generation is given at evaluation.
    assert example.input_ids[:first_target] == prompt_ids(_sample("topic: 猫 blue", "x"), tokenizer)
    assert not example.truncated


def test_chat_template_renders_system_and_generation_prompt(tokenizer: PreTrainedTokenizerBase) -> None:
    rendered = render_prompt(_sample("你好", "x", system="be brief"), tokenizer)
    assert rendered == "<|begin|>be brief\n\nUser: 你好\n\nAssistant:"


def test_fallback_layout_without_chat_template(
    plain_tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    ensure_chat_template(plain_tokenizer)
    sample = _sample("what is 2+2?", "4", system="be brief")
    expected = "<|begin|>### System:\nbe brief\n\n### User:\nwhat is 2+2?\n\n### Assistant:\n"
    assert render_prompt(sample, plain_tokenizer) == expected
    example = tokenize_sample(sample, plain_tokenizer, max_length=128)
    assert _completion(plain_tokenizer, example.input_ids, example.labels) == "4<|end|>"
    # The template travels with the tokenizer, so a server renders chat messages as training did.
    plain_tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 2+2?"}]
    assert reloaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == expected


def test_truncation_cuts_the_prompt_first(tokenizer: PreTrainedTokenizerBase) -> None:
    long_prompt = " ".join(["apple river blue green table"] * 20)
    example = tokenize_sample(_sample(long_prompt, "the cat sleeps"), tokenizer, max_length=24)
    assert len(example.input_ids) == 24
    assert example.truncated
    assert _completion(tokenizer, example.input_ids, example.labels) == " the cat sleeps<|end|>"
    assert str(tokenizer.decode(example.input_ids)).endswith("Assistant: the cat sleeps<|end|>")


def test_truncation_keeps_half_for_the_prompt_when_the_completion_is_too_long(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    example = tokenize_sample(
        _sample("topic: a b c d e f", " ".join(["river"] * 60)), tokenizer, max_length=32
    )
    assert len(example.input_ids) == 32
    assert example.labels[:16] == [IGNORE_INDEX] * 16
    assert all(label != IGNORE_INDEX for label in example.labels[16:])


def test_truncated_rows_are_counted(tokenizer: PreTrainedTokenizerBase) -> None:
    samples = [_sample("short", "ok"), _sample(" ".join(["word"] * 80), "ok"), _sample("short", "ok " * 40)]
    split = tokenize_samples(samples, tokenizer, max_length=32)
    assert split.truncated == 2
    assert split.tokens == sum(len(example.input_ids) for example in split.examples)


def test_collator_pads_right_and_reports_waste() -> None:
    collate = Collator(pad_token_id=9)
    batch = collate(
        [
            {"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]},
            {"input_ids": [5, 6], "labels": [-100, 6]},
        ]
    )
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 9, 9]]
    assert batch["labels"].tolist() == [[-100, -100, 3, 4], [-100, 6, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert collate.padding_waste == pytest.approx(2 / 8)


def test_packing_resets_positions_and_masks_boundaries(tokenizer: PreTrainedTokenizerBase) -> None:
    examples = [tokenize_sample(_sample(f"topic: {w}", "ok"), tokenizer, 64) for w in ("猫", "dog", "雨")]
    lengths = [len(example.input_ids) for example in examples]
    rows = pack(examples, max_length=lengths[0] + lengths[1])
    assert [len(row["input_ids"]) for row in rows] == [lengths[0] + lengths[1], lengths[2]]
    first = rows[0]
    assert first["position_ids"] == list(range(lengths[0])) + list(range(lengths[1]))
    assert first["input_ids"] == examples[0].input_ids + examples[1].input_ids
    assert first["labels"][lengths[0]] == IGNORE_INDEX  # never predict across examples
    batch = Collator(tokenizer.pad_token_id)(rows)
    assert "attention_mask" not in batch
    assert batch["position_ids"][1].tolist()[lengths[2] :] == list(
        range(lengths[0] + lengths[1] - lengths[2])
    )


def test_packed_rows_give_the_same_logits_as_separate_rows(tiny_llama_dir: Path) -> None:
    """The proof that packed examples do not attend to each other, in rows that first-fit decreasing
    filled out of dataset order, next to a shorter row whose padding tail is one more segment."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    examples = [
        tokenize_sample(_sample(p, a), tokenizer, 64)
        for p, a in (("dog", "狗"), ("topic: 猫 山 river blue", "yes"), ("topic: 雨", "rain"))
    ]
    lengths = [len(example.input_ids) for example in examples]
    bins = first_fit_decreasing(lengths, lengths[0] + lengths[1])
    assert bins == [[1, 0], [2]]  # the longest first, the shortest beside it, the third alone
    packed = Collator(tokenizer.pad_token_id)(pack(examples, max_length=lengths[0] + lengths[1]))
    packed_inputs = {"input_ids": packed["input_ids"], "position_ids": packed["position_ids"]}
    with torch.no_grad():  # no KV cache, as in training: with one, transformers ignores the packing
        together = model(**packed_inputs, use_cache=False).logits
        alone = [model(input_ids=torch.tensor([e.input_ids])).logits[0] for e in examples]
    for row, members in zip(together, bins, strict=True):
        expected = torch.cat([alone[i] for i in members])
        torch.testing.assert_close(row[: len(expected)], expected, rtol=1e-4, atol=1e-4)


# --- conversations and reasoning traces ---------------------------------------------------------

CONVERSATION = Sample(
    messages=(
        Message("system", "be brief"),
        Message("user", "topic: 猫"),
        Message("assistant", "the cat sleeps"),
        Message("user", "topic: dog"),
        Message("assistant", "狗在跑"),
    )
)


def _trained_pieces(tokenizer: PreTrainedTokenizerBase, example: Any) -> list[str]:
    """The labelled runs of tokens, decoded: what the loss is taken on, piece by piece."""
    pieces, run = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != IGNORE_INDEX:
            run.append(token)
        elif run:
            pieces, run = [*pieces, tokenizer.decode(run)], []
    return [*pieces, tokenizer.decode(run)] if run else pieces


def test_every_assistant_turn_is_trained_and_no_user_turn(tokenizer: PreTrainedTokenizerBase) -> None:
    """Found by a fine-tuning engineer: multi-turn chat trained only the final assistant turn."""
    every = tokenize_sample(CONVERSATION, tokenizer, max_length=256, all_turns=True)
    assert _trained_pieces(tokenizer, every) == [" the cat sleeps<|end|>", " 狗在跑<|end|>"]
    assert not every.last_turn_only
    last = tokenize_sample(CONVERSATION, tokenizer, max_length=256)
    assert _trained_pieces(tokenizer, last) == [" 狗在跑<|end|>"]
    assert every.input_ids == last.input_ids, "the same tokens, only the labels differ"


R1_LIKE_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{% set content = m['content'].split('</think>')[-1] %}"
    "{{ 'Assistant: ' + content + eos_token }}"
    "{% else %}{{ 'User: ' + m['content'] + '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)
"""Like DeepSeek-R1's: an answer's reasoning is dropped when the conversation is rendered."""


def test_reasoning_traces_are_trained_as_written_even_where_the_template_drops_them(
    tiny_llama_dir: Path,
) -> None:
    r1 = AutoTokenizer.from_pretrained(tiny_llama_dir)
    r1.chat_template = R1_LIKE_TEMPLATE
    sample = _sample("topic: 猫", "<think>the keyword is 猫</think>the cat sleeps")
    (trained,) = _trained_pieces(r1, tokenize_sample(sample, r1, max_length=128))
    assert trained.replace(" ", "") == "<think>thekeywordis猫</think>thecatsleeps<|end|>"
    # An earlier turn is trained as the template renders a conversation's history: without its
    # reasoning, as the model will see it there; the final turn with it.
    conversation = Sample(
        messages=(*sample.messages, Message("user", "topic: dog"), Message("assistant", "狗在跑"))
    )
    split = tokenize_samples([conversation], r1, max_length=128, all_turns=True)
    assert split.last_turn_only == 0
    earlier, final = _trained_pieces(r1, split.examples[0])
    assert "think" not in earlier and earlier.replace(" ", "").startswith("thecatsleeps")
    assert final.replace(" ", "") == "狗在跑<|end|>"


def test_a_template_that_rewrites_earlier_turns_trains_the_final_turn_and_says_so(
    tiny_llama_dir: Path,
) -> None:
    changing = AutoTokenizer.from_pretrained(tiny_llama_dir)
    changing.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}"
        "{% if loop.last %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    split = tokenize_samples([CONVERSATION], changing, max_length=256, all_turns=True)
    assert split.last_turn_only == 1
    assert [piece.replace(" ", "") for piece in _trained_pieces(changing, split.examples[0])] == [
        "狗在跑<|end|>"
    ]
