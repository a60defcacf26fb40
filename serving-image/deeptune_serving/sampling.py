"""Per-row sampling inside transformers' continuous batching: a greedy row takes the argmax, a sampled
row is drawn from its own temperature and top-p.

Why: one `ContinuousBatchingManager` serves greedy and sampled requests alike, and transformers gives
it one `do_sample` for all of them. Run with sampling on, it put every row of every step through top-p
(a sort of the whole vocabulary), a softmax and `torch.multinomial`, greedy or not; with DeepSeek's
102,400-token vocabulary that made greedy requests 24× slower on a CPU than an argmax
(bench/vocabulary_sampling.py). Here the manager takes the argmax, and two per-request processors
make that argmax a sample for the rows that ask for one: their logits are divided by the temperature,
cut to the top-p nucleus (sorting those rows only), and given Gumbel noise; the argmax of logits plus
Gumbel noise is a draw from their softmax (the Gumbel-max trick). Greedy rows are not touched, so
their argmax is exact greedy decoding.

transformers builds a manager's processors from its generation config only, so `install` swaps them
in on a manager made with temperature and top-p placeholders (which gives each a per-request slot),
before it starts. It checks that the manager holds what it replaces, so a transformers release that
changes this fails when the model loads, saying so, rather than serving wrong samples.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.generation.continuous_batching.cb_logits_processors import ContinuousBatchingLogitsProcessor

PLACEHOLDERS = {"do_sample": True, "temperature": 0.5, "top_p": 0.99}
"""The generation config `install` needs the manager made with: values neither None nor 1, so that
transformers gives temperature and top-p a per-request slot each (the values themselves are unused:
every request brings its own)."""


def _floats(tensor_arg: torch.Tensor, rows: int) -> torch.Tensor:
    """A per-request slot holds float32 values viewed as int32 (transformers' bulk storage)."""
    return tensor_arg[:rows].view(dtype=torch.float32)


def _as_slot(requests: list[Any], key: str, default: float) -> torch.Tensor:
    """Each request's own value of `key` as a slot's row (float32 viewed as int32)."""
    values = [request.state.logit_processor_kwargs.get(key, default) for request in requests]
    return torch.tensor(values, dtype=torch.float32, device="cpu").view(dtype=torch.int32)


class RowTemperature(ContinuousBatchingLogitsProcessor):
    """Divides each sampled row's logits by its temperature; notes which rows sample (temperature > 0)
    for `RowNucleusDraw`, which runs next in the same step."""

    supported_kwargs: dict[str, type] = {"temperature": float}
    ignored_kwargs: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.sampled_rows = torch.empty(0, dtype=torch.long)

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.copy_(torch.zeros_like(int32_tensor, dtype=torch.float32).view(dtype=torch.int32))

    def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
        return _as_slot(requests_with_new_token, "temperature", 0.0)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        temperature = _floats(tensor_arg, scores.size(0)).to(scores.device)
        self.sampled_rows = (temperature > 0).nonzero().squeeze(-1)
        if self.sampled_rows.numel():
            rows = self.sampled_rows
            scores[rows] = scores[rows] / temperature[rows].unsqueeze(-1).to(scores.dtype)
        return scores


class RowNucleusDraw(ContinuousBatchingLogitsProcessor):
    """For the rows `RowTemperature` found sampling: keeps the top-p nucleus of their (tempered)
    distribution and adds Gumbel noise, so the manager's argmax draws from it."""

    supported_kwargs: dict[str, type] = {"top_p": float}
    ignored_kwargs: tuple[str, ...] = ("filter_value", "min_tokens_to_keep")

    def __init__(self, temperature: RowTemperature) -> None:
        self._temperature = temperature

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.copy_(torch.ones_like(int32_tensor, dtype=torch.float32).view(dtype=torch.int32))

    def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
        return _as_slot(requests_with_new_token, "top_p", 1.0)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        rows = self._temperature.sampled_rows
        if rows.numel() == 0:
            return scores
        logits = scores[rows].float()
        top_p = _floats(tensor_arg, scores.size(0)).to(scores.device)[rows]
        cut = (top_p < 1).nonzero().squeeze(-1)
        if cut.numel():
            logits[cut] = nucleus(logits[cut], top_p[cut])
        gumbel = -torch.empty_like(logits).exponential_().log()
        scores[rows] = (logits + gumbel).to(scores.dtype)
        return scores


def nucleus(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Each row's logits outside its smallest set of tokens whose probability reaches top_p set to -inf
    (the most likely token always stays)."""
    ascending, order = torch.sort(logits, dim=-1)
    below = ascending.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p).unsqueeze(-1)
    below[..., -1] = False
    return logits.masked_fill(below.scatter(-1, order, below), float("-inf"))


def install(manager: Any) -> None:
    """Make a manager (created with `PLACEHOLDERS`, not started) sample per row: its temperature and
    top-p processors replaced by the two above, its sampler by the argmax."""
    processors = manager.logit_processor.logits_processor
    names = [type(processor).__name__ for processor in processors]
    expected = ["ContinuousBatchingTemperatureLogitsWarper", "ContinuousBatchingTopPLogitsWarper"]
    if names != expected:
        raise RuntimeError(
            f"transformers' continuous batching built the logits processors {names}, not {expected}: "
            "deeptune_serving.sampling does not know this transformers release; use batching.mode: dynamic"
        )
    temperature = RowTemperature()
    processors[0], processors[1] = temperature, RowNucleusDraw(temperature)
    manager.generation_config.do_sample = False
