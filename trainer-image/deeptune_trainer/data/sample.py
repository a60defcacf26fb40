"""The normalized form of one training or evaluation row, whatever its source style."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True, slots=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class Sample:
    """A conversation whose last assistant turn is the target the model learns and is scored on (with
    `rejected`, a preference pair: the target is the chosen answer).

    Prompt/completion and instruction/input/output rows become a user turn and an assistant turn,
    so one formatting path (the tokenizer's chat template, or a plain fallback) serves every style.
    `line` is the row's 1-based line or record number in its source, for messages about it.
    Slotted, as a million of them are held at once (~200 bytes each with their messages, not ~450).
    """

    messages: tuple[Message, ...]
    line: int = 0
    label: str | None = None
    augmented_by: str | None = field(default=None, compare=False, hash=False)
    """The augmentation method that made this copy of a row; None for the dataset's own rows."""
    rejected: str | None = None
    """A preference pair's other answer to the same prompt, the one to move away from (the final
    assistant turn is the chosen one); None for a supervised row."""

    @property
    def prompt_messages(self) -> tuple[Message, ...]:
        """Everything before the final assistant turn."""
        return self.messages[:-1]

    @property
    def target(self) -> str:
        """The final assistant turn: what the loss and the generation metrics look at."""
        return self.messages[-1].content

    @property
    def is_document(self) -> bool:
        """A document (`style: text`, continued pre-training): one assistant turn and no prompt — nothing
        is given, every token is learned."""
        return not self.prompt_messages

    @property
    def texts(self) -> list[str]:
        """Every text of the row: its turns, then a pair's rejected answer."""
        turns = [message.content for message in self.messages]
        return turns if self.rejected is None else [*turns, self.rejected]

    @property
    def rejected_sample(self) -> Sample:
        """The pair's rejected side as a conversation of its own: the prompt and the rejected answer."""
        assert self.rejected is not None
        return replace(
            self, messages=(*self.prompt_messages, Message("assistant", self.rejected)), rejected=None
        )
