"""The tiny local models: real architectures, a working tokenizer, a forward pass."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from deeptune_trainer import tinymodels


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_deepseek_dir"])
def test_tiny_model_loads_and_learns_from_a_batch(fixture: str, request: pytest.FixtureRequest) -> None:
    directory: Path = request.getfixturevalue(fixture)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "你好, world"}, {"role": "assistant", "content": "天气很好"}],
        tokenize=False,
    )
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    output = model(input_ids=ids, labels=ids)
    assert output.logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(output.loss)
    output.loss.backward()
    assert all(p.grad is not None for p in model.get_input_embeddings().parameters())


def test_tokenizer_round_trips_chinese_and_has_special_tokens(tiny_llama_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    text = "我们 learn 深度学习, 2024!"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|begin|>",
        "<|end|>",
        "<|pad|>",
    )
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    assert 500 <= len(tokenizer) <= 1000


def test_deepseek_v3_has_mla_dense_and_moe_layers(tiny_deepseek_dir: Path) -> None:
    config = AutoConfig.from_pretrained(tiny_deepseek_dir)
    assert config.model_type == "deepseek_v3"
    model = AutoModelForCausalLM.from_pretrained(tiny_deepseek_dir)
    names = {name for name, _ in model.named_modules()}
    assert "model.layers.0.self_attn.q_a_proj" in names  # MLA query compression
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa" in names
    assert "model.layers.0.mlp.gate_proj" in names  # dense first layer
    assert "model.layers.1.mlp.experts" in names  # routed experts
    assert "model.layers.1.mlp.shared_experts.gate_proj" in names


def test_command_line_writes_a_model_directory(tmp_path: Path) -> None:
    text_file = tmp_path / "texts.txt"
    text_file.write_text("hello 你好\n", encoding="utf-8")
    tinymodels.main(["--kind", "llama", "--out", str(tmp_path / "model"), "--text-file", str(text_file)])
    written = {path.name for path in (tmp_path / "model").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= written
    assert AutoConfig.from_pretrained(tmp_path / "model").model_type == "llama"
