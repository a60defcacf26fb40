"""Benchmark: what Triton's dynamic batching and response cache buy for a DeepTune ModelDeployment.

Why: the serving model runs every request Triton gathered in one `generate` call, so under concurrent
load dynamic batching should raise throughput (one decoding step serves many requests), at the cost
of a little queueing delay when requests are few; and a repeated greedy request should be answered
from the response cache without touching the model.

What runs: the generated model repository (`deeptune.serving.repository`) served by the tritonserver
of the nvidia-pytriton wheel on CPU (tests/serving/wheel_server.py), with three models of the same
tiny random-weight Llama: `batched` (`batching.mode: dynamic`, max batch 8, 2 ms queue delay),
`unbatched` (batching.enabled false) and `cached` (dynamic plus the response cache). Continuous
batching, the default mode, is compared with it in bench/llm_serving.py. Every
request asks for exactly `--tokens` new tokens (a random-weight model seldom stops early), with
distinct prompts except in the cache-hit run. Clients are threads with one HTTP client each, closed
loop: each sends its next request when the previous one returns. Per configuration it measures:

- throughput (requests/s and generated tokens/s) and p50/p99 latency, client-side;
- Triton's own count of inferences and model executions over the run (from its metrics port), whose
  ratio is the mean batch size the model saw;
- for the cache: p50/p99 of a repeated request (hits) against fresh ones (misses), one at a time.

The server's torch runs on one thread and the clients share the same 2 cores, so the absolute figures
are of this machine only; the ratios are the point. The load average is recorded with the results.

    python bench/serving.py            # a few minutes
    python bench/serving.py --smoke    # a few requests per configuration: what CI runs

Prints a table and writes JSON to bench/results/serving-<host>.json (serving-smoke.json for --smoke).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
import tritonclient.http as httpclient

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the tests' wheel-server helper

from machine import machine_info, save_report  # noqa: E402  (bench/machine.py; scripts run from bench/)

from deeptune.api.modeldeployment import ModelDeploymentSpec  # noqa: E402
from deeptune.serving.repository import ModelLocation, repository_files, write_repository  # noqa: E402
from deeptune_trainer.synthetic import keyword_rows, tokenizer_texts  # noqa: E402
from deeptune_trainer.tinymodels import build_tiny_model  # noqa: E402
from tests.serving.wheel_server import (  # noqa: E402
    RunningServer,
    free_ports,
    install,
    loopback_command,
    start,
)

CONCURRENCY = (1, 8, 32)


@dataclass
class Measured:
    model: str
    concurrency: int
    requests: int
    seconds: float
    requests_per_second: float
    tokens_per_second: float
    p50_ms: float
    p99_ms: float
    inferences: int
    executions: int
    mean_batch: float


def _spec(service: dict[str, int], **overrides: Any) -> ModelDeploymentSpec:
    base: dict[str, Any] = {"model": {"merged": {"pvc": {"claimName": "bench"}}}, "resources": {"gpu": 0}}
    return ModelDeploymentSpec.model_validate({**base, "service": service, **overrides})


def start_server(model_dir: Path, work: Path, tokens: int) -> RunningServer:
    triton = install(work / "triton")
    http, grpc, metrics = free_ports(3)
    service = {"httpPort": http, "grpcPort": grpc, "metricsPort": metrics}
    generation = {"maxNewTokens": tokens}
    dynamic = {"mode": "dynamic"}  # Triton's dynamic batcher: what this benchmark measures
    specs = {
        "batched": _spec(service, generation=generation, batching=dynamic),
        "unbatched": _spec(service, generation=generation, batching={"enabled": False}),
        "cached": _spec(service, generation=generation, batching=dynamic, responseCache={"enabled": True}),
    }
    location = ModelLocation(model=str(model_dir))
    files: dict[str, str] = {}
    for name, spec in specs.items():
        files |= repository_files(spec, location, name)
    root = write_repository(files, work / "repository")
    # The server-wide flags (the cache's size and the ports) from the cached model's spec.
    command = loopback_command(triton, specs["cached"], root)
    return start(triton, command, work / "tritonserver.log", (http, grpc, metrics)).wait_ready()


def _request(prompt: str) -> list[httpclient.InferInput]:
    text = httpclient.InferInput("text_input", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[prompt.encode()]], dtype=np.object_))
    return [text]


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def _counts(server: RunningServer, model: str) -> tuple[float, float]:
    metrics = server.metrics()
    return metrics.get(("nv_inference_count", model), 0.0), metrics.get(
        ("nv_inference_exec_count", model), 0.0
    )


def run_load(
    server: RunningServer, model: str, prompts: list[str], concurrency: int, tokens: int
) -> Measured:
    """Closed-loop load: `concurrency` clients send `prompts` until none are left."""
    queue: Iterator[str] = iter(prompts)
    lock = threading.Lock()
    latencies: list[float] = []

    def client() -> None:
        connection = httpclient.InferenceServerClient(server.http_url, network_timeout=300)
        while True:
            with lock:
                prompt = next(queue, None)
            if prompt is None:
                return
            started = time.perf_counter()
            connection.infer(model, _request(prompt))
            elapsed = time.perf_counter() - started
            with lock:
                latencies.append(elapsed)

    before = _counts(server, model)
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    after = _counts(server, model)
    inferences, executions = int(after[0] - before[0]), int(after[1] - before[1])
    return Measured(
        model=model,
        concurrency=concurrency,
        requests=len(latencies),
        seconds=seconds,
        requests_per_second=len(latencies) / seconds,
        tokens_per_second=len(latencies) * tokens / seconds,
        p50_ms=1000 * statistics.median(latencies),
        p99_ms=1000 * _percentile(latencies, 0.99),
        inferences=inferences,
        executions=executions,
        mean_batch=inferences / executions if executions else 0.0,
    )


def run_cache(server: RunningServer, prompts: list[str], repeats: int) -> dict[str, dict[str, float]]:
    """p50/p99 of fresh prompts (misses) and of one prompt asked again and again (hits), one at a time."""
    client = httpclient.InferenceServerClient(server.http_url, network_timeout=300)

    def timed(prompt: str) -> float:
        started = time.perf_counter()
        client.infer("cached", _request(prompt))
        return 1000 * (time.perf_counter() - started)

    misses = [timed(prompt) for prompt in prompts[:repeats]]
    timed(prompts[0])  # it is cached now
    hits = [timed(prompts[0]) for _ in range(repeats)]
    hit_count = server.metrics().get(("nv_cache_num_hits_per_model", "cached"), 0.0)
    return {
        "miss": {"p50_ms": statistics.median(misses), "p99_ms": _percentile(misses, 0.99), "n": len(misses)},
        "hit": {"p50_ms": statistics.median(hits), "p99_ms": _percentile(hits, 0.99), "n": len(hits)},
        "triton_cache_hits": {"count": hit_count},
    }


def machine() -> dict[str, Any]:
    return machine_info(
        torch=torch.__version__,
        transformers=transformers.__version__,
        triton="2.51 (nvidia-pytriton wheel, CPU, Python backend)",
    )


HEADER = (
    f"{'model':<10} {'conc':>4} {'req':>5} {'req/s':>7} {'tok/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'batch':>6}"
)


def row_line(m: Measured) -> str:
    return (
        f"{m.model:<10} {m.concurrency:>4} {m.requests:>5} {m.requests_per_second:>7.1f} "
        f"{m.tokens_per_second:>7.0f} {m.p50_ms:>8.1f} {m.p99_ms:>8.1f} {m.mean_batch:>6.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    parser.add_argument("--requests", type=int, default=96, help="requests per configuration (at least 2x32)")
    parser.add_argument("--smoke", action="store_true", help="a few requests per configuration (CI)")
    args = parser.parse_args()
    requests = 32 if args.smoke else max(args.requests, 2 * max(CONCURRENCY))
    prompts = [row["prompt"] for row in keyword_rows(requests * (len(CONCURRENCY) * 2 + 1), seed=7)]
    started_load = os.getloadavg()
    print(f"load average {started_load[0]:.2f} {started_load[1]:.2f} {started_load[2]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = build_tiny_model("llama", work / "model", tokenizer_texts())
        server = start_server(model_dir, work, args.tokens)
        try:
            results: list[Measured] = []
            print(HEADER)
            fresh = iter(prompts)
            for concurrency in CONCURRENCY:
                for model in ("batched", "unbatched"):
                    batch = [next(fresh) for _ in range(requests)]
                    run_load(server, model, batch[: min(8, requests)], concurrency, args.tokens)  # warm-up
                    results.append(run_load(server, model, batch, concurrency, args.tokens))
                    print(row_line(results[-1]), flush=True)
            cache = run_cache(server, [next(fresh) for _ in range(requests)], min(requests, 32))
        finally:
            server.stop()
    miss, hit = cache["miss"], cache["hit"]
    print(
        f"cache (concurrency 1): miss p50 {miss['p50_ms']:.1f} ms p99 {miss['p99_ms']:.1f} ms;"
        f" hit p50 {hit['p50_ms']:.1f} ms p99 {hit['p99_ms']:.1f} ms;"
        f" Triton counted {cache['triton_cache_hits']['count']:.0f} hits"
    )
    speedups = {
        str(c): next(r for r in results if r.model == "batched" and r.concurrency == c).requests_per_second
        / next(r for r in results if r.model == "unbatched" and r.concurrency == c).requests_per_second
        for c in CONCURRENCY
    }
    print(
        "throughput batched / unbatched: "
        + ", ".join(f"concurrency {c}: {s:.2f}x" for c, s in speedups.items())
    )
    finished_load = os.getloadavg()
    print(f"load average {finished_load[0]:.2f} {finished_load[1]:.2f} {finished_load[2]:.2f}")
    report = {
        "machine": {**machine(), "load_average_start": started_load, "load_average_end": finished_load},
        "settings": {"tokens": args.tokens, "requests": requests, "concurrency": list(CONCURRENCY)},
        "results": [asdict(r) for r in results],
        "throughput_batched_over_unbatched": speedups,
        "cache": cache,
    }
    save_report("serving", report, smoke=args.smoke)


if __name__ == "__main__":
    main()
