"""A real fine-tune through the cluster: progress while it runs, results at the end, retries resume.
On the local cluster the runs are the trainer image's, on the real node."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from deeptune_trainer.training import COMPLETE_MARKER
from tests.cluster.harness import Cluster, Process, wait_for
from tests.conftest import ROOT

pytestmark = [pytest.mark.cluster, pytest.mark.trainer]
NAME = "tiny-keywords"


def newest_complete_checkpoint(checkpoints: Path) -> int:
    """The step of the newest complete checkpoint under a run's `checkpoints` directory (0: none).
    The trainer keeps two, so a test that waits for one by name may find it already gone: a fast
    trainer went from checkpoint-20 to -60 within one poll once, and the run ended unseen."""
    steps = [
        int(marker.parent.name.rsplit("-", 1)[1])
        for marker in checkpoints.glob(f"checkpoint-*/{COMPLETE_MARKER}")
    ]
    return max(steps, default=0)


def tiny_manifest(namespace: str, **hyperparameters: Any) -> dict[str, Any]:
    manifest = yaml.safe_load((ROOT / "examples" / "finetune-tiny.yaml").read_text())
    manifest["metadata"]["namespace"] = namespace
    manifest["spec"]["hyperparameters"].update(hyperparameters)
    return manifest


def status_of(cluster: Cluster, namespace: str) -> dict[str, Any]:
    return (cluster.get("finetunejob", NAME, namespace) or {}).get("status") or {}


def follow(cluster: Cluster, namespace: str, timeout: float) -> list[dict[str, Any]]:
    """Every distinct status seen until the run ends (the last one is final)."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = status_of(cluster, namespace)
        if status and (not seen or status != seen[-1]):
            seen.append(status)
        if status.get("phase") in ("Succeeded", "Failed"):
            return seen
        time.sleep(0.5)
    raise AssertionError(f"the run did not finish in {timeout}s; last status: {seen[-1] if seen else None}")


def test_tiny_finetune_end_to_end(
    operator: Process,
    crds: Cluster,
    namespace: str,
    tiny_volumes: dict[str, Path],
    trainer_pods: Callable[[dict[str, Any]], dict[str, Any]],
) -> None:
    steps = 600  # long enough (seconds) that the 1 s status mirror sees the trainer's progress
    crds.apply(trainer_pods(tiny_manifest(namespace, maxSteps=steps)))
    seen = follow(crds, namespace, timeout=600)
    final = seen[-1]
    assert final["phase"] == "Succeeded", final

    running = [s for s in seen if s.get("phase") == "Running" and (s.get("progress") or {}).get("step")]
    assert running, "status showed no progress while the trainer ran"
    assert running[0]["progress"]["totalSteps"] == steps

    results = final["evalResults"]
    assert results["fineTuned"]["exactMatch"] > results["baseline"]["exactMatch"]
    assert results["delta"]["exactMatch"] > 0.5
    assert final["dataset"]["rowsRead"] == 240
    assert final["dataset"]["validationRows"] + final["dataset"]["trainRows"] == 240
    assert final["progress"]["percent"] == 100 and final["progress"]["step"] == steps
    assert final["output"] == {"claimName": "deeptune-output", "path": NAME, "adapterPath": "adapter"}
    out = tiny_volumes["deeptune-output"] / NAME
    for artifact in (
        "adapter/adapter_model.safetensors",
        "eval_results.json",
        "README.md",
        "data_report.json",
    ):
        assert (out / artifact).is_file(), artifact

    row = crds.kubectl("get", "ftj", NAME, "-n", namespace, "--no-headers").stdout.split()
    assert row[:3] == [NAME, "Succeeded", "100"]
    reasons = {e["reason"] for e in crds.list("events", namespace) if e["involvedObject"]["name"] == NAME}
    assert {"JobCreated", "Running", "Succeeded"} <= reasons


def test_tiny_preference_tuning_end_to_end(
    operator: Process,
    crds: Cluster,
    namespace: str,
    tiny_volumes: dict[str, Path],
    trainer_pods: Callable[[dict[str, Any]], dict[str, Any]],
) -> None:
    """examples/finetune-tiny-dpo.yaml as a user applies it: DPO through the real control plane, the
    base model's and the tuned model's ranking of held-out pairs in status."""
    manifest = yaml.safe_load((ROOT / "examples" / "finetune-tiny-dpo.yaml").read_text())
    manifest["metadata"]["namespace"] = namespace
    name = manifest["metadata"]["name"]
    crds.apply(trainer_pods(manifest))
    final = finished(crds, name, namespace, 600)
    assert final["phase"] == "Succeeded", final
    results = final["evalResults"]
    assert results["fineTuned"]["preferenceAccuracy"] >= 0.95 > results["baseline"]["preferenceAccuracy"]
    assert results["delta"]["preferenceMargin"] > 5
    assert final["dataset"]["rowsRead"] == 240
    card = (tiny_volumes["deeptune-output"] / name / "README.md").read_text()
    assert "with DeepTune (lora, DPO)" in card


def finished(crds: Cluster, name: str, namespace: str, timeout: float) -> dict[str, Any]:
    """The FineTuneJob's status once it succeeded or failed."""

    def final() -> dict[str, Any] | None:
        status = (crds.get("finetunejob", name, namespace) or {}).get("status") or {}
        return status if status.get("phase") in ("Succeeded", "Failed") else None

    return wait_for(f"{name} to finish", final, timeout)


def test_a_student_distilled_from_a_finetunejobs_output(
    operator: Process,
    crds: Cluster,
    namespace: str,
    tiny_volumes: dict[str, Path],
    trainer_pods: Callable[[dict[str, Any]], dict[str, Any]],
) -> None:
    """examples/finetune-tiny-distill.yaml applied before its teacher (examples/finetune-tiny.yaml, by
    name): it waits for the teacher's run, then the smaller student learns from the teacher's adapter
    on its base model, out of mostly wrong data."""
    student = yaml.safe_load((ROOT / "examples" / "finetune-tiny-distill.yaml").read_text())
    student["metadata"]["namespace"] = namespace
    name = student["metadata"]["name"]
    crds.apply(trainer_pods(student))

    def waiting() -> bool:
        status = (crds.get("finetunejob", name, namespace) or {}).get("status") or {}
        ready = next((c for c in status.get("conditions") or [] if c["type"] == "Ready"), {})
        return (
            ready.get("reason") == "WaitingForTeacher" and f"FineTuneJob {NAME} not found" in ready["message"]
        )

    wait_for(f"{name} to wait for its teacher", waiting, timeout=60)
    assert not crds.list("jobs", namespace), "no trainer Job before the teacher has succeeded"
    crds.apply(trainer_pods(tiny_manifest(namespace)))
    assert finished(crds, NAME, namespace, 600)["phase"] == "Succeeded"
    final = finished(crds, name, namespace, 600)
    assert final["phase"] == "Succeeded", final
    results = final["evalResults"]
    assert results["teacher"]["exactMatch"] >= 0.9
    assert results["fineTuned"]["exactMatch"] >= 0.9 * results["teacher"]["exactMatch"]
    assert results["baseline"]["exactMatch"] < 0.5
    config = crds.get("configmap", f"{name}-config", namespace) or {}
    assert f"/mnt/pvc/deeptune-output/{NAME}/adapter" in config["data"]["config.json"]


def kill_trainers(namespace: str, *env: str) -> int:
    """SIGKILL the trainer processes of pods in `namespace` (found by the env the Job gives them,
    narrowed by `env` entries such as `JOB_COMPLETION_INDEX=1`), leaving any other session's alone."""
    marks = [f"POD_NAMESPACE={namespace}".encode(), *(entry.encode() for entry in env)]
    killed = 0
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"deeptune_trainer" in cmdline and all(mark in environ for mark in marks):
            os.kill(int(proc.name), signal.SIGKILL)
            killed += 1
    return killed
