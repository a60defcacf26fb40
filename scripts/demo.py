"""The DeepTune demo: a real FineTuneJob and its ModelDeployment on a real (local) Kubernetes control
plane, on CPU.

Brings up the local control plane and a real node (containerd, kubelet, kube-proxy:
tests/localcluster/node.sh), installs the CRDs, starts the operator, builds a tiny random-weight
model and a learnable dataset on "PVCs", applies examples/finetune-tiny.yaml (its pods on that node,
in the trainer image built from trainer-image/Dockerfile) and follows it to the end, prints the
status and the results, then serves the result (examples/deployment-tiny.yaml, in the serving image:
Triton from the nvidia-pytriton wheel) and chats with it through the OpenAI API with the `openai`
client, through the Service's ClusterIP, asking questions it was not trained on.

The control plane is the demo's own (a private state directory, free ports), stopped at the end with
everything the demo started; `--keep` (or DEEPTUNE_KEEP_CLUSTER=1) leaves it all running and prints
the one command that stops it. DEEPTUNE_CLUSTER_DIR=DIR runs the demo on the cluster in DIR instead
(reused if up, and then left running).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import openai  # noqa: E402

from deeptune_trainer.synthetic import keyword_rows  # noqa: E402
from tests.cluster import harness  # noqa: E402
from tests.cluster.real_node import PODS_ON_THE_REAL_NODE, node_sh  # noqa: E402

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


def apply_example(cluster: harness.Cluster, name: str) -> None:
    """`kubectl apply -f examples/NAME`, its pods sent to the real node in the images built here."""
    manifest = yaml.safe_load((ROOT / "examples" / name).read_text())
    if manifest["kind"] == "FineTuneJob":
        PODS_ON_THE_REAL_NODE.finetunejob(manifest)
        image = manifest["spec"]["image"]
    else:
        PODS_ON_THE_REAL_NODE.modeldeployment(manifest["spec"])
        image = manifest["spec"]["runtime"]["image"]
    say(f"kubectl apply -f examples/{name}  (image {image}, on the real node)")
    applied = cluster.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(manifest))
    print("    " + applied.stdout.strip())


@contextlib.contextmanager
def port_forward(cluster: harness.Cluster, target: str, port: int) -> Iterator[int]:
    """`kubectl port-forward TARGET :PORT` while the block runs; yields the local port it chose."""
    command = ["kubectl", "--kubeconfig", str(cluster.kubeconfig), "port-forward", "-n", NAMESPACE,
               target, f":{port}"]  # fmt: skip
    say(" ".join(["kubectl port-forward", "-n", NAMESPACE, target, f":{port}"]))
    forward = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert forward.stdout is not None
        line = forward.stdout.readline()  # "Forwarding from 127.0.0.1:PORT -> 9000"
        print(f"    {line.strip()}")
        if not line.startswith("Forwarding from 127.0.0.1:"):
            raise SystemExit(f"kubectl port-forward did not start: {line}{forward.stdout.read()}")
        yield int(line.split(":", 1)[1].split()[0])
    finally:
        forward.terminate()
        forward.wait()


def serve_and_chat(cluster: harness.Cluster, trained: set[str]) -> bool:
    """Apply the ModelDeployment, wait until it is Ready, and ask it questions it was not trained on."""
    cluster.kubectl("delete", "mdep", NAME, "-n", NAMESPACE, "--ignore-not-found", "--wait=true")
    apply_example(cluster, "deployment-tiny.yaml")
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
    openai_url = status["endpoints"]["openai"]
    print(f"    status.endpoints.openai: {openai_url}")
    # That name resolves inside the cluster; from this machine, as from a laptop next to a kind
    # cluster, the way in is kubectl port-forward to the Service.
    host, port = openai_url.split("//", 1)[1].split("/", 1)[0].split(":")
    with port_forward(cluster, f"service/{host.split('.', 1)[0]}", int(port)) as local_port:
        base_url = f"http://127.0.0.1:{local_port}/v1"
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
        help="leave the cluster, its node and the operator running (and print the command that stops them)",
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
        say("Starting a real node (containerd, kubelet, kube-proxy; the images built once, cached)")
        if node_sh(cluster, show=True).returncode != 0:
            return 1
        say("Starting the operator")
        processes.append(harness.start_operator(cluster))
        cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
        say("Provisioning volumes with a tiny random-weight Llama model and a learnable dataset")
        dirs = harness.provision_claims(cluster, NAMESPACE, harness.TINY_CLAIMS)
        harness.seed_tiny_volumes(dirs)
        PODS_ON_THE_REAL_NODE.claims(dirs)
        print(f"    model and dataset (240 rows) on the claims under {dirs['deeptune-models'].parent}")
        cluster.kubectl("delete", "ftj", NAME, "-n", NAMESPACE, "--ignore-not-found", "--wait=true")
        apply_example(cluster, "finetune-tiny.yaml")
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
            print(f"\nLeft running: the real node and the operator (logs: {state}/*.log, {state}/node).")
        else:
            for process in reversed(processes):
                process.stop()
        print(harness.finish_local_cluster(cluster, keep=keep), flush=True)


if __name__ == "__main__":
    sys.exit(main())
