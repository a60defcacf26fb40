"""Pictures of a run, for people: the loss curve (`loss.png`) and the base model's scores beside the
fine-tuned model's (`eval.png`), in the output directory and linked from the model card.

The loss curve is written at every checkpoint too, so a run that fails later still has its curve.
matplotlib's object-oriented API on the Agg canvas: files only, no display, no pyplot state.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from deeptune.api.finetunejob import EvalResults

LOSS_PNG = "loss.png"
SCORES_PNG = "eval.png"

Point = tuple[int, float]


@dataclass(frozen=True)
class LossCurve:
    """The losses the Trainer logged, by step."""

    train: list[Point]
    eval: list[Point]
    best_step: int | None = None
    """With early stopping: the step whose weights were exported."""


def loss_curve(history: Sequence[Mapping[str, Any]], best_step: int | None = None) -> LossCurve:
    """The train and eval losses of a Trainer's `log_history` (one entry per log or evaluation)."""

    def points(key: str) -> list[Point]:
        return [
            (int(entry["step"]), float(entry[key])) for entry in history if key in entry and "step" in entry
        ]

    return LossCurve(points("loss"), points("eval_loss"), best_step)


def loss_figure(curve: LossCurve) -> Figure:
    figure = Figure(figsize=(7, 4), dpi=100)
    axes = figure.add_subplot()
    for label, line, style in (("train", curve.train, "-"), ("validation", curve.eval, "o-")):
        if line:
            axes.plot(*zip(*line, strict=True), style, label=f"{label} loss")
    if curve.best_step is not None:
        axes.axvline(
            curve.best_step, color="grey", linestyle="--", label=f"best checkpoint (step {curve.best_step})"
        )
    axes.set(xlabel="step", ylabel="loss", title="Training and validation loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return figure


def scores_figure(results: EvalResults) -> Figure | None:
    """Bars of each metric, base model beside fine-tuned; None without base-model scores."""
    baseline = results.baseline or {}
    metrics = [name for name in results.fine_tuned if name in baseline]
    if not metrics:
        return None
    figure = Figure(figsize=(2 + 1.6 * len(metrics), 4), dpi=100)
    for index, name in enumerate(metrics):
        axes = figure.add_subplot(1, len(metrics), index + 1)
        bars = axes.bar(
            ["base", "fine-tuned"], [baseline[name], results.fine_tuned[name]], color=["#999", "#2a7"]
        )
        axes.bar_label(bars, fmt="%.3g")
        axes.set_title(name + (" (lower is better)" if name == "perplexity" else ""), fontsize=9)
    figure.suptitle(f"Base model against fine-tuned, {results.split or 'validation'} split")
    figure.tight_layout()
    return figure


def save_png(figure: Figure, path: Path) -> None:
    """Written whole or not at all: a reader never sees half a PNG."""
    tmp = path.with_name(f".{path.name}.tmp")
    FigureCanvasAgg(figure).print_png(tmp)
    os.replace(tmp, path)


def write_plots(
    history: Sequence[Mapping[str, Any]], best_step: int | None, results: EvalResults, directory: Path
) -> list[str]:
    """The run's pictures in `directory`; the names of those written (no losses, no baseline: none)."""
    written = []
    curve = loss_curve(history, best_step)
    if curve.train or curve.eval:
        save_png(loss_figure(curve), directory / LOSS_PNG)
        written.append(LOSS_PNG)
    if (figure := scores_figure(results)) is not None:
        save_png(figure, directory / SCORES_PNG)
        written.append(SCORES_PNG)
    return written


class LossPlotter(TrainerCallback):
    """Redraws loss.png at each checkpoint, on the main process."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        if state.is_world_process_zero:
            curve = loss_curve(state.log_history)
            if curve.train or curve.eval:
                save_png(loss_figure(curve), self.directory / LOSS_PNG)
