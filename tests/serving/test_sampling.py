"""Per-row sampling (deeptune_serving/sampling.py) in-process: greedy rows untouched, sampled rows drawn
from their own tempered top-p distribution, and a transformers release it does not know refused."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig, LlamaForCausalLM
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from deeptune_serving.sampling import PLACEHOLDERS, RowNucleusDraw, RowTemperature, install, nucleus
from deeptune_trainer.synthetic import tokenizer_texts
from deeptune_trainer.tinymodels import tiny_config, train_tokenizer

PROBABILITIES = torch.tensor([0.5, 0.3, 0.15, 0.05])


def _slot(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(dtype=torch.int32)


def test_the_nucleus_is_the_fewest_likeliest_tokens_reaching_top_p() -> None:
    logits = PROBABILITIES.log().repeat(3, 1)
    kept = torch.isfinite(nucleus(logits, torch.tensor([0.7, 0.9, 0.01]))).tolist()
    assert kept == [
        [True, True, False, False],
        [True, True, True, False],
        [True, False, False, False],  # the likeliest token always stays
    ]


def test_greedy_rows_are_untouched_and_sampled_rows_follow_their_distribution() -> None:
    torch.manual_seed(0)
    temperature = RowTemperature()
    draw = RowNucleusDraw(temperature)
    logits = PROBABILITIES.log()
    # Row 0 greedy; row 1 sampled as it is; row 2 at temperature 0.5 within top-p 0.9.
    rows = {0: (0.0, 1.0), 1: (1.0, 1.0), 2: (0.5, 0.9)}
    counts = torch.zeros(3, 4)
    draws = 4000
    for _ in range(draws):
        scores = logits.repeat(3, 1)
        scores = temperature(scores, _slot([rows[r][0] for r in rows]))
        scores = draw(scores, _slot([rows[r][1] for r in rows]))
        assert torch.equal(scores[0], logits), "a greedy row's logits are left as they are"
        counts[torch.arange(3), scores.argmax(dim=-1)] += 1
    frequencies = counts / draws
    # Temperature 0.5 squares the probabilities: 0.69, 0.25, 0.06, 0.01; top-p 0.9 keeps the first two.
    nucleus_of_row_2 = torch.tensor([0.25, 0.09, 0, 0]) / 0.34
    expected = torch.stack([torch.tensor([1.0, 0, 0, 0]), PROBABILITIES, nucleus_of_row_2])
    torch.testing.assert_close(frequencies, expected, atol=0.03, rtol=0)


@pytest.fixture(scope="module")
def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config("llama", train_tokenizer(tokenizer_texts()), head_dim=32)).eval()


def _manager(model: LlamaForCausalLM, generation_config: GenerationConfig) -> object:
    model.destroy_cached_continuous_batching_manager()  # a model keeps the manager it made last
    return model.init_continuous_batching(
        generation_config=generation_config,
        continuous_batching_config=ContinuousBatchingConfig(
            page_size=16,
            num_blocks=8,
            max_batch_tokens=64,
            max_requests_per_batch=4,
            per_request_processors=True,
        ),
    )


def test_install_replaces_the_placeholders_sampler_with_the_argmax(tiny_llama: LlamaForCausalLM) -> None:
    manager = _manager(tiny_llama, GenerationConfig(**PLACEHOLDERS, max_new_tokens=4))
    install(manager)
    processors = manager.logit_processor.logits_processor  # type: ignore[attr-defined]
    assert [type(p) for p in processors] == [RowTemperature, RowNucleusDraw]
    assert manager.generation_config.do_sample is False  # type: ignore[attr-defined]


def test_a_manager_it_does_not_know_is_refused_with_what_to_do(tiny_llama: LlamaForCausalLM) -> None:
    manager = _manager(tiny_llama, GenerationConfig(do_sample=False, max_new_tokens=4))
    with pytest.raises(RuntimeError, match=r"batching\.mode: dynamic"):
        install(manager)
