"""First-fit-decreasing packing: every token once, rows within max length, less padding than packing
greedily in order, the same rows for the same examples. That packed examples do not attend to each
other is shown on a real model in test_formatting.py."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from deeptune_trainer.formatting import (
    IGNORE_INDEX,
    Collator,
    Example,
    Feature,
    first_fit_decreasing,
    pack,
)


def _examples(lengths: list[int]) -> list[Example]:
    """Examples whose token ids are unique across all of them (so each token can be traced), with
    the loss on the second half of each."""
    examples, next_id = [], 0
    for length in lengths:
        ids = list(range(next_id, next_id + length))
        next_id += length
        prompt = length // 2
        examples.append(
            Example(input_ids=ids, labels=[IGNORE_INDEX] * prompt + ids[prompt:], truncated=False)
        )
    return examples


def _varied_lengths(count: int = 320, seed: int = 7) -> list[int]:
    """Like the benchmark's data: half short rows, half padded out with up to 100 filler tokens."""
    rng = random.Random(seed)
    return [rng.randint(18, 26) if rng.random() < 0.5 else rng.randint(25, 121) for _ in range(count)]


def _greedy_in_order(lengths: list[int], max_length: int) -> list[list[int]]:
    """The packing this replaced: a row closes as soon as the next example does not fit."""
    rows: list[list[int]] = []
    used = max_length
    for index, length in enumerate(lengths):
        if used + length > max_length:
            rows.append([])
            used = 0
        rows[-1].append(index)
        used += length
    return rows


def _naive_first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """The textbook O(n²) version, to check the segment tree against."""
    bins: list[list[int]] = []
    used: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        slot = next((s for s, u in enumerate(used) if u + lengths[index] <= capacity), len(bins))
        if slot == len(bins):
            bins.append([])
            used.append(0)
        bins[slot].append(index)
        used[slot] += lengths[index]
    return bins


def test_first_fit_decreasing_on_a_small_case() -> None:
    # In order: [50] | [90, 40] | [80] (three rows). Longest first: 90, then 80 (no room beside 90),
    # 50 beside 80, 40 beside 90: two full rows.
    assert first_fit_decreasing([50, 90, 40, 80], 130) == [[1, 2], [3, 0]]
    assert _greedy_in_order([50, 90, 40, 80], 130) == [[0], [1, 2], [3]]


@pytest.mark.parametrize("seed", range(5))
def test_first_fit_decreasing_matches_the_textbook_algorithm(seed: int) -> None:
    rng = random.Random(seed)
    lengths = [rng.randint(1, 64) for _ in range(rng.randint(1, 500))]
    assert first_fit_decreasing(lengths, 64) == _naive_first_fit_decreasing(lengths, 64)


def test_first_fit_decreasing_edge_cases() -> None:
    assert first_fit_decreasing([], 8) == []
    assert first_fit_decreasing([8], 8) == [[0]]
    assert first_fit_decreasing([3, 3, 3], 8) == [[0, 1], [2]]  # equal lengths: index order
    with pytest.raises(ValueError, match="longer than the capacity 8"):
        first_fit_decreasing([4, 9], 8)


def test_every_token_is_kept_exactly_once_with_its_labels_and_positions() -> None:
    examples = _examples(_varied_lengths())
    rows = pack(examples, max_length=128)
    packed = Counter(token for row in rows for token in row["input_ids"])
    assert packed == Counter(token for example in examples for token in example.input_ids)
    assert max(packed.values()) == 1
    # Each example sits whole in one row, where its positions start at 0 and its labels are its own
    # but for the first, which is masked: the token before it belongs to another example.
    by_first_token = {example.input_ids[0]: example for example in examples}
    found = 0
    for row in rows:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"])
        starts = [i for i, position in enumerate(row["position_ids"]) if position == 0]
        for start, end in zip(starts, [*starts[1:], len(row["input_ids"])], strict=True):
            example = by_first_token[row["input_ids"][start]]
            assert row["input_ids"][start:end] == example.input_ids
            assert row["position_ids"][start:end] == list(range(len(example.input_ids)))
            assert row["labels"][start:end] == [IGNORE_INDEX, *example.labels[1:]]
            found += 1
    assert found == len(examples)


@pytest.mark.parametrize("max_length", [32, 121, 128, 512])
def test_no_row_exceeds_max_length(max_length: int) -> None:
    lengths = [min(length, max_length) for length in _varied_lengths()]
    rows = pack(_examples(lengths), max_length)
    assert max(len(row["input_ids"]) for row in rows) <= max_length
    assert sum(len(row["input_ids"]) for row in rows) == sum(lengths)


def _batched_waste(rows: list[Feature], batch_size: int = 16) -> float:
    """Padding waste as training sees it: batches of rows, each padded to its longest row."""
    collate = Collator(pad_token_id=0)
    for start in range(0, len(rows), batch_size):
        collate(rows[start : start + batch_size])
    return collate.padding_waste


def test_less_padding_than_greedy_in_order() -> None:
    lengths = _varied_lengths()
    examples = _examples(lengths)
    ffd_rows = pack(examples, max_length=128)
    greedy_rows = [
        {
            "input_ids": [token for i in row for token in examples[i].input_ids],
            "labels": [label for i in row for label in [IGNORE_INDEX, *examples[i].labels[1:]]],
            "position_ids": [position for i in row for position in range(lengths[i])],
        }
        for row in _greedy_in_order(lengths, max_length=128)
    ]
    # Every row padded to max length (the static count in bench/trainer.py).
    ffd_waste = 1 - sum(lengths) / (len(ffd_rows) * 128)
    greedy_waste = 1 - sum(lengths) / (len(greedy_rows) * 128)
    assert ffd_waste <= greedy_waste
    assert ffd_waste < 0.06 and greedy_waste > 0.2  # on this data
    assert _batched_waste(ffd_rows) <= _batched_waste(greedy_rows)


def test_rows_are_deterministic() -> None:
    examples = _examples(_varied_lengths())
    first = pack(examples, max_length=128)
    assert pack(examples, max_length=128) == first
    assert pack(list(examples), max_length=128) == first
    # Longest first, equal lengths in dataset order: the first row starts with the first of the
    # longest examples.
    longest = max(len(example.input_ids) for example in examples)
    first_longest = next(example for example in examples if len(example.input_ids) == longest)
    assert first[0]["input_ids"][:longest] == first_longest.input_ids
