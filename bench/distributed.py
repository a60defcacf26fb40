"""Benchmark: the trainer in 1 process against 2 worker processes (DDP, FSDP) on CPU, in one run.

Why: a FineTuneJob with `distributed.processesPerNode: 2` (or two GPUs) starts two workers under
torch.distributed's elastic launcher. This measures what that buys on the machine it runs on, through
the trainer's own code path: each worker loads the model with `deeptune_trainer.modeling.load_for_training`
(sharded across the workers for fsdp, as a pod does) and trains with `deeptune_trainer.training.train`,
like tests/trainer/distributed_worker.py. Side by side, with the same global batch:

- `1 process`: one process, no launcher (what a pod with one worker runs);
- `2 DDP`: 2 workers, each with the whole model, gradients averaged;
- `2 FSDP`: 2 workers, weights (and for full fine-tuning gradients and Adam state) sharded;
- `2 ZeRO-3`: 2 workers, the same sharded by DeepSpeed's ZeRO stage 3 (`distributed.strategy: deepspeed`).

Each for `lora` (adapters on frozen weights) and `full` fine-tuning. Per configuration:

- real tokens/s: non-padding tokens of the global batch (the Trainer's `num_input_tokens_seen`, summed
  over the workers) over the timed optimizer steps, after warm-up steps that are not counted;
- scaling efficiency: 2-worker tokens/s ÷ (2 × 1-process tokens/s);
- peak RSS of each rank during training (VmHWM at the last step, before the final checkpoint is
  written: saving gathers the whole model on rank 0, a cost of the checkpoint, not of training), the
  peak including that checkpoint, and the RSS before the model was loaded (Python and its imports,
  ~530 MB of it torch's libraries, and the data);
- CPU share: each rank's CPU seconds ÷ wall seconds over the timed steps (one thread per worker, so
  ~1 when the rank had a core to itself; well below 1 means other processes took the cores).

The model is a random-weight Llama (transformers' LlamaConfig) with the keyword task's tokenizer from
`deeptune_trainer.tinymodels` (768 tokens; embedding rows past those are never looked up, but the LM
head computes all 32,000 logits, at the labelled positions); the data is the keyword task
(`deeptune_trainer.synthetic`), packed into rows of `max_seq_length` tokens. fp32, no gradient
checkpointing.

glibc's malloc and RSS: by default glibc raises its mmap threshold each time a large block is freed,
so the next blocks of that size come from the heap, and freed heap memory mostly stays in the process.
FSDP all-gathers each layer's full weights for compute and frees them again, many times a step: under
the default, RSS then grows step by step with memory that no tensor holds (measured at the smoke size,
full fine-tuning: FSDP 1,427 MB per rank against DDP's 1,235 MB; with the threshold fixed, 1,049 MB
against 1,196 MB). So every configuration runs with the threshold fixed at glibc's initial 128 KiB
(`MALLOC_MMAP_THRESHOLD_`, `FIXED_MMAP_THRESHOLD`): large blocks go back to the system when freed, and
RSS measures what training holds. `--adaptive-malloc` measures with glibc's default instead.

Every worker runs torch on ONE thread: 1 process uses one core, 2 workers two. On a 2-core machine
shared with other work, check `uptime` first; the load average is recorded with the results.

    python bench/distributed.py            # Llama 58M, 6 configurations (not timed yet: minutes)
    python bench/distributed.py --smoke    # a 20M model, a few steps: what CI runs (~2 minutes)

Prints a table and writes JSON to bench/results/distributed-<size>.json (distributed-smoke.json for
--smoke). Internally the script also is the worker: `--worker RUN_JSON` (started by itself).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging

from deeptune.api.finetunejob import FineTuneJobSpec
from deeptune.api.trainer import TrainerConfig, TrainerPaths
from deeptune_trainer.distributed import World, end_worker
from deeptune_trainer.modeling import load_for_training
from deeptune_trainer.synthetic import as_samples, keyword_rows, tokenizer_texts
from deeptune_trainer.tinymodels import train_tokenizer
from deeptune_trainer.training import train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info  # bench/machine.py (scripts run from bench/)
from rss import current_rss_bytes, peak_rss_bytes
from step_clock import StepClock

HERE = Path(__file__).resolve().parent
WORKERS = 2
METHODS = ("lora", "full")


@dataclass(frozen=True)
class Configuration:
    name: str
    processes: int
    strategy: str


CONFIGURATIONS = (
    Configuration("1 process", 1, "ddp"),
    Configuration(f"{WORKERS} DDP", WORKERS, "ddp"),
    Configuration(f"{WORKERS} FSDP", WORKERS, "fsdp"),
    Configuration(f"{WORKERS} ZeRO-3", WORKERS, "deepspeed"),
)
SHARDING = ("fsdp", "deepspeed")


@dataclass(frozen=True)
class Size:
    """The model and the run's length: what `--smoke` shrinks."""

    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    global_batch: int
    max_seq_length: int
    warmup_steps: int
    timed_steps: int
    rows: int

    @property
    def steps(self) -> int:
        return self.warmup_steps + self.timed_steps


SIZES = {
    "58m": Size(512, 8, 1408, 8, 32_000, global_batch=8, max_seq_length=128, warmup_steps=3,
                timed_steps=15, rows=1200),
    "smoke": Size(256, 4, 688, 8, 32_000, global_batch=4, max_seq_length=64, warmup_steps=2,
                  timed_steps=3, rows=200),
}  # fmt: skip
"""Llama shapes: 58.5M parameters (16.4M in the embeddings, 16.4M in the LM head), and 19.5M (8.2M and
8.2M: a vocabulary this size costs memory, which the comparison needs, and little compute)."""

FIXED_MMAP_THRESHOLD = "131072"
"""glibc's initial mmap threshold (128 KiB), set for every process so that it stays there: see above."""


# --- the worker (one rank) -----------------------------------------------------------------------


class RankClock(StepClock):
    """The step clock (global real tokens), and this process's peak RSS at the last step: before the
    Trainer writes the final checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.training_peak_rss = 0

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        super().on_step_end(args, state, control, **kwargs)
        self.training_peak_rss = peak_rss_bytes()


def run_worker(run: dict[str, Any]) -> None:
    """Train as one rank of a configuration and write what it measured to OUTPUT/rank-<rank>.json."""
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    world = World.from_env()
    samples = as_samples(keyword_rows(run["rows"], seed=1))
    before_load = current_rss_bytes()
    spec = FineTuneJobSpec.model_validate(run["spec"])
    paths = TrainerPaths(output_dir=run["output_dir"], base_model=run["model_dir"])
    config = TrainerConfig(name="bench", spec=spec, paths=paths)
    loaded = load_for_training(config, world)
    clock = RankClock()
    result = train(
        loaded.model,
        loaded.tokenizer,
        samples,
        [],
        spec=spec,
        output_dir=run["output_dir"],
        precision="fp32",
        callbacks=[clock],
        log=lambda _: None,
        world=world,
    )
    seconds, cpu_seconds, tokens = clock.window(run["warmup_steps"])
    record = {
        "rank": world.rank,
        "world_size": world.size,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "real_tokens": tokens,
        "rss_before_load_bytes": before_load,
        "training_peak_rss_bytes": clock.training_peak_rss,
        "peak_rss_with_checkpoint_bytes": peak_rss_bytes(),
        "final_loss": result.train_loss,
    }
    Path(run["output_dir"], f"rank-{world.rank}.json").write_text(json.dumps(record))


# --- the driver ----------------------------------------------------------------------------------


def build_model(size: Size, out_dir: Path) -> int:
    """A random-weight Llama of `size` and the keyword task's tokenizer in `out_dir`; its parameters."""
    tokenizer = train_tokenizer(tokenizer_texts())
    config = LlamaConfig(
        hidden_size=size.hidden_size,
        num_hidden_layers=size.num_hidden_layers,
        intermediate_size=size.intermediate_size,
        num_attention_heads=size.num_attention_heads,
        num_key_value_heads=size.num_attention_heads,
        vocab_size=max(size.vocab_size, len(tokenizer)),
        max_position_embeddings=2048,
        initializer_range=size.hidden_size**-0.5,  # fan-in scaled, as tinymodels explains
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return sum(parameter.numel() for parameter in model.parameters())


def spec_of(method: str, configuration: Configuration, size: Size) -> dict[str, Any]:
    """The FineTuneJobSpec each worker of a configuration trains by: same global batch everywhere."""
    return {
        "baseModel": {"pvc": {"claimName": "models", "path": "bench"}},
        "dataset": {"source": {"inline": [{"prompt": "unused", "completion": "unused"}]}},
        "method": method,
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "hyperparameters": {
            "maxSteps": size.steps,
            "perDeviceBatchSize": size.global_batch // configuration.processes,
            "gradientAccumulationSteps": 1,
            "maxSeqLength": size.max_seq_length,
            "packing": True,
            "precision": "fp32",
            "gradientCheckpointing": False,
            "loggingSteps": size.steps,
            "checkpointSteps": 100_000,  # only the final save, after the last measurement
            "seed": 42,
        },
        "evaluation": {"baseline": False},
        "output": {"pvc": {"claimName": "out"}},
        "resources": {"gpu": 0},
        "distributed": {"strategy": configuration.strategy},
    }


@dataclass
class Measured:
    method: str
    configuration: str
    processes: int
    strategy: str
    per_device_batch: int
    timed_steps: int
    seconds: float
    real_tokens: int
    tokens_per_second: float
    scaling_efficiency: float | None
    """Tokens/s ÷ (processes × the 1-process tokens/s of the same method); None for 1 process."""
    training_peak_rss_per_rank: list[int]
    peak_rss_with_checkpoint_per_rank: list[int]
    rss_before_load_per_rank: list[int]
    cpu_share_per_rank: list[float]
    final_loss: float | None
    load_average: tuple[float, float, float]


def launch(configuration: Configuration, run: dict[str, Any], fixed_mmap_threshold: bool) -> None:
    """Start the configuration's processes, as a pod does: alone, or under the elastic launcher."""
    worker = [str(Path(__file__).resolve()), "--worker", json.dumps(run)]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={configuration.processes}"]
    command = [sys.executable, *(launcher if configuration.processes > 1 else []), *worker]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # CPU, even on a GPU machine
    if fixed_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = FIXED_MMAP_THRESHOLD
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{configuration.name} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")


def measure(
    method: str, configuration: Configuration, size: Size, model_dir: Path, fixed_mmap_threshold: bool
) -> Measured:
    with tempfile.TemporaryDirectory() as out:
        run = {
            "model_dir": str(model_dir),
            "output_dir": out,
            "spec": spec_of(method, configuration, size),
            "rows": size.rows,
            "warmup_steps": size.warmup_steps,
        }
        launch(configuration, run, fixed_mmap_threshold)
        ranks = [
            json.loads(Path(out, f"rank-{rank}.json").read_text()) for rank in range(configuration.processes)
        ]
    main = ranks[0]
    return Measured(
        method=method,
        configuration=configuration.name,
        processes=configuration.processes,
        strategy=configuration.strategy if configuration.processes > 1 else "-",
        per_device_batch=size.global_batch // configuration.processes,
        timed_steps=size.timed_steps,
        seconds=main["seconds"],
        real_tokens=main["real_tokens"],
        tokens_per_second=main["real_tokens"] / main["seconds"],
        scaling_efficiency=None,
        training_peak_rss_per_rank=[rank["training_peak_rss_bytes"] for rank in ranks],
        peak_rss_with_checkpoint_per_rank=[rank["peak_rss_with_checkpoint_bytes"] for rank in ranks],
        rss_before_load_per_rank=[rank["rss_before_load_bytes"] for rank in ranks],
        cpu_share_per_rank=[rank["cpu_seconds"] / rank["seconds"] for rank in ranks],
        final_loss=main["final_loss"],
        load_average=os.getloadavg(),
    )


def with_scaling(results: list[Measured]) -> list[Measured]:
    """Fill in each multi-process result's scaling efficiency against its method's single process."""
    alone = {r.method: r.tokens_per_second for r in results if r.processes == 1}
    for result in results:
        if result.processes > 1:
            result.scaling_efficiency = result.tokens_per_second / (result.processes * alone[result.method])
    return results


def megabytes(values: list[int]) -> str:
    return " / ".join(f"{value / 1e6:,.0f}" for value in values)


HEADER = (
    f"{'method':<6} {'configuration':<13} {'batch/dev':>9} {'real tok/s':>10} {'scaling':>8}"
    f" {'peak RSS MB per rank (training)':>32} {'with checkpoint':>16} {'before load':>12}"
    f" {'cpu share':>10} {'loss':>7}"
)


def row_line(result: Measured) -> str:
    scaling = "-" if result.scaling_efficiency is None else f"{result.scaling_efficiency:.0%}"
    cpu = " / ".join(f"{share:.2f}" for share in result.cpu_share_per_rank)
    loss = "-" if result.final_loss is None else f"{result.final_loss:.3f}"
    return (
        f"{result.method:<6} {result.configuration:<13} {result.per_device_batch:>9}"
        f" {result.tokens_per_second:>10.0f} {scaling:>8}"
        f" {megabytes(result.training_peak_rss_per_rank):>32}"
        f" {megabytes(result.peak_rss_with_checkpoint_per_rank):>16}"
        f" {megabytes(result.rss_before_load_per_rank):>12} {cpu:>10} {loss:>7}"
    )


def sharding_saving(results: list[Measured]) -> dict[str, dict[str, float]]:
    """Per sharding strategy and method: the highest rank's training peak RSS under DDP minus under
    that strategy, in bytes."""
    by_name = {(r.method, r.strategy): max(r.training_peak_rss_per_rank) for r in results if r.processes > 1}
    return {
        strategy: {method: by_name[(method, "ddp")] - by_name[(method, strategy)] for method in METHODS}
        for strategy in SHARDING
    }


def run_all(size: Size, fixed_mmap_threshold: bool) -> tuple[int, list[Measured]]:
    """Every method in every configuration, one fresh set of processes each; the model's parameters."""
    results: list[Measured] = []
    with tempfile.TemporaryDirectory() as model_dir:
        parameters = build_model(size, Path(model_dir))
        print(
            f"Llama, {parameters / 1e6:.1f}M parameters; global batch {size.global_batch} x "
            f"{size.max_seq_length} tokens packed; {size.timed_steps} timed steps after {size.warmup_steps}"
        )
        print(HEADER)
        for method in METHODS:
            for configuration in CONFIGURATIONS:
                results.append(measure(method, configuration, size, Path(model_dir), fixed_mmap_threshold))
                print(row_line(with_scaling(results)[-1]), flush=True)
    return parameters, results


def load_average_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--smoke", action="store_true", help="a 20M model and a few steps (CI)")
    parser.add_argument("--adaptive-malloc", action="store_true", help="glibc's default mmap threshold")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one rank, started by this script
    args = parser.parse_args()
    if args.worker:
        run_worker(json.loads(args.worker))
        end_worker(0)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    size_name = "smoke" if args.smoke else "58m"
    malloc = "adaptive (glibc default)" if args.adaptive_malloc else f"mmap threshold {FIXED_MMAP_THRESHOLD}"
    started_load = os.getloadavg()
    print(f"{load_average_line()}; 1 torch thread a rank; malloc: {malloc}")
    parameters, results = run_all(SIZES[size_name], fixed_mmap_threshold=not args.adaptive_malloc)
    saving = sharding_saving(results)
    for strategy, by_method in saving.items():
        savings = ", ".join(f"{method} {value / 1e6:,.0f} MB" for method, value in by_method.items())
        print(f"{strategy}'s saving of peak RSS per rank against DDP (highest rank): {savings}")
    print(load_average_line())
    report = {
        "machine": machine_info(
            torch_threads_per_rank=1,
            torch=torch.__version__,
            transformers=transformers.__version__,
            load_average_start=started_load,
        ),
        "settings": asdict(SIZES[size_name])
        | {"size": size_name, "parameters": parameters, "workers": WORKERS, "malloc": malloc},
        "results": [asdict(result) for result in results],
        "peak_rss_saving_per_rank_bytes": saving,
    }
    suffix = "-adaptive-malloc" if args.adaptive_malloc else ""
    out = HERE / "results" / f"distributed-{size_name}{suffix}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
