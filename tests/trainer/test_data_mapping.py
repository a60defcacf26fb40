"""Field mapping: each style to `Sample`, `auto` style detection, and the messages for wrong columns."""

from __future__ import annotations

from typing import Any

import pytest

from deeptune.api.finetunejob import FieldMapping
from deeptune_trainer.data.mapping import check_columns, columns_of, map_rows, resolve_style
from deeptune_trainer.data.rows import BadRow, LoadedRows, RawRow
from deeptune_trainer.data.sample import Message, Sample
from deeptune_trainer.errors import TrainerInputError

FIELDS = FieldMapping()


def _loaded(*rows: dict[str, Any]) -> LoadedRows:
    return LoadedRows("dataset.source.pvc", "line", [RawRow.of(n, row) for n, row in enumerate(rows, 1)])


def _conversation(*turns: tuple[str, str]) -> tuple[Message, ...]:
    return tuple(Message(role, content) for role, content in turns)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("columns", "style"),
    [
        (["messages", "prompt", "completion"], "chat"),
        (["instruction", "input", "output"], "instruction"),
        (["instruction", "output"], "instruction"),
        (["prompt", "completion", "label"], "promptCompletion"),
    ],
)
def test_auto_style_is_told_by_the_columns(columns: list[str], style: str) -> None:
    assert resolve_style("auto", columns, FIELDS) == style


def test_auto_style_follows_the_field_mapping() -> None:
    fields = FieldMapping(prompt="q", completion="a")
    assert resolve_style("auto", ["q", "a"], fields) == "promptCompletion"
    assert resolve_style("chat", ["q", "a"], fields) == "chat"


def test_auto_style_failure_lists_columns_and_what_was_expected() -> None:
    with pytest.raises(TrainerInputError) as raised:
        resolve_style("auto", ["q", "a"], FIELDS)
    assert raised.value.message == (
        "dataset.style: cannot tell the sample style from the columns (q, a); expected 'messages' (chat), "
        "'instruction' and 'output' (instruction), 'prompt' and 'completion' (promptCompletion), or 'text' "
        "(text: documents); set dataset.style and dataset.fields to name your columns"
    )


def test_missing_column_names_the_field_and_lists_the_columns() -> None:
    fields = FieldMapping(prompt="q", completion="answer")
    with pytest.raises(TrainerInputError) as raised:
        check_columns("promptCompletion", ["q", "a"], fields, "dataset.source.pvc")
    assert raised.value.reason == "InvalidDataset"
    assert (
        raised.value.message
        == "dataset.fields.completion: column 'answer' not found; the rows have columns: q, a"
    )
    with pytest.raises(TrainerInputError) as raised:
        check_columns("promptCompletion", ["q", "a"], fields, "dataset.validation.source.url")
    assert raised.value.message == (
        "dataset.fields.completion: column 'answer' not found in dataset.validation.source.url; "
        "the rows have columns: q, a"
    )


def test_columns_are_the_union_in_first_seen_order() -> None:
    assert columns_of(_loaded({"b": 1, "a": 2}, {"c": 3, "a": 4}).rows) == ["b", "a", "c"]


def test_prompt_completion_rows_become_a_user_and_an_assistant_turn() -> None:
    samples, bad = map_rows(
        _loaded({"prompt": "1+1=?", "completion": 2, "label": "math"}, {"prompt": "你好"}),
        "promptCompletion",
        FIELDS,
    )
    assert samples == [Sample(_conversation(("user", "1+1=?"), ("assistant", "2")), line=1, label="math")]
    assert bad == [BadRow("dataset.source.pvc", 2, "column 'completion' is missing")]


def test_instruction_rows_join_instruction_and_input() -> None:
    samples, bad = map_rows(
        _loaded(
            {"instruction": "翻译成英文", "input": "你好", "output": "Hello"},
            {"instruction": "Say hi", "input": "", "output": "Hi"},
            {"instruction": "Say hi", "output": "Hi"},
            {"instruction": "Say hi", "output": None},
        ),
        "instruction",
        FIELDS,
    )
    assert [sample.messages for sample in samples] == [
        _conversation(("user", "翻译成英文\n\n你好"), ("assistant", "Hello")),
        _conversation(("user", "Say hi"), ("assistant", "Hi")),
        _conversation(("user", "Say hi"), ("assistant", "Hi")),
    ]
    assert [row.describe() for row in bad] == ["line 4: column 'output' is empty (null)"]


def test_chat_rows_openai_sharegpt_and_json_text() -> None:
    openai = [
        {"role": "system", "content": "你是客服。"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "我的订单"}, {"type": "text", "text": "到哪了？"}],
        },
        {"role": "assistant", "content": "已发货。"},
    ]
    sharegpt = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]
    csv_cell = '[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]'
    samples, bad = map_rows(
        _loaded({"messages": openai}, {"messages": sharegpt}, {"messages": csv_cell}), "chat", FIELDS
    )
    assert not bad
    assert [sample.messages for sample in samples] == [
        _conversation(("system", "你是客服。"), ("user", "我的订单到哪了？"), ("assistant", "已发货。")),
        _conversation(("user", "hi"), ("assistant", "hello")),
        _conversation(("user", "q"), ("assistant", "a")),
    ]
    assert samples[0].target == "已发货。"


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        (
            [{"role": "user", "content": "q"}],
            "the last message must be from the assistant (it is from the user)",
        ),
        ([{"role": "assistant", "content": "a"}], "the conversation has no user message"),
        ([{"role": "tool", "content": "x"}], "message 1 has role 'tool'; expected system, user or assistant"),
        ([], "column 'messages' must be a non-empty list of {role, content} messages"),
        (
            "[{",
            "column 'messages' is not a JSON list of messages "
            "(Expecting property name enclosed in double quotes)",
        ),
        (
            [{"role": "user", "content": [{"type": "image_url"}]}, {"role": "assistant", "content": "a"}],
            "message 1's content has a part of type image_url; only text is supported",
        ),
        ([{"role": "user", "content": None}], "message 1's content is empty (null)"),
        (["hi"], "message 1 is not an object with role and content"),
    ],
)
def test_malformed_chat_rows_are_bad_rows(messages: Any, reason: str) -> None:
    samples, bad = map_rows(_loaded({"messages": messages}), "chat", FIELDS)
    assert samples == []
    assert [row.reason for row in bad] == [reason]


def test_nested_values_are_not_text() -> None:
    _, bad = map_rows(_loaded({"prompt": {"a": 1}, "completion": "x"}), "promptCompletion", FIELDS)
    assert [row.reason for row in bad] == ["column 'prompt' holds dict, expected text"]
