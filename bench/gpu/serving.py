"""Benchmark on a GPU: continuous against static batching in DeepTune's serving code, at LLM size.

Run as is on a machine with a CUDA GPU (elsewhere it says so and exits 0):

    source scripts/env.sh
    python bench/gpu/serving.py                       # a deepseek-llm-7b-shaped model, bf16
    python bench/gpu/serving.py --layers 4 --requests 64   # a quick look

What runs, in this process (no Triton: the figures are the engines', not the transport's): a model of
deepseek-llm-7b's shape (the Llama architecture) with random weights, built on the GPU in bf16, behind

- `static`: `deeptune_serving.generation.Generator.generate`, what `batching.mode: dynamic` runs per
  Triton batch: requests are taken in batches of the concurrency, each batch waits for its longest;
- `continuous`: `deeptune_serving.engine.ContinuousEngine` (transformers' continuous batching, paged
  KV cache), what `batching.mode: continuous` runs, its model in a process of its own as in the
  server (`BatcherProcess`): `concurrency` requests in flight, a new one submitted as each finishes.

The workload: --requests prompts of 100–400 tokens, each asking for a `max_new_tokens` drawn from
8–256 (the same draw for both), greedy; a random-weight model may stop early at its end-of-sequence
token, so tokens are counted from what came back. Per engine and concurrency (1, 8, 32): output
tokens/s, TTFT p50/p99 (continuous: the first piece of text; static: a request's whole answer arrives
at once when its batch ends, so its TTFT is its batch's time), and peak GPU memory. vLLM's column (the
engine a user would otherwise run) is not in this script yet: the GPU machine would need vLLM carried
to it as wheels.

With `--profile`, first: where a decoding step's time goes. The static engine's step time at batch
1, 8 and 32 (the time of 65 new tokens less that of 1, over 64: if it hardly grows with the batch,
the step waits on the CPU, not the GPU), then one static batch and one continuous run of 32 requests
under torch.profiler: wall time against the GPU's busy time, and the operators that take the most
CPU and GPU time.

Writes JSON to bench/results/gpu-serving-<gpu>-<host>.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from lora_qlora_fsdp import model_config, write_model  # noqa: E402  (bench/gpu/, the script's directory)
from machine import machine_info, save_gpu_report  # noqa: E402

from deeptune_serving.batcher import ManagerBatcher  # noqa: E402
from deeptune_serving.batcher_process import BatcherProcess  # noqa: E402
from deeptune_serving.engine import ContinuousEngine, Listener  # noqa: E402
from deeptune_serving.generation import Completion, Generator, LoadSettings, Sampling  # noqa: E402

CONCURRENCY = (1, 8, 32)
LENGTHS = (8, 32, 64, 128, 256)
ENGINES = ("static", "continuous")


def build_model(work: Path, layers: int) -> Path:
    """deepseek-llm-7b's architecture (the Llama one) with random bf16 weights, as the training GPU
    benchmark writes it."""
    write_model(model_config("dense-7b", layers), work / "model")
    torch.cuda.empty_cache()
    return work / "model"


def workload(generator: Generator, count: int) -> list[Any]:
    rng = random.Random(7)
    vocab = len(generator.tokenizer)
    prompts = []
    for _ in range(count):
        ids = [rng.randrange(3, vocab) for _ in range(rng.randrange(100, 400))]
        text = generator.tokenizer.decode(ids)
        prompts.append(generator.prompt(text, Sampling(rng.choice(LENGTHS), 0.0, 1.0)))
    return prompts


def summarize(
    engine: str, concurrency: int, seconds: float, ttfts: list[float], tokens: int
) -> dict[str, Any]:
    ttfts = sorted(ttfts)
    return {
        "engine": engine,
        "concurrency": concurrency,
        "seconds": round(seconds, 2),
        "output_tokens": tokens,
        "tokens_per_second": round(tokens / seconds, 1),
        "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1),
        "ttft_p99_ms": round(1000 * ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))], 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }


def run_static(generator: Generator, prompts: list[Any], concurrency: int) -> dict[str, Any]:
    torch.cuda.reset_peak_memory_stats()
    started, ttfts, tokens = time.perf_counter(), [], 0
    for first in range(0, len(prompts), concurrency):
        batch_started = time.perf_counter()
        done = generator.generate(prompts[first : first + concurrency])
        ttfts += [time.perf_counter() - batch_started] * len(done)
        tokens += sum(completion.completion_tokens for completion in done)
    return summarize("static", concurrency, time.perf_counter() - started, ttfts, tokens)


def run_continuous(engine: ContinuousEngine, prompts: list[Any], concurrency: int) -> dict[str, Any]:
    torch.cuda.reset_peak_memory_stats()
    pending = list(reversed(prompts))
    ttfts: list[float] = []
    tokens = 0
    slots = threading.Semaphore(concurrency)
    finished = threading.Event()
    lock = threading.Lock()
    left = [len(prompts)]
    started = time.perf_counter()

    def submit(prompt: Any) -> None:
        sent = time.perf_counter()
        first: list[float] = []

        def on_text(_: str) -> None:
            if not first:
                first.append(time.perf_counter() - sent)

        def on_done(completion: Completion) -> None:
            nonlocal tokens
            with lock:
                ttfts.append(first[0] if first else time.perf_counter() - sent)
                tokens += completion.completion_tokens
                left[0] -= 1
                if not left[0]:
                    finished.set()
            slots.release()

        engine.submit(prompt, Listener(on_text, on_done))

    while pending:
        slots.acquire()
        submit(pending.pop())
    finished.wait()
    return summarize("continuous", concurrency, time.perf_counter() - started, ttfts, tokens)


def with_new_tokens(prompts: list[Any], new_tokens: int) -> list[Any]:
    return [replace(each, sampling=replace(each.sampling, max_new_tokens=new_tokens)) for each in prompts]


def step_times(generator: Generator, prompts: list[Any]) -> dict[str, float]:
    """ms per decoding step of the static engine by batch size, prefill taken out."""

    def timed(batch: list[Any], new_tokens: int) -> float:
        torch.cuda.synchronize()
        started = time.perf_counter()
        generator.generate(with_new_tokens(batch, new_tokens))
        torch.cuda.synchronize()
        return time.perf_counter() - started

    steps = {}
    for batch in (1, 8, 32):
        timed(prompts[:batch], 4)
        decoding = timed(prompts[:batch], 65) - timed(prompts[:batch], 1)
        steps[f"batch_{batch}_ms"] = round(1000 * decoding / 64, 2)
    return steps


def profiled(label: str, run: Callable[[], object]) -> dict[str, Any]:
    """One run under torch.profiler: wall time, the GPU's busy time and the costliest operators."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        started = time.perf_counter()
        run()
        torch.cuda.synchronize()
        wall = time.perf_counter() - started
    events = profile.key_averages()
    on_gpu = [event for event in events if event.device_type == DeviceType.CUDA]
    kernels = sum(event.self_device_time_total for event in on_gpu) / 1e6
    print(f"== {label}: wall {wall:.2f} s, GPU busy {kernels:.2f} s ({100 * kernels / wall:.0f}%)")
    print(events.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
    print(events.table(sort_by="self_device_time_total", row_limit=8, max_name_column_width=60))
    return {"run": label, "wall_seconds": round(wall, 2), "gpu_busy_seconds": round(kernels, 2)}


def profile_engines(generator: Generator, prompts: list[Any]) -> dict[str, Any]:
    batch = with_new_tokens(prompts[:32], 64)
    generator.generate(batch)  # warm-up: a cold first pass made the sweep's steps twice as long
    found: dict[str, Any] = {"static_step": step_times(generator, prompts)}
    print(json.dumps(found), flush=True)
    found["static"] = profiled("static, 32 requests, 64 new tokens", lambda: generator.generate(batch))
    # In this process (not the server's child process), so that the profiler sees its steps.
    engine = ContinuousEngine(generator, ManagerBatcher(generator, 32), max_waiting=64)
    try:
        run_continuous(engine, batch, 32)  # warm-up: the manager's first shapes
        found["continuous"] = profiled(
            "continuous, 32 requests, 64 new tokens", lambda: run_continuous(engine, batch, 32)
        )
    finally:
        engine.close()
    return found


def shown(row: dict[str, Any]) -> dict[str, Any]:
    """Printed as soon as it is measured, so a run stopped at its time limit still shows its rows."""
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--layers", type=int, default=30, help="deepseek-llm-7b has 30")
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--profile", action="store_true", help="first, where a decoding step's time goes")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/deeptune-gpu-serving"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu/serving.py needs a CUDA GPU; none is visible, so there is nothing to measure")
        return
    args.work_dir.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(args.work_dir, args.layers)
    settings = LoadSettings(model=str(model_dir), device="cuda:0")
    generator = Generator.load(settings, max_new_tokens_limit=256)
    prompts = workload(generator, args.requests)
    results = []
    profile = profile_engines(generator, prompts) if args.profile else None
    if "static" in args.engines:
        run_static(generator, prompts[: max(args.concurrency)], max(args.concurrency))  # warm-up
        results += [shown(run_static(generator, prompts, c)) for c in args.concurrency]
    if "continuous" in args.engines:
        # As the server runs it: the model and its generation loop in a process of their own.
        batcher = BatcherProcess(settings, max(args.concurrency), max_new_tokens_limit=256)
        engine = ContinuousEngine(generator, batcher, max_waiting=args.requests)
        try:
            # Warm-up, not counted: the manager captures CUDA graphs for the shapes it first meets.
            run_continuous(engine, prompts[: max(args.concurrency)], max(args.concurrency))
            results += [shown(run_continuous(engine, prompts, c)) for c in args.concurrency]
        finally:
            engine.close()
    report = {
        "machine": machine_info(torch=torch.__version__, gpu=torch.cuda.get_device_name(0)),
        "settings": {
            "layers": args.layers,
            "requests": args.requests,
            "concurrency": args.concurrency,
            "engines": args.engines,
            "max_new_tokens": list(LENGTHS),
        },
        "results": results,
    }
    if profile:
        report["profile"] = profile
    save_gpu_report("gpu-serving", report)


if __name__ == "__main__":
    main()
