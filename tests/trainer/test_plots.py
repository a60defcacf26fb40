"""The run's pictures (deeptune_trainer.plots): the points drawn are the losses the Trainer logged and
the scores evaluation gave, the files are whole PNGs, and a checkpoint redraws the curve."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from transformers import TrainerControl, TrainerState, TrainingArguments

from deeptune.api.finetunejob import EvalResults
from deeptune_trainer.plots import (
    LOSS_PNG,
    SCORES_PNG,
    LossPlotter,
    loss_curve,
    loss_figure,
    scores_figure,
    write_plots,
)

HISTORY = [
    {"loss": 4.1, "learning_rate": 1e-4, "epoch": 0.1, "step": 10},
    {"eval_loss": 3.9, "epoch": 0.1, "step": 10},
    {"loss": 2.2, "learning_rate": 1e-4, "epoch": 0.2, "step": 20},
    {"eval_loss": 2.5, "epoch": 0.2, "step": 20},
    {"loss": 1.7, "learning_rate": 1e-4, "epoch": 0.3, "step": 30},
    {"eval_loss": 2.8, "epoch": 0.3, "step": 30},
    {"train_runtime": 12.0, "train_loss": 2.6, "epoch": 0.3, "step": 30},  # the Trainer's summary entry
]
RESULTS = EvalResults(
    fine_tuned={"exactMatch": 0.9, "perplexity": 3.1, "bleu": 41.0},
    baseline={"exactMatch": 0.1, "perplexity": 80.0},
    split="test",
)


def test_the_curve_is_the_logged_losses_by_step() -> None:
    curve = loss_curve(HISTORY, best_step=20)
    assert curve.train == [(10, 4.1), (20, 2.2), (30, 1.7)]
    assert curve.eval == [(10, 3.9), (20, 2.5), (30, 2.8)]
    figure = loss_figure(curve)
    (axes,) = figure.axes
    train, evaluation, best = axes.get_lines()
    assert [tuple(point) for point in train.get_xydata()] == curve.train
    assert [tuple(point) for point in evaluation.get_xydata()] == curve.eval
    assert list(best.get_xdata()) == [20, 20]  # the exported checkpoint, marked
    assert axes.get_legend() is not None


def test_the_scores_chart_puts_each_base_score_beside_the_fine_tuned_one() -> None:
    figure = scores_figure(RESULTS)
    assert figure is not None
    heights = {axes.get_title(): [bar.get_height() for bar in axes.patches] for axes in figure.axes}
    assert heights == {"exactMatch": [0.1, 0.9], "perplexity (lower is better)": [80.0, 3.1]}  # bleu: no base
    assert scores_figure(EvalResults(fine_tuned={"exactMatch": 0.9})) is None


def test_the_pictures_are_whole_pngs(tmp_path: Path) -> None:
    assert write_plots(HISTORY, 20, RESULTS, tmp_path) == [LOSS_PNG, SCORES_PNG]
    with Image.open(tmp_path / LOSS_PNG) as image:
        assert (image.format, image.size) == ("PNG", (700, 400))
    assert sorted(p.name for p in tmp_path.iterdir()) == [SCORES_PNG, LOSS_PNG]  # no temporary left
    assert (
        write_plots([], None, EvalResults(), tmp_path / "missing") == []
    )  # nothing to draw: nothing written


@pytest.mark.parametrize("main", [True, False])
def test_each_checkpoint_redraws_the_curve_on_the_main_process(tmp_path: Path, main: bool) -> None:
    state = TrainerState(log_history=HISTORY[:2], is_world_process_zero=main)
    LossPlotter(tmp_path).on_save(
        TrainingArguments(str(tmp_path / "ckpt"), report_to=[]), state, TrainerControl()
    )
    assert (tmp_path / LOSS_PNG).exists() == main
