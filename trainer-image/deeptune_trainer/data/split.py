"""Holding out validation rows: by ratio with a seed, so a rerun holds out the same rows."""

from __future__ import annotations

import random

from deeptune_trainer.data.sample import Sample


def split_by_ratio(samples: list[Sample], ratio: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(train, validation), both in source order. At least one row is held out whenever there are two
    or more, so evaluation always has something to score, and at least one is left to train on."""
    if ratio <= 0 or len(samples) < 2:
        return list(samples), []
    count = min(len(samples) - 1, max(1, round(len(samples) * ratio)))
    held_out = set(random.Random(seed).sample(range(len(samples)), count))
    train = [sample for index, sample in enumerate(samples) if index not in held_out]
    validation = [sample for index, sample in enumerate(samples) if index in held_out]
    return train, validation
