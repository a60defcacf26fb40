"""Long text: documents (`dataset.style: text`) trained whole in overlapping windows, and a context
extended with RoPE scaling that the exported model carries."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from deeptune.api.finetunejob import FieldMapping, FineTuneJobSpec
from deeptune.api.trainer import TrainerPaths, TrainerSummary
from deeptune_trainer.data.mapping import map_rows, resolve_style
from deeptune_trainer.data.rows import LoadedRows, RawRow
from deeptune_trainer.data.sample import Message, Sample
from deeptune_trainer.errors import TrainerInputError
from deeptune_trainer.formatting import IGNORE_INDEX, document_windows, tokenize_samples
from deeptune_trainer.modeling import extend_context, load_model
from deeptune_trainer.synthetic import keyword_documents
from tests.trainer.test_cli import _run_on_file

MakeSpec = Callable[..., FineTuneJobSpec]
DOCUMENT_TOKENS = 300


def _document(tokenizer: Any) -> Sample:
    """A document of more than DOCUMENT_TOKENS tokens."""
    text = keyword_documents(1, seed=4, sentences=60)[0]["text"]
    assert len(tokenizer(text)["input_ids"]) > DOCUMENT_TOKENS
    return Sample((Message("assistant", text),))


def _targets(windows: list[Any]) -> int:
    """Tokens some window predicts: labelled positions after each window's first (which has no context)."""
    return sum(label != IGNORE_INDEX for window in windows for label in window.labels[1:])


# --- windows ----------------------------------------------------------------------------------


@pytest.mark.parametrize("overlap", [8, 24])
def test_every_token_of_a_long_document_is_learned_once(tiny_llama_dir: Path, overlap: int) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    document = _document(tokenizer)
    ids = [tokenizer.bos_token_id, *tokenizer(document.target, add_special_tokens=False)["input_ids"]]
    ids.append(tokenizer.eos_token_id)
    windows = document_windows(document, tokenizer, max_length=64, overlap=overlap)

    assert len(windows) > 1 and all(len(window.input_ids) <= 64 for window in windows)
    rebuilt = windows[0].input_ids + [token for window in windows[1:] for token in window.input_ids[overlap:]]
    assert rebuilt == ids  # the whole document, nothing cut
    # Every token but the first is a target exactly once; the overlap is context, not learned again.
    assert _targets(windows) == len(ids) - 1
    for previous, window in itertools.pairwise(windows):
        assert window.input_ids[:overlap] == previous.input_ids[-overlap:]
        assert window.labels[:overlap] == [IGNORE_INDEX] * overlap
    assert not any(window.truncated for window in windows)


def test_without_overlap_each_windows_first_token_is_context_only(tiny_llama_dir: Path) -> None:
    """Blocks side by side (as Hugging Face's run_clm groups text): no token twice, but each block's
    first has nothing before it to be predicted from."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    windows = document_windows(_document(tokenizer), tokenizer, max_length=64)
    tokens = sum(len(window.input_ids) for window in windows)
    assert _targets(windows) == tokens - len(windows)


def test_a_short_document_is_one_window_and_conversations_are_unchanged(tiny_llama_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    short = Sample((Message("assistant", "the cat sleeps"),))
    asked = Sample((Message("user", "topic: 猫"), Message("assistant", "the cat sleeps")))
    split = tokenize_samples([short, asked], tokenizer, max_length=64, window_overlap=8)
    assert len(split.examples) == 2
    assert split.examples[0].labels == split.examples[0].input_ids  # a document: every token learned
    assert IGNORE_INDEX in split.examples[1].labels  # a conversation: the prompt is given


def test_text_rows_are_documents() -> None:
    assert resolve_style("auto", ["text", "id"], FieldMapping()) == "text"
    loaded = LoadedRows(
        "docs.jsonl", "line", [RawRow.of(1, {"text": "a long story"}), RawRow.of(2, {"text": None})]
    )
    samples, bad = map_rows(loaded, "text", FieldMapping())
    assert [sample.target for sample in samples] == ["a long story"] and samples[0].is_document
    assert [row.reason for row in bad] == ["column 'text' is empty (null)"]


def test_long_text_settings_are_checked(make_spec: MakeSpec) -> None:
    with pytest.raises(ValueError, match=r"windowOverlap must be below hyperparameters\.maxSeqLength"):
        make_spec(dataset={"style": "text", "windowOverlap": 64})
    with pytest.raises(ValueError, match=r"ropeScaling changes the base model's config"):
        make_spec(ropeScaling={"factor": 2})
    assert make_spec(ropeScaling={"factor": 2}, output={"mergeAdapter": True}).rope_scaling.type == "yarn"


# --- RoPE scaling -----------------------------------------------------------------------------


def test_rope_scaling_extends_the_models_positions(tiny_llama_dir: Path, make_spec: MakeSpec) -> None:
    spec = make_spec(method="full", ropeScaling={"type": "yarn", "factor": 2})
    loaded = load_model(spec, TrainerPaths(output_dir="/tmp/unused", base_model=str(tiny_llama_dir)))
    config = loaded.model.config
    assert config.max_position_embeddings == 1024
    assert config.rope_parameters["rope_type"] == "yarn" and config.rope_parameters["factor"] == 2
    assert config.rope_parameters["original_max_position_embeddings"] == 512
    assert loaded.model.model.rotary_emb.attention_scaling > 1  # YaRN's attention temperature is in use
    with pytest.raises(TrainerInputError, match=r"scales RoPE already \(yarn, factor 2"):
        extend_context(config, spec.rope_scaling)


@pytest.mark.trainer
def test_a_document_run_with_a_doubled_context_exports_a_model_that_uses_it(
    tiny_spec: dict[str, Any], tmp_path: Path, tiny_llama_dir: Path
) -> None:
    """`python -m deeptune_trainer` on documents longer than the model's 512 positions, in windows of
    1,024 with RoPE scaled 2×: the merged model's config carries the scaling, and it generates past
    the original limit."""
    documents = keyword_documents(12, seed=1, sentences=150)  # ~1,500 tokens each
    spec = {
        **tiny_spec,
        "baseModel": {"pvc": {"claimName": "models"}},
        "dataset": {
            "source": {"pvc": {"claimName": "data", "path": "train.jsonl"}},
            "style": "text",
            "windowOverlap": 128,
            "validation": {"ratio": 0.2},
        },
        "ropeScaling": {"type": "yarn", "factor": 2},
        "hyperparameters": {**tiny_spec["hyperparameters"], "maxSteps": 12, "maxSeqLength": 1024},
        "evaluation": {"metrics": ["perplexity", "exactMatch"]},
        "output": {"pvc": {"claimName": "out"}, "mergeAdapter": True},
    }
    run_dir = _run_on_file(tmp_path, spec, tiny_llama_dir, documents)
    summary = TrainerSummary.model_validate_json((run_dir / "summary.json").read_text())
    results = summary.eval_results
    assert results is not None and results.baseline is not None
    assert set(results.fine_tuned) == {"perplexity"}  # documents answer no prompt: no generation metrics
    assert results.fine_tuned["perplexity"] < results.baseline["perplexity"]
    assert summary.dataset is not None and summary.dataset.truncated == 0
    assert "- RoPE scaling: yarn, factor 2" in (run_dir / "README.md").read_text()
    config = AutoConfig.from_pretrained(run_dir / "merged")
    assert config.max_position_embeddings == 1024 and config.rope_parameters["rope_type"] == "yarn"
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "merged")
    prompt = tokenizer(documents[0]["text"], return_tensors="pt")["input_ids"][:, :600]
    with torch.no_grad():
        output = merged.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert output.shape[1] == 608  # past the 512 positions the base model had
