"""A hyperparameter sweep through the cluster: examples/finetune-tiny-sweep.yaml as a user applies it,
its trials real FineTuneJobs that train the tiny model, one of them killed on purpose."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.harness import Cluster, Process, wait_for
from tests.cluster.test_finetunejob_training import kill_trainers
from tests.conftest import ROOT

pytestmark = [pytest.mark.cluster, pytest.mark.trainer]
SWEEP_LABEL = "deeptune.dev/finetunesweep"


def sweep_manifest(namespace: str) -> dict[str, Any]:
    manifest = yaml.safe_load((ROOT / "examples" / "finetune-tiny-sweep.yaml").read_text())
    manifest["metadata"]["namespace"] = namespace
    manifest["spec"]["template"]["backoffLimit"] = 0  # the killed trial fails instead of retrying
    return manifest


def test_a_sweep_over_learning_rate_names_its_best_trial(
    operator: Process,
    crds: Cluster,
    namespace: str,
    tiny_volumes: dict[str, Path],
    trainer_pods: Callable[[dict[str, Any]], dict[str, Any]],
) -> None:
    if not crds.local:
        pytest.skip("LOUD SKIP: kills a trainer's process on this machine, where the local cluster runs it")
    manifest = sweep_manifest(namespace)
    trainer_pods({"spec": manifest["spec"]["template"]})
    name = manifest["metadata"]["name"]
    crds.apply(manifest)

    first = f"{name}-0"
    pod = wait_for(
        f"{first}'s trainer pod",
        lambda: next(iter(crds.list("pods", namespace, f"deeptune.dev/finetunejob={first}")), None),
        timeout=120,
    )
    wait_for(
        f"{first}'s trainer to be killed",
        lambda: kill_trainers(namespace, f"POD_NAME={pod['metadata']['name']}") == 1,
        timeout=120,
        interval=0.2,
    )

    def finished() -> dict[str, Any] | None:
        status = (crds.get("finetunesweep", name, namespace) or {}).get("status") or {}
        return status if status.get("phase") in ("Succeeded", "Failed") else None

    status = wait_for(f"{name} to finish", finished, timeout=900)
    assert status["phase"] == "Succeeded", status
    trials = {t["name"]: t for t in status["trials"]}
    assert sorted(trials) == [f"{name}-{n}" for n in range(4)]
    assert trials[first]["phase"] == "Failed" and status["failed"] == 1
    assert "137" in trials[first]["message"] or "kill" in trials[first]["message"].lower(), trials[first]

    # Each trial is an ordinary FineTuneJob: its values in its spec, its scores in its own status.
    finetunejobs = {
        f["metadata"]["name"]: f for f in crds.list("finetunejob", namespace, f"{SWEEP_LABEL}={name}")
    }
    assert sorted(finetunejobs) == sorted(trials)
    scores = {}
    for trial_name, trial in trials.items():
        spec = finetunejobs[trial_name]["spec"]
        assert spec["hyperparameters"]["learningRate"] == trial["parameters"]["hyperparameters.learningRate"]
        assert 1e-4 <= spec["hyperparameters"]["learningRate"] <= 3e-2
        assert spec["output"]["pvc"]["path"] == f"tiny-keywords-sweep/{trial_name}"
        run = finetunejobs[trial_name]["status"]
        if trial["phase"] == "Succeeded":
            scores[trial_name] = run["evalResults"]["fineTuned"]["exactMatch"]
            assert trial["objective"] == scores[trial_name]
            adapter = tiny_volumes["deeptune-output"] / spec["output"]["pvc"]["path"] / "adapter"
            assert (adapter / "adapter_model.safetensors").is_file()
    assert len(set(scores.values())) > 1, f"the learning rates made no difference: {scores}"
    best = max(sorted(scores), key=lambda trial_name: scores[trial_name])
    assert status["bestTrial"]["name"] == best
    assert status["bestTrial"]["objective"] == scores[best]
    assert status["bestTrial"]["output"]["path"] == f"tiny-keywords-sweep/{best}"

    row = crds.kubectl("get", "fts", name, "-n", namespace, "--no-headers").stdout.split()
    assert row[:4] == [name, "Succeeded", str(status["succeeded"]), "4"]
    assert row[4] == best
    reasons = [e["reason"] for e in crds.list("events", namespace) if e["involvedObject"]["name"] == name]
    assert reasons.count("TrialCreated") == 4 and "BestTrialFound" in reasons
    shown = subprocess.run(
        [sys.executable, "-m", "deeptune.kubectl_plugin", "trials", name, "-n", namespace,
         "--kubeconfig", str(crds.kubeconfig)],
        capture_output=True, text=True, check=True, env={**os.environ, "COLUMNS": "200"},
    ).stdout  # fmt: skip
    rows = {trial: line for line in shown.splitlines() for trial in trials if f" {trial} " in line}
    assert " best " in rows[best] and "exit code 137" in rows[first], shown

    # Deleting the sweep deletes its trials (garbage collection, foreground so the test can wait).
    crds.kubectl("delete", "fts", name, "-n", namespace, "--cascade=foreground", "--timeout=120s")
    wait_for(
        "the trials to be deleted",
        lambda: not crds.list("finetunejob", namespace, f"{SWEEP_LABEL}={name}"),
        timeout=120,
    )


def test_a_trial_whose_validation_loss_trails_is_pruned(
    operator: Process,
    crds: Cluster,
    namespace: str,
    tiny_volumes: dict[str, Path],
    trainer_pods: Callable[[dict[str, Any]], dict[str, Any]],
) -> None:
    """Three trials, one at a time, with learning rates 3e-3, 1e-2 and 1e-5 (the seed's draw): the
    third's validation loss trails the first two's from its first evaluation, so it is suspended
    long before its last step, its checkpoints kept, and the sweep still succeeds."""
    manifest = sweep_manifest(namespace)
    name = manifest["metadata"]["name"] = "tiny-keywords-pruned"
    spec = manifest["spec"]
    rates = [3e-3, 1e-2, 1e-5]  # what random sampling with seed 9 draws from the values below
    spec.update(trials=3, parallelism=1, pruner={"startupTrials": 2}, sampler={"type": "random", "seed": 9})
    values = [1e-2, 3e-3, 1e-5]
    spec["parameters"] = [{"path": "hyperparameters.learningRate", "type": "categorical", "values": values}]
    steps = 600  # some seconds of training: the pruner sees a few evaluations before the end
    spec["template"]["hyperparameters"].update(maxSteps=steps, checkpointSteps=50)
    spec["template"]["evaluation"].update(evalSteps=50, baseline=False)
    trainer_pods({"spec": spec["template"]})
    crds.apply(manifest)

    def finished() -> dict[str, Any] | None:
        status = (crds.get("finetunesweep", name, namespace) or {}).get("status") or {}
        return status if status.get("phase") in ("Succeeded", "Failed") else None

    status = wait_for(f"{name} to finish", finished, timeout=900)
    trials = status["trials"]
    assert [t["parameters"]["hyperparameters.learningRate"] for t in trials] == rates
    assert [t["phase"] for t in trials] == ["Succeeded", "Succeeded", "Pruned"], trials
    assert status["phase"] == "Succeeded" and status["pruned"] == 1
    pruned = trials[2]
    assert "trails the median of finished trials" in pruned["message"]
    medians = sorted(t["evaluations"][0]["evalLoss"] for t in trials[:2])
    assert pruned["evaluations"][-1]["evalLoss"] > sum(medians) / 2

    finetunejob = crds.get("finetunejob", pruned["name"], namespace) or {}
    assert finetunejob["spec"]["suspend"] is True
    assert finetunejob["status"]["phase"] == "Suspended"
    assert finetunejob["status"]["progress"]["step"] < steps
    checkpoints = tiny_volumes["deeptune-output"] / "tiny-keywords-sweep" / pruned["name"] / "checkpoints"
    assert any(checkpoints.glob("checkpoint-*")), "a pruned trial keeps what it trained"
