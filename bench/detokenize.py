"""Benchmark: the serving engine's text assembly per streamed token, by answer length.

Why: the server turns each generated token into text as it streams (stop sequences, half characters).
Decoding the whole answer so far at every token, as `TextAssembler` did until 2026-12-06, costs O(n)
per token and O(n²) per answer, all of it holding the GIL that the generation loop needs. It now
decodes a window of a few tokens (generation.py: `TextAssembler._new_text`). This measures both on the
same tokens: `whole` (decode everything so far, per token: the old way, and what a naive streamer
does) and `window` (`TextAssembler.push` as it is), in microseconds per token.

The tokenizer is the tiny models' byte-level BPE (DeepSeek's kind), trained here on the synthetic
texts; answers are those texts joined, cut to each length.

    python bench/detokenize.py            # a few seconds
    python bench/detokenize.py --smoke    # what CI runs

Prints a table and writes JSON to bench/results/detokenize-<host>.json (detokenize-smoke.json).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import transformers

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from machine import machine_info, save_report  # noqa: E402  (bench/machine.py; scripts run from bench/)

from deeptune_serving.generation import TextAssembler  # noqa: E402
from deeptune_trainer.synthetic import tokenizer_texts  # noqa: E402
from deeptune_trainer.tinymodels import train_tokenizer  # noqa: E402

DECODE_OPTIONS = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}


def microseconds_per_token(seconds: float, tokens: int) -> float:
    return round(1e6 * seconds / tokens, 2)


def whole(tokenizer: transformers.PreTrainedTokenizerBase, ids: list[int]) -> float:
    started = time.perf_counter()
    for end in range(1, len(ids) + 1):
        tokenizer.decode(ids[:end], **DECODE_OPTIONS)
    return time.perf_counter() - started


def window(tokenizer: transformers.PreTrainedTokenizerBase, ids: list[int]) -> float:
    assembler = TextAssembler(tokenizer, len(ids) + 1, ["\n\nUser:"], eos_ids=[])
    started = time.perf_counter()
    pieces = [assembler.push(token) for token in ids]
    pieces.append(assembler.finish())
    seconds = time.perf_counter() - started
    if "".join(pieces) != tokenizer.decode(ids, **DECODE_OPTIONS):
        raise SystemExit("the streamed text differs from the whole decode")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--smoke", action="store_true", help="short answers only (CI)")
    args = parser.parse_args()
    lengths = (64, 256) if args.smoke else (256, 1024, 4096, 8192)
    tokenizer = train_tokenizer(tokenizer_texts())
    corpus: list[int] = []
    while len(corpus) < max(lengths):
        corpus += tokenizer(" ".join(tokenizer_texts()), add_special_tokens=False)["input_ids"]
    results = []
    print(f"{'tokens':>7} {'whole us/token':>15} {'window us/token':>16} {'ratio':>7}")
    for length in lengths:
        ids = corpus[:length]
        old, new = whole(tokenizer, ids), window(tokenizer, ids)
        row = {
            "tokens": length,
            "whole_us_per_token": microseconds_per_token(old, length),
            "window_us_per_token": microseconds_per_token(new, length),
            "whole_over_window": round(old / new, 1),
        }
        results.append(row)
        cells = (row["whole_us_per_token"], row["window_us_per_token"], row["whole_over_window"])
        print(f"{length:>7} {cells[0]:>15} {cells[1]:>16} {cells[2]:>7}")
    report = {
        "machine": machine_info(transformers=transformers.__version__, tokenizer_vocab=len(tokenizer)),
        "results": results,
    }
    save_report("detokenize", report, smoke=args.smoke)


if __name__ == "__main__":
    main()
