"""DeepSpeed ZeRO stage 3 (`distributed.strategy: deepspeed`): its config, written from the spec, and
the base model loaded in partitions.

The weights are partitioned as they load (transformers runs `deepspeed.zero.Init` while a DeepSpeed
config is registered), so no worker ever holds the whole model, as with fsdp. The config carries
concrete numbers, not DeepSpeed's "auto": it is needed before the Trainer exists to fill those in,
and the Trainer, given the same dict, checks that its own arguments agree. Checkpoints are the
Trainer's (one ZeRO shard per worker, plus the 16-bit weights gathered whole, which rank 0 reloads
for evaluation and export); resuming is the Trainer's too.

The optimizer is the Trainer's AdamW, offloaded or not: torch's fused AdamW has a CPU kernel, so the
offloaded step needs no compiler in the image (DeepSpeed's own CPU Adam is built on first use), and
it is the same optimizer as on every other strategy. DeepSpeed's would decay every trainable
parameter, norms and biases included (measured: losses 5e-3 apart from the Trainer's after 20 steps
of full tuning at the default weightDecay 0.01), where the Trainer exempts them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from deeptune.api.finetunejob import FineTuneJobSpec

if TYPE_CHECKING:
    from deeptune_trainer.modeling import Precision

MAX_GRAD_NORM = 1.0
"""The Trainer's default gradient clipping, which DeepSpeed applies instead of it."""


def zero3_config(spec: FineTuneJobSpec, precision: Precision, hidden_size: int) -> dict[str, Any]:
    """The DeepSpeed config of a run: ZeRO stage 3, the spec's batch and precision, and its offload.

    Buckets are sized by the model's hidden size h, as the Trainer sizes DeepSpeed's "auto" (h² to
    reduce, 0.9·h² to prefetch; tensors under 10·h, norms and biases, stay whole on every worker).
    DeepSpeed's own defaults (5e8 elements, 1e5) are for billions of parameters: measured on a 20M
    model, they held more memory per worker than DDP's whole replica.
    """
    hp = spec.hyperparameters
    zero: dict[str, Any] = {
        "stage": 3,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
        "stage3_gather_16bit_weights_on_model_save": True,  # checkpoints hold whole, loadable weights
    }
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": hp.per_device_batch_size,
        "gradient_accumulation_steps": hp.gradient_accumulation_steps,
        "gradient_clipping": MAX_GRAD_NORM,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "zero_optimization": zero,
    }
    offload = spec.distributed.offload
    host = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if offload in ("optimizer", "optimizerAndParameters"):
        zero["offload_optimizer"] = host
        config["zero_force_ds_cpu_optimizer"] = False  # the Trainer's AdamW steps on the host
    if offload == "optimizerAndParameters":
        zero["offload_param"] = host
    return config


@contextmanager
def partitioned_loading(config: dict[str, Any]) -> Iterator[None]:
    """Within it, from_pretrained partitions the weights across the workers as it reads them.

    Transformers keeps only a weak reference to the registered config, hence the local holding it.
    """
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config  # noqa: PLC0415

    registered = HfDeepSpeedConfig(config)
    try:
        yield
    finally:
        del registered
        unset_hf_deepspeed_config()


def forget_zero3() -> None:
    """Unregister the Trainer's DeepSpeed config once training is over, so rank 0 loads and generates
    with a whole model again (while it is registered, from_pretrained partitions the weights and
    generate waits for the other workers)."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config  # noqa: PLC0415

    unset_hf_deepspeed_config()
