"""Will this FineTuneJob fit its GPUs? The planner's estimate for a spec, before any GPU is held.

Known only where the model's shape is: a Hugging Face id from the planner's catalogue of DeepSeek
models (a model on a PVC or another id is checked by the trainer, which reads its config.json).
Whether it fits needs the memory of one GPU, `resources.gpuMemory`; without it the plan is shown
and nothing is refused.
"""

from __future__ import annotations

import re

from deeptune.api.finetunejob import FineTuneJobSpec, MemoryPlan
from deeptune.planner import GIB, KNOWN_MODELS, ModelShape, Plan, PlanRequest, estimate

_QUANTITY = re.compile(r"^([0-9.]+)([A-Za-z]*)$")
_UNITS = {
    "": 1,
    "m": 10**-3,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def quantity_bytes(quantity: str) -> int:
    """A memory quantity (`80Gi`, `81920Mi`, `85899345920`) in bytes."""
    found = _QUANTITY.match(quantity)
    if found is None or found.group(2) not in _UNITS:
        raise ValueError(f"not a memory quantity: {quantity}")
    return int(float(found.group(1)) * _UNITS[found.group(2)])


def plan_for(spec: FineTuneJobSpec) -> Plan | None:
    """The estimate for this spec, or None when the model's shape is unknown or there is no GPU."""
    shape = KNOWN_MODELS.get(spec.base_model.name or "")
    if shape is None or spec.resources.gpu == 0:
        return None
    memory = spec.resources.gpu_memory
    return plan_for_shape(spec, shape, quantity_bytes(memory) if memory else None)


def plan_for_shape(spec: FineTuneJobSpec, shape: ModelShape, gpu_memory_bytes: int | None) -> Plan:
    """The estimate for this spec on a model of this shape (a benchmark's, say, built from a config).
    A preference run's batch holds both sequences of each pair; DPO's reference costs no memory of its
    own (the adapter switched off, or log-probabilities computed before training)."""
    hp = spec.hyperparameters
    pairs = spec.preference is not None  # a pair is two rows in a batch
    unsharded = pairs or spec.distillation is not None  # neither runs under fsdp or deepspeed yet
    request = PlanRequest(
        method=spec.method,
        strategy="ddp" if unsharded and spec.distributed.strategy == "auto" else spec.distributed.strategy,
        world_size=spec.world_size,
        per_device_batch_size=hp.per_device_batch_size * (2 if pairs else 1),
        max_seq_length=hp.max_seq_length,
        gradient_checkpointing=hp.gradient_checkpointing,
        lora_r=spec.lora.r,
        precision_bytes=4 if hp.precision == "fp32" else 2,
        gpu_memory_bytes=gpu_memory_bytes,
        offload=spec.distributed.offload,
    )
    return estimate(shape, request)


def host_bytes_per_pod(spec: FineTuneJobSpec, plan: Plan) -> float:
    """What offload keeps in each pod's memory: its workers' shares."""
    return plan.host_bytes * spec.processes_per_node


def plan_status(plan: Plan, spec: FineTuneJobSpec) -> MemoryPlan:
    host = host_bytes_per_pod(spec, plan)
    return MemoryPlan(
        summary=plan.summary(),
        strategy=plan.strategy,
        world_size=plan.request.world_size,
        gib_per_gpu=round(plan.total_bytes / GIB, 1),
        fits=plan.fits,
        offloaded_gib_per_pod=round(host / GIB, 1) if host else None,
    )


def refusal(spec: FineTuneJobSpec, plan: Plan) -> str | None:
    """Why the run cannot start, in the spec's terms: it does not fit the GPUs, or what it offloads
    does not fit the pod's memory. Only with resources.gpuMemory: the user's say that runs are checked."""
    if plan.fits is False:
        return (
            f"{spec.base_model.name} does not fit resources.gpuMemory {spec.resources.gpu_memory} per GPU: "
            f"{plan.summary()}; change the spec as advised (resources.gpu, distributed.strategy, method, "
            "hyperparameters), or remove resources.gpuMemory to run unchecked"
        )
    host, memory = host_bytes_per_pod(spec, plan), spec.resources.memory
    if spec.resources.gpu_memory is None or memory is None or host <= quantity_bytes(memory):
        return None
    return (
        f"{spec.base_model.name} with distributed.offload {spec.distributed.offload} keeps "
        f"{host / GIB:.1f} GiB in each pod's memory, more than resources.memory {memory}: raise "
        "resources.memory, offload less (or nothing) with more GPUs (resources.gpu), or remove "
        "resources.gpuMemory to run unchecked"
    )
