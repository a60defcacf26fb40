"""The DeepTune demo: a real FineTuneJob and its ModelDeployment on a real (local) Kubernetes control
plane, on CPU.

Brings up the local control plane, installs the CRDs, starts the operator and the test node agent,
builds a tiny random-weight model and a learnable dataset on "PVCs", applies
examples/finetune-tiny.yaml and follows it to the end, prints the status and the results, then
serves the result (examples/deployment-tiny.yaml, Triton from the nvidia-pytriton wheel) and chats
with it through the OpenAI API with the `openai` client, asking questions it was not trained on.

The control plane is the demo's own (a private state directory, free ports), stopped at the end with
everything the demo started; `--keep` (or DEEPTUNE_KEEP_CLUSTER=1) leaves it all running and prints
the one command that stops it. DEEPTUNE_CLUSTER_DIR=DIR runs the demo on the cluster in DIR instead
(reused if up, and then left running).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import openai  # noqa: E402

from deeptune_trainer.synthetic import keyword_rows  # noqa: E402
from tests.cluster import harness  # noqa: E402

NAMESPACE = "deeptune-demo"
NAME = "tiny-keywords"
"""The FineTuneJob's name, and the ModelDeployment's that serves it."""
SERVE_TIMEOUT = 300.0
"""Seconds for the serving pod to start Triton and load the model (torch imports are slow on 2 cores)."""


def say(message: str) -> None:
    print(f"\n==> {message}", flush=True)


COLUMNS = (
    "custom-columns=NAME:.metadata.name,PHASE:.status.phase,STEP:.status.progress.step,"
    "PROGRESS%:.status.progress.percent,LOSS:.status.progress.trainLoss,EVAL-LOSS:.status.progress.evalLoss,"
    "ETA:.status.progress.eta"
)


def follow(cluster: harness.Cluster, timeout: float) -> dict[str, Any]:
    """Print the run's phase and progress whenever they change, until the run ends."""
    deadline = time.monotonic() + timeout
    last = ""
    print("    " + cluster.kubectl("get", "ftj", NAME, "-n", NAMESPACE, "-o", COLUMNS).stdout.splitlines()[0])
    while time.monotonic() < deadline:
        result = cluster.kubectl(
            "get", "ftj", NAME, "-n", NAMESPACE, "-o", COLUMNS, "--no-headers", check=False
        )
        line = result.stdout.strip()
        if line and line != last:
            print(f"    {line}", flush=True)
            last = line
        body = cluster.get("finetunejob", NAME, NAMESPACE) or {}
        if (body.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            return body
        time.sleep(1)
    raise SystemExit(f"the FineTuneJob did not finish within {timeout:.0f}s")


def report(status: dict[str, Any], output_dir: Path) -> None:
    results = status.get("evalResults") or {}
    tuned, base = results.get("fineTuned", {}), results.get("baseline") or {}
    print(f"    {'metric':<14}{'base model':>12}{'fine-tuned':>12}")
    for metric in sorted(tuned):
        before = f"{base[metric]:.4f}" if metric in base else "-"
        print(f"    {metric:<14}{before:>12}{tuned[metric]:>12.4f}")
    print("    dataset:", json.dumps(status.get("dataset") or {}))
    print("    output: ", json.dumps(status.get("output") or {}))
    if output_dir.exists():
        print("    files:  ", ", ".join(sorted(p.name for p in output_dir.iterdir())))


def serve_and_chat(cluster: harness.Cluster, trained: set[str]) -> bool:
    """Apply the ModelDeployment, wait until it is Ready, and ask it questions it was not trained on."""
    cluster.kubectl("delete", "mdep", NAME, "-n", NAMESPACE, "--ignore-not-found", "--wait=true")
    say("kubectl apply -f examples/deployment-tiny.yaml")
    applied = cluster.kubectl("apply", "-n", NAMESPACE, "-f", str(ROOT / "examples/deployment-tiny.yaml"))
    print("    " + applied.stdout.strip())
    say("Waiting until it is Ready (kubectl get mdep)")
    deadline = time.monotonic() + SERVE_TIMEOUT
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = (cluster.get("modeldeployment", NAME, NAMESPACE) or {}).get("status") or {}
        ready = next((c for c in status.get("conditions", []) if c["type"] == "Ready"), {})
        if ready.get("status") == "True":
            break
        time.sleep(1)
    print(cluster.kubectl("get", "mdep", NAME, "-n", NAMESPACE).stdout)
    if not status.get("endpoints") or not status.get("readyReplicas"):
        print(json.dumps(status, indent=2))
        return False
    print(f"    status.endpoints.openai: {status['endpoints']['openai']}")
    (pod,) = cluster.list("pods", NAMESPACE, "app.kubernetes.io/component=serving")
    # This local cluster has no kube-proxy: the client talks to the pod's address directly.
    base_url = f"http://{pod['status']['podIP']}:9000/v1"
    say(f"Chatting with it through the OpenAI API: openai.OpenAI(base_url={base_url!r})")
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    right = 0
    questions = keyword_rows(5, seed=7, exclude=trained)
    for row in questions:
        reply = client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": row["prompt"]}], temperature=0
        )
        answer = (reply.choices[0].message.content or "").strip()
        right += answer == row["completion"]
        print(f"    user: {row['prompt']!r:<34} assistant: {answer!r}  (expected {row['completion']!r})")
    print(f"    {right} of {len(questions)} held-out questions answered as trained")
    return right > 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--keep",
        action="store_true",
        help="leave the cluster, operator and agent running (and print the command that stops them)",
    )
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    keep = args.keep or harness.keep_cluster()

    state = harness.local_state_dir()
    say("Local control plane (kube-apiserver, controller-manager, scheduler, etcd; built once, cached)")
    cluster = harness.start_local_cluster(state)
    print(f"    export KUBECONFIG={cluster.kubeconfig}")
    print(f"    state and logs: {state}" + ("" if cluster.started else " (already up: reused)"))
    processes: list[harness.Process] = []
    try:
        say("Installing the CRDs")
        harness.install_crds(cluster)
        say("Starting the test node agent (stands in for the kubelet) and the operator")
        processes.append(harness.start_node_agent(cluster))
        processes.append(harness.start_operator(cluster))
        cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
        say("Provisioning volumes with a tiny random-weight Llama model and a learnable dataset")
        dirs = harness.provision_claims(cluster, NAMESPACE, harness.TINY_CLAIMS)
        harness.seed_tiny_volumes(dirs)
        print(f"    model and dataset (240 rows) on the claims under {dirs['deeptune-models'].parent}")
        cluster.kubectl("delete", "ftj", NAME, "-n", NAMESPACE, "--ignore-not-found", "--wait=true")
        say("kubectl apply -f examples/finetune-tiny.yaml")
        applied = cluster.kubectl("apply", "-n", NAMESPACE, "-f", str(ROOT / "examples/finetune-tiny.yaml"))
        print("    " + applied.stdout.strip())
        say("Following the FineTuneJob (kubectl get ftj)")
        body = follow(cluster, args.timeout)
        status = body["status"]
        say(f"Finished: {status['phase']}  (kubectl get ftj -n {NAMESPACE})")
        print(cluster.kubectl("get", "ftj", "-n", NAMESPACE).stdout)
        report(status, dirs["deeptune-output"] / "tiny-keywords")
        if status["phase"] != "Succeeded":
            print(json.dumps(status, indent=2))
            return 1
        trained = {json.loads(line)["prompt"] for line in (dirs["deeptune-data"] / "keywords.jsonl").open()}
        return 0 if serve_and_chat(cluster, trained) else 1
    finally:
        if keep:
            print(f"\nLeft running: the operator and the node agent (their logs: {state}/*.log).")
        else:
            for process in reversed(processes):
                process.stop()
        print(harness.finish_local_cluster(cluster, keep=keep), flush=True)


if __name__ == "__main__":
    sys.exit(main())
