"""The FineTuneJob builders: the ConfigMap and Job a user's spec turns into."""

from __future__ import annotations

import json
from typing import Any

import pytest

from deeptune.api.finetunejob import parse_spec
from deeptune.api.trainer import DATASET_TOKEN_ENV, EXIT_INVALID_INPUT, TrainerConfig
from deeptune.builders.common import Owner, child_name
from deeptune.builders.finetunejob import (
    ChildSettings,
    build_config_map,
    build_job,
    build_service,
    job_controls,
)
from tests.unit.test_finetunejob_model import with_changes

OWNER = Owner(kind="FineTuneJob", name="support-bot", namespace="team-a", uid="1234-abcd")
SETTINGS = ChildSettings(trainer_image="registry.local/deeptune/trainer:test")


def job_for(spec: dict[str, Any]) -> dict[str, Any]:
    return build_job(OWNER, parse_spec(spec), SETTINGS)


def pod_of(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["template"]["spec"]


def claims_of(job: dict[str, Any]) -> list[str]:
    """The PersistentVolumeClaims the Job's pod mounts, in order."""
    return [
        v["persistentVolumeClaim"]["claimName"]
        for v in pod_of(job)["volumes"]
        if "persistentVolumeClaim" in v
    ]


def container_of(job: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod_of(job)["containers"]
    return container


@pytest.mark.parametrize(("method", "gpus"), [("lora", 1), ("qlora", 2), ("full", 8)])
def test_gpu_request_for_each_method(method: str, gpus: int) -> None:
    job = job_for(with_changes(method=method, resources={"gpu": gpus, "memory": "80Gi", "cpu": 8}))
    resources = container_of(job)["resources"]
    assert resources["limits"] == {"nvidia.com/gpu": str(gpus), "memory": "80Gi"}
    assert resources["requests"] == {"nvidia.com/gpu": str(gpus), "memory": "80Gi", "cpu": "8"}


def test_cpu_job_asks_for_no_gpu() -> None:
    resources = container_of(job_for(with_changes(resources={"gpu": 0})))["resources"]
    assert "nvidia.com/gpu" not in json.dumps(resources)


def test_custom_gpu_resource_name() -> None:
    job = job_for(with_changes(resources={"gpu": 1, "gpuResourceName": "amd.com/gpu"}))
    assert container_of(job)["resources"]["limits"] == {"amd.com/gpu": "1"}


def test_scheduling_fields_reach_the_pod() -> None:
    anti = {"labelSelector": {"matchLabels": {"team": "a"}}, "topologyKey": "kubernetes.io/hostname"}
    job = job_for(
        with_changes(
            resources={
                "nodeSelector": {"gpu": "a100"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [anti]}},
                "priorityClassName": "training",
            }
        )
    )
    pod = pod_of(job)
    assert pod["nodeSelector"] == {"gpu": "a100"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["affinity"] == {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [anti]}}
    assert pod["priorityClassName"] == "training"


def test_pod_is_locked_down() -> None:
    job = job_for(with_changes())
    pod = pod_of(job)
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container_of(job)["securityContext"]
    assert security == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert pod["restartPolicy"] == "Never"


def test_owner_reference_makes_the_job_garbage_collected() -> None:
    job = job_for(with_changes())
    assert job["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "deeptune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "name": "support-bot",
            "uid": "1234-abcd",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert job["metadata"]["name"] == "support-bot-train"
    assert job["metadata"]["namespace"] == "team-a"
    assert job["spec"]["template"]["metadata"]["labels"]["deeptune.dev/finetunejob"] == "support-bot"


def test_volumes_for_model_data_and_output_share_a_claim_once() -> None:
    job = job_for(
        with_changes(
            baseModel={"pvc": {"claimName": "models", "path": "ds-7b"}},
            dataset={"source": {"pvc": {"claimName": "shared", "path": "d.jsonl"}}},
            output={"pvc": {"claimName": "shared", "path": "runs/1"}},
        )
    )
    claims = claims_of(job)
    assert claims == ["models", "shared"]
    mounts = {m["mountPath"] for m in container_of(job)["volumeMounts"]}
    assert {"/mnt/pvc/models", "/mnt/pvc/shared", "/etc/deeptune", "/tmp", "/dev/shm"} <= mounts


def test_config_map_dataset_is_mounted_and_resolved() -> None:
    spec = with_changes(dataset={"source": {"configMap": {"name": "qa", "key": "rows.jsonl"}}})
    job = job_for(spec)
    assert {"name": "data-0", "configMap": {"name": "qa"}} in pod_of(job)["volumes"]
    config = TrainerConfig.model_validate_json(
        build_config_map(OWNER, parse_spec(spec))["data"]["config.json"]
    )
    assert config.paths.dataset == "/mnt/configmap/qa/rows.jsonl"
    assert config.paths.output_dir == "/mnt/pvc/out/team-a/support-bot"


def test_a_test_source_is_mounted_and_resolved() -> None:
    spec = with_changes(
        dataset={
            "source": {"pvc": {"claimName": "data", "path": "train.jsonl"}},
            "test": {"source": {"pvc": {"claimName": "exams", "path": "test.jsonl"}}},
        }
    )
    claims = claims_of(job_for(spec))
    assert "exams" in claims
    config = TrainerConfig.model_validate_json(
        build_config_map(OWNER, parse_spec(spec))["data"]["config.json"]
    )
    assert config.paths.test_dataset == "/mnt/pvc/exams/test.jsonl"


def test_a_distillation_teacher_on_a_pvc_is_mounted_and_resolved() -> None:
    spec = with_changes(
        distillation={"teacher": {"pvc": {"claimName": "teachers", "path": "runs/big/merged"}}}
    )
    claims = claims_of(job_for(spec))
    assert "teachers" in claims
    config = TrainerConfig.model_validate_json(
        build_config_map(OWNER, parse_spec(spec))["data"]["config.json"]
    )
    assert config.paths.teacher_model == "/mnt/pvc/teachers/runs/big/merged"
    hub = with_changes(distillation={"teacher": {"name": "org/big", "tokenSecretRef": {"name": "teacher"}}})
    env = {var["name"]: var for var in container_of(job_for(hub))["env"]}
    assert env["DEEPTUNE_TEACHER_HF_TOKEN"]["valueFrom"] == {
        "secretKeyRef": {"name": "teacher", "key": "token"}
    }


def test_token_is_referenced_never_copied() -> None:
    spec = with_changes(baseModel={"name": "org/private", "tokenSecretRef": {"name": "hf", "key": "tok"}})
    env = container_of(job_for(spec))["env"]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "tok"}}} in env
    config_map = build_config_map(OWNER, parse_spec(spec))
    assert "valueFrom" not in config_map["data"]["config.json"]


def test_bad_input_fails_the_job_without_retries() -> None:
    job = job_for(with_changes(backoffLimit=5))
    assert job["spec"]["backoffLimit"] == 5
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob"
    assert rules[0]["onExitCodes"]["values"] == [EXIT_INVALID_INPUT]


def test_job_controls() -> None:
    job = job_for(
        with_changes(
            suspend=True,
            activeDeadlineSeconds=3600,
            ttlSecondsAfterFinished=600,
            image="my/trainer:dev",
            imagePullSecrets=[{"name": "regcred"}],
            env=[{"name": "WANDB_DISABLED", "value": "true"}],
        )
    )
    assert job["spec"]["suspend"] is True
    assert job["spec"]["activeDeadlineSeconds"] == 3600
    assert job["spec"]["ttlSecondsAfterFinished"] == 600
    assert container_of(job)["image"] == "my/trainer:dev"
    assert pod_of(job)["imagePullSecrets"] == [{"name": "regcred"}]
    assert {"name": "WANDB_DISABLED", "value": "true"} in container_of(job)["env"]


def test_default_image_comes_from_the_operator_settings() -> None:
    assert container_of(job_for(with_changes()))["image"] == "registry.local/deeptune/trainer:test"


def test_long_names_stay_within_label_limits_and_unique() -> None:
    a, b = "x" * 70, "x" * 69 + "y"
    assert len(child_name(a, "train")) <= 63
    assert child_name(a, "train") != child_name(b, "train")
    assert child_name("short", "train") == "short-train"


def test_synonym_dictionary_config_map_is_mounted_and_resolved() -> None:
    spec = with_changes(
        dataset={
            "source": {"url": "https://x/d.jsonl"},
            "augmentation": {"synonyms": {"dictionaryConfigMap": {"name": "syn", "key": "dict.json"}}},
        }
    )
    assert {"name": "data-0", "configMap": {"name": "syn"}} in pod_of(job_for(spec))["volumes"]
    config = TrainerConfig.model_validate_json(
        build_config_map(OWNER, parse_spec(spec))["data"]["config.json"]
    )
    assert config.paths.synonym_dictionary == "/mnt/configmap/syn/dict.json"


@pytest.mark.parametrize(("cpu", "threads"), [("8", "8"), ("2.5", "2"), ("500m", "1"), (None, None)])
def test_torch_threads_follow_the_cpu_request(cpu: str | None, threads: str | None) -> None:
    env = container_of(job_for(with_changes(resources={"cpu": cpu} if cpu else {})))["env"]
    assert next((v["value"] for v in env if v["name"] == "OMP_NUM_THREADS"), None) == threads


def test_users_thread_setting_wins() -> None:
    spec = with_changes(resources={"cpu": "8"}, env=[{"name": "OMP_NUM_THREADS", "value": "4"}])
    env = container_of(job_for(spec))["env"]
    assert [v["value"] for v in env if v["name"] == "OMP_NUM_THREADS"] == ["4"]


def test_a_queued_job_is_made_suspended_with_kueues_labels() -> None:
    job = job_for(with_changes(queueName="gpu-queue", workloadPriorityClassName="urgent"))
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "urgent"
    assert job["spec"]["suspend"] is True  # Kueue unsuspends it when it admits the workload
    assert "kueue.x-k8s.io/queue-name" not in job["spec"]["template"]["metadata"]["labels"]
    assert "suspend" not in job_controls(parse_spec(with_changes(queueName="gpu-queue")))
    assert job_for(with_changes())["spec"]["suspend"] is False


def test_auto_strategy_reaches_the_trainer_as_the_plan_decided() -> None:
    big = with_changes(
        baseModel={"name": "deepseek-ai/deepseek-llm-67b-base"}, resources={"gpu": 8, "gpuMemory": "80Gi"}
    )
    config = json.loads(build_config_map(OWNER, parse_spec(big))["data"]["config.json"])
    assert config["strategy"] == "fsdp"  # replicated, 146 GiB per GPU would not fit
    small = json.loads(build_config_map(OWNER, parse_spec(with_changes()))["data"]["config.json"])
    assert small.get("strategy") is None  # the trainer's auto: ddp


def test_a_run_over_several_pods_is_an_indexed_job_behind_a_headless_service() -> None:
    spec = parse_spec(with_changes(resources={"gpu": 8}, distributed={"nodes": 4}, backoffLimit=2))
    job = build_job(OWNER, spec, SETTINGS)
    assert (job["spec"]["completionMode"], job["spec"]["completions"], job["spec"]["parallelism"]) == (
        "Indexed", 4, 4,
    )  # fmt: skip
    assert job["spec"]["backoffLimit"] == 8  # a failure restarts every pod: each pod's retry counts
    assert pod_of(job)["subdomain"] == "support-bot-workers"
    env = {e["name"]: e.get("value") for e in container_of(job)["env"]}
    assert env["DEEPTUNE_RENDEZVOUS_ENDPOINT"] == "support-bot-train-0.support-bot-workers:29400"
    assert {"name": "rendezvous", "containerPort": 29400, "protocol": "TCP"} in container_of(job)["ports"]
    service = build_service(OWNER, spec)
    assert service is not None and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    selector = service["spec"]["selector"]
    assert all(pod_of(job) is not None and job["spec"]["template"]["metadata"]["labels"][k] == v
               for k, v in selector.items())  # fmt: skip
    assert build_service(OWNER, parse_spec(with_changes())) is None
    assert "completionMode" not in job_for(with_changes())["spec"]


def test_each_hub_datasets_token_is_referenced_by_the_variable_the_trainer_reads() -> None:
    private = {"name": "org/chats", "tokenSecretRef": {"name": "hub", "key": "data"}}
    spec = with_changes(
        dataset={
            "source": {"hub": private},
            "validation": {"source": {"hub": {**private, "split": "validation"}}},
            "test": {"source": {"hub": {"name": "org/public", "split": "test"}}},
        }
    )
    env = container_of(job_for(spec))["env"]
    reference = {"secretKeyRef": {"name": "hub", "key": "data"}}
    assert [var for var in env if var["name"] in DATASET_TOKEN_ENV.values()] == [
        {"name": DATASET_TOKEN_ENV["dataset.source"], "valueFrom": reference},
        {"name": DATASET_TOKEN_ENV["dataset.validation.source"], "valueFrom": reference},
    ]
