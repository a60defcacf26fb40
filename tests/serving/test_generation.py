"""The generation module in-process (no Triton): batching, per-row limits, stop sequences, streaming,
chat messages, token counts and finish reasons, seeds, failures kept to their prompts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from deeptune_serving.generation import (
    Completion,
    Generator,
    LoadSettings,
    RequestError,
    Sampling,
    TextAssembler,
    chat_messages,
)
from deeptune_trainer.synthetic import tokenizer_texts
from tests.serving.tiny import TinyModels

GREEDY = Sampling(max_new_tokens=8, temperature=0.0, top_p=1.0)


@pytest.fixture(scope="module")
def merged(tiny_models: TinyModels) -> Generator:
    return Generator.load(LoadSettings(model=str(tiny_models.merged)))


def _texts(completions: list[Completion]) -> list[str]:
    assert not [c.error for c in completions if c.error]
    return [c.text for c in completions]


def test_a_batch_answers_as_each_prompt_alone(merged: Generator, tiny_models: TinyModels) -> None:
    prompts = tiny_models.prompts[:6]
    together = merged.generate([merged.prompt(p, GREEDY) for p in prompts])
    alone = [merged.generate([merged.prompt(p, GREEDY)])[0] for p in prompts]
    assert _texts(together) == _texts(alone)  # left padding does not change what a row generates
    assert [t.strip() for t in _texts(together)] == tiny_models.answers[:6]
    for completion, prompt in zip(together, prompts, strict=True):  # the answer ended at eos
        assert completion.finish_reason == "stop"
        assert completion.prompt_tokens == len(merged.prompt(prompt, GREEDY).ids)
        expected = merged.tokenizer(completion.text, add_special_tokens=False)["input_ids"]
        assert completion.completion_tokens == len(expected)


def test_chat_messages_are_rendered_with_the_models_template(
    merged: Generator, tiny_models: TinyModels
) -> None:
    """What a user writes, sent as chat messages, gets the trained answer (train/serve parity)."""
    chats = [merged.chat_prompt([{"role": "user", "content": q}], GREEDY) for q in tiny_models.questions[:4]]
    assert [c.ids for c in chats] == [merged.prompt(p, GREEDY).ids for p in tiny_models.prompts[:4]]
    assert [t.strip() for t in _texts(merged.generate(chats))] == tiny_models.answers[:4]


def test_bad_chat_messages_are_named() -> None:
    with pytest.raises(RequestError, match="messages is not valid JSON"):
        chat_messages("[{")
    with pytest.raises(RequestError, match=r"messages\[1\]\.role must be one of system, user, assistant"):
        chat_messages('[{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]')
    with pytest.raises(RequestError, match=r"messages\[0\]\.content must be text"):
        chat_messages('[{"role": "user", "content": 3}]')
    with pytest.raises(RequestError, match="non-empty list"):
        chat_messages("[]")


def test_each_row_keeps_its_own_token_limit(merged: Generator, tiny_models: TinyModels) -> None:
    prompt = next(p for p, a in zip(tiny_models.prompts, tiny_models.answers, strict=True) if " " in a)
    short, full = merged.generate(
        [merged.prompt(prompt, Sampling(1, 0.0, 1.0)), merged.prompt(prompt, GREEDY)]
    )
    assert short.text and full.text.startswith(short.text) and len(short.text) < len(full.text)
    assert (short.finish_reason, short.completion_tokens) == ("length", 1)
    assert full.finish_reason == "stop"


def test_stop_sequences_cut_the_text_before_them(merged: Generator, tiny_models: TinyModels) -> None:
    prompt = next(
        p for p, a in zip(tiny_models.prompts, tiny_models.answers, strict=True) if a == "the cat sleeps"
    )
    stopping = Generator(merged.model, merged.tokenizer, stop_sequences=["cat"])
    (completion,) = stopping.generate([stopping.prompt(prompt, GREEDY)])
    assert (completion.text, completion.finish_reason) == (" the ", "stop")
    # A request's own stop sequences apply to it alone.
    own, other = merged.generate(
        [
            merged.prompt(prompt, Sampling(8, 0.0, 1.0, stop=("cat",))),
            merged.prompt(prompt, GREEDY),
        ]
    )
    assert own.text == " the " and other.text == " the cat sleeps"
    assert (own.completion_tokens, other.completion_tokens) == (2, 3)  # counted through the stop


def test_greedy_prompts_share_a_call_whatever_their_top_p(merged: Generator, tiny_models: TinyModels) -> None:
    calls: list[int] = []
    generate = merged._generate

    def counting(batch: list[object], on_text: object) -> list[Completion]:
        calls.append(len(batch))
        return generate(batch, on_text)  # type: ignore[arg-type]

    merged._generate = counting  # type: ignore[method-assign]
    try:
        prompts = [
            merged.prompt(p, Sampling(8, 0.0, top_p))
            for p, top_p in zip(tiny_models.prompts, (1.0, 0.5), strict=False)
        ]
        merged.generate(prompts)
    finally:
        del merged._generate
    assert calls == [2]


def test_a_seed_makes_sampling_repeatable(merged: Generator, tiny_models: TinyModels) -> None:
    hot = Sampling(8, 1.5, 1.0, seed=7)
    prompt = merged.prompt(tiny_models.prompts[0], hot)
    first = merged.generate([prompt, merged.prompt(tiny_models.prompts[1], Sampling(8, 1.5, 1.0))])[0]
    again = merged.generate([prompt])[0]
    assert first.text == again.text  # alone or not, the seed gives the same answer
    others = {
        merged.generate([merged.prompt(tiny_models.prompts[0], Sampling(8, 1.5, 1.0, seed=s))])[0].text
        for s in range(8)
    }
    assert len(others) > 1  # and the seed does matter: sampling is on


def test_a_failing_batch_is_split_so_only_the_bad_prompt_fails(
    merged: Generator, tiny_models: TinyModels, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As when a batch runs out of GPU memory: halves are retried until the culprit is alone."""
    poison = merged.prompt(tiny_models.prompts[2], GREEDY).ids
    generate = merged._generate

    def failing(batch: list[object], on_text: object) -> list[Completion]:
        if any(prompt.ids == poison for prompt in batch):  # type: ignore[attr-defined]
            raise RuntimeError("CUDA out of memory (simulated)")
        return generate(batch, on_text)  # type: ignore[arg-type]

    monkeypatch.setattr(merged, "_generate", failing)
    completions = merged.generate([merged.prompt(p, GREEDY) for p in tiny_models.prompts[:4]])
    assert [c.error is not None for c in completions] == [False, False, True, False]
    assert "CUDA out of memory (simulated)" in str(completions[2].error)
    assert [completions[i].text.strip() for i in (0, 1, 3)] == [tiny_models.answers[i] for i in (0, 1, 3)]


def test_streamed_pieces_add_up_to_the_whole_answer(merged: Generator, tiny_models: TinyModels) -> None:
    prompts = tiny_models.prompts[:4]
    pieces: dict[int, list[str]] = {}
    texts = _texts(
        merged.generate(
            [merged.prompt(p, GREEDY) for p in prompts],
            on_text=lambda i, t: pieces.setdefault(i, []).append(t),
        )
    )
    assert ["".join(pieces.get(i, [])) for i in range(len(prompts))] == texts
    assert max(len(p) for p in pieces.values()) >= 2


def test_sampling_settings_are_checked_per_request(merged: Generator) -> None:
    limited = Generator(merged.model, merged.tokenizer, max_new_tokens_limit=64)
    with pytest.raises(RequestError, match=r"must be between 1 and this deployment's limit of 64 .* got 0"):
        limited.prompt("hello", Sampling(0, 0.0, 1.0))
    with pytest.raises(RequestError, match=r"limit of 64 \(spec.generation.maxNewTokensLimit\), got 65"):
        limited.prompt("hello", Sampling(65, 0.0, 1.0))
    with pytest.raises(RequestError, match=r"top_p must be above 0 and at most 1, got 1\.5"):
        merged.prompt("hello", Sampling(8, 0.0, 1.5))
    with pytest.raises(RequestError, match="exceed the model's context of 512 tokens"):
        merged.prompt("word " * 600, GREEDY)
    with pytest.raises(RequestError, match="the prompt is empty"):
        merged.prompt("", GREEDY)


def test_a_missing_adapter_is_named(tiny_models: TinyModels, tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=f"no LoRA adapter at {tmp_path}: the directory has no adapter"
    ):
        Generator.load(LoadSettings(model=str(tiny_models.base), adapter=str(tmp_path)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_quantization_without_a_gpu_says_what_to_do(tiny_models: TinyModels) -> None:
    with pytest.raises(RuntimeError, match=r"quantization int8 .* needs a CUDA GPU, and none is visible"):
        Generator.load(LoadSettings(model=str(tiny_models.merged), quantization="int8"))


class _CharTokenizer:
    """One token per UTF-8 byte, decoded as a byte-level tokenizer does: broken characters become U+FFFD."""

    def decode(self, ids: list[int], **_: object) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def _stream(text: str, stops: list[str], limit: int = 100) -> tuple[list[str], str]:
    assembler = TextAssembler(_CharTokenizer(), limit, stops, eos_ids=[0])  # type: ignore[arg-type]
    pieces = [assembler.push(byte) for byte in text.encode()]
    pieces.append(assembler.finish())
    return [p for p in pieces if p], assembler.text


def test_streaming_never_hands_out_half_a_character() -> None:
    pieces, text = _stream("狗在跑", [])
    assert pieces == ["狗", "在", "跑"] and text == "狗在跑"


def test_streaming_holds_back_what_may_start_a_stop_sequence() -> None:
    pieces, text = _stream("ab\n\nUser: more", ["\n\nUser:"])
    assert pieces == ["a", "b"] and text == "ab"
    pieces, text = _stream("a\nb", ["\n\nUser:"])
    assert "".join(pieces) == text == "a\nb"  # the held-back newline is released once it cannot stop


def test_eos_and_the_row_limit_end_the_text() -> None:
    assert _stream("abc\0def", [])[1] == "abc"
    assert _stream("abcdef", [], limit=4)[1] == "abcd"


class _Recording:
    """A tokenizer that remembers how many tokens each decode call was given."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.lengths: list[int] = []

    def decode(self, ids: list[int], **options: object) -> str:
        self.lengths.append(len(ids))
        return self.tokenizer.decode(ids, **options)  # type: ignore[arg-type]


def _sentencepiece_style() -> PreTrainedTokenizerBase:
    """A Metaspace tokenizer (Llama-2, Mistral): a word's space is part of its first token, and a text's
    first space is dropped when decoded, so a token decodes differently at a text's start."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"])
    tokenizer.train_from_iterator(tokenizer_texts(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>")


@pytest.fixture(scope="module")
def tokenizers_by_kind(tiny_models: TinyModels) -> dict[str, PreTrainedTokenizerBase]:
    return {
        "byte-level": AutoTokenizer.from_pretrained(tiny_models.merged),  # DeepSeek's and Llama-3's kind
        "sentencepiece-style": _sentencepiece_style(),
    }


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece-style"])
def test_streamed_text_is_the_whole_decode_from_short_windows(
    kind: str, tokenizers_by_kind: dict[str, PreTrainedTokenizerBase]
) -> None:
    """Any tokens at all (half characters, special tokens, words): the pieces join to what decoding
    the whole answer at once gives, while each step decodes only a few tokens, not the answer so far."""
    tokenizer = tokenizers_by_kind[kind]

    @settings(derandomize=True, max_examples=150, deadline=None)
    @given(st.lists(st.integers(0, len(tokenizer) - 1), max_size=80))
    def check(ids: list[int]) -> None:
        recording = _Recording(tokenizer)
        assembler = TextAssembler(recording, 1000, [], eos_ids=[])  # type: ignore[arg-type]
        pieces = [assembler.push(token) for token in ids] + [assembler.finish()]
        whole = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert "".join(pieces) == assembler.text == whole

    check()

    words = tokenizer(" ".join(tokenizer_texts()[:40]), add_special_tokens=False)["input_ids"]
    recording = _Recording(tokenizer)
    assembler = TextAssembler(recording, 10_000, [], eos_ids=[])  # type: ignore[arg-type]
    for token in words:
        assembler.push(token)
    assert len(words) > 200 and max(recording.lengths) <= 4
