"""The contract between the operator and the trainer container.

The operator writes a `TrainerConfig` (as JSON in a ConfigMap) and reads back the trainer's
Prometheus metrics while it runs and its `TrainerSummary` (the pod's termination message) at the end.
Both sides import these definitions, so they cannot drift apart.
"""

from __future__ import annotations

import posixpath
from typing import Literal

from deeptune.api.base import ApiModel
from deeptune.api.finetunejob import DatasetReport, EvalResults, FineTuneJobSpec, Lineage

METRICS_PORT = 9090
CONFIG_PATH = "/etc/deeptune/config.json"
TERMINATION_MESSAGE_PATH = "/dev/termination-log"
SUMMARY_LIMIT_BYTES = 4096
"""Kubernetes truncates termination messages at 4 KiB."""

RENDEZVOUS_PORT = 29400
"""Where pod 0's launcher hosts the c10d rendezvous of a run over several pods."""
RENDEZVOUS_ENV = "DEEPTUNE_RENDEZVOUS_ENDPOINT"
"""`host:port` of pod 0's rendezvous, set by the operator on the pods of a run over several pods."""

DATASET_TOKEN_ENV: dict[str, str] = {
    "dataset.source": "DEEPTUNE_DATASET_HUB_TOKEN",
    "dataset.validation.source": "DEEPTUNE_VALIDATION_HUB_TOKEN",
    "dataset.test.source": "DEEPTUNE_TEST_HUB_TOKEN",
}
"""The variable each data source's `hub.tokenSecretRef` reaches the trainer as (from the Secret, by
reference), by the source's spec path."""

FEDERATION_PORT = 9092
"""Where a federated run's coordinator serves Flower's fleet API to the sites."""

EXIT_INVALID_INPUT = 3
"""Trainer exit code for bad input (spec, dataset, model): retrying cannot help, so the Job fails fast."""


HUB_TOKEN_ENV = "HF_TOKEN"
"""The variable the base model's Hub token (`baseModel.tokenSecretRef`) reaches the trainer in."""
TEACHER_HUB_TOKEN_ENV = "DEEPTUNE_TEACHER_HF_TOKEN"
"""The variable the distillation teacher's Hub token (`distillation.teacher.tokenSecretRef`) reaches the
trainer in."""


class TrainerPaths(ApiModel):
    """Local paths inside the trainer's container, resolved from the spec's volumes."""

    output_dir: str
    dataset: str | None = None
    """The dataset file, for PVC and ConfigMap sources (URL and inline sources need none)."""
    validation_dataset: str | None = None
    test_dataset: str | None = None
    synonym_dictionary: str | None = None
    """The mounted file of `dataset.augmentation.synonyms.dictionaryConfigMap`."""
    base_model: str | None = None
    """The model directory, for a base model on a PVC."""
    teacher_model: str | None = None
    """The distillation teacher's directory, for a teacher on a PVC."""
    teacher_adapter: str | None = None
    """An adapter directory merged into the teacher (`distillation.teacher.adapter`, or the adapter
    of a `fineTuneJobRef` teacher's run)."""
    hf_home: str | None = None
    """Hugging Face cache, kept on the output volume so retries do not download again."""

    @property
    def hub_cache(self) -> str | None:
        """huggingface_hub's cache of models and datasets under `hf_home`; None for its default."""
        return posixpath.join(self.hf_home, "hub") if self.hf_home else None


class Coordination(ApiModel):
    """The coordinator's part in federated fine-tuning: how many rounds, and how many sites each
    round waits for."""

    rounds: int
    sites: int
    port: int = FEDERATION_PORT
    """Where Flower's fleet API listens (on every interface)."""


class TrainerConfig(ApiModel):
    """Everything the trainer needs, resolved by the operator (or by the standalone CLI)."""

    name: str
    namespace: str = "default"
    uid: str = ""
    spec: FineTuneJobSpec
    paths: TrainerPaths
    metrics_port: int = METRICS_PORT
    termination_message_path: str = TERMINATION_MESSAGE_PATH
    strategy: Literal["ddp", "fsdp"] | None = None
    """`distributed.strategy: auto` as the operator's memory plan decided it (`status.plan`), so the
    trainer shards exactly when the plan said it must; None where there is no plan (auto is ddp)."""
    coordinator: Coordination | None = None
    """Set for a federated run's coordinator: it reads no rows, serves the sites' rounds (Flower) and
    saves the averaged adapter."""


class TrainerError(ApiModel):
    """Why a run failed, in words a user can act on."""

    reason: str
    """CamelCase reason, e.g. `InvalidDataset`, `ModelNotFound`, `OutOfMemory`."""
    message: str


class ArtifactPaths(ApiModel):
    """Artifact locations relative to the output path."""

    adapter: str | None = None
    merged: str | None = None
    quantized: str | None = None


class SiteResult(ApiModel):
    """What a site reported to the coordinator in the last round: numbers, never rows."""

    train_rows: int | None = None
    eval_loss: float | None = None
    """The averaged adapter's validation loss on the site's own rows."""


class FederationSummary(ApiModel):
    """The coordinator's account of a federated run."""

    rounds: int
    sites: dict[str, SiteResult] = {}
    """By site (its namespace)."""


class TrainerSummary(ApiModel):
    """The compact result the trainer writes to its termination message (at most 4 KiB)."""

    outcome: Literal["succeeded", "failed"]
    error: TrainerError | None = None
    steps: int | None = None
    train_loss: float | None = None
    eval_results: EvalResults | None = None
    dataset: DatasetReport | None = None
    artifacts: ArtifactPaths | None = None
    lineage: Lineage | None = None
    federation: FederationSummary | None = None


class MetricNames:
    """Prometheus metric names the trainer exposes and the operator scrapes."""

    STEP = "deeptune_trainer_step"
    TOTAL_STEPS = "deeptune_trainer_total_steps"
    EPOCH = "deeptune_trainer_epoch"
    TRAIN_LOSS = "deeptune_trainer_train_loss"
    EVAL_LOSS = "deeptune_trainer_eval_loss"
    LEARNING_RATE = "deeptune_trainer_learning_rate"
    TOKENS_PER_SECOND = "deeptune_trainer_tokens_per_second"
    SAMPLES_PER_SECOND = "deeptune_trainer_samples_per_second"
    ETA_SECONDS = "deeptune_trainer_eta_seconds"
    PEAK_MEMORY_BYTES = "deeptune_trainer_peak_memory_bytes"
