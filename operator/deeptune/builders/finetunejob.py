"""FineTuneJob → its children: the trainer ConfigMap and the batch/v1 Job. Pure functions."""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field

from deeptune.api.base import ConfigMapKeyRef, SecretKeyRef
from deeptune.api.finetunejob import KUEUE_PRIORITY_LABEL, KUEUE_QUEUE_LABEL, DataSource, FineTuneJobSpec
from deeptune.api.trainer import (
    CONFIG_PATH,
    DATASET_TOKEN_ENV,
    EXIT_INVALID_INPUT,
    HUB_TOKEN_ENV,
    METRICS_PORT,
    RENDEZVOUS_ENV,
    RENDEZVOUS_PORT,
    TEACHER_HUB_TOKEN_ENV,
    TERMINATION_MESSAGE_PATH,
    Coordination,
    TrainerConfig,
    TrainerPaths,
)
from deeptune.builders.common import (
    Manifest,
    Owner,
    child_name,
    container_security_context,
    metadata,
    pod_security_context,
    uid_label,
)
from deeptune.builders.pod import container_resources, cpu_threads, scheduling
from deeptune.fitting import plan_for

COMPONENT = "trainer"
CONTAINER = "trainer"
CONFIG_KEY = "config.json"
PVC_ROOT = "/mnt/pvc"
CONFIGMAP_ROOT = "/mnt/configmap"
DEFAULT_TRAINER_IMAGE = "ghcr.io/deeptune/trainer:0.1.0"
RESULT_FINALIZER = "deeptune.dev/result"
"""Held by a trainer Job and its pods until the run's outcome is in the FineTuneJob's status, so a
short ttlSecondsAfterFinished (or one that passes while no operator runs) cannot erase the result:
the outcome comes from the Job's conditions and the trainer's summary from its pod."""


@dataclass(frozen=True)
class ChildSettings:
    """Operator-wide choices for the children it builds, not part of any one spec (set from the
    chart's values)."""

    trainer_image: str = DEFAULT_TRAINER_IMAGE
    image_pull_policy: str = "IfNotPresent"
    extra_labels: dict[str, str] = field(default_factory=dict)
    operator_namespace: str = ""
    """Where the operator's pods run, and their labels (the chart says both): a serving NetworkPolicy
    admits them, since the operator checks the model through the HTTP port. Unknown (a local run):
    the policy admits no operator."""
    operator_labels: dict[str, str] = field(default_factory=dict)


def config_map_name(owner: Owner) -> str:
    return child_name(owner.name, "config")


def job_name(owner: Owner) -> str:
    return child_name(owner.name, "train")


def service_name(owner: Owner) -> str:
    """The headless Service that names the pods of a run over several pods (`<job>-<index>.<this>`)."""
    return child_name(owner.name, "workers")


def rendezvous_endpoint(owner: Owner) -> str:
    """Pod 0 of the Indexed Job: its hostname is `<job>-0`, its DNS name that under the Service."""
    return f"{job_name(owner)}-0.{service_name(owner)}:{RENDEZVOUS_PORT}"


def _pvc_path(claim: str, path: str) -> str:
    return posixpath.join(PVC_ROOT, claim, path) if path else posixpath.join(PVC_ROOT, claim)


def _config_map_path(ref: ConfigMapKeyRef | None) -> str | None:
    return posixpath.join(CONFIGMAP_ROOT, ref.name, ref.key) if ref else None


def _source_path(source: DataSource | None) -> str | None:
    """Where a dataset source appears inside the container (URL and inline sources have no path)."""
    if source is None:
        return None
    if source.pvc is not None:
        return _pvc_path(source.pvc.claim_name, source.pvc.path)
    return _config_map_path(source.config_map)


def _synonym_config_map(spec: FineTuneJobSpec) -> ConfigMapKeyRef | None:
    augmentation = spec.dataset.augmentation
    synonyms = augmentation.synonyms if augmentation else None
    return synonyms.dictionary_config_map if synonyms else None


def trainer_config(owner: Owner, spec: FineTuneJobSpec) -> TrainerConfig:
    """The trainer's whole input, with volume paths resolved to where the Job mounts them."""
    output = spec.output.pvc
    output_dir = _pvc_path(output.claim_name, output.path or posixpath.join(owner.namespace, owner.name))
    base = spec.base_model.pvc
    teacher = spec.distillation.teacher.pvc if spec.distillation else None
    teacher_adapter = spec.distillation.teacher.adapter if spec.distillation else None
    plan = plan_for(spec)
    return TrainerConfig(
        name=owner.name,
        strategy="fsdp" if plan is not None and plan.strategy == "fsdp" else None,
        namespace=owner.namespace,
        uid=owner.uid,
        spec=spec,
        paths=TrainerPaths(
            output_dir=output_dir,
            dataset=_source_path(spec.dataset.source),
            validation_dataset=_source_path(spec.dataset.validation.source),
            test_dataset=_source_path(_test_source(spec)),
            synonym_dictionary=_config_map_path(_synonym_config_map(spec)),
            base_model=_pvc_path(base.claim_name, base.path) if base else None,
            teacher_model=_pvc_path(teacher.claim_name, teacher.path) if teacher else None,
            teacher_adapter=(
                _pvc_path(teacher_adapter.claim_name, teacher_adapter.path) if teacher_adapter else None
            ),
            hf_home=_pvc_path(output.claim_name, ".cache/huggingface"),
        ),
    )


def build_config_map(
    owner: Owner, spec: FineTuneJobSpec, coordinator: Coordination | None = None
) -> Manifest:
    """The resolved trainer config (a federation's coordinator's with `coordinator`). It holds no
    secret: tokens are referenced, never copied."""
    config = trainer_config(owner, spec).model_copy(update={"coordinator": coordinator})
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(owner, config_map_name(owner), COMPONENT),
        "data": {CONFIG_KEY: json.dumps(config.to_wire(), indent=2, sort_keys=True)},
    }


def _test_source(spec: FineTuneJobSpec) -> DataSource | None:
    return spec.dataset.test.source if spec.dataset.test else None


def _secret_env(name: str, ref: SecretKeyRef) -> Manifest:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


def _dataset_token_env(spec: FineTuneJobSpec) -> list[Manifest]:
    """Each Hub data source's token, from its Secret by reference (DATASET_TOKEN_ENV names them)."""
    sources = {
        "dataset.source": spec.dataset.source,
        "dataset.validation.source": spec.dataset.validation.source,
        "dataset.test.source": _test_source(spec),
    }
    return [
        _secret_env(DATASET_TOKEN_ENV[where], source.hub.token_secret_ref)
        for where, source in sources.items()
        if source is not None and source.hub is not None and source.hub.token_secret_ref is not None
    ]


def _claims(spec: FineTuneJobSpec) -> list[str]:
    """Every PVC the trainer needs, once each (the dataset and output may share a claim)."""
    locations = [
        spec.base_model.pvc,
        spec.distillation.teacher.pvc if spec.distillation else None,
        spec.distillation.teacher.adapter if spec.distillation else None,
        spec.dataset.source.pvc,
        spec.dataset.validation.source.pvc if spec.dataset.validation.source else None,
        test.pvc if (test := _test_source(spec)) else None,
        spec.output.pvc,
    ]
    return list(dict.fromkeys(loc.claim_name for loc in locations if loc is not None))


def _dataset_config_maps(spec: FineTuneJobSpec) -> list[str]:
    """ConfigMaps with data the trainer reads: dataset sources and the synonym dictionary."""
    sources = [spec.dataset.source, spec.dataset.validation.source, _test_source(spec)]
    refs = [s.config_map for s in sources if s is not None] + [_synonym_config_map(spec)]
    return list(dict.fromkeys(ref.name for ref in refs if ref is not None))


def _volumes(owner: Owner, spec: FineTuneJobSpec) -> tuple[list[Manifest], list[Manifest]]:
    volumes: list[Manifest] = [
        {"name": "config", "configMap": {"name": config_map_name(owner)}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.resources.shared_memory}},
    ]
    mounts: list[Manifest] = [
        {"name": "config", "mountPath": posixpath.dirname(CONFIG_PATH), "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    for index, claim in enumerate(_claims(spec)):
        volumes.append({"name": f"pvc-{index}", "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": f"pvc-{index}", "mountPath": posixpath.join(PVC_ROOT, claim)})
    for index, name in enumerate(_dataset_config_maps(spec)):
        volumes.append({"name": f"data-{index}", "configMap": {"name": name}})
        mounts.append(
            {"name": f"data-{index}", "mountPath": posixpath.join(CONFIGMAP_ROOT, name), "readOnly": True}
        )
    return volumes, mounts


def _env(owner: Owner, spec: FineTuneJobSpec) -> list[Manifest]:
    env: list[Manifest] = [
        {"name": "HOME", "value": "/tmp"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]
    token = spec.base_model.token_secret_ref
    if token is not None:
        env.append(_secret_env(HUB_TOKEN_ENV, token))
    teacher_token = spec.distillation.teacher.token_secret_ref if spec.distillation else None
    if teacher_token is not None:
        env.append(_secret_env(TEACHER_HUB_TOKEN_ENV, teacher_token))
    env += _dataset_token_env(spec)
    if spec.distributed.nodes > 1:
        env.append({"name": RENDEZVOUS_ENV, "value": rendezvous_endpoint(owner)})
    user_names = {var.name for var in spec.env}
    threads = cpu_threads(spec.resources.cpu)
    if threads and "OMP_NUM_THREADS" not in user_names:
        # torch sizes its thread pool by the node's cores, not the pod's CPU; oversubscribed
        # threads spinning against each other make CPU training many times slower.
        env.append({"name": "OMP_NUM_THREADS", "value": str(threads)})
    env.extend(var.to_wire() for var in spec.env)
    return env


def _ports(spec: FineTuneJobSpec) -> list[Manifest]:
    ports: list[Manifest] = [{"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}]
    if spec.distributed.nodes > 1:
        ports.append({"name": "rendezvous", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"})
    return ports


def _pod_spec(owner: Owner, spec: FineTuneJobSpec, settings: ChildSettings) -> Manifest:
    volumes, mounts = _volumes(owner, spec)
    container: Manifest = {
        "name": CONTAINER,
        "image": spec.image or settings.trainer_image,
        "imagePullPolicy": spec.image_pull_policy or settings.image_pull_policy,
        "command": ["python", "-m", "deeptune_trainer", "--config", CONFIG_PATH],
        "ports": _ports(spec),
        "env": _env(owner, spec),
        "resources": container_resources(spec.resources),
        "volumeMounts": mounts,
        "securityContext": container_security_context(),
        "terminationMessagePath": TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod: Manifest = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": volumes,
    }
    pod.update(scheduling(spec.resources))
    if spec.distributed.nodes > 1:
        pod["subdomain"] = service_name(owner)  # with the Indexed Job's hostname: a DNS name per pod
    if spec.image_pull_secrets:
        pod["imagePullSecrets"] = [s.to_wire() for s in spec.image_pull_secrets]
    return pod


def build_job(owner: Owner, spec: FineTuneJobSpec, settings: ChildSettings) -> Manifest:
    """The batch/v1 Job that runs the trainer once, retrying pods up to `backoffLimit`.

    Bad input (trainer exit code 3) fails the Job at once: retrying cannot fix a typo, and a retry
    loop would burn GPU hours. Pods evicted by the cluster (DisruptionTarget) do not count as failures.
    """
    meta = metadata(owner, job_name(owner), COMPONENT)
    meta["labels"].update(settings.extra_labels)
    meta["finalizers"] = [RESULT_FINALIZER]
    template_labels = {**meta["labels"]}
    if spec.queue_name:
        meta["labels"][KUEUE_QUEUE_LABEL] = spec.queue_name
    if spec.workload_priority_class_name:
        meta["labels"][KUEUE_PRIORITY_LABEL] = spec.workload_priority_class_name
    nodes = spec.distributed.nodes
    job_spec: Manifest = {
        "completions": nodes,
        "parallelism": nodes,
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": CONTAINER,
                        "operator": "In",
                        "values": [EXIT_INVALID_INPUT],
                    },
                },
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            ]
        },
        "template": {
            "metadata": {
                "labels": template_labels,
                "finalizers": [RESULT_FINALIZER],
                "annotations": {
                    "prometheus.io/scrape": "true",
                    "prometheus.io/port": str(METRICS_PORT),
                },
            },
            "spec": _pod_spec(owner, spec, settings),
        },
    }
    if nodes > 1:
        job_spec["completionMode"] = "Indexed"  # JOB_COMPLETION_INDEX and hostname <job>-<index>
    job_spec.update({key: value for key, value in job_controls(spec).items() if value is not None})
    job_spec["suspend"] = spec.suspend or bool(spec.queue_name)  # queued: Kueue starts it when admitted
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}


def build_service(owner: Owner, spec: FineTuneJobSpec) -> Manifest | None:
    """The headless Service of a run over several pods (None for one pod): it gives each pod a DNS
    name, so pod 0's rendezvous is found before any pod is ready."""
    if spec.distributed.nodes == 1:
        return None
    meta = metadata(owner, service_name(owner), COMPONENT)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {uid_label(owner.kind): owner.uid, "app.kubernetes.io/component": COMPONENT},
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT}],
        },
    }


def job_controls(spec: FineTuneJobSpec) -> Manifest:
    """The Job fields a user may change after creation (the operator patches a running Job when they
    change); everything else is fixed with the run (immutable in the CRD). A queued Job's `suspend`
    is Kueue's: the operator patching it back would fight Kueue's admission."""
    controls: Manifest = {
        # Over several pods one failure restarts them all: each pod's retry counts.
        "backoffLimit": spec.backoff_limit * spec.distributed.nodes,
        "activeDeadlineSeconds": spec.active_deadline_seconds,
        "ttlSecondsAfterFinished": spec.ttl_seconds_after_finished,
    }
    if not spec.queue_name:
        controls["suspend"] = spec.suspend
    return controls
