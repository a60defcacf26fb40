"""Saved weights, results files, the model card and the 4 KiB termination summary."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from deeptune.api.finetunejob import DatasetReport, EvalResults, FineTuneJobSpec
from deeptune.api.trainer import (
    SUMMARY_LIMIT_BYTES,
    ArtifactPaths,
    TrainerConfig,
    TrainerError,
    TrainerPaths,
    TrainerSummary,
)
from deeptune_trainer.artifacts import (
    CardFacts,
    fit_summary,
    make_output_dir,
    model_card,
    save_model_artifacts,
    write_eval_results,
    write_resolved_config,
    write_summary,
)
from deeptune_trainer.errors import TrainerInputError
from deeptune_trainer.modeling import apply_method

MakeSpec = Callable[..., FineTuneJobSpec]


def _results(count: int) -> EvalResults:
    fine_tuned = {f"metric_with_a_long_name_{i}": 1 / 3 + i for i in range(count)}
    baseline = {name: value / 7 for name, value in fine_tuned.items()}
    delta = {name: fine_tuned[name] - baseline[name] for name in fine_tuned}
    return EvalResults(fine_tuned=fine_tuned, baseline=baseline, delta=delta, samples=200)


def _succeeded(results: EvalResults) -> TrainerSummary:
    return TrainerSummary(
        outcome="succeeded",
        steps=1200,
        train_loss=0.123456789,
        eval_results=results,
        dataset=DatasetReport(rows_read=10_000, rows_kept=9_000, train_rows=8_100, validation_rows=900),
        artifacts=ArtifactPaths(adapter="adapter", merged="merged"),
    )


def test_a_small_summary_is_written_as_is() -> None:
    summary = _succeeded(_results(6))
    assert json.loads(fit_summary(summary)) == summary.to_wire()


def test_a_summary_with_many_metrics_fits_in_4_kib() -> None:
    encoded = fit_summary(_succeeded(_results(300)))
    assert len(encoded.encode()) <= SUMMARY_LIMIT_BYTES
    decoded = TrainerSummary.model_validate(json.loads(encoded))
    assert decoded.outcome == "succeeded"
    assert decoded.steps == 1200
    first = decoded.eval_results.fine_tuned["metric_with_a_long_name_0"]  # type: ignore[union-attr]
    assert first == pytest.approx(0.3333)  # rounded to 4 significant digits


def test_a_failed_summary_with_a_huge_message_fits() -> None:
    summary = TrainerSummary(
        outcome="failed", error=TrainerError(reason="InvalidDataset", message="bad row; " * 2000)
    )
    encoded = fit_summary(summary)
    assert len(encoded.encode()) <= SUMMARY_LIMIT_BYTES
    decoded = TrainerSummary.model_validate(json.loads(encoded))
    assert decoded.error is not None and decoded.error.reason == "InvalidDataset"
    assert decoded.error.message.startswith("bad row; bad row;")


def test_chinese_text_is_measured_in_bytes() -> None:
    summary = TrainerSummary(
        outcome="failed", error=TrainerError(reason="InvalidDataset", message="数据错误" * 2000)
    )
    assert len(fit_summary(summary).encode()) <= SUMMARY_LIMIT_BYTES


def test_write_summary_reports_an_unwritable_path(tmp_path: Path) -> None:
    summary = TrainerSummary(outcome="succeeded")
    assert write_summary(summary, tmp_path / "termination-log")
    assert json.loads((tmp_path / "termination-log").read_text()) == {"outcome": "succeeded"}
    (tmp_path / "a-file").write_text("")
    assert not write_summary(summary, tmp_path / "a-file" / "termination-log")


def test_an_output_dir_that_cannot_be_made_is_bad_input_naming_the_claim(
    tmp_path: Path, make_spec: MakeSpec
) -> None:
    """A file where the output path's parent should be (the same OSError path a claim the trainer's
    user may not write takes: tests/cluster/test_real_node.py has that one, as uid 1000)."""
    make_output_dir(make_spec(), tmp_path / "made" / "run")
    assert (tmp_path / "made" / "run").is_dir() and not any((tmp_path / "made" / "run").iterdir())
    (tmp_path / "a-file").write_text("")
    with pytest.raises(TrainerInputError) as raised:
        make_output_dir(make_spec(), tmp_path / "a-file" / "run")
    assert raised.value.reason == "OutputNotWritable"
    assert "output.pvc:" in raised.value.message and "claim out" in raised.value.message
    assert "Not a directory" in raised.value.message


def test_model_card_has_the_ab_table_data_and_hyperparameters(make_spec: MakeSpec) -> None:
    results = EvalResults(
        fine_tuned={"bleu": 42.5, "exactMatch": 0.9}, baseline={"bleu": 2.5, "exactMatch": 0.0},
        delta={"bleu": 40.0, "exactMatch": 0.9}, samples=40,
    )  # fmt: skip
    facts = CardFacts(
        name="support-bot",
        base_model="deepseek-ai/deepseek-llm-7b-base",
        steps=120,
        train_loss=0.3,
        eval_results=results,
        dataset=DatasetReport(rows_read=200, train_rows=160, validation_rows=40),
        artifacts=ArtifactPaths(adapter="adapter"),
    )
    card = model_card(make_spec(), facts)
    assert card.startswith("# support-bot\n")
    assert "| bleu | 2.5 | 42.5 | 40 |" in card
    assert "| exactMatch | 0 | 0.9 | 0.9 |" in card
    assert "- trainRows: 160" in card
    assert "- learning rate: 0.01" in card
    assert "- LoRA: r 16, alpha 32, dropout 0.0" in card
    assert "- adapter: adapter" in card


def test_results_and_resolved_config_files(tmp_path: Path, make_spec: MakeSpec) -> None:
    results = EvalResults(fine_tuned={"perplexity": 3.5}, samples=10)
    write_eval_results(results, tmp_path)
    assert json.loads((tmp_path / "eval_results.json").read_text()) == {
        "fineTuned": {"perplexity": 3.5},
        "samples": 10,
    }
    config = TrainerConfig(name="j", spec=make_spec(), paths=TrainerPaths(output_dir=str(tmp_path)))
    write_resolved_config(config, tmp_path)
    assert TrainerConfig.model_validate_json((tmp_path / "trainer_config.json").read_text()) == config


def test_lora_adapter_and_merged_model(tiny_llama_dir: Path, make_spec: MakeSpec, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    spec = make_spec(output={"mergeAdapter": True})
    model = apply_method(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), spec)
    with torch.no_grad():  # a fresh adapter is a no-op; give it weights so merging means something
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    ids = torch.tensor([tokenizer("topic: 猫 blue", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits

    paths = save_model_artifacts(
        model, tokenizer, spec, tmp_path, reload_base=lambda: pytest.fail("not qlora")
    )
    assert paths == ArtifactPaths(adapter="adapter", merged="merged")
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= {
        p.name for p in (tmp_path / "adapter").iterdir()
    }
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_full_fine_tuning_saves_the_whole_model(
    tiny_llama_dir: Path, make_spec: MakeSpec, tmp_path: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    paths = save_model_artifacts(
        model, tokenizer, make_spec(method="full"), tmp_path, reload_base=lambda: model
    )
    assert paths == ArtifactPaths(merged="model")
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert not (tmp_path / "adapter").exists()
