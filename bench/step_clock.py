"""The benchmarks' clock for a Hugging Face Trainer: wall time, CPU time and real tokens at the end of
every optimizer step, and the record a worker process writes from it (with the malloc it ran on).
Needs transformers and the trainer's stdlib-only allocator probe, so the TRL worker uses it too."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from rss import peak_rss_bytes
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from deeptune_trainer.allocator import malloc_in_use


@dataclass(frozen=True)
class Tick:
    wall: float
    cpu: float
    tokens: int


class StepClock(TrainerCallback):
    """Wall time, process CPU time and real tokens seen at the end of every optimizer step."""

    def __init__(self) -> None:
        self.ticks: list[Tick] = []

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        self.ticks.append(Tick(time.perf_counter(), time.process_time(), state.num_input_tokens_seen))

    def window(self, warmup: int) -> tuple[float, float, int]:
        """Wall seconds, CPU seconds and real tokens of the steps after the first `warmup`."""
        start, end = self.ticks[warmup - 1], self.ticks[-1]
        return end.wall - start.wall, end.cpu - start.cpu, end.tokens - start.tokens


def worker_record(
    clock: StepClock, warmup: int, history: list[dict[str, float]], rss_before_load: int, library: str
) -> dict[str, Any]:
    """What one benchmark worker measured: the timed window, its peak RSS and its last loss."""
    seconds, cpu_seconds, tokens = clock.window(warmup)
    losses = [entry["loss"] for entry in history if "loss" in entry]
    return {
        "library": library,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "real_tokens": tokens,
        "peak_rss_bytes": peak_rss_bytes(),
        "rss_before_load_bytes": rss_before_load,
        "final_loss": losses[-1] if losses else None,
        "allocator": malloc_in_use(),
    }
