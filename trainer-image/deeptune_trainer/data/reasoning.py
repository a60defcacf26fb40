"""Reasoning traces in answers (`<think>…</think>`, as DeepSeek-R1 and its distilled models write them):
kept as written, or stripped so the model learns the answers without them (`dataset.reasoningTraces`)."""

from __future__ import annotations

import re
from dataclasses import replace

from deeptune_trainer.data.sample import Message, Sample

THINK = re.compile(r"<think>.*?</think>\s*", re.DOTALL)


def strip_reasoning(sample: Sample) -> Sample:
    """The sample with every reasoning trace removed from its assistant turns."""
    messages = tuple(
        Message(m.role, THINK.sub("", m.content)) if m.role == "assistant" else m for m in sample.messages
    )
    rejected = None if sample.rejected is None else THINK.sub("", sample.rejected)
    return replace(sample, messages=messages, rejected=rejected)
