"""Preference tuning (`spec.preference`): pairs through the data pipeline, DPO and ORPO with TRL on
the keyword task's pairs, and the scores that judge them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from deeptune.api.finetunejob import Cleaning, FieldMapping, FineTuneJobSpec
from deeptune.api.trainer import TrainerSummary
from deeptune_trainer.data.cleaning import Cleaner
from deeptune_trainer.data.mapping import map_rows, resolve_style
from deeptune_trainer.data.rows import LoadedRows, RawRow
from deeptune_trainer.data.sample import Sample
from deeptune_trainer.errors import TrainerInputError
from deeptune_trainer.evaluation import evaluate
from deeptune_trainer.preference import pair_rows
from deeptune_trainer.synthetic import as_pairs, keyword_pairs
from deeptune_trainer.training import train
from tests.trainer.test_cli import _run_on_file
from tests.trainer.test_training import _KillAt

MakeSpec = Callable[..., FineTuneJobSpec]
Pairs = tuple[list[Sample], list[Sample]]
"""Training pairs and held-out pairs."""
PAIRS: dict[str, Any] = {"preference": {}}
"""A preference run (train() is handed its pairs: the spec's inline rows stay unused)."""


@pytest.fixture(scope="module")
def keyword_pair_task() -> Pairs:
    """160 training pairs and 40 held-out pairs whose prompts training never saw."""
    train_rows = keyword_pairs(160, seed=1)
    held_out = keyword_pairs(40, seed=2, exclude={row["prompt"] for row in train_rows})
    return as_pairs(train_rows), as_pairs(held_out)


def _mapped(*rows: dict[str, Any]) -> tuple[list[Sample], list[str]]:
    loaded = LoadedRows("data.jsonl", "line", [RawRow.of(i + 1, row) for i, row in enumerate(rows)])
    samples, bad = map_rows(loaded, "preference", FieldMapping())
    return samples, [row.reason for row in bad]


# --- data -------------------------------------------------------------------------------------


def test_pairs_map_from_text_and_from_messages() -> None:
    samples, bad = _mapped(
        {"prompt": "capital of France?", "chosen": "Paris", "rejected": "Lyon"},
        {
            "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}],
            "chosen": [{"role": "assistant", "content": "4"}],
            "rejected": [{"role": "assistant", "content": "5"}],
        },
        {"prompt": "no rejected", "chosen": "x"},
        {
            "prompt": [{"role": "user", "content": "q"}],
            "chosen": "a",
            "rejected": [{"role": "user", "content": "b"}],
        },
        {"prompt": [{"role": "assistant", "content": "q"}], "chosen": "a", "rejected": "b"},
    )
    assert [(s.target, s.rejected, [m.role for m in s.prompt_messages]) for s in samples] == [
        ("Paris", "Lyon", ["user"]),
        ("4", "5", ["system", "user"]),
    ]
    assert samples[1].rejected_sample.target == "5" and samples[1].rejected_sample.rejected is None
    assert bad == [
        "column 'rejected' is missing",
        "column 'rejected' must be text or a list of one assistant message",
        "column 'prompt' must end with a user message",
    ]


def test_auto_style_finds_pairs_only_for_a_preference_run() -> None:
    columns, fields = ["prompt", "chosen", "rejected"], FieldMapping()
    assert resolve_style("auto", columns, fields, pairs=True) == "preference"
    with pytest.raises(TrainerInputError, match=r"rows are preference pairs .*: set spec.preference"):
        resolve_style("auto", columns, fields)
    with pytest.raises(
        TrainerInputError, match=r"spec.preference trains on pairs, but .* \(they have: prompt, completion\)"
    ):
        resolve_style("auto", ["prompt", "completion"], fields, pairs=True)


def test_the_spec_keeps_pairs_and_preference_together(make_spec: MakeSpec) -> None:
    assert make_spec(**PAIRS).preference.algorithm == "dpo"
    with pytest.raises(ValueError, match=r"dataset\.style preference is for preference tuning"):
        make_spec(dataset={"style": "preference"})
    with pytest.raises(ValueError, match=r"spec\.preference trains on pairs"):
        make_spec(**PAIRS, dataset={"style": "chat"})
    with pytest.raises(ValueError, match=r"hyperparameters\.packing is for supervised rows"):
        make_spec(**PAIRS, hyperparameters={"packing": True})


def test_cleaning_treats_the_rejected_answer_as_part_of_the_pair() -> None:
    samples, _ = _mapped(
        {"prompt": "q1", "chosen": "same", "rejected": "same"},  # nothing to learn
        {"prompt": "q2", "chosen": "fine", "rejected": "mail me at ann@example.com"},
        {"prompt": "q3", "chosen": "good", "rejected": "bad"},
        {"prompt": "q3", "chosen": "good", "rejected": "worse"},  # another pair for the same prompt
        {"prompt": "q3", "chosen": "good", "rejected": "bad"},  # a copy
    )
    kept, stats = Cleaner(Cleaning()).clean(samples)
    assert [(s.target, s.rejected) for s in kept] == [
        ("fine", "mail me at [EMAIL]"),
        ("good", "bad"),
        ("good", "worse"),
    ]
    assert (stats.degenerate, stats.exact_duplicates, stats.pii_redacted) == (1, 1, 1)


def test_pairs_reach_trl_as_the_chat_template_renders_them(tiny_llama_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    [row] = pair_rows(as_pairs(keyword_pairs(1, seed=3)), tokenizer)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=False
    )
    assert row["prompt"].startswith(prompt.split("x")[0]) and row["prompt"].endswith(prompt.split("x")[1])
    assert row["chosen"].endswith(tokenizer.eos_token) and row["rejected"].endswith(tokenizer.eos_token)


# --- training ---------------------------------------------------------------------------------


@pytest.mark.trainer
@pytest.mark.parametrize("algorithm", ["dpo", "orpo"])
def test_preference_tuning_ranks_unseen_pairs_better_than_the_base_model(
    algorithm: str,
    tiny_llama_dir: Path,
    keyword_pair_task: Pairs,
    make_spec: MakeSpec,
    tmp_path: Path,
) -> None:
    """Every phrase is chosen for one keyword and rejected for another: a model ranks the unseen
    pairs right only if it learned, from preferences alone, which phrase each keyword wants."""
    train_pairs, held_out = keyword_pair_task
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    spec = make_spec(
        preference={"algorithm": algorithm, "beta": 0.1 if algorithm == "dpo" else 1.0},
        hyperparameters={"maxSteps": 40, "loggingSteps": 10},
        evaluation={"metrics": ["perplexity"], "evalSteps": 20},
    )
    baseline = evaluate(model, tokenizer, held_out, spec)
    lines: list[str] = []
    result = train(
        model, tokenizer, train_pairs, held_out,
        spec=spec, output_dir=tmp_path, precision="fp32", log=lines.append,
    )  # fmt: skip
    tuned = evaluate(result.model, tokenizer, held_out, spec)
    print(f"\n{algorithm}: base {baseline}; tuned {tuned}")

    assert baseline["preferenceAccuracy"] <= 0.75  # no ranking of the phrases alone does better
    assert tuned["preferenceAccuracy"] >= 0.95
    assert tuned["preferenceMargin"] > baseline["preferenceMargin"] + 5
    losses = [entry["loss"] for entry in result.log_history if "loss" in entry]
    assert losses[-1] < losses[0] / 2
    assert any(line.startswith("step 40/40") for line in lines)
    # The saved adapter is the trained one alone (DPO's reference copy is gone).
    assert isinstance(result.model, PeftModel) and list(result.model.peft_config) == ["default"]
    assert result.final_checkpoint is not None and result.final_checkpoint.name == "checkpoint-40"
    if algorithm == "orpo":  # ORPO learns the chosen answers as supervised tuning does
        assert tuned["perplexity"] < baseline["perplexity"] / 2


@pytest.mark.trainer
def test_full_dpo_takes_its_reference_from_the_weights_before_training(
    tiny_llama_dir: Path,
    keyword_pair_task: Pairs,
    make_spec: MakeSpec,
    tmp_path: Path,
) -> None:
    train_pairs, held_out = keyword_pair_task
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    spec = make_spec(
        **PAIRS,
        method="full",
        hyperparameters={"maxSteps": 20, "learningRate": 1e-3},
        evaluation={"metrics": []},
    )
    baseline = evaluate(model, tokenizer, held_out, spec)
    result = train(model, tokenizer, train_pairs, held_out, spec=spec, output_dir=tmp_path, precision="fp32")
    tuned = evaluate(result.model, tokenizer, held_out, spec)
    print(f"\nfull DPO: base {baseline}; tuned {tuned}")
    assert not isinstance(result.model, PeftModel)
    assert tuned["preferenceAccuracy"] > baseline["preferenceAccuracy"]
    assert tuned["preferenceMargin"] > baseline["preferenceMargin"]
    first = next(entry for entry in result.log_history if "loss" in entry)
    assert abs(first["loss"] - 0.6931) < 0.01  # policy == reference at step 1: DPO's loss is ln 2


# --- a whole run ------------------------------------------------------------------------------


@pytest.mark.trainer
def test_a_whole_dpo_run_from_a_manifest(
    tiny_spec: dict[str, Any], tmp_path: Path, tiny_llama_dir: Path
) -> None:
    """`python -m deeptune_trainer` on a pairs file: cleaned, tuned, scored against the base model,
    exported; the summary the operator reads holds both models' preference scores."""
    train_rows = keyword_pairs(160, seed=1)
    held_out = keyword_pairs(40, seed=2, exclude={row["prompt"] for row in train_rows})
    rows = [
        *train_rows,
        train_rows[0],
        {"prompt": "q", "chosen": "same", "rejected": "same"},
        {"prompt": "q"},
    ]
    spec = {
        **tiny_spec,
        "baseModel": {"pvc": {"claimName": "models"}},
        "dataset": {
            "source": {"pvc": {"claimName": "data", "path": "train.jsonl"}},
            "validation": {"source": {"inline": held_out}},
        },
        "preference": {"algorithm": "dpo"},
        "hyperparameters": {**tiny_spec["hyperparameters"], "maxSteps": 40},
        "evaluation": {"metrics": ["exactMatch"], "generation": {"maxNewTokens": 8}},
    }
    run_dir = _run_on_file(tmp_path, spec, tiny_llama_dir, rows)
    summary = TrainerSummary.model_validate_json((run_dir / "summary.json").read_text())
    assert summary.outcome == "succeeded" and summary.steps == 40
    results = summary.eval_results
    assert results is not None and results.baseline is not None and results.delta is not None
    assert results.fine_tuned["preferenceAccuracy"] >= 0.95 > results.baseline["preferenceAccuracy"]
    assert results.delta["preferenceMargin"] > 5
    assert "exactMatch" in results.fine_tuned  # listed metrics score the chosen answers
    report = summary.dataset
    assert report is not None
    assert (report.bad_rows, report.duplicates_removed, report.degenerate_removed) == (1, 1, 1)
    assert (report.train_rows, report.validation_rows) == (160, 40)
    assert sorted(path.name for path in (run_dir / "adapter").iterdir() if path.is_dir()) == []  # no `ref`
    card = (run_dir / "README.md").read_text()
    assert "with DeepTune (lora, DPO)" in card and "- preference: dpo, beta 0.1" in card


@pytest.mark.trainer
def test_a_killed_dpo_run_resumes_as_if_never_killed(
    tiny_llama_dir: Path,
    keyword_pair_task: Pairs,
    make_spec: MakeSpec,
    tmp_path: Path,
) -> None:
    """A preempted pod's retry resumes from the newest checkpoint: the adapter, the optimizer, and
    DPO's reference (the adapter as it was before the first step) are what they would have been."""
    train_pairs, held_out = keyword_pair_task
    spec = make_spec(**PAIRS, hyperparameters={"maxSteps": 30, "checkpointSteps": 10, "loggingSteps": 5})

    def pod(output_dir: Path, **options: Any) -> Any:
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
        tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
        return train(model, tokenizer, train_pairs, held_out, spec=spec, output_dir=output_dir,
                     precision="fp32", log=lambda _: None, **options)  # fmt: skip

    with pytest.raises(RuntimeError, match="killed"):
        pod(tmp_path / "run", callbacks=[_KillAt(15)])
    resumed = pod(tmp_path / "run")
    assert (resumed.resumed_from, resumed.steps) == ("checkpoint-10", 30)
    uninterrupted = pod(tmp_path / "uninterrupted")
    assert resumed.train_loss == pytest.approx(uninterrupted.train_loss, rel=1e-5)
    assert list(resumed.model.peft_config) == ["default"]
