"""The whole data pipeline on realistic files: counts in the report, messages, and no leakage."""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import pytest

from deeptune.api.finetunejob import DatasetReport, DatasetSpec
from deeptune.api.trainer import TrainerPaths
from deeptune_trainer.data.pipeline import PreparedData, prepare_dataset
from deeptune_trainer.data.report import write_data_report
from deeptune_trainer.errors import TrainerInputError

SOURCE = {"pvc": {"claimName": "data", "path": "train.jsonl"}}


def _write_jsonl(path: Path, rows: list[Any]) -> Path:
    lines = [row if isinstance(row, str) else json.dumps(row, ensure_ascii=False) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _spec(**fields: Any) -> DatasetSpec:
    return DatasetSpec.model_validate({"source": SOURCE, **fields})


def _paths(tmp_path: Path, dataset: Path | None = None, validation: Path | None = None) -> TrainerPaths:
    return TrainerPaths(
        output_dir=str(tmp_path / "out"),
        dataset=str(dataset) if dataset else None,
        validation_dataset=str(validation) if validation else None,
    )


def _customer_service_rows() -> list[Any]:
    rows: list[Any] = [
        {"prompt": f"订单{n}号什么时候发货？", "completion": f"您好，订单{n}号预计明天发货，请耐心等待。"}
        for n in range(1, 19)
    ]
    rows += [
        {"prompt": "我的手机是13812345678，请回电", "completion": "好的，我们会尽快联系您。"},
        {
            "prompt": "订单1号什么时候发货？",
            "completion": "您好,订单1号预计明天发货,请耐心等待.",
        },  # dup after norm
        {"prompt": "Hi", "completion": "!!!"},  # degenerate
        {"prompt": "Is it free?", "completion": ""},  # too short
        "not json",  # malformed
    ]
    return rows


def test_end_to_end_counts(tmp_path: Path) -> None:
    data = _write_jsonl(tmp_path / "train.jsonl", _customer_service_rows())
    prepared = prepare_dataset(_spec(validation={"ratio": 0.1}), _paths(tmp_path, data), seed=42)
    assert prepared.style == "promptCompletion"
    assert prepared.report == DatasetReport(
        rows_read=23,
        bad_rows=1,
        rows_kept=19,
        duplicates_removed=1,
        filtered_by_length=1,
        degenerate_removed=1,
        pii_redacted=1,
        train_rows=17,
        validation_rows=2,
    )
    assert [row.describe() for row in prepared.bad_rows] == [
        "line 23: invalid JSON: Expecting value at column 1"
    ]
    redacted = [s for s in prepared.train + prepared.validation if "[PHONE]" in s.messages[0].content]
    assert [s.line for s in redacted] == [19]


@pytest.mark.parametrize("enabled", [True, False])
def test_the_cycle_collector_is_left_as_the_caller_had_it(tmp_path: Path, enabled: bool) -> None:
    # Reading and cleaning hold it off (rows hold no cycles); a failed read must restore it too.
    data = _write_jsonl(tmp_path / "train.jsonl", _customer_service_rows())
    empty = _write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "a", "completion": ""}])
    try:
        gc.enable() if enabled else gc.disable()
        prepare_dataset(_spec(), _paths(tmp_path, data), seed=5)
        assert gc.isenabled() is enabled
        with pytest.raises(TrainerInputError):
            prepare_dataset(_spec(), _paths(tmp_path, empty), seed=5)
        assert gc.isenabled() is enabled
    finally:
        gc.enable()


def test_split_is_reproducible_with_the_seed(tmp_path: Path) -> None:
    data = _write_jsonl(tmp_path / "train.jsonl", _customer_service_rows())
    first = prepare_dataset(_spec(), _paths(tmp_path, data), seed=5)
    again = prepare_dataset(_spec(), _paths(tmp_path, data), seed=5)
    assert [s.line for s in first.validation] == [s.line for s in again.validation]


def test_augmentation_touches_train_rows_only(tmp_path: Path) -> None:
    data = _write_jsonl(tmp_path / "train.jsonl", _customer_service_rows())
    spec = _spec(
        validation={"ratio": 0.2},
        augmentation={
            "fraction": 0.5,
            "synonyms": {"dictionary": {"发货": ["出货"]}},
            "instructionPerturbation": {},
        },
    )
    prepared = prepare_dataset(spec, _paths(tmp_path, data), seed=42)
    validation_lines = {s.line for s in prepared.validation}
    copies = [s for s in prepared.train if s.augmented_by is not None]
    assert len(copies) == prepared.report.augmented == 8  # round(0.5 × 15 train rows)
    assert prepared.report.train_rows == 15 + 8
    assert not validation_lines & {s.line for s in copies}
    assert all(s.augmented_by is None for s in prepared.validation)
    assert sum(prepared.augmented_by.values()) == 8


def test_separate_validation_source_loses_rows_that_repeat_train_rows(tmp_path: Path) -> None:
    data = _write_jsonl(
        tmp_path / "train.jsonl", [{"q": "一加一等于几？", "a": "二"}, {"q": "2+2?", "a": "4"}]
    )
    held = _write_jsonl(tmp_path / "valid.jsonl", [{"q": "2+2?", "a": "4"}, {"q": "3+3?", "a": "6"}])
    spec = _spec(
        fields={"prompt": "q", "completion": "a"},
        validation={"source": {"pvc": {"claimName": "data", "path": "valid.jsonl"}}},
    )
    prepared = prepare_dataset(spec, _paths(tmp_path, data, held), seed=1)
    assert [s.target for s in prepared.train] == ["二", "4"]
    assert [s.target for s in prepared.validation] == ["6"]
    assert (prepared.report.rows_read, prepared.report.duplicates_removed) == (4, 1)


def test_a_test_split_is_held_out_apart_from_the_validation_split(tmp_path: Path) -> None:
    rows = [{"prompt": f"问题{n}：一加{n}等于几？", "completion": f"答案是{n + 1}。"} for n in range(40)]
    data = _write_jsonl(tmp_path / "train.jsonl", rows)
    spec = _spec(validation={"ratio": 0.1}, test={"ratio": 0.2})
    prepared = prepare_dataset(spec, _paths(tmp_path, data), seed=3)
    train, validation, test = (
        {s.line for s in part} for part in (prepared.train, prepared.validation, prepared.test)
    )
    assert (len(train), len(validation), len(test)) == (29, 3, 8)
    assert not (train & validation or train & test or validation & test)
    assert (prepared.report.validation_rows, prepared.report.test_rows, prepared.report.rows_kept) == (
        3,
        8,
        40,
    )
    again = prepare_dataset(spec, _paths(tmp_path, data), seed=3)
    assert [s.line for s in again.test] == [s.line for s in prepared.test]
    without = prepare_dataset(_spec(validation={"ratio": 0.1}), _paths(tmp_path, data), seed=3)
    assert without.test == [] and len(without.validation) == 4


def test_a_test_source_left_empty_says_so(tmp_path: Path) -> None:
    data = _write_jsonl(
        tmp_path / "train.jsonl",
        [{"prompt": "2+2?", "completion": "4"}, {"prompt": "3+3?", "completion": "6"}],
    )
    spec = _spec(test={"source": {"inline": [{"prompt": "2+2?", "completion": "4"}]}})
    with pytest.raises(TrainerInputError) as raised:
        prepare_dataset(spec, _paths(tmp_path, data), seed=1)
    assert (
        raised.value.message == "dataset.test.source: no rows left after cleaning: 1 read, 1 exact duplicates"
    )


def test_reasoning_traces_are_kept_or_stripped_as_asked(tmp_path: Path) -> None:
    rows = [
        {"prompt": "2+2?", "completion": "<think>two plus two is four</think>\n4"},
        {"prompt": "3+3?", "completion": "6"},
    ]
    data = _write_jsonl(tmp_path / "train.jsonl", rows)
    kept = prepare_dataset(_spec(validation={"ratio": 0.5}), _paths(tmp_path, data), seed=1)
    stripped = prepare_dataset(
        _spec(validation={"ratio": 0.5}, reasoningTraces="strip"), _paths(tmp_path, data), seed=1
    )
    assert _targets(kept) == ["6", "<think>two plus two is four</think>\n4"]
    assert _targets(stripped) == ["4", "6"]


def _targets(prepared: PreparedData) -> list[str]:
    return sorted(sample.target for sample in prepared.train + prepared.validation)


def test_validation_source_left_empty_says_so(tmp_path: Path) -> None:
    data = _write_jsonl(tmp_path / "train.jsonl", [{"prompt": "2+2?", "completion": "4"}])
    held = _write_jsonl(tmp_path / "valid.jsonl", [{"prompt": "2+2?", "completion": "4"}])
    spec = _spec(validation={"source": {"configMap": {"name": "eval", "key": "valid.jsonl"}}})
    with pytest.raises(TrainerInputError) as raised:
        prepare_dataset(spec, _paths(tmp_path, data, held), seed=1)
    assert (
        raised.value.message
        == "dataset.validation.source: no rows left after cleaning: 1 read, 1 exact duplicates"
    )


def test_no_rows_left_names_what_removed_them(tmp_path: Path) -> None:
    rows = [{"prompt": f"q{n}", "completion": "ok"} for n in range(40)]
    rows += [{"prompt": f"笑一个{n}", "completion": "哈哈哈哈哈哈"} for n in range(80)]
    data = _write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(TrainerInputError) as raised:
        prepare_dataset(_spec(cleaning={"minChars": 5}), _paths(tmp_path, data), seed=1)
    assert raised.value.reason == "EmptyDataset"
    assert (
        raised.value.message
        == "no rows left after cleaning: 120 read, 40 too short (minChars=5), 80 degenerate"
    )


def test_no_rows_left_message_lists_every_rule(tmp_path: Path) -> None:
    rows = [{"prompt": "q", "completion": "ok"}] * 40 + [{"prompt": "q", "completion": "a@b.cn"}] * 80
    data = _write_jsonl(tmp_path / "train.jsonl", [*rows, "not json"])
    spec = _spec(cleaning={"minChars": 5, "pii": {"action": "drop"}}, maxBadRowRatio=0.1)
    with pytest.raises(TrainerInputError) as raised:
        prepare_dataset(spec, _paths(tmp_path, data), seed=1)
    assert raised.value.message == (
        "no rows left after cleaning: 121 read, 1 malformed, 40 too short (minChars=5), "
        "80 with personal data (pii.action=drop)"
    )


def test_too_many_bad_rows_fail_the_run(tmp_path: Path) -> None:
    rows: list[Any] = [{"prompt": f"q{n}", "completion": f"a{n}"} for n in range(8)]
    rows += ["{oops", {"prompt": "no completion"}]
    data = _write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(TrainerInputError) as raised:
        prepare_dataset(_spec(), _paths(tmp_path, data), seed=1)
    assert raised.value.message == (
        "dataset.source.pvc: 2 of 10 rows are malformed (20.0%), more than dataset.maxBadRowRatio allows "
        "(5.0%); first: line 9: invalid JSON: Expecting property name enclosed in double quotes at column 2; "
        "line 10: column 'completion' is missing. "
        "Fix these rows, or raise dataset.maxBadRowRatio to skip them."
    )
    prepared = prepare_dataset(_spec(maxBadRowRatio=0.2), _paths(tmp_path, data), seed=1)
    assert (prepared.report.rows_read, prepared.report.bad_rows) == (10, 2)


def test_wrong_field_mapping_names_field_and_columns(tmp_path: Path) -> None:
    data = _write_jsonl(tmp_path / "train.jsonl", [{"q": "1+1", "a": "2"}])
    spec = _spec(style="promptCompletion", fields={"prompt": "q", "completion": "answer"})
    with pytest.raises(TrainerInputError) as raised:
        prepare_dataset(spec, _paths(tmp_path, data), seed=1)
    assert (
        raised.value.message
        == "dataset.fields.completion: column 'answer' not found; the rows have columns: q, a"
    )


def test_a_parquet_file_with_other_columns_names_them(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow", exc_type=ImportError)
    pq = pytest.importorskip("pyarrow.parquet", exc_type=ImportError)
    data = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "1+1", "answer": "2", "id": 7}]), data)
    with pytest.raises(TrainerInputError) as raised:
        prepare_dataset(_spec(), _paths(tmp_path, data), seed=1)
    assert raised.value.reason == "InvalidDataset"
    assert raised.value.message.startswith(
        "dataset.style: cannot tell the sample style from the columns (question, answer, id); expected"
    )


def test_chat_style_is_detected_for_inline_rows(tmp_path: Path) -> None:
    conversation = [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "您好！有什么可以帮您？"},
    ]
    spec = DatasetSpec.model_validate({"source": {"inline": [{"messages": conversation}]}})
    prepared = prepare_dataset(spec, _paths(tmp_path), seed=1)
    assert prepared.style == "chat"
    assert (len(prepared.train), len(prepared.validation)) == (1, 0)
    assert prepared.train[0].target == "您好！有什么可以帮您？"


def test_dictionary_config_map_needs_its_file(tmp_path: Path) -> None:
    data = _write_jsonl(tmp_path / "train.jsonl", [{"prompt": "快速发货", "completion": "好的"}])
    spec = _spec(augmentation={"synonyms": {"dictionaryConfigMap": {"name": "syn", "key": "zh.json"}}})
    with pytest.raises(
        TrainerInputError, match=r"^dataset.augmentation.synonyms.dictionaryConfigMap: the Config"
    ):
        prepare_dataset(spec, _paths(tmp_path, data), seed=1)
    dictionary = tmp_path / "zh.json"
    dictionary.write_text('{"快速": ["迅速"]}', encoding="utf-8")
    prepared = prepare_dataset(
        spec, _paths(tmp_path, data).model_copy(update={"synonym_dictionary": str(dictionary)}), seed=1
    )
    assert [s.messages[0].content for s in prepared.train] == ["快速发货", "迅速发货"]


def test_packaged_thesauri_augment_and_the_embedding_check_reports_what_it_dropped(tmp_path: Path) -> None:
    """Cilin finds 发货 and 订单 in the prompts without a dictionary; its broad groups make some
    copies drift, which the embedding check drops and data_report.json counts."""
    data = _write_jsonl(tmp_path / "train.jsonl", _customer_service_rows())
    augmentation = {"fraction": 1.0, "synonyms": {"thesauri": ["cilin"]}}
    plain = prepare_dataset(_spec(augmentation=augmentation), _paths(tmp_path, data), seed=42)
    assert plain.augmented_by == {"synonyms": plain.report.augmented} and plain.report.augmented > 10
    checked = prepare_dataset(
        _spec(augmentation={**augmentation, "embeddingCheck": {"minSimilarity": 0.97}}),
        _paths(tmp_path, data),
        seed=42,
    )
    dropped = checked.meaning_drifted.get("synonyms", 0)
    assert dropped > 0 and checked.report.augmented + dropped == plain.report.augmented
    write_data_report(checked, tmp_path / "report.json")
    report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert report["embeddingCheckDropped"] == {"synonyms": dropped}


def test_data_report_file(tmp_path: Path) -> None:
    data = _write_jsonl(tmp_path / "train.jsonl", _customer_service_rows())
    prepared = prepare_dataset(_spec(), _paths(tmp_path, data), seed=42)
    path = tmp_path / "out" / "data_report.json"
    write_data_report(prepared, path)
    report = json.loads(path.read_text(encoding="utf-8"))
    assert report["summary"]["rowsRead"] == 23
    assert report["style"] == "promptCompletion"
    assert report["rules"] == {
        "tooShort": 1,
        "tooLong": 0,
        "degenerate": 1,
        "piiDropped": 0,
        "piiRedactedRows": 1,
        "exactDuplicates": 1,
        "nearDuplicates": 0,
        "nearDuplicateComparisons": report["rules"]["nearDuplicateComparisons"],
    }
    assert report["piiFound"] == {"phone": 1}
    assert report["badRows"] == [
        {
            "source": "dataset.source.pvc",
            "line": 23,
            "reason": "invalid JSON: Expecting value at column 1",
        }
    ]
