"""Instruction perturbation: the same question asked another way, so the answer stops hinging on one
phrasing.

Three independent changes to the user turn, each optional:
- reword: the question framed by an opening and a closing phrase in the row's language, each drawn
  from a pool (one of them may be empty), joined by a space or a line break: 9 × 7 openings and
  closings × 2 joins give over a hundred framings per language, not a handful of fixed templates; or
  the user's own `templates` (each with `{text}`), for the phrasings their users really write;
- insert context: an irrelevant sentence before or after the question;
- typos: a share of the Latin-script words (four letters or more) get one slip of the keyboard (two
  neighbouring letters swapped, one dropped, one doubled), as people type.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from deeptune_trainer.data.script import is_chinese

TEXT = "{text}"
OPENINGS = {
    "zh": ("", "请回答下面的问题：", "问题：", "我想请教一下：", "麻烦帮我看看：", "请问：", "有个问题：",
           "帮我回答一下：", "任务："),
    "en": ("", "Please answer the following:", "Question:", "I'd like to ask:", "Could you help with this?",
           "Quick question:", "Here is what I need:", "Answer this, please:", "Task:"),
}  # fmt: skip
CLOSINGS = {
    "zh": ("", "请给出你的回答。", "谢谢！", "请简短回答。", "答案是什么？", "只回答答案即可。", "麻烦了。"),
    "en": ("", "Please give your answer.", "Thanks!", "Keep it short.", "What is the answer?",
           "Reply with the answer only.", "Much appreciated."),
}  # fmt: skip
CONTEXT = {
    "zh": ("顺便说一句，今天天气不错。", "我刚喝完一杯咖啡。", "这个问题是我在整理笔记时想到的。"),
    "en": ("By the way, the weather is nice today.", "I just finished a cup of coffee.",
           "This came up while I was tidying my notes."),
}  # fmt: skip
TYPO_WORD = re.compile(r"\b[A-Za-z]{4,}\b")


def framings(language: str) -> list[str]:
    """Every built-in framing of a language, as templates with `{text}`."""
    return [
        join.join(part for part in (opening, TEXT, closing) if part)
        for opening in OPENINGS[language]
        for closing in CLOSINGS[language]
        if opening or closing
        for join in (" ", "\n")
    ]


def typo(word: str, rng: random.Random) -> str:
    """One slip inside the word (its first and last letters stay, as in most real typos)."""
    at = rng.randrange(1, len(word) - 2)
    kind = rng.randrange(3)
    if kind == 0:
        return word[:at] + word[at + 1] + word[at] + word[at + 2 :]
    if kind == 1:
        return word[:at] + word[at + 1 :]
    return word[:at] + word[at] + word[at:]


class InstructionPerturber:
    """Rewords, adds context to and misspells a user turn as configured; one call, one variant."""

    def __init__(
        self,
        *,
        reword: bool,
        insert_context: bool,
        templates: Sequence[str] = (),
        typos: float = 0.0,
    ) -> None:
        self.reword, self.insert_context, self.typos = reword, insert_context, typos
        self.templates = {language: list(templates) or framings(language) for language in OPENINGS}

    def __call__(self, text: str, rng: random.Random) -> str:
        language = "zh" if is_chinese(text) else "en"
        if self.typos:
            text = TYPO_WORD.sub(lambda m: typo(m[0], rng) if rng.random() < self.typos else m[0], text)
        if self.reword:
            # str.replace, not format(): user text may contain braces.
            text = rng.choice(self.templates[language]).replace(TEXT, text)
        if self.insert_context:
            sentence = rng.choice(CONTEXT[language])
            text = f"{sentence}\n{text}" if rng.random() < 0.5 else f"{text}\n{sentence}"
        return text
