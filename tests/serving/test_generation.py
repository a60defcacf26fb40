"""The generation module in-process (no Triton): batching, per-row limits, stop sequences, streaming."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deeptune.serving.generation import Generator, LoadSettings, RequestError, Sampling, TextAssembler
from tests.serving.tiny import TinyModels

GREEDY = Sampling(max_new_tokens=8, temperature=0.0, top_p=1.0)


@pytest.fixture(scope="module")
def merged(tiny_models: TinyModels) -> Generator:
    return Generator.load(LoadSettings(model=str(tiny_models.merged)))


def test_a_batch_answers_as_each_prompt_alone(merged: Generator, tiny_models: TinyModels) -> None:
    prompts = tiny_models.prompts[:6]
    together = merged.generate([merged.prompt(p, GREEDY) for p in prompts])
    alone = [merged.generate([merged.prompt(p, GREEDY)])[0] for p in prompts]
    assert together == alone  # left padding does not change what a row generates
    assert [t.strip() for t in together] == tiny_models.answers[:6]


def test_each_row_keeps_its_own_token_limit(merged: Generator, tiny_models: TinyModels) -> None:
    prompt = next(p for p, a in zip(tiny_models.prompts, tiny_models.answers, strict=True) if " " in a)
    short, full = merged.generate(
        [merged.prompt(prompt, Sampling(1, 0.0, 1.0)), merged.prompt(prompt, GREEDY)]
    )
    assert short and full.startswith(short) and len(short) < len(full)


def test_stop_sequences_cut_the_text_before_them(merged: Generator, tiny_models: TinyModels) -> None:
    prompt = next(
        p for p, a in zip(tiny_models.prompts, tiny_models.answers, strict=True) if a == "the cat sleeps"
    )
    stopping = Generator(merged.model, merged.tokenizer, stop_sequences=["cat"])
    assert stopping.generate([stopping.prompt(prompt, GREEDY)]) == [" the "]


def test_streamed_pieces_add_up_to_the_whole_answer(merged: Generator, tiny_models: TinyModels) -> None:
    prompts = tiny_models.prompts[:4]
    pieces: dict[int, list[str]] = {}
    texts = merged.generate(
        [merged.prompt(p, GREEDY) for p in prompts], on_text=lambda i, t: pieces.setdefault(i, []).append(t)
    )
    assert ["".join(pieces.get(i, [])) for i in range(len(prompts))] == texts
    assert max(len(p) for p in pieces.values()) >= 2


def test_sampling_settings_are_checked_per_request(merged: Generator) -> None:
    with pytest.raises(RequestError, match="max_new_tokens must be between 1 and 32768, got 0"):
        merged.prompt("hello", Sampling(0, 0.0, 1.0))
    with pytest.raises(RequestError, match=r"top_p must be above 0 and at most 1, got 1\.5"):
        merged.prompt("hello", Sampling(8, 0.0, 1.5))
    with pytest.raises(RequestError, match="exceed the model's context of 512 tokens"):
        merged.prompt("word " * 600, GREEDY)
    with pytest.raises(RequestError, match="text_input is empty"):
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
