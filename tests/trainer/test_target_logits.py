"""Logits at the labelled positions only: the batch says which, and the loss and gradients are those
of logits at every position."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedModel

from deeptune_trainer.data.sample import Message, Sample
from deeptune_trainer.formatting import IGNORE_INDEX, Collator, pack, tokenize_sample
from deeptune_trainer.modeling import computes_logits_at_targets_only
from deeptune_trainer.training import logits_at_targets_only

IGN = IGNORE_INDEX


def test_collator_marks_the_positions_whose_next_token_is_scored() -> None:
    features = [
        {"input_ids": [1, 2, 3, 4], "labels": [IGN, IGN, 3, 4]},
        {"input_ids": [5, 6], "labels": [IGN, 6]},
    ]
    batch = Collator(pad_token_id=0, logits_at_targets_only=True)(features)
    assert batch["logits_to_keep"].tolist() == [[False, True, True, False], [True, False, False, False]]
    assert batch["shift_labels"].tolist() == [3, 4, 6]
    # The rest of the batch is what it is without the option.
    plain = Collator(pad_token_id=0)(features)
    assert set(batch) == {*plain, "logits_to_keep", "shift_labels"}
    for name, tensor in plain.items():
        assert torch.equal(batch[name], tensor), name


def _samples() -> list[Sample]:
    pairs = [("topic: 猫 山 river", "yes"), ("dog", "狗 cat"), ("topic: 雨 blue green", "rain"), ("hi", "ok")]
    return [Sample(messages=(Message("user", p), Message("assistant", a))) for p, a in pairs]


def _lora_grads(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    return loss.detach(), [
        p.grad.clone() for p in model.parameters() if p.requires_grad and p.grad is not None
    ]


@pytest.mark.parametrize("architecture", ["llama", "deepseek_v3"])
@pytest.mark.parametrize("packing", [False, True])
def test_same_loss_and_gradients_as_logits_everywhere(
    architecture: str, packing: bool, tiny_llama_dir: Path, tiny_deepseek_dir: Path
) -> None:
    model_dir = tiny_llama_dir if architecture == "llama" else tiny_deepseek_dir
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    assert computes_logits_at_targets_only(base)
    torch.manual_seed(0)
    model = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=16, target_modules=["o_proj"], init_lora_weights=False)
    )
    examples = [tokenize_sample(sample, tokenizer, 64) for sample in _samples()]
    features = pack(examples, 64) if packing else [example.feature() for example in examples]

    everywhere = Collator(tokenizer.pad_token_id)(features)
    targets_only = Collator(tokenizer.pad_token_id, logits_at_targets_only=True)(features)
    scored = int((everywhere["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert len(targets_only["shift_labels"]) == scored < everywhere["input_ids"].numel() / 3

    loss, grads = _lora_grads(model, everywhere)
    loss_targets_only, grads_targets_only = _lora_grads(model, targets_only)
    torch.testing.assert_close(loss_targets_only, loss, rtol=1e-5, atol=1e-6)
    assert len(grads) == len(grads_targets_only) > 0
    for grad, grad_targets_only in zip(grads, grads_targets_only, strict=True):
        torch.testing.assert_close(grad_targets_only, grad, rtol=1e-4, atol=1e-6)


def _gpt2() -> PreTrainedModel:
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8))


def test_only_known_architectures_in_transformers_own_code(tiny_llama_dir: Path) -> None:
    llama = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert computes_logits_at_targets_only(llama)
    assert not computes_logits_at_targets_only(_gpt2())  # not a model type checked here
    # A class loaded with trustRemoteCode lives outside transformers.
    remote = type("LlamaForCausalLM", (type(llama),), {"__module__": "transformers_modules.some.repo"})
    assert not computes_logits_at_targets_only(remote(llama.config))


def test_not_with_several_gpus_in_one_process(tiny_llama_dir: Path) -> None:
    """nn.DataParallel would split the flattened shift_labels apart from their rows."""
    llama = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert logits_at_targets_only(llama, SimpleNamespace(n_gpu=0))  # CPU
    assert logits_at_targets_only(llama, SimpleNamespace(n_gpu=1))  # one GPU, or one per process
    assert not logits_at_targets_only(llama, SimpleNamespace(n_gpu=2))
