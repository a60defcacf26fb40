"""Which modules LoRA adapts (`lora.targetModules`) and when QLoRA is refused, on a tiny DeepSeek-V3
(MLA, dense layer 0, MoE layers 1-2 with routed and shared experts) and a tiny Llama."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, DeepseekV2Config, PreTrainedModel

from deeptune.api.finetunejob import FineTuneJobSpec
from deeptune.api.trainer import TrainerPaths
from deeptune_trainer.errors import TrainerInputError
from deeptune_trainer.modeling import (
    apply_method,
    check_qlora_quantizes_the_model,
    load_model,
    model_parameters,
    peft_targets_as_resolved,
    resolve_target_modules,
    routed_expert_parameters,
)

MakeSpec = Callable[..., FineTuneJobSpec]

MLA = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
SHARED_EXPERTS = {f"model.layers.{i}.mlp.shared_experts.{name}" for i in (1, 2) for name in MLP}
DENSE_MLP = {f"model.layers.0.mlp.{name}" for name in MLP}

V2_LITE = DeepseekV2Config(
    vocab_size=102400,
    hidden_size=2048,
    intermediate_size=10944,
    moe_intermediate_size=1408,
    num_hidden_layers=27,
    first_k_dense_replace=1,
    num_attention_heads=16,
    num_key_value_heads=16,
    q_lora_rank=None,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    n_routed_experts=64,
    n_shared_experts=2,
    num_experts_per_tok=6,
)
"""deepseek-ai/DeepSeek-V2-Lite's shape (its config.json), without weights."""


def _lora_modules(wrapped: PreTrainedModel | PeftModel) -> set[str]:
    """The full names (as in the base model) of the modules peft gave a LoRA adapter."""
    return {
        name.removeprefix("base_model.model.").removesuffix(".lora_A")
        for name, _ in wrapped.named_modules()
        if name.endswith(".lora_A")
    }


def _adapted(model: PreTrainedModel, spec: FineTuneJobSpec) -> set[str]:
    return _lora_modules(apply_method(model, spec))


def _targets(make_spec: MakeSpec, *entries: str) -> FineTuneJobSpec:
    return make_spec(lora={"targetModules": list(entries)})


def _assert_routed_experts_untouched(model: PreTrainedModel | PeftModel) -> None:
    for name, module in model.named_modules():
        if name.endswith(".mlp.experts") or name.endswith(".mlp.gate"):
            assert type(module).__name__ in {"DeepseekV3Experts", "DeepseekV3TopkRouter"}, name
            assert not any(parameter.requires_grad for parameter in module.parameters()), name


@pytest.fixture
def deepseek(tiny_deepseek_dir: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(tiny_deepseek_dir)


@pytest.fixture
def llama(tiny_llama_dir: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir)


# --- targetModules ----------------------------------------------------------------------------


def test_plain_name_adapts_every_linear_layer_of_that_name(
    deepseek: PreTrainedModel, make_spec: MakeSpec
) -> None:
    # peft alone would read a bare gate_proj/up_proj on deepseek_v3 as the fused routed experts.
    adapted = _adapted(deepseek, _targets(make_spec, "gate_proj", "kv_b_proj"))
    gate = {name for name in DENSE_MLP | SHARED_EXPERTS if name.endswith(".gate_proj")}
    assert adapted == gate | {f"model.layers.{i}.self_attn.kv_b_proj" for i in range(3)}
    _assert_routed_experts_untouched(deepseek)


def test_path_qualified_names_adapt_the_shared_experts_not_the_routed_ones(
    deepseek: PreTrainedModel, make_spec: MakeSpec
) -> None:
    spec = _targets(make_spec, *(f"mlp.shared_experts.{name}" for name in MLP), "self_attn.q_b_proj")
    assert resolve_target_modules(deepseek, list(spec.lora.target_modules)) == list(spec.lora.target_modules)
    adapted = _adapted(deepseek, spec)
    assert adapted == SHARED_EXPERTS | {f"model.layers.{i}.self_attn.q_b_proj" for i in range(3)}
    _assert_routed_experts_untouched(deepseek)


def test_regular_expressions_full_match_full_names(deepseek: PreTrainedModel, make_spec: MakeSpec) -> None:
    entry = r"re:.*\.layers\.[01]\.self_attn\..*"  # the layer norms in self_attn are not Linear: skipped
    expected = [f"model.layers.{i}.self_attn.{name}" for i in (0, 1) for name in MLA]
    assert sorted(resolve_target_modules(deepseek, [entry])) == sorted(expected)
    assert _adapted(deepseek, _targets(make_spec, entry)) == set(expected)
    with pytest.raises(TrainerInputError, match="re:q_a_proj match no Linear layer"):
        resolve_target_modules(deepseek, ["re:q_a_proj"])  # a full match: the last name alone is no match


def test_adapter_on_shared_experts_reloads_onto_them(
    deepseek: PreTrainedModel, tiny_deepseek_dir: Path, make_spec: MakeSpec, tmp_path: Path
) -> None:
    wrapped = apply_method(deepseek, _targets(make_spec, *(f"mlp.shared_experts.{name}" for name in MLP)))
    wrapped.save_pretrained(tmp_path / "adapter")
    with peft_targets_as_resolved():
        reloaded = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_deepseek_dir), tmp_path / "adapter"
        )
    loras = {name: value for name, value in wrapped.state_dict().items() if "lora_" in name}
    reloaded_loras = {name: value for name, value in reloaded.state_dict().items() if "lora_" in name}
    assert loras.keys() == reloaded_loras.keys() and len(loras) == 2 * len(SHARED_EXPERTS)
    assert all(loras[name].equal(reloaded_loras[name]) for name in loras)


@pytest.mark.parametrize(
    ("entries", "refused"),
    [
        # The routed experts are fused parameters and `gate` is the router module: neither is a Linear layer.
        (["q_a_proj", "experts.gate_up_proj", "re:.*nothing.*"], "experts.gate_up_proj, re:.*nothing.*"),
        (["gate"], "gate"),
    ],
)
def test_entries_matching_no_linear_layer_are_refused(
    deepseek: PreTrainedModel, entries: list[str], refused: str
) -> None:
    with pytest.raises(TrainerInputError) as raised:
        resolve_target_modules(deepseek, entries)
    message = str(raised.value)
    assert raised.value.reason == "InvalidSpec"
    assert message.startswith(f"lora.targetModules {refused} match no Linear layer"), message
    assert "mlp.shared_experts.gate_proj" in message and "self_attn.kv_b_proj" in message  # examples


def test_invalid_regular_expression_is_refused(deepseek: PreTrainedModel) -> None:
    with pytest.raises(
        TrainerInputError, match=r"lora.targetModules re:\(\[ is not a valid regular"
    ) as raised:
        resolve_target_modules(deepseek, ["re:(["])
    assert raised.value.reason == "InvalidSpec"


MOE_RECIPE = [
    "self_attn.q_a_proj",
    "self_attn.q_b_proj",
    "self_attn.kv_a_proj_with_mqa",
    "self_attn.kv_b_proj",
    "self_attn.o_proj",
    *(f"mlp.{name}" for name in MLP),
    *(f"mlp.shared_experts.{name}" for name in MLP),
]
"""The usual MoE recipe, as a user writes it: attention, the dense layers' MLP, the shared experts."""


def test_the_moe_recipe_adapts_attention_dense_mlp_and_shared_experts(
    deepseek: PreTrainedModel, make_spec: MakeSpec
) -> None:
    wrapped = apply_method(deepseek, make_spec(lora={"targetModules": MOE_RECIPE}))
    adapted = _lora_modules(wrapped)
    attention = {f"model.layers.{i}.self_attn.{name}" for i in range(3) for name in MLA}
    assert adapted == attention | DENSE_MLP | SHARED_EXPERTS
    assert len(adapted) == 24
    _assert_routed_experts_untouched(deepseek)
    ids = torch.randint(0, deepseek.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    wrapped(input_ids=ids, labels=ids).loss.backward()
    lora_b = {name: p.grad for name, p in wrapped.named_parameters() if "lora_B" in name}
    assert len(lora_b) == 24 and all(grad is not None and grad.abs().sum() > 0 for grad in lora_b.values())


def test_auto_on_llama_is_attention_and_mlp(llama: PreTrainedModel, make_spec: MakeSpec) -> None:
    names = ("q_proj", "k_proj", "v_proj", "o_proj", *MLP)
    assert resolve_target_modules(llama, ["auto"]) == list(names)
    adapted = _adapted(llama, make_spec())
    assert adapted == {
        f"model.layers.{i}.{'mlp' if name in MLP else 'self_attn'}.{name}" for i in range(2) for name in names
    }


# --- QLoRA on MoE -----------------------------------------------------------------------------


def test_routed_expert_count_matches_the_model_transformers_builds(tiny_deepseek_dir: Path) -> None:
    config = AutoConfig.from_pretrained(tiny_deepseek_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_deepseek_dir)
    routed = sum(p.numel() for name, p in model.named_parameters() if ".mlp.experts." in name)
    assert routed_expert_parameters(config) == routed == 2 * 4 * 3 * 64 * 32  # 2 MoE layers, 4 experts
    assert model_parameters(config) == sum(p.numel() for p in model.parameters())


def test_qlora_on_deepseek_v2_lite_is_refused_with_the_memory_it_would_take() -> None:
    assert routed_expert_parameters(V2_LITE) == 26 * 64 * 3 * 2048 * 1408  # ≈ 14.4B
    assert 15.6e9 < model_parameters(V2_LITE) < 15.8e9
    with pytest.raises(TrainerInputError) as raised:
        check_qlora_quantizes_the_model(V2_LITE, trust_remote_code=False)
    message = str(raised.value)
    assert raised.value.reason == "InvalidSpec"
    for part in (
        "model type deepseek_v2",
        "14.4B of the model's 15.7B parameters (92%)",
        "26.8 GiB in bf16",
        "53.6 GiB in fp32",
    ):
        assert part in message
    assert "method lora" in message and "resources.gpu" in message and "distributed.strategy fsdp" in message


def test_qlora_on_deepseek_remote_code_is_not_refused() -> None:
    """DeepSeek's own modeling code builds every expert from Linear layers, which bitsandbytes quantizes."""
    remote = copy.deepcopy(V2_LITE)
    remote.auto_map = {"AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM"}
    check_qlora_quantizes_the_model(remote, trust_remote_code=True)
    with pytest.raises(TrainerInputError, match="deepseek_v2"):  # transformers' own code without the trust
        check_qlora_quantizes_the_model(remote, trust_remote_code=False)


def test_load_model_refuses_qlora_on_moe_before_loading_weights(
    make_spec: MakeSpec, tiny_deepseek_dir: Path, tmp_path: Path
) -> None:
    config_only = tmp_path / "model"  # no weights, no tokenizer: the check must come before them
    config_only.mkdir()
    shutil.copy(tiny_deepseek_dir / "config.json", config_only)
    paths = TrainerPaths(output_dir=str(tmp_path / "out"), base_model=str(config_only))
    with pytest.raises(TrainerInputError, match=r"model type deepseek_v3.*\(22%\)") as raised:
        load_model(make_spec(method="qlora"), paths)
    assert raised.value.reason == "InvalidSpec"


def test_qlora_on_a_dense_model_passes_the_check(tiny_llama_dir: Path) -> None:
    check_qlora_quantizes_the_model(AutoConfig.from_pretrained(tiny_llama_dir), trust_remote_code=False)
