"""Benchmark: our trainer against a plain transformers Trainer + peft LoRA script, same model and data.

Why: DeepTune's trainer claims things a plain script does not do: it takes the loss on the
completion only, and runs the LM head and cross-entropy only there (transformers' boolean
`logits_to_keep`); with `packing: true` it packs rows padding-free (first-fit decreasing; position
ids restart per example, no attention across examples), so a batch holds real tokens instead of
padding. Padding only matters when row lengths vary, so the data here varies a lot: the keyword
task (`deeptune_trainer.synthetic`), half of whose prompts get 5 to 100 extra filler words (about 20
to 125 tokens a row, max length 128).

What runs, on CPU, one configuration after the other in this process (fresh model each time):

- `plain`: bench/plain_hf_baseline.py, the docs-style script (one string a row,
  `DataCollatorForLanguageModeling(mlm=False)`, `get_peft_model`, `Trainer`);
- `ours`: `deeptune_trainer.training.train` with the equivalent FineTuneJobSpec, `packing: false`;
- `ours+packing`: the same with `packing: true`.

All three get the same model weights, rows, LoRA (r, alpha, the seven Llama projections), batch size,
steps, learning rate, schedule, weight decay and seed; gradient checkpointing is off in all three (our
default turns it on to save memory, which costs compute). Per configuration it measures, after a few
warm-up steps that are not counted (model loading and tokenization are not counted either):

- wall seconds for the timed optimizer steps;
- tokens/s counting only real (non-pad) tokens: the Trainer's own `num_input_tokens_seen` in its
  `non_padding` mode, for all three;
- padding waste: pad tokens / all tokens of the collated batches;
- which tokens carry the loss and get logits (all of them in `plain`, the completion only in ours);
- the process's CPU seconds over the same window: a share well below 1 means other processes took
  the core, and the figures of that run are noisy.

torch runs on ONE thread (`torch.set_num_threads(1)`): the models are small, and on a shared 2-core
machine OpenMP threads spinning against other processes make steps many times slower and the
figures meaningless. Check `uptime` first; the load average is recorded with the results.

    python bench/trainer.py                  # tiny and small Llama models, 3 rounds: 3-7 minutes
    python bench/trainer.py --sizes tiny     # one size
    python bench/trainer.py --smoke          # a few steps of the tiny model: what CI runs

Prints a table and writes JSON to bench/results/trainer-<host>.json (trainer-smoke.json for --smoke).
With several rounds (the three configurations interleaved) the table shows, per configuration, the
round with the median tokens/s, and each `vs plain` is the median over rounds of the ratio to `plain`
in the same round (neighbours in time share the machine's load): of tokens/s, and of tokens per CPU
second, which moves much less when other processes take the core. Every round is in the JSON.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import random
import statistics
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import peft
import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PrinterCallback,
)
from transformers.utils import logging as hf_logging

from deeptune.api.finetunejob import FineTuneJobSpec
from deeptune_trainer.formatting import IGNORE_INDEX, Example, pack, tokenize_samples
from deeptune_trainer.synthetic import FILLER_WORDS, as_samples, keyword_rows, tokenizer_texts
from deeptune_trainer.tinymodels import build_tiny_model, tiny_config, train_tokenizer
from deeptune_trainer.training import train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info, save_report  # bench/machine.py (scripts run from bench/)
from plain_hf_baseline import LORA_TARGETS, plain_lora_trainer
from step_clock import StepClock

CONFIGURATIONS = ("plain", "ours", "ours+packing")

SIZES: dict[str, dict[str, int]] = {
    "tiny": {},  # build_tiny_model's Llama: hidden 64, 2 layers
    "small": {
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
    },
}
"""Llama configs by name: overrides of `tiny_config("llama", ...)`."""


@dataclass(frozen=True)
class Settings:
    """What all three configurations share."""

    rows: int = 320
    max_length: int = 128
    batch_size: int = 16
    warmup_steps: int = 3
    timed_steps: dict[str, int] = field(default_factory=lambda: {"tiny": 60, "small": 30})
    learning_rate: float = 2e-3
    lora_r: int = 16
    lora_alpha: int = 32
    warmup_ratio: float = 0.03
    weight_decay: float = 0.01
    logging_steps: int = 10
    seed: int = 42

    def steps(self, size: str) -> int:
        return self.warmup_steps + self.timed_steps[size]


SMOKE = Settings(rows=96, warmup_steps=1, timed_steps={"tiny": 3, "small": 3}, logging_steps=2)


# --- model and data ----------------------------------------------------------------------------


def build_model(size: str, out_dir: Path, seed: int = 0) -> Path:
    """A random-weight Llama of `size` and its tokenizer (fitted to the keyword task) in `out_dir`."""
    overrides = SIZES[size]
    if not overrides:
        return build_tiny_model("llama", out_dir, tokenizer_texts(), seed=seed)
    tokenizer = train_tokenizer(tokenizer_texts())
    config = tiny_config("llama", tokenizer)
    for name, value in overrides.items():
        setattr(config, name, value)
    config.initializer_range = config.hidden_size**-0.5  # fan-in scaled, as tinymodels explains
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def varied_rows(count: int, seed: int = 1) -> list[dict[str, str]]:
    """The keyword task with half the prompts padded out by 5-100 filler words at random places."""
    rng = random.Random(seed)
    rows = keyword_rows(count, seed)
    for row in rows:
        if rng.random() < 0.5:
            continue
        words = row["prompt"].split()
        for _ in range(rng.randint(5, 100)):
            words.insert(rng.randrange(1, len(words) + 1), rng.choice(FILLER_WORDS))
        row["prompt"] = " ".join(words)
    return rows


def our_spec(settings: Settings, steps: int, packing: bool) -> FineTuneJobSpec:
    """The FineTuneJobSpec equivalent to the plain script's arguments."""
    return FineTuneJobSpec.model_validate(
        {
            "baseModel": {"pvc": {"claimName": "models", "path": "bench"}},
            "dataset": {"source": {"inline": [{"prompt": "unused", "completion": "unused"}]}},
            "method": "lora",
            "lora": {
                "r": settings.lora_r,
                "alpha": settings.lora_alpha,
                "dropout": 0.0,
                "targetModules": LORA_TARGETS,
            },
            "hyperparameters": {
                "learningRate": settings.learning_rate,
                "maxSteps": steps,
                "perDeviceBatchSize": settings.batch_size,
                "gradientAccumulationSteps": 1,
                "maxSeqLength": settings.max_length,
                "warmupRatio": settings.warmup_ratio,
                "weightDecay": settings.weight_decay,
                "scheduler": "cosine",
                "seed": settings.seed,
                "precision": "fp32",
                "gradientCheckpointing": False,
                "packing": packing,
                "loggingSteps": settings.logging_steps,
                "checkpointSteps": 100_000,  # only the final save, after the clock stops
            },
            "evaluation": {"baseline": False},
            "output": {"pvc": {"claimName": "out"}},
        }
    )


# --- measuring ---------------------------------------------------------------------------------


class PaddingCounter:
    """Wraps a collator that returns an attention_mask and counts the padding it adds."""

    def __init__(self, collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]) -> None:
        self.collate = collate
        self.pad_tokens = 0
        self.total_tokens = 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.collate(features)
        self.total_tokens += batch["input_ids"].numel()
        self.pad_tokens += int((batch["attention_mask"] == 0).sum())
        return batch

    @property
    def padding_waste(self) -> float:
        return self.pad_tokens / self.total_tokens if self.total_tokens else 0.0


@dataclass
class Measured:
    size: str
    configuration: str
    round: int
    timed_steps: int
    seconds: float
    real_tokens: int
    tokens_per_second: float
    padding_waste: float
    loss_on: str
    loss_token_share: float
    """Share of the dataset's real tokens that carry the loss."""
    dataset_tokens: int
    epoch_seconds: float
    """dataset_tokens / tokens_per_second: one pass over the data at this rate."""
    median_step_seconds: float
    cpu_share: float
    """Process CPU seconds / wall seconds over the timed steps (1 thread: ~1 when it had the core)."""
    tokens_per_cpu_second: float
    """Real tokens per CPU second of this process: less sensitive to other processes than tokens/s."""
    final_loss: float | None
    load_average: tuple[float, float, float]


def measure(
    clock: StepClock,
    warmup: int,
    *,
    padding_waste: float,
    loss_on: str,
    loss_token_share: float,
    dataset_tokens: int,
    final_loss: float | None,
    size: str,
    configuration: str,
    round_: int,
) -> Measured:
    seconds, cpu_seconds, tokens = clock.window(warmup)
    steps = [b.wall - a.wall for a, b in itertools.pairwise(clock.ticks[warmup - 1 :])]
    rate = tokens / seconds
    return Measured(
        size=size,
        configuration=configuration,
        round=round_,
        timed_steps=len(steps),
        seconds=seconds,
        real_tokens=tokens,
        tokens_per_second=rate,
        padding_waste=padding_waste,
        loss_on=loss_on,
        loss_token_share=loss_token_share,
        dataset_tokens=dataset_tokens,
        epoch_seconds=dataset_tokens / rate,
        median_step_seconds=statistics.median(steps),
        cpu_share=cpu_seconds / seconds,
        tokens_per_cpu_second=tokens / cpu_seconds,
        final_loss=final_loss,
        load_average=os.getloadavg(),
    )


def last_loss(history: list[dict[str, float]]) -> float | None:
    return next((entry["loss"] for entry in reversed(history) if "loss" in entry), None)


def run_plain(
    model_dir: Path, rows: list[dict[str, str]], settings: Settings, size: str, round_: int
) -> Measured:
    clock = StepClock()
    with tempfile.TemporaryDirectory() as out:
        trainer = plain_lora_trainer(
            model_dir,
            rows,
            output_dir=Path(out),
            max_length=settings.max_length,
            batch_size=settings.batch_size,
            steps=settings.steps(size),
            learning_rate=settings.learning_rate,
            lora_r=settings.lora_r,
            lora_alpha=settings.lora_alpha,
            warmup_ratio=settings.warmup_ratio,
            weight_decay=settings.weight_decay,
            logging_steps=settings.logging_steps,
            seed=settings.seed,
            callbacks=[clock],
        )
        trainer.remove_callback(PrinterCallback)  # raw log dicts; ours removes it too
        counter = PaddingCounter(trainer.data_collator)
        trainer.data_collator = counter
        trainer.train()
        dataset = trainer.train_dataset
        assert isinstance(dataset, list)
        return measure(
            clock,
            settings.warmup_steps,
            padding_waste=counter.padding_waste,
            loss_on="all tokens",
            loss_token_share=1.0,
            dataset_tokens=sum(len(row["input_ids"]) for row in dataset),
            final_loss=last_loss(trainer.state.log_history),
            size=size,
            configuration="plain",
            round_=round_,
        )


def run_ours(
    model_dir: Path, rows: list[dict[str, str]], settings: Settings, size: str, round_: int, *, packing: bool
) -> Measured:
    clock = StepClock()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    samples = as_samples(rows)
    split = tokenize_samples(samples, tokenizer, settings.max_length)
    completion = sum(label != IGNORE_INDEX for example in split.examples for label in example.labels)
    with tempfile.TemporaryDirectory() as out:
        result = train(
            model,
            tokenizer,
            samples,
            [],
            spec=our_spec(settings, settings.steps(size), packing),
            output_dir=out,
            precision="fp32",
            callbacks=[clock],
            log=lambda _: None,
        )
    return measure(
        clock,
        settings.warmup_steps,
        padding_waste=result.padding_waste,
        loss_on="completion",
        loss_token_share=completion / split.tokens,
        dataset_tokens=split.tokens,
        final_loss=result.train_loss,
        size=size,
        configuration="ours+packing" if packing else "ours",
        round_=round_,
    )


# --- report ------------------------------------------------------------------------------------


def packing_waste_estimate(examples: Sequence[Example], max_length: int) -> dict[str, float]:
    """Padding waste if every packed row were padded to max_length, for two ways to pack.

    `greedy_in_order` is how `formatting.pack` packed before (a row closes as soon as the next
    example does not fit); `first_fit_decreasing` is `formatting.pack` now; `lower_bound` has no
    gaps at all. A static count over the dataset, not a training measurement.
    """
    total = sum(len(example.input_ids) for example in examples)
    greedy, used = 0, max_length
    for example in examples:
        if used + len(example.input_ids) > max_length:
            greedy, used = greedy + 1, 0
        used += len(example.input_ids)
    return {
        "greedy_in_order": 1 - total / (greedy * max_length),
        "first_fit_decreasing": 1 - total / (len(pack(examples, max_length)) * max_length),
        "lower_bound": 1 - total / (-(-total // max_length) * max_length),
    }


def machine() -> dict[str, Any]:
    return machine_info(
        torch_threads=torch.get_num_threads(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        peft=peft.__version__,
    )


def median_round(results: list[Measured]) -> Measured:
    """The round with the median tokens/s (the lower middle one of an even count)."""
    ordered = sorted(results, key=lambda r: r.tokens_per_second)
    return ordered[(len(ordered) - 1) // 2]


HEADER = (
    f"{'size':<6} {'configuration':<13} {'steps':>5} {'seconds':>8} {'real tok/s':>10} {'vs plain':>8}"
    f" {'tok/cpu-s':>9} {'vs plain':>8} {'pad waste':>9} {'loss on':>17} {'epoch s':>8} {'cpu share':>9}"
)


def row_line(result: Measured, ratio: float, cpu_ratio: float) -> str:
    loss_on = f"{result.loss_on} ({result.loss_token_share:.0%})"
    return (
        f"{result.size:<6} {result.configuration:<13} {result.timed_steps:>5} {result.seconds:>8.2f}"
        f" {result.tokens_per_second:>10.0f} {ratio:>7.2f}x {result.tokens_per_cpu_second:>9.0f}"
        f" {cpu_ratio:>7.2f}x {result.padding_waste:>9.1%} {loss_on:>17} {result.epoch_seconds:>8.2f}"
        f" {result.cpu_share:>9.2f}"
    )


def ratios_to_plain(results: list[Measured], rate: Callable[[Measured], float]) -> dict[str, float]:
    """Ours/plain by configuration: the median over rounds of the ratio of `rate` within a round."""
    plain = {r.round: rate(r) for r in results if r.configuration == "plain"}
    return {
        name: statistics.median(rate(r) / plain[r.round] for r in results if r.configuration == name)
        for name in CONFIGURATIONS
    }


def run_size(
    size: str, model_dir: Path, rows: list[dict[str, str]], settings: Settings, rounds: int
) -> list[Measured]:
    """Every round of the three configurations, interleaved: neighbours in time share the machine's
    load, so ratios are taken within a round."""
    results: list[Measured] = []
    for round_ in range(rounds):
        for name in CONFIGURATIONS:
            if name == "plain":
                results.append(run_plain(model_dir, rows, settings, size, round_))
            else:
                results.append(run_ours(model_dir, rows, settings, size, round_, packing=name != "ours"))
            gc.collect()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the 3 configurations")
    parser.add_argument("--smoke", action="store_true", help="a few steps of the tiny model, one round (CI)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside transformers
    warnings.filterwarnings("ignore", message=".*pin_memory.*")  # the plain script's default on CPU
    settings, sizes, rounds = (SMOKE, ["tiny"], 1) if args.smoke else (Settings(), args.sizes, args.rounds)
    rows = varied_rows(settings.rows)
    started_load = os.getloadavg()
    print(f"load average {started_load[0]:.2f} {started_load[1]:.2f} {started_load[2]:.2f}; torch threads 1")

    all_rounds: list[Measured] = []
    table: list[Measured] = []
    ratios: dict[str, dict[str, float]] = {}
    cpu_ratios: dict[str, dict[str, float]] = {}
    packing_estimate: dict[str, float] = {}
    print(HEADER)
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            model_dir = build_model(size, Path(tmp) / size)
            if not packing_estimate:
                tokenizer = AutoTokenizer.from_pretrained(model_dir)
                split = tokenize_samples(as_samples(rows), tokenizer, settings.max_length)
                packing_estimate = packing_waste_estimate(split.examples, settings.max_length)
            results = run_size(size, model_dir, rows, settings, rounds)
            ratios[size] = ratios_to_plain(results, lambda r: r.tokens_per_second)
            cpu_ratios[size] = ratios_to_plain(results, lambda r: r.tokens_per_cpu_second)
            all_rounds.extend(results)
            for name in CONFIGURATIONS:
                picked = median_round([r for r in results if r.configuration == name])
                table.append(picked)
                print(row_line(picked, ratios[size][name], cpu_ratios[size][name]), flush=True)

    finished_load = os.getloadavg()
    print(f"load average {finished_load[0]:.2f} {finished_load[1]:.2f} {finished_load[2]:.2f}")
    print(
        "padding waste of packed rows padded to max length (static): "
        + ", ".join(f"{name.replace('_', ' ')} {waste:.1%}" for name, waste in packing_estimate.items())
    )
    report = {
        "machine": {**machine(), "load_average_start": started_load, "load_average_end": finished_load},
        "settings": asdict(settings) | {"sizes": sizes, "rounds": rounds},
        "results": [asdict(r) for r in table],
        "ratios_ours_over_plain_tokens_per_second": ratios,
        "ratios_ours_over_plain_tokens_per_cpu_second": cpu_ratios,
        "packing_waste_estimate": packing_estimate,
        "all_rounds": [asdict(r) for r in all_rounds],
    }
    save_report("trainer", report, smoke=args.smoke)


if __name__ == "__main__":
    main()
