"""The memory planner: catalogue shapes against published sizes, the verdicts for the runs users ask
about (67B LoRA, 7B full, QLoRA on 24 GiB), the advice and its order, and properties that hold for
every catalogued model (more GPUs never cost memory per GPU, longer sequences never save it).
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deeptune.planner import (
    CUDA_OVERHEAD_BYTES,
    GIB,
    KNOWN_MODELS,
    MAX_ADVISED_WORLD_SIZE,
    MIN_ADVISED_SEQ_LENGTH,
    Method,
    ModelShape,
    PlanRequest,
    Strategy,
    estimate,
    shape_from_config,
)
from tests.conftest import ROOT

GPU_80 = 80 * GIB
GPU_24 = 24 * GIB

PUBLISHED_BILLIONS = {
    # The hub's parameter counts of the safetensors files, or the model card's size where it states
    # one (V2/V3/R1, whose multi-token-prediction layer transformers does not load).
    "deepseek-ai/deepseek-llm-7b-base": 6.91,
    "deepseek-ai/deepseek-llm-7b-chat": 6.91,
    "deepseek-ai/deepseek-llm-67b-base": 67.4,
    "deepseek-ai/deepseek-llm-67b-chat": 67.4,
    "deepseek-ai/deepseek-coder-1.3b-base": 1.35,
    "deepseek-ai/deepseek-coder-1.3b-instruct": 1.35,
    "deepseek-ai/deepseek-coder-6.7b-base": 6.74,
    "deepseek-ai/deepseek-coder-6.7b-instruct": 6.74,
    "deepseek-ai/deepseek-coder-33b-base": 33.3,
    "deepseek-ai/deepseek-coder-33b-instruct": 33.3,
    "deepseek-ai/DeepSeek-V2-Lite": 15.7,
    "deepseek-ai/DeepSeek-V2-Lite-Chat": 15.7,
    "deepseek-ai/DeepSeek-V2": 236,
    "deepseek-ai/DeepSeek-V3": 671,
    "deepseek-ai/DeepSeek-R1": 671,
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": 1.78,
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": 7.62,
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B": 14.8,
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B": 32.8,
    "deepseek-ai/DeepSeek-R1-Distill-Llama-8B": 8.03,
    "deepseek-ai/DeepSeek-R1-Distill-Llama-70B": 70.6,
}

DEEPSEEK_LLM_7B_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 4096,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 30,
    "num_key_value_heads": 32,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1",
    "use_cache": True,
    "vocab_size": 102400,
}

DEEPSEEK_V3_CONFIG: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 129280,
}

LLM_67B = KNOWN_MODELS["deepseek-ai/deepseek-llm-67b-base"]
LLM_7B = KNOWN_MODELS["deepseek-ai/deepseek-llm-7b-base"]
V2_LITE = KNOWN_MODELS["deepseek-ai/DeepSeek-V2-Lite"]
CODER_1_3B = KNOWN_MODELS["deepseek-ai/deepseek-coder-1.3b-base"]


def wide_shallow(model_type: str, **changes: Any) -> ModelShape:
    """Two layers so wide that one layer is most of the model: sharding cannot help it."""
    config = {**DEEPSEEK_V3_CONFIG, "vocab_size": 1000, "hidden_size": 8192, "num_hidden_layers": 2}
    config.update(intermediate_size=65536, num_attention_heads=64, model_type=model_type, **changes)
    return shape_from_config(config)


# A tiny-expert MoE whose dense first layer holds nearly all weights, and its dense twin.
TINY_EXPERT_MOE = wide_shallow(
    "deepseek_v3",
    first_k_dense_replace=1,
    n_routed_experts=2,
    moe_intermediate_size=64,
    num_experts_per_tok=1,
)
DENSE_TWIN = wide_shallow("deepseek_v3", n_routed_experts=None)


@pytest.mark.parametrize("name", sorted(KNOWN_MODELS))
def test_catalogue_totals_match_the_published_sizes(name: str) -> None:
    billions = KNOWN_MODELS[name].total_params / 1e9
    assert billions == pytest.approx(PUBLISHED_BILLIONS[name], rel=0.02)


def test_the_catalogue_has_the_models_users_bring() -> None:
    assert set(KNOWN_MODELS) == set(PUBLISHED_BILLIONS)


@pytest.mark.parametrize(("name", "billions"), [("DeepSeek-V2", 21), ("DeepSeek-V3", 37)])
def test_moe_active_parameters_match_the_published_counts(name: str, billions: float) -> None:
    shape = KNOWN_MODELS[f"deepseek-ai/{name}"]
    assert shape.active_params / 1e9 == pytest.approx(billions, rel=0.03)
    assert shape.routed_expert_params > 0.9 * shape.total_params


def test_lora_targets_mirror_the_trainers_auto_modules() -> None:
    dense = {linear.name for linear in LLM_7B.lora_target_linears()}
    assert dense == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert [linear.name for linear in V2_LITE.lora_target_linears()] == [
        "q_proj",
        "kv_a_proj_with_mqa",
        "kv_b_proj",
        "o_proj",
    ]
    v3 = KNOWN_MODELS["deepseek-ai/DeepSeek-V3"]
    assert "q_a_proj" in {linear.name for linear in v3.lora_target_linears()}
    assert LLM_7B.lora_params(16) == 16 * 30 * (4 * 2 * 4096 + 3 * (4096 + 11008))
    assert LLM_7B.lora_target_params == 30 * (4 * 4096 * 4096 + 3 * 4096 * 11008)


def test_shape_from_config_reads_published_config_files_as_the_catalogue() -> None:
    assert shape_from_config(DEEPSEEK_LLM_7B_CONFIG) == LLM_7B
    assert shape_from_config(DEEPSEEK_V3_CONFIG) == KNOWN_MODELS["deepseek-ai/DeepSeek-V3"]


def test_shape_from_config_reads_unknown_model_types_as_llama_style() -> None:
    shape = shape_from_config({**DEEPSEEK_LLM_7B_CONFIG, "model_type": "mistral", "num_key_value_heads": 8})
    assert shape.model_type == "mistral"
    assert shape.num_key_value_heads == 8
    assert shape.total_params < LLM_7B.total_params
    assert not shape.is_moe
    assert not shape.uses_mla


def test_a_null_query_rank_means_no_query_compression() -> None:
    assert V2_LITE.q_lora_rank is None
    assert V2_LITE.uses_mla
    assert V2_LITE.is_moe


@pytest.mark.parametrize(
    ("config", "key"),
    [
        (DEEPSEEK_LLM_7B_CONFIG, "vocab_size"),
        (DEEPSEEK_LLM_7B_CONFIG, "model_type"),
        (DEEPSEEK_V3_CONFIG, "kv_lora_rank"),
        (DEEPSEEK_V3_CONFIG, "q_lora_rank"),
        (DEEPSEEK_V3_CONFIG, "moe_intermediate_size"),
    ],
)
def test_a_missing_key_is_named(config: dict[str, Any], key: str) -> None:
    incomplete = {name: value for name, value in config.items() if name != key}
    with pytest.raises(ValueError, match=re.escape(repr(key))):
        shape_from_config(incomplete)


@pytest.mark.parametrize("value", [0, -1, True, "4096", 4096.0])
def test_a_dimension_that_is_not_a_positive_integer_is_named(value: object) -> None:
    with pytest.raises(ValueError, match="'hidden_size'"):
        shape_from_config({**DEEPSEEK_LLM_7B_CONFIG, "hidden_size": value})


def test_67b_lora_does_not_fit_one_80gib_gpu_and_the_advice_names_the_fewest_gpus_with_fsdp() -> None:
    plan = estimate(LLM_67B, PlanRequest("lora", gpu_memory_bytes=GPU_80))
    assert plan.fits is False
    assert plan.advice is not None
    advised = plan.advice.plan.request
    assert advised.strategy == "fsdp"
    assert advised.world_size > 1
    assert plan.advice.change == f"{advised.world_size} GPUs and strategy fsdp"
    assert f"would fit with {advised.world_size} GPUs and strategy fsdp" in plan.summary()
    request = PlanRequest("lora", strategy="fsdp", world_size=advised.world_size, gpu_memory_bytes=GPU_80)
    assert estimate(LLM_67B, request).fits is True
    assert estimate(LLM_67B, replace(request, world_size=advised.world_size - 1)).fits is False


def test_67b_lora_fits_eight_80gib_gpus_sharded() -> None:
    plan = estimate(LLM_67B, PlanRequest("lora", world_size=8, gpu_memory_bytes=GPU_80))
    assert plan.fits is True
    assert plan.strategy == "fsdp"
    assert plan.advice is None


def test_7b_full_needs_fp32_master_weights_and_adam_and_fits_sharded_over_eight() -> None:
    single = estimate(LLM_7B, PlanRequest("full", strategy="ddp", gpu_memory_bytes=GPU_80))
    assert single.fits is False
    assert single.weights_bytes + single.optimizer_bytes == pytest.approx(16 * LLM_7B.total_params)
    assert single.weights_bytes + single.optimizer_bytes > 100e9
    sharded = estimate(LLM_7B, PlanRequest("full", strategy="fsdp", world_size=8, gpu_memory_bytes=GPU_80))
    assert sharded.fits is True


def test_qlora_on_a_dense_7b_fits_a_24gib_gpu() -> None:
    plan = estimate(LLM_7B, PlanRequest("qlora", gpu_memory_bytes=GPU_24))
    assert plan.fits is True
    assert plan.weights_bytes < 0.5 * estimate(LLM_7B, PlanRequest("lora")).weights_bytes


def test_qlora_on_moe_keeps_the_routed_experts_unquantized() -> None:
    lora = estimate(V2_LITE, PlanRequest("lora"))
    qlora = estimate(V2_LITE, PlanRequest("qlora"))
    assert qlora.weights_bytes > lora.weights_bytes


def test_qlora_is_advised_for_a_dense_model_that_sharding_cannot_help() -> None:
    request = small_run("lora", gpu_memory_bytes=between(DENSE_TWIN, "qlora", "lora"))
    plan = estimate(DENSE_TWIN, request)
    assert plan.advice is not None
    assert plan.advice.change == "method qlora instead of lora"


def test_qlora_is_never_advised_for_moe_even_where_it_would_fit() -> None:
    request = small_run("lora", gpu_memory_bytes=between(TINY_EXPERT_MOE, "qlora", "lora"))
    assert estimate(TINY_EXPERT_MOE, replace(request, method="qlora")).fits is True
    plan = estimate(TINY_EXPERT_MOE, request)
    assert plan.fits is False
    assert plan.advice is None
    assert "no single change found makes it fit" in plan.summary()


def small_run(method: Method, **changes: Any) -> PlanRequest:
    """A run already at the smallest batch and sequence the advice would propose."""
    return PlanRequest(method, per_device_batch_size=1, max_seq_length=MIN_ADVISED_SEQ_LENGTH, **changes)


def between(shape: ModelShape, smaller: Method, larger: Method) -> int:
    """GPU memory halfway between two methods' totals for a small run."""
    low, high = (estimate(shape, small_run(method)).total_bytes for method in (smaller, larger))
    assert low < high
    return int((low + high) / 2)


def test_a_smaller_batch_is_advised_when_activations_do_not_fit() -> None:
    request = PlanRequest("lora", per_device_batch_size=64, max_seq_length=4096, gpu_memory_bytes=GPU_24)
    plan = estimate(CODER_1_3B, request)
    assert plan.advice is not None
    batch = plan.advice.plan.request.per_device_batch_size
    assert plan.advice.change.startswith(f"perDeviceBatchSize {batch} ")
    assert plan.advice.plan.fits is True
    assert estimate(CODER_1_3B, replace(request, per_device_batch_size=batch + 1)).fits is False


def test_shorter_sequences_are_advised_when_the_batch_is_already_one() -> None:
    request = PlanRequest("lora", per_device_batch_size=1, max_seq_length=65536, gpu_memory_bytes=GPU_24)
    plan = estimate(LLM_7B, request)
    assert plan.advice is not None
    length = plan.advice.plan.request.max_seq_length
    assert plan.advice.change == f"maxSeqLength {length}"
    assert length in {32768, 16384, 8192, 4096}
    assert plan.advice.plan.fits is True
    assert estimate(LLM_7B, replace(request, max_seq_length=2 * length)).fits is False


def test_gradient_checkpointing_is_advised_last() -> None:
    request = small_run(
        "lora", strategy="fsdp", world_size=MAX_ADVISED_WORLD_SIZE, gradient_checkpointing=False
    )
    on = estimate(CODER_1_3B, replace(request, gradient_checkpointing=True)).total_bytes
    off = estimate(CODER_1_3B, request).total_bytes
    plan = estimate(CODER_1_3B, replace(request, gpu_memory_bytes=int((on + off) / 2)))
    assert plan.advice is not None
    assert plan.advice.change == "gradientCheckpointing on"


def test_auto_picks_ddp_when_one_gpu_holds_the_run_and_fsdp_when_not() -> None:
    assert estimate(CODER_1_3B, PlanRequest("lora", world_size=8, gpu_memory_bytes=GPU_80)).strategy == "ddp"
    assert estimate(LLM_67B, PlanRequest("lora", world_size=8, gpu_memory_bytes=GPU_80)).strategy == "fsdp"
    assert estimate(LLM_67B, PlanRequest("lora", world_size=1, gpu_memory_bytes=GPU_80)).strategy == "ddp"


def test_unknown_gpu_memory_says_nothing_of_fitting() -> None:
    plan = estimate(LLM_67B, PlanRequest("lora"))
    assert plan.fits is None
    assert plan.advice is None
    assert plan.strategy == "ddp"
    assert "GPU memory unknown" in plan.summary()


def test_the_summary_is_one_line_in_gib() -> None:
    plan = estimate(LLM_67B, PlanRequest("lora", world_size=8, gpu_memory_bytes=GPU_80))
    pattern = (
        r"lora on 8 GPUs \(fsdp\): [\d.]+ GiB per GPU of 80 GiB "
        r"\(weights [\d.]+, optimizer [\d.]+, activations [\d.]+, overhead 1\.5\)"
    )
    assert re.fullmatch(pattern, plan.summary())


def test_the_parts_add_up() -> None:
    plan = estimate(V2_LITE, PlanRequest("lora", gpu_memory_bytes=GPU_80))
    parts = plan.weights_bytes + plan.optimizer_bytes + plan.activations_bytes + plan.overhead_bytes
    assert plan.total_bytes == parts


@pytest.mark.parametrize(
    "changes", [{"world_size": 0}, {"per_device_batch_size": 0}, {"precision_bytes": 1}, {"strategy": "tp"}]
)
def test_a_request_out_of_range_is_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        PlanRequest("lora", **changes)


MODELS = st.sampled_from(sorted(KNOWN_MODELS)).map(KNOWN_MODELS.__getitem__)
METHODS = st.sampled_from(["lora", "qlora", "full"])
STRATEGIES = st.sampled_from(["ddp", "fsdp", "deepspeed"])
REQUESTS = st.builds(
    PlanRequest,
    method=METHODS,
    strategy=st.sampled_from(["auto", "ddp", "fsdp", "deepspeed"]),
    world_size=st.integers(1, 64),
    per_device_batch_size=st.integers(1, 16),
    max_seq_length=st.integers(16, 32768),
    gradient_checkpointing=st.booleans(),
    lora_r=st.sampled_from([8, 16, 64]),
    precision_bytes=st.sampled_from([2, 4]),
    gpu_memory_bytes=st.sampled_from([None, 16 * GIB, GPU_24, 40 * GIB, GPU_80, 141 * GIB]),
)


@settings(derandomize=True, max_examples=200, deadline=None)
@given(
    shape=MODELS, method=METHODS, sizes=st.lists(st.integers(1, 1024), min_size=2, max_size=2, unique=True)
)
def test_more_gpus_with_fsdp_never_need_more_memory_per_gpu(
    shape: ModelShape, method: Method, sizes: list[int]
) -> None:
    fewer, more = sorted(sizes)
    request = PlanRequest(method, strategy="fsdp")
    on_fewer = estimate(shape, replace(request, world_size=fewer)).total_bytes
    on_more = estimate(shape, replace(request, world_size=more)).total_bytes
    assert on_more <= on_fewer * (1 + 1e-12)


@settings(derandomize=True, max_examples=200, deadline=None)
@given(shape=MODELS, request=REQUESTS, strategy=STRATEGIES, extra=st.integers(1, 8192))
def test_longer_sequences_never_need_less_memory(
    shape: ModelShape, request: PlanRequest, strategy: Strategy, extra: int
) -> None:
    request = replace(request, strategy=strategy)
    longer = replace(request, max_seq_length=request.max_seq_length + extra)
    assert estimate(shape, longer).total_bytes >= estimate(shape, request).total_bytes


@settings(derandomize=True, max_examples=200, deadline=None)
@given(shape=MODELS, request=REQUESTS)
def test_advice_fits_and_never_offers_qlora_on_moe(shape: ModelShape, request: PlanRequest) -> None:
    plan = estimate(shape, request)
    assert plan.strategy != "auto"
    assert (plan.fits is None) == (request.gpu_memory_bytes is None)
    if plan.advice is None:
        return
    assert plan.fits is False
    assert plan.advice.plan.fits is True
    assert plan.advice.plan.advice is None
    if shape.is_moe:
        assert plan.advice.plan.request.method == request.method


@settings(derandomize=True, max_examples=100, deadline=None)
@given(shape=MODELS, request=REQUESTS)
def test_auto_is_ddp_exactly_when_ddp_fits(shape: ModelShape, request: PlanRequest) -> None:
    plan = estimate(shape, replace(request, strategy="auto"))
    ddp = estimate(shape, replace(request, strategy="ddp"))
    assert plan.strategy == ("fsdp" if ddp.fits is False and request.world_size > 1 else "ddp")


def test_offload_keeps_only_gradients_and_gathered_units_on_the_gpu() -> None:
    on_gpu = PlanRequest("full", strategy="deepspeed", world_size=8)
    optimizer = estimate(LLM_7B, replace(on_gpu, offload="optimizer"))
    everything = estimate(LLM_7B, replace(on_gpu, offload="optimizerAndParameters"))
    kept = estimate(LLM_7B, on_gpu)
    assert optimizer.optimizer_bytes == pytest.approx(2 * LLM_7B.total_params / 8)  # bf16 gradients
    assert kept.optimizer_bytes == pytest.approx(14 * LLM_7B.total_params / 8)
    assert optimizer.weights_bytes == kept.weights_bytes
    assert everything.weights_bytes < kept.weights_bytes  # the units gathered for compute only
    one_gpu = replace(on_gpu, world_size=1)
    whole = estimate(LLM_7B, one_gpu).weights_bytes
    assert estimate(LLM_7B, replace(one_gpu, offload="optimizerAndParameters")).weights_bytes < whole / 4


def test_offload_is_advised_where_more_gpus_are_not() -> None:
    at_most = PlanRequest("full", strategy="fsdp", world_size=MAX_ADVISED_WORLD_SIZE, max_seq_length=512)
    offloaded = estimate(LLM_67B, replace(at_most, strategy="deepspeed", offload="optimizer")).total_bytes
    plan = estimate(LLM_67B, replace(at_most, gpu_memory_bytes=int(offloaded) + 1))
    assert plan.fits is False
    assert plan.advice is not None
    assert plan.advice.change == "strategy deepspeed and offload optimizer"
    assert plan.advice.plan.fits is True
    assert f"on {MAX_ADVISED_WORLD_SIZE} GPUs (deepspeed, offload optimizer)" in plan.advice.plan.summary()


def test_offload_needs_deepspeed() -> None:
    with pytest.raises(ValueError, match="offload 'optimizer' needs strategy deepspeed"):
        PlanRequest("lora", strategy="fsdp", offload="optimizer")


GPU_RUNS = [
    json.loads(path.read_text())
    for path in sorted((ROOT / "bench" / "results").glob("gpu-*.json"))
    if not path.name.startswith("gpu-serving-")
]
"""bench/gpu/lora_qlora_fsdp.py's reports (an H200's, an H100's): peak memory of real training steps."""
BENCH_SHAPES = {"dense-7b": LLM_7B}
"""The benchmark's models by name (random weights of these architectures, all their layers)."""
PLAN_MARGIN = 1.1
"""How far above a measured peak the plan may be: more refuses runs that would fit."""


def card(run: dict[str, Any]) -> str:
    return str(run["machine"]["gpu"]).split()[1]  # "NVIDIA H100 80GB HBM3" -> "H100"


def test_gpu_reports_are_found() -> None:
    assert {card(run) for run in GPU_RUNS} >= {"H100", "H200"}


@pytest.mark.parametrize(
    ("settings", "measured"),
    [
        pytest.param(run["settings"], row, id=f"{card(run)}-{row['model']}-{row['configuration']}")
        for run in GPU_RUNS
        for row in run["results"]
    ],
)
def test_the_plan_covers_the_peak_measured_on_a_gpu_by_at_most_a_tenth(
    settings: dict[str, Any], measured: dict[str, Any]
) -> None:
    assert settings["layers"] is None, "the figures must come from the whole model"
    request = PlanRequest(
        measured["configuration"],
        per_device_batch_size=settings["batch"],
        max_seq_length=settings["seq"],
        gradient_checkpointing=settings["gradient_checkpointing"],
        lora_r=settings["lora_r"],
    )
    planned = estimate(BENCH_SHAPES[measured["model"]], request).total_bytes - CUDA_OVERHEAD_BYTES
    peak = measured["peak_allocated_gib_per_gpu"] * GIB
    assert peak <= planned <= PLAN_MARGIN * peak, (
        f"planned {planned / GIB:.2f} GiB, measured {peak / GIB:.2f}"
    )
