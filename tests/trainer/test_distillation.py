"""Knowledge distillation (`spec.distillation`): a student learns the keyword task from a teacher that
knows it, out of data whose answers are mostly wrong — by the teacher's answers (`sequences`) or its
next-token distributions (`logits`) — and beats the same student trained on the data alone."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from deeptune.api.finetunejob import FineTuneJobSpec
from deeptune.api.trainer import TrainerPaths, TrainerSummary
from deeptune_trainer.data.sample import Sample
from deeptune_trainer.distillation import check_shared_vocabulary, load_teacher, teacher_answers
from deeptune_trainer.errors import TrainerInputError
from deeptune_trainer.evaluation import evaluate
from deeptune_trainer.synthetic import as_samples, mostly_wrong
from deeptune_trainer.tinymodels import build_smaller_model, build_tiny_model
from deeptune_trainer.training import train
from tests.trainer.conftest import TINY_SPEC
from tests.trainer.test_cli import _run_on_file

MakeSpec = Callable[..., FineTuneJobSpec]
Task = tuple[list[Sample], list[Sample]]
WRONG_SHARE = 2 / 3
"""Of the data's answers, the share `mostly_wrong` replaces by another keyword's phrase."""


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path, keyword_task: Task) -> Path:
    """The tiny Llama fine-tuned on the keyword task's right answers, merged and saved: the teacher."""
    train_rows, _ = keyword_task
    model, tokenizer = _student(tiny_llama_dir)
    out = tmp_path_factory.mktemp("teacher")
    spec = FineTuneJobSpec.model_validate(TINY_SPEC)
    result = train(model, tokenizer, train_rows, [], spec=spec, output_dir=out / "run", precision="fp32")
    result.model.save_pretrained(out / "adapter")  # the same teacher as base model + adapter
    result.model.merge_and_unload().save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    return out / "model"


@pytest.fixture(scope="module")
def noisy_task(keyword_task_rows: tuple[list[dict[str, str]], list[dict[str, str]]]) -> Task:
    """The keyword task's training rows with most answers wrong, and its right held-out rows."""
    train_rows, held_out_rows = keyword_task_rows
    return as_samples(mostly_wrong(train_rows)), as_samples(held_out_rows)


@pytest.fixture(scope="module")
def student_and_teacher(
    tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path, teacher_dir: Path
) -> tuple[Path, Path]:
    """A student half the teacher's width (a quarter of its weights but the embeddings), with its
    vocabulary, and the teacher."""
    return build_smaller_model(tiny_llama_dir, tmp_path_factory.mktemp("student")), teacher_dir


def _distilling(
    make_spec: MakeSpec, teacher_dir: Path, **distillation: Any
) -> tuple[FineTuneJobSpec, TrainerPaths]:
    spec = make_spec(
        distillation={"teacher": {"pvc": {"claimName": "teachers"}}, **distillation},
        evaluation={"metrics": ["exactMatch"], "generation": {"maxNewTokens": 8}},
    )
    return spec, TrainerPaths(output_dir="/tmp/unused", teacher_model=str(teacher_dir))


def _student(tiny_llama_dir: Path) -> tuple[Any, Any]:
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir), AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.mark.trainer
@pytest.mark.parametrize("mode", ["sequences", "logits"])
def test_a_distilled_student_learns_what_the_teacher_knows_and_the_data_gets_wrong(
    mode: str, noisy_task: Task, student_and_teacher: tuple[Path, Path], make_spec: MakeSpec, tmp_path: Path
) -> None:
    data, held_out = noisy_task
    student_dir, teacher_dir = student_and_teacher
    spec, paths = _distilling(make_spec, teacher_dir, mode=mode, alpha=0.9)
    teacher = load_teacher(spec, paths)
    teacher_scores = evaluate(teacher.model, teacher.tokenizer, held_out, spec)
    weights = [sum(p.numel() for p in m.parameters()) for m in (_student(student_dir)[0], teacher.model)]
    assert weights[0] <= 0.55 * weights[1], f"the student is not smaller: {weights}"

    model, tokenizer = _student(student_dir)
    alone = train(model, tokenizer, data, [], spec=spec, output_dir=tmp_path / "alone", precision="fp32")
    alone_scores = evaluate(alone.model, tokenizer, held_out, spec)

    model, tokenizer = _student(student_dir)
    if mode == "sequences":
        answered = teacher_answers(teacher, data, spec)
        assert (
            sum(s.target != t.target for s, t in zip(answered, data, strict=True))
            >= WRONG_SHARE * len(data) - 2
        )
        distilled = train(
            model, tokenizer, answered, [], spec=spec, output_dir=tmp_path / "kd", precision="fp32"
        )
    else:
        distilled = train(
            model, tokenizer, data, [],
            spec=spec, output_dir=tmp_path / "kd", precision="fp32", teacher=teacher.model,
        )  # fmt: skip
    scores = evaluate(distilled.model, tokenizer, held_out, spec)
    print(f"\n{mode}: teacher {teacher_scores}, data alone {alone_scores}, distilled {scores}")

    assert teacher_scores["exactMatch"] >= 0.9
    assert alone_scores["exactMatch"] <= 0.5  # the data's majority answer is wrong
    assert scores["exactMatch"] >= 0.9 * teacher_scores["exactMatch"] > alone_scores["exactMatch"]


def test_logits_need_the_students_tokenizer(tmp_path: Path) -> None:
    one = AutoTokenizer.from_pretrained(build_tiny_model("llama", tmp_path / "a", ["the cat sleeps"]))
    other = AutoTokenizer.from_pretrained(build_tiny_model("llama", tmp_path / "b", ["狗在跑 天气很好"]))
    check_shared_vocabulary(one, one)
    with pytest.raises(TrainerInputError, match=r"tokenizers differ .*: use mode sequences"):
        check_shared_vocabulary(one, other)


def test_a_missing_teacher_is_named_as_the_teacher(make_spec: MakeSpec, tmp_path: Path) -> None:
    spec, paths = _distilling(make_spec, tmp_path / "nowhere")
    with pytest.raises(TrainerInputError, match=r"^distillation\.teacher: no model found at claim teachers"):
        load_teacher(spec, paths)


@pytest.mark.trainer
def test_a_teacher_given_as_a_base_model_and_an_adapter_teaches_as_the_merged_one(
    make_spec: MakeSpec, tiny_llama_dir: Path, teacher_dir: Path, noisy_task: Task
) -> None:
    """What the operator resolves a `fineTuneJobRef` teacher that saved only its adapter to."""
    _, held_out = noisy_task
    spec, paths = _distilling(make_spec, tiny_llama_dir)
    adapter = teacher_dir.parent / "adapter"
    teacher = load_teacher(spec, paths.model_copy(update={"teacher_adapter": str(adapter)}))
    merged = load_teacher(spec, paths.model_copy(update={"teacher_model": str(teacher_dir)}))
    scores = [evaluate(t.model, t.tokenizer, held_out, spec)["exactMatch"] for t in (teacher, merged)]
    assert scores[0] == scores[1] >= 0.9
    with pytest.raises(TrainerInputError, match=r"^distillation\.teacher: no adapter at .*nowhere"):
        load_teacher(spec, paths.model_copy(update={"teacher_adapter": str(teacher_dir / "nowhere")}))
    by_run = make_spec(distillation={"teacher": {"fineTuneJobRef": {"name": "big"}}})
    with pytest.raises(TrainerInputError, match=r"fineTuneJobRef is resolved by the operator"):
        load_teacher(by_run, paths)


def test_distillation_settings_are_checked(make_spec: MakeSpec) -> None:
    teacher = {"teacher": {"name": "org/teacher"}}
    with pytest.raises(ValueError, match=r"distillation and preference cannot be combined"):
        make_spec(distillation=teacher, preference={})
    with pytest.raises(ValueError, match=r"does not run under distributed\.strategy fsdp"):
        make_spec(distillation=teacher, distributed={"strategy": "fsdp"})


@pytest.mark.trainer
def test_a_whole_distillation_run_reports_the_teachers_scores_beside_the_students(
    tiny_spec: dict[str, Any], tmp_path: Path, tiny_llama_dir: Path, teacher_dir: Path,
    keyword_task_rows: tuple[list[dict[str, str]], list[dict[str, str]]],
) -> None:  # fmt: skip
    train_rows, held_out_rows = keyword_task_rows
    spec = {
        **tiny_spec,
        "baseModel": {"pvc": {"claimName": "models"}},
        "dataset": {
            "source": {"pvc": {"claimName": "data", "path": "train.jsonl"}},
            "validation": {"source": {"inline": held_out_rows}},
        },
        "distillation": {"teacher": {"pvc": {"claimName": "out", "path": "teacher"}}, "mode": "sequences"},
        "evaluation": {"metrics": ["exactMatch"], "generation": {"maxNewTokens": 8}},
    }
    shutil.copytree(teacher_dir, tmp_path / "out" / "teacher")  # a FineTuneJob's merged output, say
    run_dir = _run_on_file(tmp_path, spec, tiny_llama_dir, mostly_wrong(train_rows))
    summary = TrainerSummary.model_validate_json((run_dir / "summary.json").read_text())
    results = summary.eval_results
    assert results is not None and results.teacher is not None and results.baseline is not None
    assert results.teacher["exactMatch"] >= 0.9
    assert results.fine_tuned["exactMatch"] >= 0.9 * results.teacher["exactMatch"]
    assert "- distillation: sequences from pvc" in (run_dir / "README.md").read_text()
