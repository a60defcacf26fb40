"""Instruction perturbation: reword the user turn with templates, insert an irrelevant sentence.

Both teach the model that the answer does not hinge on the exact phrasing or on noise around the
question. Templates are in the row's language, so a Chinese row stays Chinese.
"""

from __future__ import annotations

import random

from deeptune_trainer.data.script import is_chinese

REWORD = {
    "zh": ("请回答下面的问题：\n{text}", "{text}\n请给出你的回答。", "问题：{text}", "我想请教一下：{text}"),
    "en": ("Please answer the following:\n{text}", "{text}\nPlease give your answer.", "Question: {text}",
           "I'd like to ask: {text}"),
}  # fmt: skip
CONTEXT = {
    "zh": ("顺便说一句，今天天气不错。", "我刚喝完一杯咖啡。", "这个问题是我在整理笔记时想到的。"),
    "en": ("By the way, the weather is nice today.", "I just finished a cup of coffee.",
           "This came up while I was tidying my notes."),
}  # fmt: skip


class InstructionPerturber:
    def __init__(self, reword: bool, insert_context: bool) -> None:
        self.reword = reword
        self.insert_context = insert_context

    def __call__(self, text: str, rng: random.Random) -> str:
        language = "zh" if is_chinese(text) else "en"
        if self.reword:
            # str.replace, not format(): user text may contain braces.
            text = rng.choice(REWORD[language]).replace("{text}", text)
        if self.insert_context:
            sentence = rng.choice(CONTEXT[language])
            text = f"{sentence}\n{text}" if rng.random() < 0.5 else f"{text}\n{sentence}"
        return text
