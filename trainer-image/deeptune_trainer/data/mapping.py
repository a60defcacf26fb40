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

Style = Literal["promptCompletion", "instruction", "chat"]

ROLES: frozenset[str] = frozenset(get_args(Role))
ROLE_ALIASES = {"human": "user", "gpt": "assistant"}
"""ShareGPT-style conversations (`from`/`value`, common in Chinese datasets) name roles this way."""

REQUIRED_FIELDS: dict[Style, tuple[str, ...]] = {
    "chat": ("messages",),
    "instruction": ("instruction", "output"),
    "promptCompletion": ("prompt", "completion"),
}
"""Mapping fields each style needs, in the order `auto` tries the styles."""

COLUMNS_LISTED = 20


class _RowError(ValueError):
    """A row-level defect: the row is skipped and reported, the run goes on."""


def columns_of(rows: list[RawRow]) -> list[str]:
    """Every column some row has, in first-seen order (JSON rows need not share their keys)."""
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row.values))
    return list(seen)


def _listing(columns: list[str]) -> str:
    shown = ", ".join(columns[:COLUMNS_LISTED])
    return shown + (f", ... ({len(columns)} in all)" if len(columns) > COLUMNS_LISTED else "")


def resolve_style(style: Literal["auto"] | Style, columns: list[str], fields: FieldMapping) -> Style:
    """The spec's style, or for `auto` the first style whose mapped columns all exist."""
    if style != "auto":
        return style
    present = set(columns)
    for candidate, needed in REQUIRED_FIELDS.items():
        if all(getattr(fields, name) in present for name in needed):
            return candidate
    raise TrainerInputError(
        "InvalidDataset",
        f"dataset.style: cannot tell the sample style from the columns ({_listing(columns)}); expected "
        f"'{fields.messages}' (chat), '{fields.instruction}' and '{fields.output}' (instruction), or "
        f"'{fields.prompt}' and '{fields.completion}' (promptCompletion); set dataset.style and "
        "dataset.fields to name your columns",
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
    if column not in row.values:
        raise _RowError(f"column '{column}' is missing")
    return _text(row.values[column], f"column '{column}'")


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
    if column not in row.values:
        raise _RowError(f"column '{column}' is missing")
    value = row.values[column]
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


def _instruction(row: RawRow, fields: FieldMapping) -> tuple[Message, ...]:
    instruction = _column(row, fields.instruction)
    extra = _column(row, fields.input) if row.values.get(fields.input) is not None else ""
    prompt = "\n\n".join(part for part in (instruction, extra) if part.strip())
    return Message("user", prompt), Message("assistant", _column(row, fields.output))


def _messages(row: RawRow, style: Style, fields: FieldMapping) -> tuple[Message, ...]:
    if style == "chat":
        return _chat(row, fields.messages)
    if style == "instruction":
        return _instruction(row, fields)
    return Message("user", _column(row, fields.prompt)), Message("assistant", _column(row, fields.completion))


def map_rows(loaded: LoadedRows, style: Style, fields: FieldMapping) -> tuple[list[Sample], list[BadRow]]:
    """Samples for the rows that fit the style, and bad-row records for those that do not. The rows
    are taken out of `loaded` as they are mapped (`drain`)."""
    samples: list[Sample] = []
    bad: list[BadRow] = []
    for row in drain(loaded.rows):
        try:
            messages = _messages(row, style, fields)
            label = row.values.get(fields.label)
            samples.append(
                Sample(
                    messages, row.line, None if label is None else _text(label, f"column '{fields.label}'")
                )
            )
        except _RowError as problem:
            bad.append(BadRow(loaded.source, row.line, str(problem), loaded.unit))
    return samples, bad
