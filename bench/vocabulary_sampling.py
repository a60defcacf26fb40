"""Benchmark: what a greedy request costs in the continuous engine's sampler, by vocabulary size.

Why: one transformers `ContinuousBatchingManager` serves greedy and sampled requests alike, with one
`do_sample` for all. Until 2026-12-06 the engine ran it with sampling on and sampled a greedy request at
temperature 1e-6 (`shared`): every row of every step went through top-p (a sort of the whole
vocabulary), a softmax and `torch.multinomial`. The serving benchmark's tiny model has 768 tokens,
where that is cheap; DeepSeek's models have 102,400 (deepseek-llm) to 129,280 (V3, R1). Now the engine
takes the argmax and samples only the rows that ask for it (`per_row`: serving-image/deeptune_serving/
sampling.py). This runs 32 greedy requests through a manager set up each way and through a plain
argmax manager (`argmax`, the floor), on the tests' tiny Llama with each vocabulary, and `generate()`
(static batching, greedy) for reference; `per_row` must answer exactly as `argmax` (checked). One
compute thread, as the serving benchmark.

    python bench/vocabulary_sampling.py          # ~30 s
    python bench/vocabulary_sampling.py --smoke  # what CI runs

Prints a table and writes JSON to bench/results/vocabulary_sampling-<host>.json (-smoke.json).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import GenerationConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.generation.configuration_utils import ContinuousBatchingConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info, save_report  # bench/machine.py; scripts run from bench/

from deeptune_serving import sampling
from deeptune_serving.batcher import PAGE_SIZE
from deeptune_trainer.synthetic import tokenizer_texts
from deeptune_trainer.tinymodels import tiny_config, train_tokenizer

REQUESTS = 32
PROMPT_TOKENS = 16


def tiny_llama(tokenizer: PreTrainedTokenizerFast, vocabulary: int) -> LlamaForCausalLM:
    """The tests' tiny Llama (heads of 32, as the serving benchmark's), its vocabulary widened."""
    config = tiny_config("llama", tokenizer, head_dim=32)
    config.vocab_size = vocabulary
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def prompts(vocabulary: int) -> torch.Tensor:
    return torch.randint(0, vocabulary, (REQUESTS, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1))


SETUPS = ("shared", "per_row", "argmax")


def manager_run(model: LlamaForCausalLM, new_tokens: int, setup: str) -> tuple[float, list[list[int]]]:
    """32 greedy requests at once through a continuous-batching manager set up as `setup` says: output
    tokens per second, and each request's tokens."""
    if setup == "argmax":
        config, per_request = GenerationConfig(do_sample=False, max_new_tokens=new_tokens), {}
    else:
        config = GenerationConfig(**sampling.PLACEHOLDERS, max_new_tokens=new_tokens)
        per_request = {"temperature": 1e-6 if setup == "shared" else 0.0, "top_p": 1.0}
    per_row = PROMPT_TOKENS + new_tokens
    manager = model.init_continuous_batching(
        generation_config=config,
        continuous_batching_config=ContinuousBatchingConfig(
            page_size=PAGE_SIZE,
            num_blocks=REQUESTS * math.ceil(per_row / PAGE_SIZE),
            max_batch_tokens=REQUESTS * PROMPT_TOKENS,
            max_requests_per_batch=REQUESTS,
            per_request_processors=True,
        ),
    )
    if setup == "per_row":
        sampling.install(manager)
    manager.start()
    try:
        started = time.perf_counter()
        for index, ids in enumerate(prompts(model.config.vocab_size).tolist()):
            manager.add_request(ids, request_id=f"r{index:02d}", max_new_tokens=new_tokens, **per_request)
        answers = {}
        for _ in range(REQUESTS):
            output = manager.get_result(timeout=600)
            if output is None:
                raise SystemExit("the manager stopped answering")
            answers[output.request_id] = list(output.generated_tokens)
        seconds = time.perf_counter() - started
        return sum(map(len, answers.values())) / seconds, [answers[key] for key in sorted(answers)]
    finally:
        manager.stop(block=True)
        model.destroy_cached_continuous_batching_manager()


def generate_tokens_per_second(model: LlamaForCausalLM, new_tokens: int) -> float:
    ids = prompts(model.config.vocab_size)
    started = time.perf_counter()
    with torch.inference_mode():
        length = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
        model.generate(ids, do_sample=False, pad_token_id=0, **length)
    return REQUESTS * new_tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--smoke", action="store_true", help="small vocabularies, a few tokens (CI)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    vocabularies = (768, 4096) if args.smoke else (768, 32_000, 102_400, 129_280)
    new_tokens = 4 if args.smoke else 16
    tokenizer = train_tokenizer(tokenizer_texts())
    results = []
    print(f"{'vocabulary':>10} {'shared':>9} {'per_row':>9} {'argmax':>9} {'generate':>9}  (tokens/s)")
    for vocabulary in vocabularies:
        model = tiny_llama(tokenizer, vocabulary)
        generate_tokens_per_second(model, 2)  # warm-up
        runs = {setup: manager_run(model, new_tokens, setup) for setup in SETUPS}
        if runs["per_row"][1] != runs["argmax"][1]:
            raise SystemExit(f"vocabulary {vocabulary}: per-row sampling's greedy answers are not the argmax")
        row: dict[str, float] = {"vocabulary": vocabulary}
        row |= {f"{setup}_tokens_per_second": round(runs[setup][0], 1) for setup in SETUPS}
        row["generate_tokens_per_second"] = round(generate_tokens_per_second(model, new_tokens), 1)
        row["per_row_over_shared"] = round(runs["per_row"][0] / runs["shared"][0], 1)
        results.append(row)
        cells = [row[f"{setup}_tokens_per_second"] for setup in SETUPS] + [row["generate_tokens_per_second"]]
        print(f"{vocabulary:>10} " + " ".join(f"{cell:>9.0f}" for cell in cells), flush=True)
    report = {
        "machine": machine_info(torch=torch.__version__, transformers=transformers.__version__),
        "settings": {"requests": REQUESTS, "prompt_tokens": PROMPT_TOKENS, "new_tokens": new_tokens},
        "results": results,
    }
    save_report("vocabulary_sampling", report, smoke=args.smoke)


if __name__ == "__main__":
    main()
