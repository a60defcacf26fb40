"""ModelDeployment through the real control plane: the operator, the Deployment and ReplicaSet
controllers, the scheduler, the garbage collector, and, on the local cluster, the real node running
the serving image built from serving-image/Dockerfile (Triton on the stand-in of NVIDIA's image) for
the pod the Deployment asks for, and the trainer image for the FineTuneJob it serves."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import harness
from tests.cluster.harness import Cluster, Process, events_for, modeldeployment, wait_for
from tests.cluster.real_node import Placement
from tests.conftest import load_example
from tests.unit.test_argocd_health import health

pytestmark = [pytest.mark.cluster, pytest.mark.serving]
CLAIM = "models"
LOAD_TIMEOUT = 300
"""Seconds for a pod to start Triton and load the tiny model: the backend stub imports torch and
transformers, slowly on two busy cores."""


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight Llama-architecture model: Triton loads it in seconds, and it answers with text."""
    pytest.importorskip("pytriton", reason="the serving extra (nvidia-pytriton) is not installed")
    from deeptune_trainer.synthetic import tokenizer_texts
    from deeptune_trainer.tinymodels import build_tiny_model

    return build_tiny_model("llama", tmp_path_factory.mktemp("served") / "tiny-llama", tokenizer_texts())


@pytest.fixture
def claim(crds: Cluster, namespace: str, tiny_model: Path, placement: Placement) -> Path:
    """A bound PVC named CLAIM holding the tiny model at `tiny-llama/`, readable to the serving
    image's user."""
    directory = harness.provision_claims(crds, namespace, [CLAIM])[CLAIM]
    target = directory / "tiny-llama"
    target.mkdir()
    for file in tiny_model.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    placement.readable(directory)
    return directory


def merged_spec(path: str) -> dict[str, Any]:
    return {
        "model": {"merged": {"pvc": {"claimName": CLAIM, "path": path}}},
        "resources": {"gpu": 0, "cpu": "1", "sharedMemory": "256Mi"},
        "generation": {"maxNewTokens": 4},
    }


def status_of(cluster: Cluster, name: str, namespace: str) -> dict[str, Any]:
    return (cluster.get("modeldeployment", name, namespace) or {}).get("status") or {}


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions", []) if c["type"] == kind), {})


def complete(pod_ip: str, model: str, prompt: str) -> str:
    """One request as a client sends it (the OpenAI API's completions), to the pod's address: the
    test runs on the host, where no ClusterIP routes (kube-proxy serves the node's pods)."""
    import openai

    client = openai.OpenAI(base_url=f"http://{pod_ip}:9000/v1", api_key="unused", max_retries=0)
    return client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0).choices[0].text


def test_a_merged_model_is_served_end_to_end(
    operator: Process, crds: Cluster, namespace: str, claim: Path, placement: Placement
) -> None:
    crds.apply(modeldeployment("tiny", namespace, placement.modeldeployment(merged_spec("tiny-llama"))))
    deployment = wait_for("the Deployment", lambda: crds.get("deployment", "tiny-triton", namespace), 60)
    assert deployment["metadata"]["ownerReferences"][0]["kind"] == "ModelDeployment"
    service = crds.get("service", "tiny-triton", namespace)
    assert service is not None and service["spec"]["type"] == "ClusterIP"
    repository = crds.get("configmap", "tiny-repository", namespace)
    assert repository is not None and "tiny__config.pbtxt" in repository["data"]
    wait_for("a ReplicaSet", lambda: crds.list("replicasets", namespace), 60)

    states: list[str] = []

    def ready() -> dict[str, Any] | None:
        status = status_of(crds, "tiny", namespace)
        if status.get("modelState") and status["modelState"] not in states[-1:]:
            states.append(status["modelState"])
        return status if condition(status, "Ready").get("status") == "True" else None

    status = wait_for("Ready=True", ready, LOAD_TIMEOUT, interval=0.5)
    assert states[-2:] == ["Loading", "Loaded"], states
    assert condition(status, "ModelLoaded")["status"] == "True"
    assert (status["replicas"], status["readyReplicas"]) == (1, 1)
    assert status["endpoints"] == {
        "http": f"http://tiny-triton.{namespace}.svc:8000",
        "grpc": f"tiny-triton.{namespace}.svc:8001",
        "metrics": f"http://tiny-triton.{namespace}.svc:8002/metrics",
        "openai": f"http://tiny-triton.{namespace}.svc:9000/v1",
        "modelName": "tiny",
        "models": ["tiny"],
    }
    assert status["backend"] == "python", "auto serves on the Python backend without a GPU"
    row = crds.kubectl("get", "mdep", "tiny", "-n", namespace, "--no-headers").stdout.split()
    assert row[1:5] == ["True", "Loaded", "1", f"http://tiny-triton.{namespace}.svc:9000/v1"]
    probe = status["lastProbe"]
    assert probe["serverReady"] and probe["modelReady"] and probe["inferenceOk"], probe
    assert probe["latencyMs"] > 0
    print(f"\nprobe: {probe}")

    (pod,) = crds.list("pods", namespace, "app.kubernetes.io/component=serving")
    answer = complete(pod["status"]["podIP"], "tiny", "User: topic: weather\n\nAssistant:")
    print(f"served text: {answer!r}")
    assert isinstance(answer, str) and answer
    wait_for(
        "Events on the way",
        lambda: (
            {"DeploymentCreated", "Loaded", "Ready"}
            <= {e["reason"] for e in events_for(crds, "ModelDeployment", "tiny", namespace)}
        ),
        30,
    )

    follows_spec_changes(crds, namespace, pod["metadata"]["name"])

    delete_and_wait(crds, namespace, "tiny")


def delete_and_wait(cluster: Cluster, namespace: str, name: str) -> None:
    """Delete a ModelDeployment and wait for the garbage collector to remove its children (and for the
    node to stop its server: no Triton outlives its test)."""
    cluster.kubectl("delete", "mdep", name, "-n", namespace)
    children = [
        ("deployment", f"{name}-triton"),
        ("service", f"{name}-triton"),
        ("configmap", f"{name}-repository"),
    ]
    wait_for(
        "the children to be garbage-collected",
        lambda: (
            not any(cluster.get(kind, child, namespace) for kind, child in children)
            and not cluster.list("pods", namespace, "app.kubernetes.io/component=serving")
        ),
        120,
    )


def patch_spec(cluster: Cluster, namespace: str, spec: str) -> None:
    cluster.kubectl("patch", "mdep", "tiny", "-n", namespace, "--type=merge", "-p", f'{{"spec": {spec}}}')


def follows_spec_changes(cluster: Cluster, namespace: str, old_pod: str) -> None:
    """Autoscaling and the NetworkPolicy on and off create and remove them; new generation defaults
    roll the pod."""
    patch_spec(cluster, namespace, '{"autoscaling": {"enabled": true, "maxReplicas": 2}}')
    hpa = wait_for("the HPA", lambda: cluster.get("hpa", "tiny-triton", namespace), 60)
    assert hpa["spec"]["maxReplicas"] == 2
    patch_spec(cluster, namespace, '{"autoscaling": {"enabled": false}}')
    wait_for("the HPA to be removed", lambda: cluster.get("hpa", "tiny-triton", namespace) is None, 60)

    patch_spec(cluster, namespace, '{"networkPolicy": {"enabled": true}}')
    policy = wait_for("the NetworkPolicy", lambda: cluster.get("networkpolicy", "tiny-triton", namespace), 60)
    assert policy["spec"]["podSelector"]["matchLabels"]["deeptune.dev/modeldeployment-uid"]
    patch_spec(cluster, namespace, '{"networkPolicy": {"enabled": false}}')
    wait_for(
        "the NetworkPolicy to be removed",
        lambda: cluster.get("networkpolicy", "tiny-triton", namespace) is None,
        60,
    )

    patch_spec(cluster, namespace, '{"generation": {"maxNewTokens": 2}}')
    wait_for(
        "the repository to follow the spec",
        lambda: (
            'key: "max_new_tokens" value: { string_value: "2" }'
            in (cluster.get("configmap", "tiny-repository", namespace) or {})
            .get("data", {})
            .get("tiny__config.pbtxt", "")
        ),
        60,
    )

    def rolled() -> dict[str, Any] | None:
        pods = cluster.list("pods", namespace, "app.kubernetes.io/component=serving")
        status = status_of(cluster, "tiny", namespace)
        fresh = [p["metadata"]["name"] for p in pods] not in ([], [old_pod]) and len(pods) == 1
        return status if fresh and condition(status, "Ready").get("status") == "True" else None

    status = wait_for("a new pod, loaded and ready", rolled, LOAD_TIMEOUT)
    assert status["observedGeneration"] == 6


def test_a_missing_finetunejob_is_reported_without_children(
    operator: Process, crds: Cluster, namespace: str
) -> None:
    spec = {"model": {"fineTuneJobRef": {"name": "not-trained-yet"}}, "resources": {"gpu": 0}}
    crds.apply(modeldeployment("waiting", namespace, spec))
    status = wait_for(
        "FineTuneJobNotFound",
        lambda: (
            condition(s := status_of(crds, "waiting", namespace), "Ready").get("reason")
            == "FineTuneJobNotFound"
            and s
        ),
        60,
    )
    assert status["modelState"] == "Pending"
    assert condition(status, "Ready")["status"] == "False"
    assert "not-trained-yet" in condition(status, "Ready")["message"]
    assert crds.list("deployments", namespace) == []
    assert crds.list("configmaps", namespace, "app.kubernetes.io/component=serving") == []


def test_a_bad_model_path_fails_to_load_with_the_servers_message(
    operator: Process, crds: Cluster, namespace: str, claim: Path, placement: Placement
) -> None:
    crds.apply(modeldeployment("broken", namespace, placement.modeldeployment(merged_spec("no-such-model"))))
    status = wait_for(
        "FailedToLoad",
        lambda: (s := status_of(crds, "broken", namespace)).get("modelState") == "FailedToLoad" and s,
        LOAD_TIMEOUT,
    )
    failure = status["lastFailure"]
    print(f"\nlast failure: {failure}")
    assert failure["reason"] == "ModelLoadFailed" and failure["exitCode"] == 1
    # Triton's log tail (the termination message) names the failure; the model's own error names
    # the missing directory when the model writes it to the termination message.
    assert "failed to load" in failure["message"] or "/mnt/pvc/models/no-such-model" in failure["message"]
    ready = condition(status, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ModelLoadFailed")
    wait_for(
        "a FailedToLoad Warning",
        lambda: any(
            (e["type"], e["reason"]) == ("Warning", "FailedToLoad")
            for e in events_for(crds, "ModelDeployment", "broken", namespace)
        ),
        30,
    )
    delete_and_wait(crds, namespace, "broken")


@pytest.mark.trainer
def test_a_finetunejob_is_served_once_it_succeeds(
    operator: Process, crds: Cluster, namespace: str, placement: Placement
) -> None:
    """The whole product: the ModelDeployment waits for its FineTuneJob, then serves the adapter the
    job saved on the base model it trained (examples/finetune-tiny.yaml, shortened), and a user's
    `openai` client, asking held-out questions as a person writes them, gets answers that score no
    lower than the trainer's own evaluation of the same rows (train/serve parity)."""
    pytest.importorskip("pytriton", reason="the serving extra (nvidia-pytriton) is not installed")
    import openai

    from deeptune_trainer.synthetic import keyword_rows

    claims = harness.provision_claims(crds, namespace, harness.TINY_CLAIMS)
    harness.seed_tiny_volumes(claims)
    trained = {json.loads(line)["prompt"] for line in (claims["deeptune-data"] / "keywords.jsonl").open()}
    held_out = keyword_rows(16, seed=2, exclude=trained)
    lines = [json.dumps(row, ensure_ascii=False) for row in held_out]
    (claims["deeptune-data"] / "held-out.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    placement.claims(claims)
    job = placement.finetunejob(load_example("finetune-tiny.yaml"))
    name = job["metadata"]["name"]
    served = {"model": {"fineTuneJobRef": {"name": name}}, "resources": {"gpu": 0}}
    crds.apply(modeldeployment("keywords", namespace, placement.modeldeployment(served)))
    wait_for(
        "FineTuneJobNotFound",
        lambda: (
            condition(status_of(crds, "keywords", namespace), "Ready").get("reason") == "FineTuneJobNotFound"
        ),
        60,
    )

    job["metadata"]["namespace"] = namespace
    job["spec"]["hyperparameters"].update(maxSteps=40)
    job["spec"]["dataset"]["validation"] = {
        "source": {"pvc": {"claimName": "deeptune-data", "path": "held-out.jsonl"}}
    }
    job["spec"]["evaluation"] = {
        "metrics": ["exactMatch"],
        "baseline": False,
        "maxSamples": len(held_out),
        "generation": {"maxNewTokens": 8},
    }
    crds.apply(job)
    waiting = wait_for(
        "WaitingForFineTuneJob",
        lambda: (
            condition(s := status_of(crds, "keywords", namespace), "Ready").get("reason")
            == "WaitingForFineTuneJob"
            and s
        ),
        60,
    )
    assert name in condition(waiting, "Ready")["message"]
    assert crds.list("deployments", namespace) == []

    status = wait_for(
        "Ready=True after the fine-tune",
        lambda: condition(s := status_of(crds, "keywords", namespace), "Ready").get("status") == "True" and s,
        LOAD_TIMEOUT + 300,
    )
    resolved = status["resolvedModel"]
    assert resolved["fineTuneJob"] == name
    assert resolved["adapter"] == {"claimName": "deeptune-output", "path": f"{name}/adapter"}
    assert resolved["baseModel"]["pvc"] == {"claimName": "deeptune-models", "path": "tiny-llama"}
    assert status["endpoints"]["openai"] == f"http://keywords-triton.{namespace}.svc:9000/v1"
    finetunejob = crds.get("finetunejob", name, namespace)
    trainer_score = finetunejob["status"]["evalResults"]["fineTuned"]["exactMatch"]
    # Lineage through the API server: which run's files, by digest, the deployment serves.
    lineage = finetunejob["status"]["lineage"]
    assert lineage["config"].startswith("sha256:") and lineage["datasets"]["dataset.source"].startswith(
        "sha256:"
    )
    assert resolved["digest"] == lineage["artifacts"]["adapter"]
    (trainer_job,) = [j for j in crds.list("jobs", namespace) if j["metadata"]["name"].startswith(name)]
    (trainer_pod,) = crds.list("pods", namespace, f"job-name={trainer_job['metadata']['name']}")
    (trainer,) = trainer_pod["status"]["containerStatuses"]
    assert lineage["trainerImage"] == trainer["imageID"]  # the image as the node's runtime resolved it
    if placement.real_node:
        assert "sha256:" in trainer["imageID"]  # containerd's digest of the trainer image
    assert resolved["fineTuneJobUid"] == finetunejob["metadata"]["uid"]

    (pod,) = crds.list("pods", namespace, "app.kubernetes.io/component=serving")
    # The pod's address: the test runs on the host, where the Service's ClusterIP does not route.
    client = openai.OpenAI(
        base_url=f"http://{pod['status']['podIP']}:9000/v1", api_key="unused", max_retries=0
    )
    assert [model.id for model in client.models.list()] == ["keywords"]
    answers = []
    for row in held_out:
        reply = client.chat.completions.create(
            model="keywords",
            messages=[{"role": "user", "content": row["prompt"]}],
            max_tokens=8,
            temperature=0,
        )
        answers.append((reply.choices[0].message.content or "").strip())
    served_score = sum(a == row["completion"] for a, row in zip(answers, held_out, strict=True)) / len(
        held_out
    )
    print(f"\nexact match: trainer {trainer_score}, served over the OpenAI API {served_score}; {answers[:4]}")
    assert served_score >= trainer_score > 0
    streamed = client.chat.completions.create(
        model="keywords",
        messages=[{"role": "user", "content": held_out[0]["prompt"]}],
        max_tokens=8,
        temperature=0,
        stream=True,
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed).strip() == answers[0]
    # `kubectl deeptune chat`, a line typed, the reply streamed back (to the pod's address, as above).
    plugin = [sys.executable, "-m", "deeptune.kubectl_plugin", "--kubeconfig", str(crds.kubeconfig)]
    chat = [*plugin, "chat", "keywords", "-n", namespace, "--url", f"http://{pod['status']['podIP']}:9000/v1"]
    typed = subprocess.run(
        [*chat, "--temperature", "0", "--max-tokens", "8"],
        input=f"{held_out[0]['prompt']}\n",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert typed.returncode == 0, typed.stderr
    assert typed.stdout.splitlines()[1].strip() == answers[0], typed.stdout

    # The promotion gate: the run that learned passes; a run made not to learn (one step at a
    # negligible learning rate) is refused, and the run that learned keeps answering.
    gated = placement.modeldeployment(
        {
            "model": {"fineTuneJobRef": {"name": name}},
            "resources": {"gpu": 0},
            "promotion": {"rules": [{"metric": "exactMatch", "threshold": trainer_score / 2}]},
        }
    )
    crds.apply(modeldeployment("keywords", namespace, gated))
    passed = wait_for(
        "Promoted=True",
        lambda: condition(status_of(crds, "keywords", namespace), "Promoted").get("status") == "True",
        60,
    )
    assert passed
    untrained = copy.deepcopy(job)
    untrained["metadata"]["name"] = f"{name}-untrained"
    untrained["spec"]["hyperparameters"].update(maxSteps=1, learningRate=1e-9)
    untrained["spec"]["output"]["pvc"]["path"] = f"{name}-untrained"  # its own run: its own checkpoints
    crds.apply(untrained)
    gated["model"]["fineTuneJobRef"]["name"] = f"{name}-untrained"
    crds.apply(modeldeployment("keywords", namespace, gated))
    refused = wait_for(
        "Promoted=False for the untrained run",
        lambda: (
            condition(s := status_of(crds, "keywords", namespace), "Promoted").get("status") == "False" and s
        ),
        LOAD_TIMEOUT,
    )
    gate = condition(refused, "Promoted")
    print(crds.kubectl("get", "mdep", "keywords", "-n", namespace).stdout)
    print(json.dumps(refused["promotion"], indent=2))
    print(crds.kubectl("get", "ftj", "-n", namespace).stdout)
    print(json.dumps((crds.get("finetunejob", name, namespace) or {})["status"]["usage"], indent=2))
    assert gate["reason"] == "PromotionGateFailed"
    assert (
        f"FineTuneJob {name}-untrained did not pass the promotion gate: exactMatch 0 missed"
        in gate["message"]
    )
    assert gate["message"].endswith(f"FineTuneJob {name}'s model keeps serving")
    assert refused["promotion"]["servedScores"]["exactMatch"] == trainer_score
    assert refused["resolvedModel"]["fineTuneJobUid"] == finetunejob["metadata"]["uid"]
    assert condition(refused, "Ready")["status"] == "True"
    assert health("ModelDeployment", crds.get("modeldeployment", "keywords", namespace) or {}) == (
        "Degraded",
        f"PromotionGateFailed: {gate['message']}",
    )
    reasons = [event["reason"] for event in events_for(crds, "ModelDeployment", "keywords", namespace)]
    assert "PromotionGateFailed" in reasons and "PromotionGatePassed" in reasons
    (still,) = crds.list("pods", namespace, "app.kubernetes.io/component=serving")
    assert still["metadata"]["uid"] == pod["metadata"]["uid"]
    again = client.chat.completions.create(
        model="keywords",
        messages=[{"role": "user", "content": held_out[0]["prompt"]}],
        max_tokens=8,
        temperature=0,
    )
    assert (again.choices[0].message.content or "").strip() == answers[0]
    delete_and_wait(crds, namespace, "keywords")
