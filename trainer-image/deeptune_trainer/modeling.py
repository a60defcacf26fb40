"""Loading the base model and tokenizer, and shaping the model for the chosen method.

Everything here depends on the architecture (`config.model_type`) or the hardware, and nothing on
the Trainer, so the evaluation of the base model and the training share one loaded model.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from huggingface_hub import errors as hub_errors
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.utils import transformers_weight_conversion
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.distributed import DistributedConfig

from deeptune.api.finetunejob import FineTuneJobSpec, RopeScaling
from deeptune.api.trainer import HUB_TOKEN_ENV, TrainerConfig, TrainerPaths
from deeptune_trainer.distributed import World, resolve_strategy, shards_weights
from deeptune_trainer.errors import TrainerInputError
from deeptune_trainer.formatting import ensure_chat_template
from deeptune_trainer.zero import partitioned_loading, zero3_config

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
"""`lora.targetModules` entries that `auto` stands for, by `config.model_type`; other model types fall
back to the Llama-style names. Entries that match no Linear layer of the model are dropped.

DeepSeek-V2/V3 get the MLA attention projections. The usual MoE recipe adds the dense layers' MLP and
the shared experts, never the routed experts nor the router; it is written path-qualified, because the
last name alone is ambiguous on these models (`mlp.gate_proj`, `mlp.up_proj`, `mlp.down_proj`,
`mlp.shared_experts.gate_proj`, ...). It trains (see `peft_targets_as_resolved`), but it is not the
default: peft 0.21 reads any target ending in `gate_proj`/`up_proj`/`down_proj` on these model types as
the fused routed-expert parameters when it *loads* an adapter (huggingface/peft#3711), so a server
loading such an adapter with plain peft would put it on the routed experts. DeepTune's own merge
loads it right: serve those adapters merged (`output.mergeAdapter`). In transformers 5 the routed
experts are not Linear layers at all (two fused 3-D parameters per layer) and the router is a module
with a plain weight, so no entry reaches them: adapting every routed expert would multiply adapter and
optimizer memory for experts that each see a few tokens of a batch, and an untouched router keeps the
pretrained expert load balance.
"""

REGEX_PREFIX = "re:"
"""Marks a `lora.targetModules` entry as a regular expression over full module names."""


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
    pvc = spec.base_model.pvc
    where = f"claim {pvc.claim_name}, path '{pvc.path}'" if pvc else directory
    if not (Path(directory) / "config.json").is_file():
        raise TrainerInputError(
            "ModelNotFound",
            f"baseModel: no model found at {where} (no config.json in {directory}); put a model saved "
            "with save_pretrained there (config.json, tokenizer files, weights) or fix baseModel.pvc.path",
        )
    # safetensors reports a file it may not open as "No such file or directory": say what it is.
    unreadable = sorted(
        f.name for f in Path(directory).iterdir() if f.is_file() and not os.access(f, os.R_OK)
    )
    if unreadable:
        raise TrainerInputError(
            "ModelNotReadable",
            f"baseModel: the trainer (uid {os.getuid()}, gid {os.getgid()}) may not read "
            f"{', '.join(unreadable)} in {where}; make the model's files readable to it "
            "(e.g. chmod a+r), or own them by its group",
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


FUSED_EXPERT_MODEL_TYPES = frozenset({"deepseek_v2", "deepseek_v3"})
"""Model types whose transformers implementation keeps the routed experts as fused 3-D parameters
(`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`), not as Linear layers bitsandbytes could quantize."""


def routed_expert_parameters(config: PretrainedConfig) -> int:
    """Parameters of the routed experts of a DeepSeek-V2/V3 config: n_routed_experts SwiGLU MLPs (gate,
    up and down, each hidden × moe_intermediate) in every MoE layer.

    transformers makes every layer from first_k_dense_replace on an MoE layer; it ignores moe_layer_freq
    (1 in every DeepSeek release; DeepSeek's own remote code would skip layers for other values).
    """
    experts = getattr(config, "n_routed_experts", None) or 0
    moe_layers = config.num_hidden_layers - (getattr(config, "first_k_dense_replace", None) or 0)
    return experts * max(moe_layers, 0) * 3 * config.hidden_size * config.moe_intermediate_size


def model_parameters(config: PretrainedConfig) -> int:
    """All parameters of the model transformers builds from `config`, counted on the meta device, where
    building allocates no memory and reads no weights."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(parameter.numel() for parameter in model.parameters())


def _count(parameters: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if parameters >= size:
            return f"{parameters / size:.1f}{unit}"
    return str(parameters)


def _gib(size_bytes: int) -> str:
    gib = size_bytes / 2**30
    return f"{gib:,.1f} GiB" if gib >= 0.1 else f"{gib:.2g} GiB"


def check_qlora_quantizes_the_model(config: PretrainedConfig, trust_remote_code: bool) -> None:
    """Refuse QLoRA where 4-bit weights would not make the model small, before any weight is loaded.

    bitsandbytes quantizes nn.Linear layers only. transformers' DeepSeek-V2/V3 keep the routed experts,
    most of the model, as fused 3-D parameters: they stay 16-bit, and prepare_model_for_kbit_training
    upcasts them to fp32, so on the released models QLoRA would take more memory than LoRA on bf16
    weights (V2-Lite: 14.4B of 15.7B parameters are routed experts). DeepSeek's own remote code
    (trustRemoteCode with an auto_map) builds each expert from Linear layers, which do quantize.
    """
    remote_code = trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if config.model_type not in FUSED_EXPERT_MODEL_TYPES or remote_code:
        return
    routed = routed_expert_parameters(config)
    if routed == 0:
        return
    total = model_parameters(config)
    raise TrainerInputError(
        "InvalidSpec",
        f"method qlora cannot quantize the routed experts of model type {config.model_type}: transformers "
        f"keeps them as fused 3-D parameters and bitsandbytes quantizes Linear layers only, so "
        f"{_count(routed)} of the model's {_count(total)} parameters ({routed / total:.0%}) would stay "
        f"un-quantized, {_gib(2 * routed)} in bf16 and {_gib(4 * routed)} in fp32 once "
        f"prepare_model_for_kbit_training upcasts them (the whole model in bf16, as method lora holds it: "
        f"{_gib(2 * total)}); use method lora instead, with more GPUs (resources.gpu) and "
        "distributed.strategy fsdp to shard the weights where one GPU is too small",
    )


def _weight_options(spec: FineTuneJobSpec, precision: Precision, sharded: bool) -> dict[str, object]:
    """How from_pretrained lays out the weights for the method, and across the workers."""
    # Full fine-tuning keeps fp32 master weights (mixed precision autocasts the compute); adapters
    # train on frozen weights, which can stay in the 16-bit compute dtype and take half the memory.
    dtype = torch.float32 if spec.method == "full" else TORCH_DTYPES[precision]
    if sharded:  # FSDP2 over every worker: each loads and keeps only its shard of every weight
        return {"dtype": dtype, "distributed_config": DistributedConfig(fsdp_size=World.from_env().size)}
    if spec.method != "qlora":
        return {"dtype": dtype}
    return {
        "dtype": dtype,
        "quantization_config": _quantization(precision),
        "device_map": {"": torch.cuda.current_device()},  # this worker's GPU (the Trainer set it)
    }


def _hub_options(
    spec: FineTuneJobSpec, paths: TrainerPaths, token_env: str = HUB_TOKEN_ENV
) -> dict[str, str | None]:
    """from_pretrained's options for a model from the Hub (none for one on a PVC), with the token the
    operator put in `token_env`."""
    if spec.base_model.pvc is not None:
        return {}
    return {
        "revision": spec.base_model.revision,
        "token": os.environ.get(token_env) or None,
        "cache_dir": paths.hub_cache,
    }


def _hidden_size(spec: FineTuneJobSpec, paths: TrainerPaths) -> int:
    """The model's hidden size, from its config alone (before any weight is read)."""
    options = _hub_options(spec, paths)
    source, trust_remote_code = model_source(spec, paths), spec.base_model.trust_remote_code
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **options)
    return int(config.get_text_config().hidden_size)


def extend_context(config: PretrainedConfig, scaling: RopeScaling) -> None:
    """Give a RoPE model's config the spec's scaling: `factor` times the positions it was trained on.
    The model is then built with it, and every config saved from it carries it."""
    text = config.get_text_config()
    current = dict(getattr(text, "rope_parameters", None) or {})
    if not current:
        raise TrainerInputError(
            "InvalidSpec", f"ropeScaling: model type {config.model_type} has no rotary position embeddings"
        )
    if current.get("rope_type", "default") != "default":
        raise TrainerInputError(
            "InvalidSpec",
            f"ropeScaling: the base model scales RoPE already ({current['rope_type']}, factor "
            f"{current.get('factor')}); scaling it again is not supported: remove ropeScaling",
        )
    original = int(text.max_position_embeddings)
    text.rope_parameters = {
        **current,
        "rope_type": scaling.type,
        "factor": scaling.factor,
        "original_max_position_embeddings": original,
    }
    text.max_position_embeddings = int(original * scaling.factor)


def load_model(
    spec: FineTuneJobSpec, paths: TrainerPaths, *, sharded: bool = False, token_env: str = HUB_TOKEN_ENV
) -> LoadedModel:
    """The base model and its tokenizer, in the dtype the method trains in; `sharded` spreads the
    weights over the workers (fsdp), every one of which must call this; `token_env` holds the Hub
    token for it."""
    source = model_source(spec, paths)
    local = spec.base_model.pvc is not None
    if local:
        _check_local_model(spec, source)
    precision = resolve_precision(spec.hyperparameters.precision)
    trust_remote_code = spec.base_model.trust_remote_code
    hub_options = _hub_options(spec, paths, token_env)
    try:
        given: dict[str, PretrainedConfig] = {}  # from_pretrained reads the model's own unless given one
        if spec.method == "qlora" or spec.rope_scaling is not None:
            config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **hub_options)
            if spec.method == "qlora":
                check_qlora_quantizes_the_model(config, trust_remote_code)
            if spec.rope_scaling is not None:
                extend_context(config, spec.rope_scaling)
                given["config"] = config
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **hub_options)
        model = AutoModelForCausalLM.from_pretrained(
            source,
            **given,
            trust_remote_code=trust_remote_code,
            **hub_options,
            **_weight_options(spec, precision, sharded),
        )
    except OSError as error:
        if not local and _is_permanent_hub_error(error):
            raise _model_not_found(spec, error) from error
        raise
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and loss, so any id will do; eos always exists.
        tokenizer.pad_token = tokenizer.eos_token
    ensure_chat_template(tokenizer)
    return LoadedModel(model=model, tokenizer=tokenizer, precision=precision, source=source)


def load_for_training(config: TrainerConfig, world: World) -> LoadedModel:
    """The base model laid out as the run's strategy trains it: whole in every worker (ddp), sharded
    (fsdp) or partitioned (deepspeed) across them. Every worker must call it."""
    spec, paths = config.spec, config.paths
    if resolve_strategy(config) == "deepspeed":
        precision = resolve_precision(spec.hyperparameters.precision)
        with partitioned_loading(zero3_config(spec, precision, _hidden_size(spec, paths))):
            return load_model(spec, paths)
    return load_model(spec, paths, sharded=shards_weights(config, world))


def _linear_module_names(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


def _compile(entry: str) -> re.Pattern[str]:
    try:
        return re.compile(entry.removeprefix(REGEX_PREFIX))
    except re.error as error:
        raise TrainerInputError(
            "InvalidSpec",
            f"lora.targetModules {entry} is not a valid regular expression ({error}); after {REGEX_PREFIX} "
            r"write a Python regular expression for full module names, e.g. re:.*\.layers\.[0-3]\..*_proj",
        ) from error


def _selects(entry: str) -> Callable[[str], bool]:
    """Whether a full module name is selected by one entry: `re:` full-matches a regular expression,
    anything else is the module's last name or a dotted suffix of its full name, as peft reads a list."""
    if entry.startswith(REGEX_PREFIX):
        pattern = _compile(entry)
        return lambda name: pattern.fullmatch(name) is not None
    return lambda name: name == entry or name.endswith(f".{entry}")


def _peft_targets(entry: str, linear_names: list[str]) -> list[str]:
    """The entry as LoraConfig takes it: names and suffixes as they are (peft matches list items the
    same way), a regular expression as the full names it selects (peft takes a regular expression only
    in place of the whole list)."""
    if not entry.startswith(REGEX_PREFIX):
        return [entry]
    selects = _selects(entry)
    return [name for name in linear_names if selects(name)]


def _kinds_of_linear(linear_names: list[str]) -> list[str]:
    """The Linear layers with the layer index cut off (`mlp.shared_experts.gate_proj`), for messages:
    each is a valid entry itself."""
    return sorted({re.sub(r"^.*?\.\d+\.", "", name) for name in linear_names})


def resolve_target_modules(model: PreTrainedModel, requested: list[str]) -> list[str]:
    """The `target_modules` for LoraConfig, each entry checked to select at least one Linear layer.

    Entries are a module's last name (`q_proj`), a dotted suffix of its full name
    (`mlp.shared_experts.gate_proj`), or `re:` and a regular expression full-matched against full names
    (`re:.*\\.layers\\.[0-3]\\..*_proj`); `auto` picks them per architecture (AUTO_TARGET_MODULES).
    """
    linear_names = _linear_module_names(model)
    kinds = ", ".join(_kinds_of_linear(linear_names))
    if requested == ["auto"]:
        candidates = AUTO_TARGET_MODULES.get(model.config.model_type, _LLAMA_STYLE)
        entries = [entry for entry in candidates if any(map(_selects(entry), linear_names))]
        if not entries:
            raise TrainerInputError(
                "InvalidSpec",
                f"lora.targetModules auto knows no projection names of model type {model.config.model_type}; "
                f"list them explicitly, e.g. some of: {kinds}",
            )
    else:
        entries = requested
        missing = [entry for entry in entries if not any(map(_selects(entry), linear_names))]
        if missing:
            raise TrainerInputError(
                "InvalidSpec",
                f"lora.targetModules {', '.join(missing)} match no Linear layer of this model; name Linear "
                f"layers by last name (q_proj), dotted path suffix (mlp.shared_experts.gate_proj) or "
                f"{REGEX_PREFIX} and a regular expression over full names; this model's Linear layers are: "
                f"{kinds}",
            )
    return list(dict.fromkeys(target for entry in entries for target in _peft_targets(entry, linear_names)))


def _config_as_given(*_args: object, **_kwargs: object) -> None:
    """Stands in for peft's transformers-4 to 5 config conversion: leaves the config as it is."""


_PEFT_CONVERSION = "convert_peft_config_for_transformers"


@contextmanager
def peft_targets_as_resolved() -> Iterator[None]:
    """Within it, peft adapts the modules `target_modules` names on the loaded model, nothing else.

    To read adapters trained on transformers 4, peft 0.21 rewrites the config when it injects adapters
    into a model type whose MoE transformers 5 fused (deepseek_v2/v3 among them): any target ending in
    `gate_proj`, `up_proj` or `down_proj` becomes the fused routed-expert parameters and `gate` the router
    weight, even `mlp.shared_experts.gate_proj` (huggingface/peft#3711; half of a fused pair is refused
    outright), so the dense and shared-expert MLPs could not be adapted at all. The targets here are
    resolved against the model as loaded, so the rewrite is switched off. Reloading such an adapter
    (PeftModel.from_pretrained) needs the same, until a peft release keeps path-qualified targets.
    """
    original = getattr(transformers_weight_conversion, _PEFT_CONVERSION)  # fails loudly if peft renames it
    setattr(transformers_weight_conversion, _PEFT_CONVERSION, _config_as_given)
    try:
        yield
    finally:
        setattr(transformers_weight_conversion, _PEFT_CONVERSION, original)


def load_trained(spec: FineTuneJobSpec, paths: TrainerPaths, checkpoint: Path) -> PreTrainedModel | PeftModel:
    """The trained model from a checkpoint the Trainer wrote, whole, in this one process: the base
    model with the checkpoint's adapter, or the checkpoint's full weights."""
    if spec.method == "full":
        weights: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
            checkpoint, dtype=torch.float32, trust_remote_code=spec.base_model.trust_remote_code
        )
        return weights
    base = load_model(spec, paths).model
    with peft_targets_as_resolved():
        return PeftModel.from_pretrained(base, checkpoint)


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
    with peft_targets_as_resolved():
        peft_model = get_peft_model(model, config)
    if spec.hyperparameters.gradient_checkpointing:
        # Checkpointed blocks recompute from their inputs; with frozen embeddings those inputs carry
        # no grad and the adapters inside would get none, unless the embedding output requires it.
        peft_model.enable_input_require_grads()
    return peft_model
