"""Training progress from the trainer's Prometheus exposition, as `status.progress` shows it."""

from __future__ import annotations

import math

from prometheus_client.parser import text_string_to_metric_families

from deeptune.api.finetunejob import Progress
from deeptune.api.trainer import MetricNames


def format_duration(seconds: float) -> str:
    """A short human duration, `2h5m`, `4m10s`, `9s`: what a person reads in `kubectl get`."""
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def _samples(text: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("deeptune_trainer_") and math.isfinite(sample.value):
                values[sample.name] = sample.value
    return values


def parse_progress(text: str, now: str) -> Progress | None:
    """Progress from a metrics page; None when the trainer has not reported a step yet."""
    values = _samples(text)
    step = values.get(MetricNames.STEP)
    if step is None:
        return None
    total = values.get(MetricNames.TOTAL_STEPS)
    eta = values.get(MetricNames.ETA_SECONDS)
    return Progress(
        step=int(step),
        total_steps=int(total) if total else None,
        epoch=_rounded(values.get(MetricNames.EPOCH), 3),
        percent=min(100, int(100 * step / total)) if total else None,
        eta=format_duration(eta) if eta is not None else None,
        train_loss=_rounded(values.get(MetricNames.TRAIN_LOSS), 4),
        eval_loss=_rounded(values.get(MetricNames.EVAL_LOSS), 4),
        learning_rate=values.get(MetricNames.LEARNING_RATE),
        tokens_per_second=_rounded(values.get(MetricNames.TOKENS_PER_SECOND), 1),
        last_update_time=now,
    )


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
