"""Field mapping: turning raw rows of any supported style into `Sample` conversations.

A column absent from every row is a spec mistake (wrong `fields` or `style`) and fails at once,
naming the columns that do exist; a value missing or malformed in some rows only makes those rows bad.
"""

from __future__ import annotations

import json
from typing import Any, Literal, cast, get_args

from deeptune.api.finetunejob import FieldMapping
from deeptune_trainer.data.rows import BadRow, LoadedRows, RawRow, drain
from deeptune_trainer.data.sample import Message, Role, Sample
from deeptune_trainer.errors import TrainerInputError

Style = Literal["promptCompletion", "instruction", "chat", "preference", "text"]

ROLES: frozenset[str] = frozenset(get_args(Role))
ROLE_ALIASES = {"human": "user", "gpt": "assistant"}
"""ShareGPT-style conversations (`from`/`value`, common in Chinese datasets) name roles this way."""

REQUIRED_FIELDS: dict[Style, tuple[str, ...]] = {
    "chat": ("messages",),
    "instruction": ("instruction", "output"),
    "promptCompletion": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
    "text": ("text",),
}
"""Mapping fields each style needs, in the order `auto` tries the supervised styles (a run with
`spec.preference` takes pairs only)."""

COLUMNS_LISTED = 20


class _RowError(ValueError):
    """A row-level defect: the row is skipped and reported, the run goes on."""


def columns_of(rows: list[RawRow]) -> list[str]:
    """Every column some row has, in first-seen order (JSON rows need not share their keys)."""
    seen: dict[str, None] = {}
    for columns in {id(row.columns): row.columns for row in rows}.values():  # rows share them
        seen.update(dict.fromkeys(columns))
    return list(seen)


def _listing(columns: list[str]) -> str:
    shown = ", ".join(columns[:COLUMNS_LISTED])
    return shown + (f", ... ({len(columns)} in all)" if len(columns) > COLUMNS_LISTED else "")


def _has_columns(style: Style, present: set[str], fields: FieldMapping) -> bool:
    return all(getattr(fields, name) in present for name in REQUIRED_FIELDS[style])


def resolve_style(
    style: Literal["auto"] | Style, columns: list[str], fields: FieldMapping, *, pairs: bool = False
) -> Style:
    """The spec's style, or for `auto` the first style whose mapped columns all exist: `preference`
    when the run tunes on pairs (`pairs`), else a supervised one."""
    if style != "auto":
        return style
    present = set(columns)
    if pairs:
        if _has_columns("preference", present, fields):
            return "preference"
        raise TrainerInputError(
            "InvalidDataset",
            f"spec.preference trains on pairs, but the rows have no '{fields.prompt}', '{fields.chosen}' and "
            f"'{fields.rejected}' columns (they have: {_listing(columns)}); set dataset.fields.prompt, "
            "chosen and rejected to name your columns",
        )
    for candidate in REQUIRED_FIELDS:
        if candidate != "preference" and _has_columns(candidate, present, fields):
            return candidate
    if _has_columns("preference", present, fields):
        raise TrainerInputError(
            "InvalidDataset",
            f"the rows are preference pairs ('{fields.prompt}', '{fields.chosen}', '{fields.rejected}'): set "
            "spec.preference (algorithm dpo or orpo) to tune on them",
        )
    raise TrainerInputError(
        "InvalidDataset",
        f"dataset.style: cannot tell the sample style from the columns ({_listing(columns)}); expected "
        f"'{fields.messages}' (chat), '{fields.instruction}' and '{fields.output}' (instruction), "
        f"'{fields.prompt}' and '{fields.completion}' (promptCompletion), or '{fields.text}' (text: "
        "documents); set dataset.style and dataset.fields to name your columns",
    )


def check_columns(style: Style, columns: list[str], fields: FieldMapping, where: str) -> None:
    """Fail on a mapped column that no row has, listing the ones that exist."""
    place = f" in {where}" if where.startswith("dataset.validation") else ""
    for name in REQUIRED_FIELDS[style]:
        column = getattr(fields, name)
        if column not in columns:
            raise TrainerInputError(
                "InvalidDataset",
                f"dataset.fields.{name}: column '{column}' not found{place}; "
                f"the rows have columns: {_listing(columns)}",
            )


def _text(value: Any, what: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if value is None:
        raise _RowError(f"{what} is empty (null)")
    raise _RowError(f"{what} holds {type(value).__name__}, expected text")


def _column(row: RawRow, column: str) -> str:
    if not row.has(column):
        raise _RowError(f"column '{column}' is missing")
    return _text(row.get(column), f"column '{column}'")


def _content(value: Any, what: str) -> str:
    # OpenAI-style content may be a list of parts; only text parts can be trained on.
    if isinstance(value, list):
        texts = []
        for part in value:
            if not (isinstance(part, dict) and part.get("type") == "text"):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise _RowError(f"{what} has a part of type {kind}; only text is supported")
            texts.append(_text(part.get("text"), what))
        return "".join(texts)
    return _text(value, what)


def _message(item: Any, number: int) -> Message:
    if not isinstance(item, dict):
        raise _RowError(f"message {number} is not an object with role and content")
    role = item.get("role", item.get("from"))
    role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
    if role not in ROLES:
        raise _RowError(f"message {number} has role {role!r}; expected system, user or assistant")
    content = _content(item.get("content", item.get("value")), f"message {number}'s content")
    return Message(cast(Role, role), content)


def _chat(row: RawRow, column: str) -> tuple[Message, ...]:
    if not row.has(column):
        raise _RowError(f"column '{column}' is missing")
    value = row.get(column)
    if isinstance(value, str):
        try:  # CSV cells hold the messages as JSON text.
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise _RowError(f"column '{column}' is not a JSON list of messages ({error.msg})") from None
    if not isinstance(value, list) or not value:
        raise _RowError(f"column '{column}' must be a non-empty list of {{role, content}} messages")
    messages = tuple(_message(item, number) for number, item in enumerate(value, start=1))
    if messages[-1].role != "assistant":
        raise _RowError(f"the last message must be from the assistant (it is from the {messages[-1].role})")
    if not any(message.role == "user" for message in messages):
        raise _RowError("the conversation has no user message")
    return messages


def _answer(row: RawRow, column: str) -> str:
    """A preference pair's answer: text, or a list of one assistant message (TRL's conversational form)."""
    if not row.has(column):
        raise _RowError(f"column '{column}' is missing")
    value = row.get(column)
    if not isinstance(value, list):
        return _text(value, f"column '{column}'")
    if len(value) != 1 or _message(value[0], 1).role != "assistant":
        raise _RowError(f"column '{column}' must be text or a list of one assistant message")
    return _message(value[0], 1).content


def _pair(row: RawRow, fields: FieldMapping) -> tuple[tuple[Message, ...], str]:
    """A preference row: the prompt (text, or messages ending with the user's) with the chosen answer
    as the final turn, and the rejected answer."""
    prompt = row.get(fields.prompt)
    if isinstance(prompt, list):
        messages = tuple(_message(item, number) for number, item in enumerate(prompt, start=1))
        if not messages or messages[-1].role != "user":
            raise _RowError(f"column '{fields.prompt}' must end with a user message")
    else:
        messages = (Message("user", _column(row, fields.prompt)),)
    chosen = _answer(row, fields.chosen)
    return (*messages, Message("assistant", chosen)), _answer(row, fields.rejected)


def _instruction(row: RawRow, fields: FieldMapping) -> tuple[Message, ...]:
    instruction = _column(row, fields.instruction)
    extra = _column(row, fields.input) if row.get(fields.input) is not None else ""
    prompt = "\n\n".join(part for part in (instruction, extra) if part.strip())
    return Message("user", prompt), Message("assistant", _column(row, fields.output))


def _messages(row: RawRow, style: Style, fields: FieldMapping) -> tuple[Message, ...]:
    if style == "chat":
        return _chat(row, fields.messages)
    if style == "instruction":
        return _instruction(row, fields)
    if style == "text":
        return (Message("assistant", _column(row, fields.text)),)
    return Message("user", _column(row, fields.prompt)), Message("assistant", _column(row, fields.completion))


def map_rows(loaded: LoadedRows, style: Style, fields: FieldMapping) -> tuple[list[Sample], list[BadRow]]:
    """Samples for the rows that fit the style, and bad-row records for those that do not. The rows
    are taken out of `loaded` as they are mapped (`drain`)."""
    samples: list[Sample] = []
    bad: list[BadRow] = []
    for row in drain(loaded.rows):
        try:
            messages, rejected = (
                _pair(row, fields) if style == "preference" else (_messages(row, style, fields), None)
            )
            label = row.get(fields.label)
            label_text = None if label is None else _text(label, f"column '{fields.label}'")
            samples.append(Sample(messages, row.line, label_text, rejected=rejected))
        except _RowError as problem:
            bad.append(BadRow(loaded.source, row.line, str(problem), loaded.unit))
    return samples, bad
