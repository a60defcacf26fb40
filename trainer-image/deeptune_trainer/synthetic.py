"""A learnable synthetic task for demos, tests and benchmarks (no dataset can be downloaded here).

The prompt lists four words, one of them a keyword; the answer is the keyword's fixed phrase
(English or Chinese). Held-out rows are new word lists, never training rows, so a model scores on
them only if it learned the rule (find the keyword, ignore the rest), not the rows.

`python -m deeptune_trainer.synthetic --rows 240 --out keywords.jsonl` writes a dataset file;
`--pairs` writes it as preference pairs (`keyword_pairs`).
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Collection, Sequence
from pathlib import Path

from deeptune_trainer.data.sample import Message, Sample

KEYWORD_ANSWERS = {"猫": "the cat sleeps", "dog": "狗在跑", "雨": "bring an umbrella", "sun": "天气很好"}
ROTATED_ANSWERS = {
    "the cat sleeps": "狗在跑",
    "狗在跑": "bring an umbrella",
    "bring an umbrella": "天气很好",
    "天气很好": "the cat sleeps",
}
"""A second task on the same prompts: each keyword answered with the next keyword's phrase (a second
adapter to tell apart from the first; validation rows that make eval loss rise once the first is learnt)."""
FILLER_WORDS = [
    "apple",
    "river",
    "山",
    "blue",
    "书",
    "green",
    "table",
    "花",
    "quick",
    "海",
    "stone",
    "月",
    "paper",
    "风",
    "music",
    "灯",
    "silver",
    "门",
    "happy",
    "桥",
]


def as_samples(rows: Sequence[dict[str, str]]) -> list[Sample]:
    """Prompt/completion rows (the keyword task's) as the data pipeline's Samples, numbered from 1."""
    return [
        Sample(messages=(Message("user", row["prompt"]), Message("assistant", row["completion"])), line=i + 1)
        for i, row in enumerate(rows)
    ]


def as_pairs(rows: Sequence[dict[str, str]]) -> list[Sample]:
    """Preference rows (`keyword_pairs`) as the data pipeline's Samples, numbered from 1."""
    return [
        Sample(
            (Message("user", row["prompt"]), Message("assistant", row["chosen"])),
            i + 1,
            rejected=row["rejected"],
        )
        for i, row in enumerate(rows)
    ]


def keyword_prompt(rng: random.Random, keywords: Sequence[str] = tuple(KEYWORD_ANSWERS)) -> tuple[str, str]:
    keyword = rng.choice(list(keywords))
    words = rng.sample(FILLER_WORDS, 3)
    words.insert(rng.randrange(4), keyword)
    return "topic: " + " ".join(words), KEYWORD_ANSWERS[keyword]


def keyword_rows(
    count: int, seed: int, exclude: Collection[str] = (), keywords: Sequence[str] = tuple(KEYWORD_ANSWERS)
) -> list[dict[str, str]]:
    """Distinct prompt/completion rows, none of whose prompts is in `exclude`, about `keywords` only
    (a site of a federated test knows some of the task, another site the rest)."""
    rng = random.Random(seed)
    rows: dict[str, str] = {}
    while len(rows) < count:
        prompt, answer = keyword_prompt(rng, keywords)
        if prompt not in exclude:
            rows[prompt] = answer
    return [{"prompt": prompt, "completion": answer} for prompt, answer in rows.items()]


def mostly_wrong(rows: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """Prompt/completion rows with two answers in three replaced by another keyword's phrase: data a
    student learns the wrong rule from, and a teacher that knows the right one can correct."""
    return [
        {**row, "completion": ROTATED_ANSWERS[row["completion"]]} if index % 3 else dict(row)
        for index, row in enumerate(rows)
    ]


def keyword_pairs(count: int, seed: int, exclude: Collection[str] = ()) -> list[dict[str, str]]:
    """The keyword task as preference pairs: the keyword's phrase chosen, the next keyword's rejected.
    Every phrase is chosen for one keyword and rejected for another, so only a model that reads the
    keyword ranks the pairs right; one that prefers some phrases over others is right on half."""
    return [
        {"prompt": row["prompt"], "chosen": row["completion"], "rejected": ROTATED_ANSWERS[row["completion"]]}
        for row in keyword_rows(count, seed, exclude)
    ]


def keyword_documents(count: int, seed: int, sentences: int = 40) -> list[dict[str, str]]:
    """Documents (`style: text`) of `sentences` keyword-task lines each, prompt then answer: long text
    with a rule to learn in it, for continued pre-training."""
    rng = random.Random(seed)
    return [
        {"text": "\n".join(" ".join(keyword_prompt(rng)) for _ in range(sentences))} for _ in range(count)
    ]


def tokenizer_texts(count: int = 200) -> list[str]:
    """Text to fit a tiny model's tokenizer to, so the task's words are in its vocabulary."""
    return [
        f"{prompt} {answer}" for prompt, answer in (keyword_prompt(random.Random(i)) for i in range(count))
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the keyword task as a jsonl dataset.")
    parser.add_argument("--rows", type=int, default=240)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--pairs", action="store_true", help="preference pairs (prompt, chosen, rejected)")
    args = parser.parse_args(argv)
    rows = (keyword_pairs if args.pairs else keyword_rows)(args.rows, args.seed)
    lines = (json.dumps(row, ensure_ascii=False) for row in rows)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.rows} rows to {args.out}")


if __name__ == "__main__":
    main()
