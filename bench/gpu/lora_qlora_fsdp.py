"""Benchmark on GPUs: LoRA, QLoRA and FSDP through DeepTune's trainer, on a DeepSeek-V2-Lite-shaped
model with random weights, and on a dense deepseek-llm-7b-shaped one (the Llama architecture).

Run as is on a machine with one or more CUDA GPUs (elsewhere it says so and exits 0):

    source scripts/env.sh
    python bench/gpu/lora_qlora_fsdp.py                      # both models, every configuration
    python bench/gpu/lora_qlora_fsdp.py --layers 4 --timed-steps 5   # a quick look on a small GPU
    python bench/gpu/lora_qlora_fsdp.py --models v2-lite --batch 2 --seq 4096

What runs, each configuration in fresh processes (so peak memory is its own), through the code a
FineTuneJob's pod runs: `deeptune_trainer.modeling.load_for_training` (4-bit for qlora, sharded at load
for fsdp) and `deeptune_trainer.training.train`, bf16 mixed precision, gradient checkpointing on as
by default, LoRA r 16 on the `auto` targets:

- `lora`: 1 GPU, bf16 frozen weights;
- `qlora`: 1 GPU, NF4 weights; dense model only: on DeepSeek-V2/V3 `check_qlora_quantizes_the_model`
  refuses it (transformers keeps the routed experts as fused 3-D parameters bitsandbytes cannot
  quantize), and the table prints the refusal instead;
- `full zero3 offload`: 1 GPU, DeepSpeed ZeRO-3 with the fp32 master weights and Adam state in host
  memory (DeepSpeed's CPU Adam): run only where they take at most `HOST_SHARE` of the machine's memory;
- `lora fsdp`, `full fsdp`, `lora zero3` and `full zero3`: every visible GPU (only with more than one),
  the script started again under torch.distributed's elastic launcher, one worker per GPU, weights
  sharded (fsdp) or partitioned (ZeRO-3) as they load. Full fine-tuning keeps fp32 master weights and
  Adam state (16 bytes a parameter, sharded): it runs only when the planner says it fits the GPUs,
  else the table says what the planner estimated.

The model is written once per model (random weights, built on the GPU in bf16, saved to --work-dir:
V2-Lite takes 31 GB of disk, the dense 7B 14 GB) and removed after its configurations. The data is
the keyword task (`deeptune_trainer.synthetic`) packed into rows of --seq tokens; the tokenizer is
the tiny one of `deeptune_trainer.tinymodels` (768 tokens; the model keeps its 102,400-token vocab).

Per configuration, after --warmup-steps that are not counted:

- tokens/s: real (non-padding) tokens of the global batch per second, over the timed steps;
- MFU: 6 × P × tokens/s ÷ (GPUs × peak dense bf16 FLOP/s), P the parameters a token passes through
  (planner's `active_params`: all but the routed experts a token is not sent to) less the input
  embedding, a lookup. The usual model-FLOPs convention: it counts neither the recomputed forward of
  gradient checkpointing nor that frozen weights (lora, qlora) need no weight gradients, nor the
  attention's sequence-length term; and the LM head at every position, though the trainer computes
  logits at the labelled positions only. Peak FLOP/s from PEAK_BF16_TFLOPS by GPU name, or --peak-tflops;
- peak memory per GPU: torch.cuda.max_memory_allocated during training (the highest rank), and
  max_memory_reserved (what the caching allocator held);
- the planner's estimate per GPU (`deeptune.fitting.plan_for_shape`, as the operator computes it before a
  run): its total includes a fixed 1.5 GiB for the CUDA context and allocator slack, which
  max_memory_allocated does not see, so the table shows it without that allowance too.

Each worker leaves right after the last timed step: the final checkpoint of a full fine-tune of
V2-Lite (gathered weights and sharded Adam state, ~250 GB) would fill the disk and time the disk.

Prints one table and writes JSON to bench/results/gpu-<gpu>-<host>.json with the machine (bench/machine.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    LlamaConfig,
    PretrainedConfig,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging

from deeptune.api.finetunejob import FineTuneJobSpec
from deeptune.api.trainer import TrainerConfig, TrainerPaths
from deeptune.fitting import plan_for_shape
from deeptune.planner import CUDA_OVERHEAD_BYTES, GIB, ModelShape, shape_from_config
from deeptune_trainer.distributed import World, barrier, end_worker
from deeptune_trainer.errors import TrainerInputError
from deeptune_trainer.modeling import check_qlora_quantizes_the_model, load_for_training
from deeptune_trainer.synthetic import as_samples, keyword_rows, tokenizer_texts
from deeptune_trainer.tinymodels import train_tokenizer
from deeptune_trainer.training import train

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from machine import machine_info, save_gpu_report  # bench/machine.py

HERE = Path(__file__).resolve().parent
NEEDS_A_GPU = (
    "bench/gpu/lora_qlora_fsdp.py needs a CUDA GPU and none is visible: nothing measured. "
    "Run it as is on a GPU machine."
)

PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),  # SXM (and GH200)
    ("A100", 312.0),
    ("L40S", 362.0),
)
"""Dense (not 2:4 sparse) bf16 tensor-core TFLOPS from NVIDIA's data sheets, by a part of the name
torch reports; the first match wins, so the specific names come first."""

KEYWORD_EXAMPLE_TOKENS = 20
"""About the fewest tokens a keyword-task example takes: sizes how many rows the packed data needs."""
MAX_ROWS = 50_000
"""Enough for 8 GPUs at the defaults (the keyword task has ~109k distinct prompts); a run that needs
more simply starts another epoch."""


def model_config(name: str, layers: int | None) -> PretrainedConfig:
    """The architecture of DeepSeek-V2-Lite or deepseek-llm-7b, optionally with fewer layers."""
    if name == "v2-lite":
        config: PretrainedConfig = DeepseekV2Config(
            vocab_size=102_400,
            hidden_size=2048,
            intermediate_size=10_944,  # the dense first layer's MLP
            num_hidden_layers=27,
            num_attention_heads=16,
            num_key_value_heads=16,
            first_k_dense_replace=1,
            n_routed_experts=64,
            n_shared_experts=2,
            num_experts_per_tok=6,
            moe_intermediate_size=1408,
            kv_lora_rank=512,
            q_lora_rank=None,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
            topk_method="greedy",
            n_group=1,
            topk_group=1,
            norm_topk_prob=False,
            routed_scaling_factor=1.0,
            max_position_embeddings=32_768,
            rms_norm_eps=1e-6,
        )
    else:
        config = LlamaConfig(
            vocab_size=102_400,
            hidden_size=4096,
            intermediate_size=11_008,
            num_hidden_layers=30,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=32_768,
            rms_norm_eps=1e-6,
        )
    if layers is not None:
        config.num_hidden_layers = layers
    return config


def write_model(config: PretrainedConfig, directory: Path) -> None:
    """Random bf16 weights, initialised on the GPU (seconds, where the CPU takes minutes), saved with
    the tiny tokenizer as a hub checkpoint is."""
    tokenizer = train_tokenizer(tokenizer_texts())
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    del model
    torch.cuda.empty_cache()


# --- one worker ----------------------------------------------------------------------------------


class StopAfterMeasuringError(Exception):
    """Raised after the last timed step, before the Trainer writes its final checkpoint."""


@dataclass(frozen=True)
class Tick:
    wall: float
    tokens: int


class StepClock(TrainerCallback):
    """Wall time and the global batch's real tokens at every step's end; at the last step this rank's
    peak GPU memory, written to OUTPUT/rank-<rank>.json, and then it stops the run."""

    def __init__(self, output: Path, warmup_steps: int, world: World, load_peak: int) -> None:
        self.output = output
        self.warmup_steps = warmup_steps
        self.world = world
        self.load_peak = load_peak
        self.ticks: list[Tick] = []

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        torch.cuda.synchronize()
        self.ticks.append(Tick(time.perf_counter(), state.num_input_tokens_seen))
        if state.global_step < state.max_steps:
            return
        start, end = self.ticks[self.warmup_steps - 1], self.ticks[-1]
        record = {
            "rank": self.world.rank,
            "seconds": end.wall - start.wall,
            "real_tokens": end.tokens - start.tokens,
            "load_peak_allocated_bytes": self.load_peak,
            "training_peak_allocated_bytes": torch.cuda.max_memory_allocated(),
            "training_peak_reserved_bytes": torch.cuda.max_memory_reserved(),
        }
        (self.output / f"rank-{self.world.rank}.json").write_text(json.dumps(record))
        barrier()  # every rank has written its record before any leaves
        raise StopAfterMeasuringError


def run_worker(run: dict[str, Any]) -> None:
    """One rank of a configuration: load as a pod does, train, record, leave."""
    hf_logging.set_verbosity_error()
    world = World.from_env()
    spec = FineTuneJobSpec.model_validate(run["spec"])
    paths = TrainerPaths(output_dir=run["output_dir"], base_model=run["model_dir"])
    config = TrainerConfig(name="bench", spec=spec, paths=paths)
    loaded = load_for_training(config, world)
    load_peak = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    clock = StepClock(Path(run["output_dir"]), run["warmup_steps"], world, load_peak)
    try:
        train(
            loaded.model,
            loaded.tokenizer,
            as_samples(keyword_rows(run["rows"], seed=1)),
            [],
            spec=spec,
            output_dir=run["output_dir"],
            precision=loaded.precision,
            callbacks=[clock],
            log=lambda _: None,
            world=world,
        )
    except StopAfterMeasuringError:
        return


# --- the driver ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    batch: int
    """Per GPU."""
    seq: int
    warmup_steps: int
    timed_steps: int
    lora_r: int
    gradient_checkpointing: bool

    @property
    def steps(self) -> int:
        return self.warmup_steps + self.timed_steps


@dataclass(frozen=True)
class Configuration:
    name: str
    method: str
    gpus: int
    strategy: str
    offload: str = "none"

    @property
    def launched(self) -> bool:
        """Whether the workers run under the launcher (several GPUs, or ZeRO at all)."""
        return self.gpus > 1 or self.strategy == "deepspeed"


def configurations(gpus: int, chosen: list[str] | None = None) -> list[Configuration]:
    """One GPU: lora, qlora, and full fine-tuning with ZeRO-Offload. Several: also lora and full
    fine-tuning sharded over all of them, by FSDP and by DeepSpeed ZeRO-3. `chosen` names a subset."""
    every = all_configurations(gpus)
    return every if chosen is None else [c for c in every if c.name in chosen]


def all_configurations(gpus: int) -> list[Configuration]:
    single = [
        Configuration("lora", "lora", 1, "ddp"),
        Configuration("qlora", "qlora", 1, "ddp"),
        Configuration("full zero3 offload", "full", 1, "deepspeed", "optimizer"),
    ]
    if gpus < 2:
        return single
    sharded = [
        Configuration("lora fsdp", "lora", gpus, "fsdp"),
        Configuration("full fsdp", "full", gpus, "fsdp"),
        Configuration("lora zero3", "lora", gpus, "deepspeed"),
        Configuration("full zero3", "full", gpus, "deepspeed"),
    ]
    return single + sharded


def spec_of(configuration: Configuration, settings: Settings) -> dict[str, Any]:
    return {
        "baseModel": {"pvc": {"claimName": "models", "path": "bench"}},
        "dataset": {"source": {"inline": [{"prompt": "unused", "completion": "unused"}]}},
        "method": configuration.method,
        "lora": {"r": settings.lora_r, "alpha": 2 * settings.lora_r, "dropout": 0.0},
        "hyperparameters": {
            "maxSteps": settings.steps,
            "perDeviceBatchSize": settings.batch,
            "gradientAccumulationSteps": 1,
            "maxSeqLength": settings.seq,
            "packing": True,
            "precision": "bf16",
            "gradientCheckpointing": settings.gradient_checkpointing,
            "loggingSteps": settings.steps,
            "checkpointSteps": 100_000,
            "seed": 42,
        },
        "evaluation": {"baseline": False},
        "output": {"pvc": {"claimName": "out"}},
        "resources": {"gpu": configuration.gpus},
        "distributed": {"strategy": configuration.strategy, "offload": configuration.offload},
    }


def plan_bytes(shape: ModelShape, configuration: Configuration, settings: Settings) -> float:
    """The planner's estimate per GPU, as the operator makes it for this run."""
    spec = FineTuneJobSpec.model_validate(spec_of(configuration, settings))
    return plan_for_shape(spec, shape, gpu_memory_bytes=None).total_bytes


@dataclass
class Row:
    model: str
    configuration: str
    gpus: int
    planner_gib_per_gpu: float
    planner_tensors_gib_per_gpu: float
    """The planner's estimate less its fixed CUDA allowance: what max_memory_allocated can see."""
    tokens_per_second: float | None = None
    mfu: float | None = None
    peak_allocated_gib_per_gpu: float | None = None
    peak_reserved_gib_per_gpu: float | None = None
    load_peak_allocated_gib_per_gpu: float | None = None
    seconds: float | None = None
    real_tokens: int | None = None
    note: str = ""
    detail: str = ""
    """The trainer's whole message, where the note shortens it."""


def launch(configuration: Configuration, run: dict[str, Any]) -> None:
    """This script as the configuration's workers: alone on GPU 0, or one per GPU under the launcher."""
    worker = [str(Path(__file__).resolve()), "--worker", json.dumps(run)]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={configuration.gpus}"]
    command = [sys.executable, *(launcher if configuration.launched else []), *worker]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{configuration.name} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")


@dataclass(frozen=True)
class Subject:
    """One model under test: its architecture, as the planner reads it, and where its weights are."""

    name: str
    config: PretrainedConfig
    directory: Path

    @property
    def shape(self) -> ModelShape:
        return shape_from_config(self.config.to_dict())

    @property
    def flops_per_token(self) -> float:
        """6 × the parameters a token passes through, less the input embedding (a lookup)."""
        shape = self.shape
        return 6 * (shape.active_params - shape.vocab_size * shape.hidden_size)


def measure(
    subject: Subject, configuration: Configuration, settings: Settings, peak_flops: float | None, row: Row
) -> None:
    """Run one configuration and fill in what it measured."""
    global_tokens = settings.steps * settings.batch * configuration.gpus * settings.seq
    with tempfile.TemporaryDirectory() as out:
        run = {
            "model_dir": str(subject.directory),
            "output_dir": out,
            "spec": spec_of(configuration, settings),
            "rows": min(MAX_ROWS, global_tokens // KEYWORD_EXAMPLE_TOKENS),
            "warmup_steps": settings.warmup_steps,
        }
        launch(configuration, run)
        ranks = [json.loads(Path(out, f"rank-{rank}.json").read_text()) for rank in range(configuration.gpus)]
    main = ranks[0]
    rate = main["real_tokens"] / main["seconds"]
    row.seconds, row.real_tokens, row.tokens_per_second = main["seconds"], main["real_tokens"], rate
    if peak_flops:
        row.mfu = subject.flops_per_token * rate / (configuration.gpus * peak_flops)
    row.peak_allocated_gib_per_gpu = max(r["training_peak_allocated_bytes"] for r in ranks) / GIB
    row.peak_reserved_gib_per_gpu = max(r["training_peak_reserved_bytes"] for r in ranks) / GIB
    row.load_peak_allocated_gib_per_gpu = max(r["load_peak_allocated_bytes"] for r in ranks) / GIB


HOST_SHARE = 0.7
"""Of the machine's memory, what offloaded optimizer state may take (the rest: the data, the workers)."""


def host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def offloaded_bytes(subject: Subject) -> float:
    """ZeRO-Offload's host share of a full fine-tune: fp32 master weights and two Adam moments."""
    return 12 * subject.shape.total_params


def refusal(config: PretrainedConfig) -> str | None:
    """Why qlora is refused on this model, as the trainer says it; None when it is not."""
    try:
        check_qlora_quantizes_the_model(config, trust_remote_code=False)
    except TrainerInputError as error:
        return error.message
    return None


def row_for(
    subject: Subject, configuration: Configuration, settings: Settings, peak_flops: float | None
) -> Row:
    """The configuration measured, or why it was not run: qlora refused, or the planner says no fit."""
    planned = plan_bytes(subject.shape, configuration, settings)
    row = Row(subject.name, configuration.name, configuration.gpus, planned / GIB,
              (planned - CUDA_OVERHEAD_BYTES) / GIB)  # fmt: skip
    if configuration.method == "qlora" and (refused := refusal(subject.config)):
        row.note, row.detail = f"refused: {refused.split(':', 1)[0]}", refused
    elif planned > torch.cuda.get_device_properties(0).total_memory:
        row.note = f"not run: the planner says it does not fit ({planned / GIB:.0f} GiB per GPU)"
    elif configuration.offload != "none" and (host := offloaded_bytes(subject)) > HOST_SHARE * host_memory():
        row.note = (
            f"not run: the offloaded fp32 weights and Adam state take {host / GIB:.0f} GiB of host memory"
        )
    else:
        try:
            measure(subject, configuration, settings, peak_flops, row)
        except RuntimeError as error:  # a worker that failed: recorded, and the next configuration runs
            row.note, row.detail = f"failed: {str(error).splitlines()[0]}", str(error)
    return row


def run_model(name: str, args: argparse.Namespace, settings: Settings, peak_flops: float | None) -> list[Row]:
    """Every configuration on one model, written to disk first and removed after."""
    subject = Subject(
        name, model_config(name, args.layers), Path(tempfile.mkdtemp(prefix=f"{name}-", dir=args.work_dir))
    )
    rows: list[Row] = []
    try:
        write_model(subject.config, subject.directory)
        for configuration in configurations(torch.cuda.device_count(), args.configurations):
            rows.append(row_for(subject, configuration, settings, peak_flops))
            print(row_line(rows[-1]) + (f"\n    {rows[-1].detail}" if rows[-1].detail else ""), flush=True)
    finally:
        shutil.rmtree(subject.directory, ignore_errors=True)
    return rows


def peak_tflops(device_name: str, given: float | None) -> float | None:
    if given:
        return given
    return next((tflops for part, tflops in PEAK_BF16_TFLOPS if part in device_name), None)


def number(value: float | None, form: str) -> str:
    return "-" if value is None else format(value, form)


HEADER = (
    f"{'model':<8} {'configuration':<13} {'GPUs':>4} {'tokens/s':>9} {'MFU':>6} {'peak GiB/GPU':>12}"
    f" {'reserved':>8} {'planner GiB/GPU (tensors)':>26}  note"
)


def row_line(row: Row) -> str:
    planner = f"{row.planner_gib_per_gpu:.1f} ({row.planner_tensors_gib_per_gpu:.1f})"
    return (
        f"{row.model:<8} {row.configuration:<13} {row.gpus:>4} {number(row.tokens_per_second, ',.0f'):>9}"
        f" {number(row.mfu, '.1%'):>6} {number(row.peak_allocated_gib_per_gpu, '.1f'):>12}"
        f" {number(row.peak_reserved_gib_per_gpu, '.1f'):>8} {planner:>26}  {row.note}"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    models = ["v2-lite", "dense-7b"]
    parser.add_argument("--models", nargs="+", choices=models, default=models)
    parser.add_argument("--layers", type=int, help="fewer decoder layers, for a smaller GPU or a quick run")
    parser.add_argument(
        "--configurations",
        nargs="+",
        choices=[c.name for c in all_configurations(gpus=2)],
        help="a subset (default: every one that applies to the GPUs visible)",
    )
    parser.add_argument("--batch", type=int, default=4, help="rows per GPU per step")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per row (packed)")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--timed-steps", type=int, default=10)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's peak dense bf16 TFLOPS, for MFU")
    parser.add_argument("--work-dir", help="where the random models are written (default: the temp dir)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one rank, started by this script
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        print(NEEDS_A_GPU)
        return
    if args.worker:
        run_worker(json.loads(args.worker))
        end_worker(0)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    settings = Settings(args.batch, args.seq, args.warmup_steps, args.timed_steps, args.lora_r,
                        gradient_checkpointing=not args.no_gradient_checkpointing)  # fmt: skip
    device = torch.cuda.get_device_name(0)
    tflops = peak_tflops(device, args.peak_tflops)
    mfu = "from it" if tflops else "unknown: give --peak-tflops"
    print(
        f"{torch.cuda.device_count()} x {device}; peak bf16 {number(tflops, '.0f')} TFLOPS (MFU {mfu}); "
        f"{settings.batch} x {settings.seq} tokens per GPU a step; "
        f"{settings.timed_steps} timed steps after {settings.warmup_steps}"
    )
    print(HEADER)
    peak_flops = tflops * 1e12 if tflops else None
    rows = [row for name in args.models for row in run_model(name, args, settings, peak_flops)]
    report = {
        "machine": machine_info(
            gpu=device,
            gpus=torch.cuda.device_count(),
            gpu_memory_bytes=torch.cuda.get_device_properties(0).total_memory,
            peak_bf16_tflops=tflops,
            cuda=torch.version.cuda,
            torch=torch.__version__,
            transformers=transformers.__version__,
        ),
        "settings": asdict(settings)
        | {"models": args.models, "layers": args.layers, "configurations": args.configurations},
        "results": [asdict(row) for row in rows],
    }
    save_gpu_report("gpu", report)


if __name__ == "__main__":
    main()
