"""Benchmark: what a greedy request costs in the continuous engine's sampler, by vocabulary size.

Why: the continuous engine (serving-image/deeptune_serving/engine.py) runs transformers'
`ContinuousBatchingManager` with `do_sample=True` and per-request temperature and top-p, since one
manager serves greedy and sampled requests alike; a greedy request is sampled at temperature 1e-6.
So every row of every step goes through top-p (a sort of the whole vocabulary), a softmax and
`torch.multinomial`, greedy or not. The serving benchmark's tiny model has 768 tokens, where that is
cheap; DeepSeek's models have 102,400 (deepseek-llm) to 129,280 (V3, R1). This runs 32 greedy requests
through the manager as the engine configures it (`engine`) and through a manager that only takes the
argmax (`argmax`, what greedy decoding needs), on a random-weight Llama with each vocabulary, and
`generate()` (static batching, greedy) for reference. One compute thread, as the serving benchmark.

    python bench/vocabulary_sampling.py          # ~2 minutes
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
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
from transformers.generation.configuration_utils import ContinuousBatchingConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info, save_report  # bench/machine.py; scripts run from bench/

from deeptune_serving.engine import GREEDY_TEMPERATURE, PAGE_SIZE

REQUESTS = 32
PROMPT_TOKENS = 16


def tiny_llama(vocabulary: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocabulary,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=2048,
    )
    return LlamaForCausalLM(config).eval()


def prompts(vocabulary: int) -> torch.Tensor:
    return torch.randint(0, vocabulary, (REQUESTS, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1))


def manager_tokens_per_second(model: LlamaForCausalLM, new_tokens: int, *, as_the_engine: bool) -> float:
    """32 greedy requests at once through a continuous-batching manager; output tokens per second."""
    if as_the_engine:  # engine.py's placeholders: the sampler on, per-request temperature and top-p
        config = GenerationConfig(do_sample=True, temperature=0.5, top_p=0.99, max_new_tokens=new_tokens)
        per_request = {"temperature": GREEDY_TEMPERATURE, "top_p": 1.0}
    else:
        config, per_request = GenerationConfig(do_sample=False, max_new_tokens=new_tokens), {}
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
    manager.start()
    try:
        started = time.perf_counter()
        for index, ids in enumerate(prompts(model.config.vocab_size).tolist()):
            manager.add_request(ids, request_id=f"r{index}", max_new_tokens=new_tokens, **per_request)
        tokens = 0
        for _ in range(REQUESTS):
            output = manager.get_result(timeout=600)
            if output is None:
                raise SystemExit("the manager stopped answering")
            tokens += len(output.generated_tokens)
        return tokens / (time.perf_counter() - started)
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
    results = []
    columns = ("engine tok/s", "argmax tok/s", "generate tok/s", "argmax/engine")
    print(f"{'vocabulary':>10} {columns[0]:>13} {columns[1]:>13} {columns[2]:>15} {columns[3]:>14}")
    for vocabulary in vocabularies:
        model = tiny_llama(vocabulary)
        generate_tokens_per_second(model, 2)  # warm-up
        engine = manager_tokens_per_second(model, new_tokens, as_the_engine=True)
        argmax = manager_tokens_per_second(model, new_tokens, as_the_engine=False)
        row = {
            "vocabulary": vocabulary,
            "engine_tokens_per_second": round(engine, 1),
            "argmax_tokens_per_second": round(argmax, 1),
            "generate_tokens_per_second": round(generate_tokens_per_second(model, new_tokens), 1),
            "argmax_over_engine": round(argmax / engine, 1),
        }
        results.append(row)
        print(
            f"{vocabulary:>10} {row['engine_tokens_per_second']:>13} {row['argmax_tokens_per_second']:>13} "
            f"{row['generate_tokens_per_second']:>15} {row['argmax_over_engine']:>14}",
            flush=True,
        )
    report = {
        "machine": machine_info(torch=torch.__version__, transformers=transformers.__version__),
        "settings": {"requests": REQUESTS, "prompt_tokens": PROMPT_TOKENS, "new_tokens": new_tokens},
        "results": results,
    }
    save_report("vocabulary_sampling", report, smoke=args.smoke)


if __name__ == "__main__":
    main()
