"""Will it fit? GPU memory per GPU of a fine-tuning run, estimated before any GPU is held.

The operator uses it to refuse runs that plainly cannot fit and to say the cheapest change that would
(more GPUs with FSDP, qlora, a smaller batch or maxSeqLength, gradient checkpointing). It is a simple,
documented model for that purpose, not a precise prediction: it counts weights, trainable state
(adapter or full weights' gradients and Adam), activations and a fixed CUDA overhead, and nothing of
the allocator's behaviour. Pure arithmetic on the architecture's numbers from config.json: no torch,
no I/O.

Bytes per GPU, per part:
- weights: every parameter at the compute precision (bf16: 2 bytes) for lora and full; qlora stores
  decoder Linear weights in NF4 (`NF4_BITS_PER_PARAM`) and, through peft's
  `prepare_model_for_kbit_training`, every other parameter in fp32 (`QLORA_UNQUANTIZED_BYTES`):
  embeddings, lm_head, norms, and the routed experts of DeepSeek-V2/V3, which transformers fuses into
  3-D parameters that bitsandbytes does not quantize. DDP replicates weights on every GPU; FSDP (full
  shard) and DeepSpeed ZeRO-3 divide them by the world size, plus the units gathered whole for compute
  (`FSDP_GATHERED_UNITS`).
- optimizer: the trainable parameters' own copies, gradients and Adam moments. LoRA adapters are fp32
  (peft upcasts 16-bit adapters): 4 + 4 + 8 = 16 bytes per adapter parameter. Full fine-tuning: a
  gradient at the compute precision, an fp32 master copy when that precision is 16-bit, and two fp32
  moments: 2 + 4 + 8 = 14 bytes per parameter on top of the 2 bytes of weights (16 in all, the usual
  mixed-precision Adam figure: ≈112 GB for a 7B model). FSDP and ZeRO-3 divide it by the world size.
- offload (DeepSpeed's ZeRO-Offload): `optimizer` moves the fp32 copies and Adam moments to host
  memory, leaving the gradients on the GPU; `optimizerAndParameters` moves the weights' shards too,
  leaving only the units gathered for compute.
- activations: see `_activation_bytes`; they are per GPU and not divided by sharding. Checked against
  the peaks measured on an H200 and an H100 (bench/results/gpu-h200-vm.json, gpu-h100-vm.json;
  tests/unit/test_planner.py reads every such report).
- overhead: `CUDA_OVERHEAD_BYTES`.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, Literal, get_args

Method = Literal["lora", "qlora", "full"]
Strategy = Literal["auto", "ddp", "fsdp", "deepspeed"]
Offload = Literal["none", "optimizer", "optimizerAndParameters"]

GIB = 2**30

CUDA_OVERHEAD_BYTES = 1.5 * GIB
"""CUDA context and kernels (≈0.5-1 GiB on recent GPUs), cuBLAS/cuDNN workspaces, NCCL buffers and
allocator slack: a fixed allowance, since none of it scales with the model."""

NF4_BITS_PER_PARAM = 4 + 8 / 64 + 32 / (64 * 256)
"""QLoRA's NF4 with double quantization: 4 bits per weight, an 8-bit scale per block of 64 weights,
and an fp32 scale per 256 such blocks: ≈4.127 bits."""

QLORA_UNQUANTIZED_BYTES = 4
"""`prepare_model_for_kbit_training` (which the trainer calls for qlora) casts every 16-bit parameter
that is not 4-bit to fp32; on DeepSeek-V2/V3 that includes the fused routed experts."""

FP32_BYTES = 4
QLORA_ACTIVATION_BYTES = FP32_BYTES
"""Under qlora the hidden states are fp32: the norms that `prepare_model_for_kbit_training` upcast
multiply them by fp32 weights, and bitsandbytes' 4-bit layers hand back their input's dtype. Measured
on an H200 (bench/results/gpu-h200-vm.json, deepseek-llm-7b's shape, 4 x 2048 tokens, checkpointing;
an H100 gave the same peaks): the peak was 2.1 GiB above a 16-bit activation estimate, about the fp32
layer inputs kept for backward (+1.9 GiB); counting every activation at 4 bytes stays above the peak,
by 0.9 GiB."""
ADAPTER_BYTES = FP32_BYTES
"""peft's `autocast_adapter_dtype` keeps LoRA weights in fp32 even on a 16-bit model."""

ADAM_MOMENTS_BYTES = 2 * FP32_BYTES
"""Adam's first and second moments, fp32, per trainable parameter."""

LOGITS_BYTES = FP32_BYTES
"""The loss reads the logits in fp32."""

FSDP_GATHERED_UNITS = 2
"""FSDP and ZeRO-3 all-gather one wrapped unit (a decoder layer, or the embeddings and lm_head) to
compute with it while prefetching the next: two of the largest units are whole at once."""

ACTIVATION_BYTES_PER_TOKEN_HIDDEN = 34
"""Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"): one
transformer layer keeps ≈ s·b·h·(34 + 5·a·s/h) bytes of 16-bit activations for backward (s sequence,
b batch, h hidden, a heads). The 5·a·s/h part is the attention scores and softmax, which PyTorch's
fused SDPA kernels (transformers' default attention, used by the trainer) recompute instead of keeping,
as the paper's selective recomputation does: 34·s·b·h. Counting the scores would refuse runs that fit,
e.g. a 7B at 32k tokens (≈150 GB for one layer's scores alone). SwiGLU MLPs keep a little more than
the paper's GELU MLP; the allowance is not refined for that."""

LOGITS_AT_TARGETS_MODEL_TYPES = frozenset({"llama", "qwen2", "deepseek_v2", "deepseek_v3"})
"""Model types for which the trainer asks for logits at the labelled positions only (it mirrors
`deeptune_trainer.modeling.LOGITS_AT_TARGETS_MODEL_TYPES`, which imports torch)."""

LABELLED_SHARE = 0.5
"""The share of a sequence that is labelled (the response, not the prompt), taken as half."""

SHARDING_STRATEGIES = frozenset({"fsdp", "deepspeed"})
MAX_ADVISED_WORLD_SIZE = 512
"""The most GPUs the advice proposes (64 nodes of 8)."""
MIN_ADVISED_SEQ_LENGTH = 256
"""Halving maxSeqLength below this would leave too little text to learn from to be worth advising."""

_MLA_TYPES = frozenset({"deepseek_v2", "deepseek_v3"})


@dataclass(frozen=True)
class Linear:
    """One nn.Linear of a decoder layer, by the name LoRA targets it with."""

    name: str
    in_features: int
    out_features: int

    @property
    def params(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class ParamCount:
    """Parameters by how each method stores them."""

    linear: int
    """Decoder nn.Linear weights: what bitsandbytes quantizes under qlora."""
    routed: int
    """Routed experts' fused 3-D weights: not nn.Linear, so never quantized."""
    other: int
    """Embeddings, lm_head, norms and the MoE router."""

    @property
    def total(self) -> int:
        return self.linear + self.routed + self.other

    def __add__(self, more: ParamCount) -> ParamCount:
        return ParamCount(self.linear + more.linear, self.routed + more.routed, self.other + more.other)

    def times(self, count: int) -> ParamCount:
        return ParamCount(self.linear * count, self.routed * count, self.other * count)

    def weight_bytes(self, method: Method, precision_bytes: int) -> float:
        if method == "qlora":
            return self.linear * NF4_BITS_PER_PARAM / 8 + (self.routed + self.other) * QLORA_UNQUANTIZED_BYTES
        return self.total * precision_bytes


@dataclass(frozen=True)
class ModelShape:
    """The architecture facts that decide training memory, as config.json states them.

    MLA fields (DeepSeek-V2/V3's multi-head latent attention) are None/0 on other models; MoE fields
    are 0 on dense models. Counts match transformers' models but for biases (Qwen2's q/k/v: <0.01%).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool
    q_lora_rank: int | None = None
    """None on MLA models without query compression (V2-Lite)."""
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    moe_intermediate_size: int = 0
    first_k_dense_replace: int = 0
    """The first k layers keep a dense MLP of `intermediate_size`; the rest are MoE."""
    num_experts_per_tok: int = 0

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    @property
    def uses_mla(self) -> bool:
        return self.kv_lora_rank is not None

    @property
    def dense_layer_count(self) -> int:
        return (
            min(self.first_k_dense_replace, self.num_hidden_layers) if self.is_moe else self.num_hidden_layers
        )

    @property
    def moe_layer_count(self) -> int:
        return self.num_hidden_layers - self.dense_layer_count

    def attention_linears(self) -> tuple[Linear, ...]:
        """The attention projections of one layer, named as transformers names them."""
        hidden, heads = self.hidden_size, self.num_attention_heads
        if self.kv_lora_rank is None:
            return (
                Linear("q_proj", hidden, heads * self.head_dim),
                Linear("k_proj", hidden, self.num_key_value_heads * self.head_dim),
                Linear("v_proj", hidden, self.num_key_value_heads * self.head_dim),
                Linear("o_proj", heads * self.head_dim, hidden),
            )
        query_width = heads * (self.qk_nope_head_dim + self.qk_rope_head_dim)
        query = (
            (Linear("q_proj", hidden, query_width),)
            if self.q_lora_rank is None
            else (
                Linear("q_a_proj", hidden, self.q_lora_rank),
                Linear("q_b_proj", self.q_lora_rank, query_width),
            )
        )
        return (
            *query,
            Linear("kv_a_proj_with_mqa", hidden, self.kv_lora_rank + self.qk_rope_head_dim),
            Linear("kv_b_proj", self.kv_lora_rank, heads * (self.qk_nope_head_dim + self.v_head_dim)),
            Linear("o_proj", heads * self.v_head_dim, hidden),
        )

    def mlp_linears(self, intermediate_size: int) -> tuple[Linear, ...]:
        """A SwiGLU MLP: the dense layers', or the shared experts' (their widths add up)."""
        hidden = self.hidden_size
        return (
            Linear("gate_proj", hidden, intermediate_size),
            Linear("up_proj", hidden, intermediate_size),
            Linear("down_proj", intermediate_size, hidden),
        )

    def lora_target_linears(self) -> tuple[Linear, ...]:
        """The Linear layers of one decoder layer that `targetModules: [auto]` adapts.

        Mirrors the trainer's `AUTO_TARGET_MODULES`: attention and MLP projections of Llama-style
        models; the MLA attention projections only on DeepSeek-V2/V3 (the same in every layer).
        """
        if self.uses_mla:
            return self.attention_linears()
        return self.attention_linears() + self.mlp_linears(self.intermediate_size)

    def _norm_params(self) -> int:
        latent_norms = (self.q_lora_rank or 0) + (self.kv_lora_rank or 0)
        return 2 * self.hidden_size + latent_norms

    @property
    def dense_layer(self) -> ParamCount:
        linears = self.attention_linears() + self.mlp_linears(self.intermediate_size)
        return ParamCount(sum(linear.params for linear in linears), 0, self._norm_params())

    @property
    def expert_params(self) -> int:
        """One routed expert: a SwiGLU MLP of `moe_intermediate_size`."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    @property
    def moe_layer(self) -> ParamCount:
        shared = (
            self.mlp_linears(self.moe_intermediate_size * self.n_shared_experts)
            if self.n_shared_experts
            else ()
        )
        linears = self.attention_linears() + shared
        router = self.n_routed_experts * self.hidden_size
        return ParamCount(
            linear=sum(linear.params for linear in linears),
            routed=self.n_routed_experts * self.expert_params,
            other=self._norm_params() + router,
        )

    @property
    def root(self) -> ParamCount:
        """What is outside the decoder layers: embeddings, lm_head (unless tied) and the final norm."""
        embeddings = self.vocab_size * self.hidden_size
        lm_head = 0 if self.tie_word_embeddings else embeddings
        return ParamCount(0, 0, embeddings + lm_head + self.hidden_size)

    @property
    def params(self) -> ParamCount:
        return (
            self.root
            + self.dense_layer.times(self.dense_layer_count)
            + self.moe_layer.times(self.moe_layer_count)
        )

    @property
    def largest_unit(self) -> ParamCount:
        """The largest part FSDP gathers whole: a decoder layer, or the root."""
        units = [self.root]
        if self.dense_layer_count:
            units.append(self.dense_layer)
        if self.moe_layer_count:
            units.append(self.moe_layer)
        return max(units, key=lambda unit: unit.total)

    @property
    def total_params(self) -> int:
        return self.params.total

    @property
    def routed_expert_params(self) -> int:
        return self.params.routed

    @property
    def active_params(self) -> int:
        """Parameters one token passes through: all but the routed experts it is not sent to."""
        if not self.is_moe:
            return self.total_params
        idle_experts = self.n_routed_experts - self.num_experts_per_tok
        return self.total_params - self.moe_layer_count * idle_experts * self.expert_params

    @property
    def lora_target_params(self) -> int:
        """Parameters in the Linear layers that LoRA's default targets adapt."""
        return self.num_hidden_layers * sum(linear.params for linear in self.lora_target_linears())

    def lora_params(self, r: int) -> int:
        """Adapter parameters at rank r: A (r × in) and B (out × r) per adapted Linear."""
        per_layer = sum(linear.in_features + linear.out_features for linear in self.lora_target_linears())
        return r * per_layer * self.num_hidden_layers


def _required(config: Mapping[str, Any], key: str) -> Any:
    if key not in config:
        model_type = config.get("model_type", "unknown")
        raise ValueError(
            f"config.json of model type {model_type} has no {key!r}, which the memory planner needs"
        )
    return config[key]


def _count(config: Mapping[str, Any], key: str, minimum: int = 1) -> int:
    value = _required(config, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"config.json {key!r} must be an integer of at least {minimum}, not {value!r}")
    return value


def _count_or(config: Mapping[str, Any], key: str, default: int) -> int:
    """A key transformers fills in when it is absent or null."""
    return default if config.get(key) is None else _count(config, key)


def _optional_count(config: Mapping[str, Any], key: str) -> int | None:
    """A key that must be present but may be null (DeepSeek-V2-Lite's q_lora_rank)."""
    return None if _required(config, key) is None else _count(config, key)


def _mla_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "q_lora_rank": _optional_count(config, "q_lora_rank"),
        "kv_lora_rank": _count(config, "kv_lora_rank"),
        "qk_nope_head_dim": _count(config, "qk_nope_head_dim"),
        "qk_rope_head_dim": _count(config, "qk_rope_head_dim"),
        "v_head_dim": _count(config, "v_head_dim"),
    }


def _moe_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    if _required(config, "n_routed_experts") is None:
        return {}
    return {
        "n_routed_experts": _count(config, "n_routed_experts"),
        "n_shared_experts": _count(config, "n_shared_experts", minimum=0),
        "moe_intermediate_size": _count(config, "moe_intermediate_size"),
        "first_k_dense_replace": _count(config, "first_k_dense_replace", minimum=0),
        "num_experts_per_tok": _count(config, "num_experts_per_tok"),
    }


def shape_from_config(config: Mapping[str, Any]) -> ModelShape:
    """The shape of a model from its Hugging Face config.json.

    llama, qwen2, deepseek_v2 and deepseek_v3 are read as transformers reads them; other model types
    are read as Llama-style. A missing key is a ValueError naming it.
    """
    model_type = _required(config, "model_type")
    hidden_size = _count(config, "hidden_size")
    heads = _count(config, "num_attention_heads")
    specific = {**_mla_fields(config), **_moe_fields(config)} if model_type in _MLA_TYPES else {}
    return ModelShape(
        model_type=str(model_type),
        vocab_size=_count(config, "vocab_size"),
        hidden_size=hidden_size,
        num_hidden_layers=_count(config, "num_hidden_layers"),
        intermediate_size=_count(config, "intermediate_size"),
        num_attention_heads=heads,
        num_key_value_heads=_count_or(config, "num_key_value_heads", heads),
        head_dim=_count_or(config, "head_dim", hidden_size // heads),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        **specific,
    )


_LLAMA_STYLE_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
)


def _dense(values: tuple[str, int, int, int, int, int, int]) -> dict[str, Any]:
    """A Llama-style config.json's architecture keys, given in `_LLAMA_STYLE_KEYS` order."""
    return {**dict(zip(_LLAMA_STYLE_KEYS, values, strict=True)), "tie_word_embeddings": False}


_DEEPSEEK_LLM_7B = _dense(("llama", 102400, 4096, 30, 11008, 32, 32))
_DEEPSEEK_LLM_67B = _dense(("llama", 102400, 8192, 95, 22016, 64, 8))
_DEEPSEEK_CODER_1_3B = _dense(("llama", 32256, 2048, 24, 5504, 16, 16))
_DEEPSEEK_CODER_6_7B = _dense(("llama", 32256, 4096, 32, 11008, 32, 32))
_DEEPSEEK_CODER_33B = _dense(("llama", 32256, 7168, 62, 19200, 56, 8))

_DEEPSEEK_V2_LITE: Mapping[str, Any] = {
    "model_type": "deepseek_v2",
    "vocab_size": 102400,
    "hidden_size": 2048,
    "num_hidden_layers": 27,
    "intermediate_size": 10944,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "q_lora_rank": None,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "moe_intermediate_size": 1408,
    "first_k_dense_replace": 1,
    "num_experts_per_tok": 6,
    "tie_word_embeddings": False,
}
_DEEPSEEK_V2: Mapping[str, Any] = {
    **_DEEPSEEK_V2_LITE,
    "hidden_size": 5120,
    "num_hidden_layers": 60,
    "intermediate_size": 12288,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "q_lora_rank": 1536,
    "n_routed_experts": 160,
    "moe_intermediate_size": 1536,
}
_DEEPSEEK_V3: Mapping[str, Any] = {
    **_DEEPSEEK_V2,
    "model_type": "deepseek_v3",
    "vocab_size": 129280,
    "hidden_size": 7168,
    "num_hidden_layers": 61,
    "intermediate_size": 18432,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "moe_intermediate_size": 2048,
    "first_k_dense_replace": 3,
    "num_experts_per_tok": 8,
}

_CATALOGUE: Mapping[str, Mapping[str, Any]] = {
    "deepseek-ai/deepseek-llm-7b-base": _DEEPSEEK_LLM_7B,
    "deepseek-ai/deepseek-llm-7b-chat": _DEEPSEEK_LLM_7B,
    "deepseek-ai/deepseek-llm-67b-base": _DEEPSEEK_LLM_67B,
    "deepseek-ai/deepseek-llm-67b-chat": _DEEPSEEK_LLM_67B,
    "deepseek-ai/deepseek-coder-1.3b-base": _DEEPSEEK_CODER_1_3B,
    "deepseek-ai/deepseek-coder-1.3b-instruct": _DEEPSEEK_CODER_1_3B,
    "deepseek-ai/deepseek-coder-6.7b-base": _DEEPSEEK_CODER_6_7B,
    "deepseek-ai/deepseek-coder-6.7b-instruct": _DEEPSEEK_CODER_6_7B,
    "deepseek-ai/deepseek-coder-33b-base": _DEEPSEEK_CODER_33B,
    "deepseek-ai/deepseek-coder-33b-instruct": _DEEPSEEK_CODER_33B,
    "deepseek-ai/DeepSeek-V2-Lite": _DEEPSEEK_V2_LITE,
    "deepseek-ai/DeepSeek-V2-Lite-Chat": _DEEPSEEK_V2_LITE,
    "deepseek-ai/DeepSeek-V2": _DEEPSEEK_V2,
    "deepseek-ai/DeepSeek-V3": _DEEPSEEK_V3,
    "deepseek-ai/DeepSeek-R1": _DEEPSEEK_V3,
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": _dense(("qwen2", 151936, 1536, 28, 8960, 12, 2)),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": _dense(("qwen2", 152064, 3584, 28, 18944, 28, 4)),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B": _dense(("qwen2", 152064, 5120, 48, 13824, 40, 8)),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B": _dense(("qwen2", 152064, 5120, 64, 27648, 40, 8)),
    "deepseek-ai/DeepSeek-R1-Distill-Llama-8B": _dense(("llama", 128256, 4096, 32, 14336, 32, 8)),
    "deepseek-ai/DeepSeek-R1-Distill-Llama-70B": _dense(("llama", 128256, 8192, 80, 28672, 64, 8)),
}
"""The architecture keys of the DeepSeek models' public config.json files on the Hugging Face hub
(chat/instruct variants share their base model's). DeepSeek-V3 and R1 also carry one multi-token
prediction layer (num_nextn_predict_layers), which transformers does not load: 671B, not 685B."""

KNOWN_MODELS: Mapping[str, ModelShape] = MappingProxyType(
    {name: shape_from_config(config) for name, config in _CATALOGUE.items()}
)
"""Shapes of the DeepSeek models users bring, by Hugging Face id."""


@dataclass(frozen=True)
class PlanRequest:
    """What the run asks for, as far as memory goes. Defaults are the FineTuneJob spec's."""

    method: Method
    strategy: Strategy = "auto"
    """`auto`: DDP when the whole run fits one GPU (or there is only one), else FSDP."""
    world_size: int = 1
    """All GPUs of the run: nodes × GPUs per node."""
    per_device_batch_size: int = 4
    max_seq_length: int = 2048
    gradient_checkpointing: bool = True
    lora_r: int = 16
    precision_bytes: int = 2
    """Bytes of the compute precision: 2 for bf16/fp16, 4 for fp32."""
    gpu_memory_bytes: int | None = None
    """None when unknown: the plan then says nothing of fitting."""
    offload: Offload = "none"
    """What DeepSpeed keeps in host memory instead (strategy deepspeed only)."""

    def __post_init__(self) -> None:
        if self.method not in get_args(Method) or self.strategy not in get_args(Strategy):
            raise ValueError(f"unknown method {self.method!r} or strategy {self.strategy!r}")
        if self.offload not in get_args(Offload) or (self.offload != "none" and self.strategy != "deepspeed"):
            raise ValueError(f"offload {self.offload!r} needs strategy deepspeed, not {self.strategy!r}")
        counts = (self.world_size, self.per_device_batch_size, self.max_seq_length, self.lora_r)
        if min(counts) < 1:
            raise ValueError(f"world size, batch size, sequence length and lora r must be positive: {counts}")
        if self.precision_bytes not in (2, 4):
            raise ValueError(f"precision_bytes must be 2 or 4, not {self.precision_bytes}")


@dataclass(frozen=True)
class Plan:
    """Bytes per GPU of one run, by part, and whether they fit its GPUs."""

    request: PlanRequest
    """The request with its strategy decided (never auto)."""
    weights_bytes: float
    optimizer_bytes: float
    """Trainable parameters' own copies, their gradients and Adam state."""
    activations_bytes: float
    overhead_bytes: float
    host_bytes: float = 0.0
    """What offload keeps in the pod's memory instead, per GPU (not part of the total)."""
    advice: Advice | None = None
    """When it does not fit: the cheapest change that would."""

    @property
    def strategy(self) -> Strategy:
        return self.request.strategy

    @property
    def total_bytes(self) -> float:
        return self.weights_bytes + self.optimizer_bytes + self.activations_bytes + self.overhead_bytes

    @property
    def fits(self) -> bool | None:
        memory = self.request.gpu_memory_bytes
        return None if memory is None else self.total_bytes <= memory

    def summary(self) -> str:
        """One line for status and messages, in GiB."""
        request = self.request
        gpus = f"{request.world_size} GPU{'' if request.world_size == 1 else 's'}"
        memory = request.gpu_memory_bytes
        of = "(GPU memory unknown)" if memory is None else f"of {_gib(memory)} GiB"
        parts = (
            f"weights {_gib(self.weights_bytes)}, optimizer {_gib(self.optimizer_bytes)}, "
            f"activations {_gib(self.activations_bytes)}, overhead {_gib(self.overhead_bytes)}"
        )
        total = _gib(self.total_bytes)
        how = self.strategy if request.offload == "none" else f"{self.strategy}, offload {request.offload}"
        line = f"{request.method} on {gpus} ({how}): {total} GiB per GPU {of} ({parts})"
        if self.host_bytes:
            line = f"{line}, and {_gib(self.host_bytes)} GiB per GPU in host memory"
        if self.fits is not False:
            return line
        if self.advice is None:
            return f"{line}; does not fit, and no single change found makes it fit"
        advised = _gib(self.advice.plan.total_bytes)
        return f"{line}; does not fit, would fit with {self.advice.change}: {advised} GiB per GPU"


@dataclass(frozen=True)
class Advice:
    """A change to the request that makes the run fit, and the plan it gives."""

    change: str
    """In the spec's terms, e.g. "8 GPUs and strategy fsdp"."""
    plan: Plan


def _gib(size: float) -> str:
    text = f"{size / GIB:.1f}"
    return text.removesuffix(".0")


def estimate(shape: ModelShape, request: PlanRequest) -> Plan:
    """Bytes per GPU for the run, with advice when it does not fit."""
    plan = _plan(shape, request)
    if plan.fits is not False:
        return plan
    return replace(plan, advice=_advice(shape, request))


def _plan(shape: ModelShape, request: PlanRequest) -> Plan:
    if request.strategy != "auto":
        return _breakdown(shape, request)
    replicated = _breakdown(shape, replace(request, strategy="ddp"))
    if replicated.fits is not False or request.world_size == 1:
        return replicated
    return _breakdown(shape, replace(request, strategy="fsdp"))


def _breakdown(shape: ModelShape, request: PlanRequest) -> Plan:
    shards = request.world_size if request.strategy in SHARDING_STRATEGIES else 1
    return Plan(
        request=request,
        weights_bytes=_weight_bytes(shape, request, shards),
        optimizer_bytes=_optimizer_bytes(shape, request) / shards,
        activations_bytes=_activation_bytes(shape, request),
        overhead_bytes=CUDA_OVERHEAD_BYTES,
        host_bytes=_host_bytes(shape, request) / shards,
    )


def _host_bytes(shape: ModelShape, request: PlanRequest) -> float:
    """All that offload moves to host memory: the optimizer's share, and the weights with parameters."""
    if request.offload == "none":
        return 0.0
    optimizer = _optimizer_bytes(shape, replace(request, offload="none")) - _optimizer_bytes(shape, request)
    if request.offload == "optimizerAndParameters":
        return optimizer + shape.params.weight_bytes(request.method, request.precision_bytes)
    return optimizer


def _weight_bytes(shape: ModelShape, request: PlanRequest, shards: int) -> float:
    """A shard of the weights, plus what the other ranks send of the units gathered for compute."""
    whole = shape.params.weight_bytes(request.method, request.precision_bytes)
    unit = shape.largest_unit.weight_bytes(request.method, request.precision_bytes)
    gathered = min(FSDP_GATHERED_UNITS * unit, whole)
    if request.offload == "optimizerAndParameters":  # the shards live in host memory
        return gathered
    return whole / shards + gathered * (1 - 1 / shards)


def _optimizer_bytes(shape: ModelShape, request: PlanRequest) -> float:
    """Gradients, and (unless offloaded) the trainable parameters' own copies and Adam moments."""
    offloaded = request.offload != "none"
    if request.method != "full":
        kept_on_gpu = ADAPTER_BYTES if offloaded else 2 * ADAPTER_BYTES + ADAM_MOMENTS_BYTES
        return shape.lora_params(request.lora_r) * kept_on_gpu
    master = FP32_BYTES if request.precision_bytes < FP32_BYTES else 0
    kept_on_gpu = 0 if offloaded else master + ADAM_MOMENTS_BYTES
    return shape.total_params * (request.precision_bytes + kept_on_gpu)


def _activation_bytes(shape: ModelShape, request: PlanRequest) -> float:
    """Activations kept for backward, per GPU.

    Without gradient checkpointing every layer keeps 34·s·b·h bytes (`ACTIVATION_BYTES_PER_TOKEN_HIDDEN`,
    scaled from 16-bit to the compute precision). With it, each layer keeps only its input (s·b·h at
    the compute precision; fp32 under qlora, `QLORA_ACTIVATION_BYTES`) and one layer at a time is
    recomputed whole. Plus the fp32 logits: at the labelled positions only (taken as half the
    sequence) for the model types where the trainer asks for no more, at every position otherwise.
    """
    tokens, hidden = request.per_device_batch_size * request.max_seq_length, shape.hidden_size
    precision = QLORA_ACTIVATION_BYTES if request.method == "qlora" else request.precision_bytes
    full_layer = tokens * hidden * ACTIVATION_BYTES_PER_TOKEN_HIDDEN * precision / 2
    if request.gradient_checkpointing:
        layers = shape.num_hidden_layers * tokens * hidden * precision + full_layer
    else:
        layers = shape.num_hidden_layers * full_layer
    labelled = LABELLED_SHARE if shape.model_type in LOGITS_AT_TARGETS_MODEL_TYPES else 1
    return layers + tokens * labelled * shape.vocab_size * LOGITS_BYTES


def _first_fitting(shape: ModelShape, candidates: Sequence[PlanRequest]) -> Plan | None:
    """The first candidate that fits, found by bisection: the candidates are ordered so that every
    one after a fitting one fits too."""
    index = bisect.bisect_left(
        range(len(candidates)), True, key=lambda i: bool(_plan(shape, candidates[i]).fits)
    )
    return _plan(shape, candidates[index]) if index < len(candidates) else None


def _more_gpus(shape: ModelShape, request: PlanRequest) -> Advice | None:
    """The fewest GPUs that fit with a sharding strategy (the requested one, else FSDP)."""
    sharding: Strategy = request.strategy if request.strategy in SHARDING_STRATEGIES else "fsdp"
    first = request.world_size + 1 if request.strategy in SHARDING_STRATEGIES else request.world_size
    sizes = range(first, MAX_ADVISED_WORLD_SIZE + 1)
    plan = _first_fitting(shape, [replace(request, strategy=sharding, world_size=size) for size in sizes])
    return None if plan is None else Advice(f"{plan.request.world_size} GPUs and strategy {sharding}", plan)


def _offload(shape: ModelShape, request: PlanRequest) -> Advice | None:
    """DeepSpeed on the GPUs asked for, with the optimizer state (then the weights too) in host memory."""
    if request.method == "qlora":
        return None
    levels: tuple[Offload, ...] = ("optimizer", "optimizerAndParameters")
    more = levels[levels.index(request.offload) + 1 :] if request.offload in levels else levels
    plan = _first_fitting(shape, [replace(request, strategy="deepspeed", offload=level) for level in more])
    if plan is None:
        return None
    return Advice(f"strategy deepspeed and offload {plan.request.offload}", plan)


def _qlora(shape: ModelShape, request: PlanRequest) -> Advice | None:
    """QLoRA on dense models only: on MoE it would leave the routed experts unquantized (in fp32).
    Its 4-bit weights are not sharded, so it runs replicated (ddp)."""
    if request.method != "lora" or shape.is_moe:
        return None
    replicated = request.strategy in SHARDING_STRATEGIES
    candidate = replace(
        request, method="qlora", strategy="ddp" if replicated else request.strategy, offload="none"
    )
    plan = _first_fitting(shape, [candidate])
    if plan is None:
        return None
    return Advice("method qlora and strategy ddp" if replicated else "method qlora instead of lora", plan)


def _smaller_batch(shape: ModelShape, request: PlanRequest) -> Advice | None:
    batches = range(request.per_device_batch_size - 1, 0, -1)
    plan = _first_fitting(shape, [replace(request, per_device_batch_size=batch) for batch in batches])
    if plan is None:
        return None
    batch = plan.request.per_device_batch_size
    return Advice(
        f"perDeviceBatchSize {batch} (raise gradientAccumulationSteps to keep the global batch)", plan
    )


def _halvings(length: int) -> Iterator[int]:
    while length // 2 >= MIN_ADVISED_SEQ_LENGTH:
        length //= 2
        yield length


def _shorter_sequences(shape: ModelShape, request: PlanRequest) -> Advice | None:
    lengths = _halvings(request.max_seq_length)
    plan = _first_fitting(shape, [replace(request, max_seq_length=length) for length in lengths])
    return None if plan is None else Advice(f"maxSeqLength {plan.request.max_seq_length}", plan)


def _gradient_checkpointing(shape: ModelShape, request: PlanRequest) -> Advice | None:
    if request.gradient_checkpointing:
        return None
    plan = _first_fitting(shape, [replace(request, gradient_checkpointing=True)])
    return None if plan is None else Advice("gradientCheckpointing on", plan)


_ADVICE_ORDER: tuple[Callable[[ModelShape, PlanRequest], Advice | None], ...] = (
    _more_gpus,
    _offload,
    _qlora,
    _smaller_batch,
    _shorter_sequences,
    _gradient_checkpointing,
)
"""Changes in the order a user would accept them: more hardware keeps the training as asked;
offloading keeps it too, at slower steps; qlora changes little of it; a smaller batch keeps it with
more accumulation; shorter sequences cut data."""


def _advice(shape: ModelShape, request: PlanRequest) -> Advice | None:
    return next((advice for change in _ADVICE_ORDER if (advice := change(shape, request))), None)
