"""Benchmark: DeepTune's trainer against TRL's SFTTrainer, the fine-tuning library a user would
otherwise reach for, and against the plain transformers script. One run, side by side, each
configuration in a fresh process (so peak memory is its own), on two shapes of data:

- `trl`: TRL 1.16's SFTTrainer as its documentation sets it up for prompt/completion data: packing
  (best-fit decreasing, padding-free), loss on the completion only, LoRA through `peft_config`
  (bench/trl_worker.py: TRL is the trainer's own dependency, for preference tuning);
- `ours`: `deeptune_trainer.training.train` with `packing: true` (first-fit decreasing, padding-free;
  loss on the completion only; the LM head and cross-entropy at the labelled positions only);
- `plain`: bench/plain_hf_baseline.py (one string a row, loss on every token, padded batches).

Each on a named malloc: `glibc` (what a user's Python runs on) or `tcmalloc` (preloaded, as the
trainer image runs every process: trainer-image/Dockerfile; Debian's libtcmalloc-minimal4). TRL
runs on both, ours on both, plain on glibc; the ratios are against TRL on glibc, as a user would
run it. A worker records the malloc it found itself on, and the driver refuses a preload that
did not take.

Same random-weight Llama (bench/distributed.py's 58.5M: hidden 512, 8 layers; its LM head computes
all 32,000 logits, as a real vocabulary would), same rows, LoRA (r, alpha, the seven projections),
batch, steps, learning rate, cosine schedule, warm-up, weight decay and seed, fp32, no gradient
checkpointing, torch on one thread. The rows are the keyword task with 100 to 384 filler words
(3/4 of the row length) either in every prompt — `long prompts`, answers of a few tokens, as in
classification, extraction or RAG data, where computing logits at the labelled positions only pays —
or after every answer — `long answers`, where nearly every position is labelled and it cannot.
Each trainer renders rows its own way (ours through the chat template, TRL as prompt + completion),
so token counts differ a little: tokens/s counts the real tokens each one trained on.

Per configuration, over the timed steps after a few warm-up steps: real (non-padding) tokens/s (the
Trainer's `num_input_tokens_seen`, which all three are built on), CPU share, peak RSS of the process
(VmHWM, bench/rss.py) and its RSS before the model was loaded (Python and its libraries), and the
last loss.

    python bench/versus_trl.py            # 58.5M model (~18 minutes on 2 cores)
    python bench/versus_trl.py --smoke    # 19.5M model, a few steps: what CI runs (tests/bench)

Prints a table and writes JSON to bench/results/versus-trl-<size>.json with the machine recorded.
Internally the script also is the worker for `ours` and `plain` (`--worker CONFIGURATION RUN_JSON`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import transformers

from deeptune_trainer.allocator import tcmalloc_library
from deeptune_trainer.synthetic import FILLER_WORDS, as_samples, keyword_rows

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distributed import SIZES, build_model  # bench/distributed.py (scripts run from bench/)
from machine import machine_info
from plain_hf_baseline import LORA_TARGETS, plain_lora_trainer
from rss import peak_rss_bytes
from step_clock import StepClock, worker_record

from trainer import Settings, our_spec

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Configuration:
    trainer: str
    """`trl`, `ours` or `plain`."""
    allocator: str
    """`glibc`, or `tcmalloc` preloaded."""


CONFIGURATIONS = (
    Configuration("trl", "glibc"),
    Configuration("trl", "tcmalloc"),
    Configuration("ours", "tcmalloc"),
    Configuration("ours", "glibc"),
    Configuration("plain", "glibc"),
)
BASELINE = CONFIGURATIONS[0]
"""What the ratios are against: TRL as a user runs it."""


@dataclass(frozen=True)
class Run:
    """What every configuration gets, written to a file each worker reads."""

    model_dir: str
    rows: str
    result: str
    max_length: int
    batch_size: int
    warmup_steps: int
    steps: int
    learning_rate: float
    warmup_ratio: float
    weight_decay: float
    lora_r: int
    lora_alpha: int
    lora_targets: list[str]
    logging_steps: int
    seed: int

    def settings(self) -> Settings:
        """The same numbers as bench/trainer.py's Settings, for its `our_spec`."""
        return Settings(
            rows=0,
            max_length=self.max_length,
            batch_size=self.batch_size,
            warmup_steps=self.warmup_steps,
            learning_rate=self.learning_rate,
            lora_r=self.lora_r,
            lora_alpha=self.lora_alpha,
            warmup_ratio=self.warmup_ratio,
            weight_decay=self.weight_decay,
            logging_steps=self.logging_steps,
            seed=self.seed,
        )


@dataclass(frozen=True)
class Scale:
    model: str
    """A size of bench/distributed.py's SIZES."""
    rows: int
    max_length: int
    batch_size: int
    warmup_steps: int
    timed_steps: int


SCALES = {
    "58m": Scale("58m", rows=400, max_length=512, batch_size=4, warmup_steps=2, timed_steps=10),
    "smoke": Scale("smoke", rows=64, max_length=256, batch_size=2, warmup_steps=1, timed_steps=2),
}


DATA = {"long prompts": "prompt", "long answers": "completion"}
"""The two shapes of data, by the field that gets the filler words."""


def padded_rows(count: int, field: str, max_words: int, seed: int = 1) -> list[dict[str, str]]:
    """The keyword task with 100 to `max_words` filler words in every row's `field`, at random places
    (after the first word)."""
    rng = random.Random(seed)
    rows = keyword_rows(count, seed)
    for row in rows:
        words = row[field].split()
        for _ in range(rng.randint(min(100, max_words), max_words)):
            words.insert(rng.randrange(1, len(words) + 1), rng.choice(FILLER_WORDS))
        row[field] = " ".join(words)
    return rows


# --- the workers (ours and plain, in the project's environment) --------------------------------


def run_worker(configuration: str, run: Run) -> None:
    """Train one configuration and write what it measured to the run's result file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    from deeptune_trainer.training import train  # noqa: PLC0415

    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    before_load = peak_rss_bytes()
    rows = json.loads(Path(run.rows).read_text())
    clock = StepClock()
    with tempfile.TemporaryDirectory() as out:
        if configuration == "ours":
            model = AutoModelForCausalLM.from_pretrained(run.model_dir, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(run.model_dir)
            spec = our_spec(run.settings(), run.steps, packing=True)
            history = train(model, tokenizer, as_samples(rows), [], spec=spec, output_dir=out,
                            precision="fp32", callbacks=[clock], log=lambda _: None).log_history  # fmt: skip
        else:
            trainer = plain_lora_trainer(
                Path(run.model_dir), rows, output_dir=Path(out), max_length=run.max_length,
                batch_size=run.batch_size, steps=run.steps, learning_rate=run.learning_rate,
                lora_r=run.lora_r, lora_alpha=run.lora_alpha, warmup_ratio=run.warmup_ratio,
                weight_decay=run.weight_decay, logging_steps=run.logging_steps, seed=run.seed,
                callbacks=[clock],
            )  # fmt: skip
            trainer.train()
            history = trainer.state.log_history
    record = worker_record(
        clock, run.warmup_steps, history, before_load, f"transformers {transformers.__version__}"
    )
    Path(run.result).write_text(json.dumps(record))


# --- the driver --------------------------------------------------------------------------------


@dataclass
class Measured:
    data: str
    configuration: str
    allocator: str
    library: str
    tokens_per_second: float
    real_tokens: int
    seconds: float
    cpu_share: float
    peak_rss_bytes: int
    rss_before_load_bytes: int
    final_loss: float | None
    tokens_per_second_vs_trl: float | None = None
    peak_rss_vs_trl: float | None = None


def run_of(scale: Scale, model_dir: Path, rows_file: Path, result_file: Path) -> Run:
    """What every configuration gets at this scale: bench/trainer.py's training settings."""
    defaults = Settings()
    return Run(
        model_dir=str(model_dir), rows=str(rows_file), result=str(result_file), max_length=scale.max_length,
        batch_size=scale.batch_size, warmup_steps=scale.warmup_steps,
        steps=scale.warmup_steps + scale.timed_steps, learning_rate=defaults.learning_rate,
        warmup_ratio=defaults.warmup_ratio, weight_decay=defaults.weight_decay, lora_r=defaults.lora_r,
        lora_alpha=defaults.lora_alpha, lora_targets=list(LORA_TARGETS), logging_steps=1, seed=defaults.seed,
    )  # fmt: skip


def worker_environment(allocator: str) -> dict[str, str]:
    """This process's environment for a worker: one thread, no GPU, the allocator preloaded or not."""
    env = {key: value for key, value in os.environ.items() if key != "LD_PRELOAD"}
    env |= {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    if allocator == "tcmalloc":
        env["LD_PRELOAD"] = tcmalloc_library()
    return env


def measure(data: str, configuration: Configuration, run: Run) -> Measured:
    """Start the configuration's worker in a fresh process and read what it measured."""
    run_file = Path(run.result).with_suffix(".run.json")
    run_file.write_text(json.dumps(asdict(run)))
    trainer = configuration.trainer
    if trainer == "trl":
        command = [sys.executable, str(HERE / "trl_worker.py"), str(run_file)]
    else:
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", trainer, str(run_file)]
    env = worker_environment(configuration.allocator)
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{configuration} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    result = json.loads(Path(run.result).read_text())
    if result["allocator"] != configuration.allocator:
        raise RuntimeError(f"{configuration} ran on {result['allocator']}: the preload did not take")
    return Measured(
        data=data,
        configuration=trainer,
        allocator=configuration.allocator,
        library=result["library"],
        tokens_per_second=result["real_tokens"] / result["seconds"],
        real_tokens=result["real_tokens"],
        seconds=result["seconds"],
        cpu_share=result["cpu_seconds"] / result["seconds"],
        peak_rss_bytes=result["peak_rss_bytes"],
        rss_before_load_bytes=result["rss_before_load_bytes"],
        final_loss=result["final_loss"],
    )


def with_ratios(results: list[Measured]) -> list[Measured]:
    """Each result against TRL's on glibc on the same data."""
    trl_by_data = {
        result.data: result
        for result in results
        if (result.configuration, result.allocator) == (BASELINE.trainer, BASELINE.allocator)
    }
    for result in results:
        trl = trl_by_data[result.data]
        result.tokens_per_second_vs_trl = result.tokens_per_second / trl.tokens_per_second
        result.peak_rss_vs_trl = result.peak_rss_bytes / trl.peak_rss_bytes
    return results


HEADER = (
    f"{'data':<13} {'configuration':<13} {'malloc':<9} {'real tok/s':>10} {'vs TRL':>7}"
    f" {'peak RSS MB':>12} {'vs TRL':>7} {'before load':>12} {'cpu share':>10} {'loss':>7}"
)


def row_line(result: Measured) -> str:
    loss = "-" if result.final_loss is None else f"{result.final_loss:.3f}"
    speed, memory = result.tokens_per_second_vs_trl, result.peak_rss_vs_trl
    return (
        f"{result.data:<13} {result.configuration:<13} {result.allocator:<9}"
        f" {result.tokens_per_second:>10.0f} {speed:>6.2f}x"
        f" {result.peak_rss_bytes / 1e6:>12,.0f} {memory:>6.2f}x"
        f" {result.rss_before_load_bytes / 1e6:>12,.0f} {result.cpu_share:>10.2f} {loss:>7}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--smoke", action="store_true", help="a 19.5M model and a few steps (CI)")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)  # CONFIGURATION RUN_JSON
    args = parser.parse_args()
    if args.worker:
        configuration, run_file = args.worker
        run_worker(configuration, Run(**json.loads(Path(run_file).read_text())))
        return
    scale = SCALES["smoke" if args.smoke else "58m"]
    started_load = os.getloadavg()
    with tempfile.TemporaryDirectory() as work:
        model_dir = Path(work) / "model"
        parameters = build_model(SIZES[scale.model], model_dir)
        print(f"Llama, {parameters / 1e6:.1f}M parameters; {scale.rows} rows packed to "
              f"{scale.max_length} tokens, batch {scale.batch_size}; "
              f"{scale.timed_steps} timed steps after {scale.warmup_steps}")  # fmt: skip
        print(HEADER)
        results: list[Measured] = []
        for data, field in DATA.items():
            rows_file = Path(work) / f"{field}.json"
            rows_file.write_text(
                json.dumps(padded_rows(scale.rows, field, max_words=scale.max_length * 3 // 4))
            )
            run = run_of(scale, model_dir, rows_file, Path(work) / "result.json")
            measured = [measure(data, configuration, run) for configuration in CONFIGURATIONS]
            for result in with_ratios(measured):
                print(row_line(result), flush=True)
            results += measured
    report = {
        "machine": machine_info(
            torch_threads=1,
            torch=torch.__version__,
            transformers=transformers.__version__,
            load_average_start=started_load,
        ),
        "settings": asdict(scale) | {"parameters": parameters, "run": asdict(run)},
        "results": [asdict(result) for result in results],
    }
    out = HERE / "results" / f"versus-trl-{scale.model}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
