"""Loading the base model and tokenizer, and shaping the model for the chosen method.

Everything here depends on the architecture (`config.model_type`) or the hardware, and nothing on
the Trainer, so the evaluation of the base model and the training share one loaded model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from huggingface_hub import errors as hub_errors
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from deeptune.api.finetunejob import FineTuneJobSpec
from deeptune.api.trainer import TrainerPaths
from deeptune_trainer.errors import TrainerInputError

Precision = Literal["bf16", "fp16", "fp32"]

TORCH_DTYPES: dict[Precision, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}

_LLAMA_STYLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_DEEPSEEK_MLA = (
    "q_proj",  # V2-Lite has no query compression (q_lora_rank is null) ...
    "q_a_proj",  # ... V2 and V3 compress the query through q_a_proj → q_b_proj.
    "q_b_proj",
    "kv_a_proj_with_mqa",
    "kv_b_proj",
    "o_proj",
)

AUTO_TARGET_MODULES: dict[str, tuple[str, ...]] = {
    "llama": _LLAMA_STYLE,  # deepseek-llm, deepseek-coder
    "qwen2": _LLAMA_STYLE,  # DeepSeek-R1-Distill-Qwen
    "deepseek_v2": _DEEPSEEK_MLA,
    "deepseek_v3": _DEEPSEEK_MLA,
}
"""Module-name suffixes that `targetModules: [auto]` adapts, by `config.model_type`; other model types
fall back to the Llama-style names, kept only where the model has them.

DeepSeek-V2/V3 get the MLA attention projections only. Their MLP names are ambiguous there: peft (0.21,
with transformers 5) reads `gate_proj`/`up_proj`/`down_proj` on these MoE model types as the fused
routed-expert parameters, so naming them would skip the dense and shared-expert MLPs and instead put
adapters on every routed expert of every layer (hundreds per layer on V3), multiplying adapter and
optimizer memory for experts that each see a few tokens of a batch. The router is never adapted, so the
pretrained expert load balance is kept. Users who want expert adapters can list the names explicitly.
"""


LOGITS_AT_TARGETS_MODEL_TYPES = frozenset({"llama", "qwen2", "deepseek_v2", "deepseek_v3"})
"""Model types whose transformers implementation takes a boolean (batch, sequence) `logits_to_keep`
mask (transformers 5's `slice_logits_to_keep`) and does nothing to the logits but the loss."""


def computes_logits_at_targets_only(model: PreTrainedModel) -> bool:
    """Whether training may ask the model for logits at the labelled positions only.

    True for the DeepSeek-family architectures as transformers implements them. Remote code
    (`trustRemoteCode`) and other model types may slice `logits_to_keep` differently, or transform the
    logits (soft-capping, scaling) in ways this was not checked against: they get logits everywhere.
    """
    own_code = type(model).__module__.startswith("transformers.models.")
    return own_code and model.config.model_type in LOGITS_AT_TARGETS_MODEL_TYPES


@dataclass(frozen=True)
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    precision: Precision
    source: str
    """The directory or Hugging Face id it was loaded from, for messages and the model card."""


def cuda_available() -> bool:
    return torch.cuda.is_available()


def check_gpu_requirements(spec: FineTuneJobSpec) -> None:
    """Fail before any data or model work when the spec needs a GPU this machine does not have."""
    if cuda_available():
        return
    if spec.method == "qlora":
        raise TrainerInputError(
            "GpuRequired",
            "method qlora loads the model in 4-bit with bitsandbytes, which needs a CUDA GPU, and none "
            "is visible: give the job a GPU (resources.gpu) or use method lora",
        )
    if spec.output.quantized_export != "none":
        raise TrainerInputError(
            "GpuRequired",
            f"output.quantizedExport {spec.output.quantized_export} quantizes with bitsandbytes, which "
            "needs a CUDA GPU, and none is visible: give the job a GPU or set quantizedExport to none",
        )
    if spec.hyperparameters.precision == "fp16":
        raise TrainerInputError(
            "GpuRequired",
            "hyperparameters.precision fp16 needs a CUDA GPU, and none is visible: use auto, bf16 or fp32",
        )


def resolve_precision(requested: Literal["auto", "bf16", "fp16", "fp32"]) -> Precision:
    """`auto`: bf16 where the GPU supports it (Ampere and newer), fp16 on older GPUs, fp32 on CPU."""
    if requested != "auto":
        return requested
    if not cuda_available():
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def model_source(spec: FineTuneJobSpec, paths: TrainerPaths) -> str:
    """The local directory (PVC) or the Hugging Face id to load from."""
    if spec.base_model.pvc is not None:
        if paths.base_model is None:
            raise TrainerInputError(
                "ModelNotFound", "baseModel.pvc is set but no model directory was mounted"
            )
        return paths.base_model
    assert spec.base_model.name is not None  # the spec validator guarantees one source
    return spec.base_model.name


def _check_local_model(spec: FineTuneJobSpec, directory: str) -> None:
    if not (Path(directory) / "config.json").is_file():
        pvc = spec.base_model.pvc
        where = f"claim {pvc.claim_name}, path '{pvc.path}'" if pvc else directory
        raise TrainerInputError(
            "ModelNotFound",
            f"baseModel: no model found at {where} (no config.json in {directory}); put a model saved "
            "with save_pretrained there (config.json, tokenizer files, weights) or fix baseModel.pvc.path",
        )


def _is_permanent_hub_error(error: BaseException) -> bool:
    """Errors a retry cannot fix. Being unable to reach the hub is one only in offline mode."""
    cause = error.__cause__
    if isinstance(cause, hub_errors.LocalEntryNotFoundError):
        return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}
    permanent = (
        hub_errors.RepositoryNotFoundError,
        hub_errors.RevisionNotFoundError,
        hub_errors.EntryNotFoundError,
        hub_errors.HFValidationError,
    )
    return isinstance(cause, permanent)


def _model_not_found(spec: FineTuneJobSpec, error: BaseException) -> TrainerInputError:
    base = spec.base_model
    if isinstance(error.__cause__, hub_errors.GatedRepoError):
        hint = "the model is gated: accept its licence on the hub and set baseModel.tokenSecretRef"
    else:
        hint = (
            "check baseModel.name and baseModel.revision, set baseModel.tokenSecretRef for a private model, "
            "or put the model on a PVC (baseModel.pvc)"
        )
    return TrainerInputError(
        "ModelNotFound", f"baseModel {base.name}@{base.revision} could not be loaded ({error}); {hint}"
    )


def _quantization(precision: Precision) -> BitsAndBytesConfig:
    """QLoRA's recipe: NF4 weights, quantized quantization constants, 16-bit compute."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=TORCH_DTYPES[precision if precision != "fp32" else "bf16"],
    )


def load_model(spec: FineTuneJobSpec, paths: TrainerPaths) -> LoadedModel:
    """The base model and its tokenizer, in the dtype the method trains in."""
    source = model_source(spec, paths)
    local = spec.base_model.pvc is not None
    if local:
        _check_local_model(spec, source)
    precision = resolve_precision(spec.hyperparameters.precision)
    hub_options = (
        {}
        if local
        else {
            "revision": spec.base_model.revision,
            "token": os.environ.get("HF_TOKEN") or None,
            "cache_dir": os.path.join(paths.hf_home, "hub") if paths.hf_home else None,
        }
    )
    # Full fine-tuning keeps fp32 master weights (mixed precision autocasts the compute); adapters
    # train on frozen weights, which can stay in the 16-bit compute dtype and take half the memory.
    dtype = torch.float32 if spec.method == "full" else TORCH_DTYPES[precision]
    extra: dict[str, object] = {}
    if spec.method == "qlora":
        extra = {
            "quantization_config": _quantization(precision),
            "device_map": {"": torch.cuda.current_device()},
        }
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=spec.base_model.trust_remote_code, **hub_options
        )
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, trust_remote_code=spec.base_model.trust_remote_code, **hub_options, **extra
        )
    except OSError as error:
        if not local and _is_permanent_hub_error(error):
            raise _model_not_found(spec, error) from error
        raise
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and loss, so any id will do; eos always exists.
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, precision=precision, source=source)


def _linear_module_names(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


def resolve_target_modules(model: PreTrainedModel, requested: list[str]) -> list[str]:
    """The module-name suffixes to adapt, checked against the model's actual Linear layers."""
    present = {name.rsplit(".", 1)[-1] for name in _linear_module_names(model)}
    if requested == ["auto"]:
        candidates = AUTO_TARGET_MODULES.get(model.config.model_type, _LLAMA_STYLE)
        chosen = [name for name in candidates if name in present]
        if not chosen:
            raise TrainerInputError(
                "InvalidSpec",
                f"lora.targetModules auto knows no projection names of model type {model.config.model_type}; "
                f"list them explicitly, e.g. some of: {', '.join(sorted(present))}",
            )
        return chosen
    missing = [name for name in requested if name not in present]
    if missing:
        raise TrainerInputError(
            "InvalidSpec",
            f"lora.targetModules {', '.join(missing)} match no Linear layer of this model; "
            f"its Linear layers are named: {', '.join(sorted(present))}",
        )
    return requested


def apply_method(model: PreTrainedModel, spec: FineTuneJobSpec) -> PreTrainedModel | PeftModel:
    """Wrap the model for LoRA/QLoRA (only adapter weights train), or leave it whole for full tuning."""
    if spec.method == "full":
        return model
    if spec.method == "qlora":
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=spec.hyperparameters.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    lora = spec.lora
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        bias=lora.bias,
        target_modules=resolve_target_modules(model, list(lora.target_modules)),
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    if spec.hyperparameters.gradient_checkpointing:
        # Checkpointed blocks recompute from their inputs; with frozen embeddings those inputs carry
        # no grad and the adapters inside would get none, unless the embedding output requires it.
        peft_model.enable_input_require_grads()
    return peft_model
