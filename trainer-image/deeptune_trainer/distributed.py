"""Several worker processes (one per GPU, or N on CPU) on PyTorch's own distributed engine.

The container's entry point validates the config once, then starts the workers with
torch.distributed's elastic launcher (what `torchrun` runs) and turns their outcome into one exit
code: bad input in any worker is still EXIT_INVALID_INPUT, so the Job fails once instead of retrying.
Every worker runs the same program; only rank 0 writes artifacts, metrics, logs and the summary.

Strategies: `ddp` keeps a whole model in every worker and averages gradients (the Trainer does it
when started under the launcher); `fsdp` shards the weights across the workers as they load
(transformers' FSDP2 plan, `DistributedConfig(fsdp_size=world)`), so no worker ever holds the whole
model, and the Trainer trains the sharded model as is. Accelerate's own FSDP plugin is not used: it
refuses CPU workers (gloo), so it could not be tested here, and it loads a full copy per process first.
`deepspeed` partitions the weights as they load too, and trains them with DeepSpeed's ZeRO stage 3
(`zero`); it runs under the launcher even as one process, since ZeRO needs a process group.
"""

from __future__ import annotations

import os
import socket
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn

from deeptune.api.trainer import EXIT_INVALID_INPUT, RENDEZVOUS_ENV, TrainerConfig
from deeptune_trainer.errors import TrainerInputError

ResolvedStrategy = Literal["ddp", "fsdp", "deepspeed"]

SHARDED_STATE_DIR = "sharded-state"
"""Inside a checkpoint: the trainable weights, optimizer and scheduler state of an fsdp run (one file
per rank, torch.distributed.checkpoint's format, which loads onto another number of workers too)."""


@dataclass(frozen=True)
class World:
    """This process's place among the workers, from the variables the launcher sets."""

    rank: int = 0
    size: int = 1
    pod: int = 0
    """The launcher's group rank: workers of pod 0 share rank 0's files."""

    @classmethod
    def from_env(cls) -> World:
        return cls(
            rank=int(os.environ.get("RANK", "0")),
            size=int(os.environ.get("WORLD_SIZE", "1")),
            pod=int(os.environ.get("GROUP_RANK", "0")),
        )

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes logs, metrics, artifacts and the summary."""
        return self.rank == 0


def is_worker() -> bool:
    """Whether this process was started by the launcher (or by torchrun)."""
    return "LOCAL_RANK" in os.environ


def needs_launcher(config: TrainerConfig) -> bool:
    """Whether this process starts the workers: the run has several (per pod, or pods), or uses ZeRO."""
    return (config.spec.world_size > 1 or resolve_strategy(config) == "deepspeed") and not is_worker()


def resolve_strategy(config: TrainerConfig) -> ResolvedStrategy:
    """The strategy a run uses: `auto` is what the operator's memory plan decided (fsdp when the
    model and its training state do not fit one GPU), else ddp."""
    if config.spec.distributed.strategy == "auto":
        return config.strategy or "ddp"
    return config.spec.distributed.strategy


def shards_weights(config: TrainerConfig, world: World) -> bool:
    """Whether the model is loaded sharded across the workers (fsdp with more than one)."""
    return world.size > 1 and resolve_strategy(config) == "fsdp"


def splits_weights(config: TrainerConfig, world: World) -> bool:
    """Whether no worker holds the whole model while it trains (fsdp's shards, ZeRO's partitions):
    rank 0 then reloads the trained model whole from the final checkpoint."""
    return shards_weights(config, world) or resolve_strategy(config) == "deepspeed"


def _threads_per_worker(workers: int) -> str:
    """Split the pod's CPU threads between its workers, so they do not oversubscribe the cores."""
    available = int(os.environ.get("OMP_NUM_THREADS", "0")) or len(os.sched_getaffinity(0))
    return str(max(1, available // workers))


def launch(config: TrainerConfig, argv: Sequence[str]) -> int:
    """Run `python -m deeptune_trainer ARGV` in `processes_per_node` workers; their exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError  # noqa: PLC0415
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch  # noqa: PLC0415

    workers = config.spec.processes_per_node
    os.environ["OMP_NUM_THREADS"] = _threads_per_worker(workers)
    launch_config = LaunchConfig(
        nproc_per_node=workers,
        rdzv_backend="c10d",
        monitor_interval=1.0,
        start_method="spawn",
        **_placement(config),
    )
    nodes = config.spec.distributed.nodes
    where = f" on each of {nodes} pods" if nodes > 1 else ""
    print(f"starting {workers} worker processes{where} ({resolve_strategy(config)})", flush=True)
    try:
        elastic_launch(launch_config, entrypoint=sys.executable)("-m", "deeptune_trainer", *argv)
    except ChildFailedError as error:
        codes = {failure.exitcode for failure in error.failures.values()}
        return EXIT_INVALID_INPUT if EXIT_INVALID_INPUT in codes else 1
    return 0


def _placement(config: TrainerConfig) -> dict[str, Any]:
    """Where the workers meet. One pod: a private rendezvous. Several pods: pod 0 hosts a c10d
    rendezvous under the Indexed Job's DNS name.

    No launcher restarts its workers (max_restarts 0): when one pod fails, the others' collectives
    fail, their launchers exit, and the Job replaces every failed pod; the new gang meets afresh and
    resumes from the newest complete checkpoint. The elastic alternative (survivors restart their
    workers and wait for the replacement in a second rendezvous round) deadlocked here with torch
    2.15: both launchers waited on each other's round-1 keys until the store's 60 s timeout.
    """
    nodes = config.spec.distributed.nodes
    if nodes == 1:
        return {"min_nodes": 1, "max_nodes": 1, "run_id": str(uuid.uuid4()), "rdzv_endpoint": "localhost:0",
                "max_restarts": 0}  # fmt: skip
    endpoint = os.environ.get(RENDEZVOUS_ENV)
    if not endpoint:
        raise TrainerInputError(
            "InvalidSpec",
            f"distributed.nodes {nodes} runs as an Indexed Job in a cluster (the operator sets "
            f"{RENDEZVOUS_ENV}); a run outside a cluster takes one pod: set distributed.nodes to 1",
        )
    index = int(os.environ.get("JOB_COMPLETION_INDEX", "0"))
    return {
        "min_nodes": nodes,
        "max_nodes": nodes,
        "run_id": config.uid or config.name,
        "rdzv_endpoint": endpoint,
        "rdzv_configs": {"is_host": index == 0},
        "max_restarts": 0,
        "local_addr": _pod_address(endpoint),
    }


def _pod_address(endpoint: str) -> str:
    """This pod's DNS name under the run's headless Service (`<job>-<index>.<service>`), which the
    other pods resolve. The launchers rank the pods by it, so pod 0 is rank 0 in every round (the one
    whose metrics the operator reads and whose summary it records), and rank 0's is the address the
    workers of every pod connect to."""
    service = endpoint.rsplit(":", 1)[0].split(".", 1)[1]
    return f"{socket.gethostname()}.{service}"


def sharded_state_dir(checkpoint: Path) -> Path:
    return checkpoint / SHARDED_STATE_DIR


def _training_state(model: Any, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict  # noqa: PLC0415

    # Frozen weights (all but the adapters under LoRA) never change: the base model has them.
    weights, optimizer_state = get_state_dict(
        model, optimizer, options=StateDictOptions(ignore_frozen_params=True)
    )
    return {"model": weights, "optimizer": optimizer_state, "scheduler": scheduler.state_dict()}


def save_sharded_training_state(model: Any, optimizer: Any, scheduler: Any, checkpoint: Path) -> None:
    """Write this worker's shard of the trainable weights and optimizer state, and the scheduler's.

    Collective: every worker calls it at the same step. The Trainer can neither save the optimizer of
    a model sharded at load time nor load full weights back into one, so an fsdp run checkpoints its
    state here, in PyTorch's sharded format.
    """
    import torch.distributed.checkpoint as dcp  # noqa: PLC0415

    dcp.save(_training_state(model, optimizer, scheduler), checkpoint_id=str(sharded_state_dir(checkpoint)))


def load_sharded_training_state(model: Any, optimizer: Any, scheduler: Any, checkpoint: Path) -> None:
    """Restore what `save_sharded_training_state` wrote, resharded onto this run's workers."""
    import torch.distributed.checkpoint as dcp  # noqa: PLC0415
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict  # noqa: PLC0415

    state = _training_state(model, optimizer, scheduler)
    dcp.load(state, checkpoint_id=str(sharded_state_dir(checkpoint)))
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=StateDictOptions(strict=False),  # the frozen weights are not in it
    )
    scheduler.load_state_dict(state["scheduler"])


def barrier() -> None:
    """Wait for every worker, when there are several."""
    import torch.distributed as dist  # noqa: PLC0415

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def release_process_group() -> None:
    """Shut this worker's process group down once it has no more collectives to run."""
    import torch.distributed as dist  # noqa: PLC0415

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def end_worker(code: int) -> NoReturn:
    """Leave a worker process with `code`, skipping the interpreter's finalization.

    A finished worker's C++ threads can be destroyed unjoined while the interpreter tears down
    (gloo's, most likely, kept alive by the device meshes the model still refers to: not confirmed),
    which aborts the process ("terminate called without an active exception",
    pytorch/pytorch#190489), and the launcher then fails the whole run. Seen twice in CI, the second
    time after `destroy_process_group()`. Every file a worker writes is closed by now; only the
    standard streams need flushing.
    """
    release_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
