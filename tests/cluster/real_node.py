"""The real node (tests/localcluster/node.sh) for the cluster suite: what it runs, starting and
stopping it, what it must give back to the machine, and putting the operator's pods (a FineTuneJob's,
a ModelDeployment's) on it in the images built from the project's Dockerfiles.

The node is tainted: only pods that tolerate the taint and select it run there. The suite's other
pods (those of tests of the operator alone) stay Pending, as a cluster with no node for them leaves
them.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.cluster import harness
from tests.cluster.harness import Cluster

NODE = "deeptune-real-node"
DEBIAN_IMAGE = "deeptune.local/debian:bookworm"
PYTHON_IMAGE = "deeptune.local/python:3.11-slim-bookworm"
OPERATOR_IMAGE = "deeptune.local/operator:dev"
TRAINER_IMAGE = "deeptune.local/trainer:dev"
TRAINER_UID = 1000
"""The user trainer-image/Dockerfile runs as, and the operator's pod security context asks for."""
SERVING_IMAGE = "deeptune.local/serving:dev"
SERVING_UID = 1000
"""Triton's user (triton-server) in NVIDIA's image and the stand-in, which serving-image/Dockerfile
runs as."""
ON_THE_NODE = {"deeptune.dev/real-node": "true"}
"""The node's label, for the nodeSelector of what must run there."""
TOLERATE_THE_NODE = [{"key": "deeptune.dev/real-node", "operator": "Exists", "effect": "NoSchedule"}]
"""A toleration of the node's taint, which keeps every other pod off it."""
NODE_SH = harness.LOCALCLUSTER / "node.sh"
FIXED_DIRS = ("/var/lib/kubelet", "/var/log/containers", "/var/lib/cni", "/run/containerd")
SYSCTLS = (
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "net.ipv4.ip_forward",
    "net.ipv4.conf.all.forwarding",
    "net.netfilter.nf_conntrack_max",
    "net.netfilter.nf_conntrack_tcp_timeout_established",
    "net.netfilter.nf_conntrack_tcp_timeout_close_wait",
)
"""The kubelet's kernel settings, forwarding (which the node turns on for its bridge alone) and the
conntrack settings kube-proxy makes unless told not to."""
GPUS = 4
"""The `nvidia.com/gpu` the node advertises (node.sh's DEEPTUNE_NODE_GPUS): so that GPU requests
(Kueue's GPU quota) schedule; the pods get no device and run on CPU."""


def machine_state(state_dir: Path) -> dict[str, Any]:
    """What the node may change on this machine and must give back: links, routes, mounts and
    processes under the cluster's state dir, the kernel settings the kubelet sets, cgroups."""

    def run(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout

    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    cgroups = sorted(str(p) for p in Path("/sys/fs/cgroup").glob("*/deeptune-*"))
    processes = run("ps", "-e", "-o", "args=").splitlines()
    return {
        "nftables tables": sorted(run("nft", "list", "tables").splitlines()),
        "iptables rules": [line for line in run("iptables-save").splitlines() if not line.startswith("#")],
        "links": sorted(run("ip", "-o", "link").splitlines()),
        "routes": sorted(run("ip", "route").splitlines()),
        "policy rules": run("ip", "rule").splitlines(),
        "mounts under the state dir": [m for m in mounts if m.startswith(str(state_dir))],
        "processes under the state dir": [p for p in processes if str(state_dir / "node") in p],
        "sysctls": {key: run("sysctl", "-n", key).strip() for key in SYSCTLS},
        "cgroups": cgroups,
        "fixed directories": [d for d in FIXED_DIRS if Path(d).exists()],
    }


def node_sh(cluster: Cluster, *args: str, show: bool = False) -> subprocess.CompletedProcess[str]:
    """Run node.sh for `cluster`: its output captured, or with `show` shown as it goes and no time
    limit (a first start builds the images: about 25 minutes)."""
    env = {**os.environ, "DEEPTUNE_CLUSTER_DIR": str(cluster.state_dir), "DEEPTUNE_NODE_GPUS": str(GPUS)}
    command = ["bash", str(NODE_SH), *args]
    if show:
        return subprocess.run(command, env=env, text=True, check=False)
    return subprocess.run(command, env=env, capture_output=True, text=True, check=False, timeout=900)


@contextlib.contextmanager
def running(cluster: Cluster) -> Iterator[dict[str, Any]]:
    """The node, started (its packages, kubelet and images first) and stopped on leaving; yields the
    machine's state from before it started."""
    prepared = node_sh(cluster, "--prepare")  # packages, kubelet, images: before the snapshot
    assert prepared.returncode == 0, f"node.sh --prepare failed:\n{prepared.stderr[-4000:]}"
    before = machine_state(cluster.state_dir)
    started = node_sh(cluster)
    assert started.returncode == 0, f"node.sh failed:\n{started.stderr[-4000:]}"
    try:
        yield before
    finally:
        node_sh(cluster, "--stop")


@contextlib.contextmanager
def lost_node(cluster: Cluster) -> Iterator[None]:
    """The node lost at once while the block runs (node.sh --crash: every process of it SIGKILLed,
    nothing cleaned up), and back on its state after it, Ready again (node.sh --restart), whatever
    the block did: the rest of the run needs the node."""
    crashed = node_sh(cluster, "--crash")
    try:
        assert crashed.returncode == 0, f"node.sh --crash failed:\n{crashed.stderr[-4000:]}"
        yield
    finally:
        restarted = node_sh(cluster, "--restart")
        assert restarted.returncode == 0, f"node.sh --restart failed:\n{restarted.stderr[-4000:]}"


def _scheduled_on_the_node(spec: dict[str, Any]) -> None:
    """A spec's `resources` (a FineTuneJob's or a ModelDeployment's) sent to the real node, asking for
    half a CPU: the node has this machine's two, and a federation's coordinator and sites, or a
    rollout's new pod beside the old one, must run at once (a trainer still gets one thread,
    `cpu_threads`, and no CPU limit)."""
    spec.setdefault("resources", {}).update(
        cpu="500m", nodeSelector=ON_THE_NODE, tolerations=TOLERATE_THE_NODE
    )


def on_the_node(manifest: dict[str, Any], image: str = TRAINER_IMAGE) -> dict[str, Any]:
    """A FineTuneJob manifest (or one with a FineTuneJob spec, such as a sweep's or a federation's
    template) whose pods run `image` (the trainer image by default) on the real node."""
    spec = manifest["spec"]
    spec.update(image=image, imagePullPolicy="Never")
    _scheduled_on_the_node(spec)
    return manifest


def make_readable(directory: Path) -> None:
    """A hostPath volume is the directory as it is: the kubelet applies no fsGroup to it. So, as the
    trainer's ModelNotReadable message says, a model's files are made readable to the images' users
    (transformers saved the weights 0600)."""
    for path in directory.rglob("*"):
        path.chmod(path.stat().st_mode | 0o444)


def hand_to_the_trainer(volumes: dict[str, Path]) -> None:
    """The model made readable, and the output claim given to the trainer's user (a provisioner
    would)."""
    make_readable(volumes["deeptune-models"])
    output = volumes["deeptune-output"]
    for path in (output, *output.rglob("*")):
        os.chown(path, TRAINER_UID, TRAINER_UID)


def serving_on_the_node(spec: dict[str, Any]) -> dict[str, Any]:
    """A ModelDeployment spec whose pods run the serving image built from serving-image/Dockerfile
    on the real node."""
    spec.setdefault("runtime", {})["image"] = SERVING_IMAGE
    spec["imagePullPolicy"] = "Never"
    _scheduled_on_the_node(spec)
    return spec


@dataclass(frozen=True)
class Placement:
    """Where the operator's pods run, as changes to what makes them: on the local cluster, the real
    node, in the images built from the project's Dockerfiles, with claims handed to the images'
    user; on another cluster (kind), where that cluster puts them, everything as it is."""

    real_node: bool

    def finetunejob(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """A FineTuneJob manifest, or one with a FineTuneJob spec (a sweep's or federation's template)."""
        return on_the_node(manifest) if self.real_node else manifest

    def modeldeployment(self, spec: dict[str, Any]) -> dict[str, Any]:
        """A ModelDeployment's spec."""
        return serving_on_the_node(spec) if self.real_node else spec

    def claims(self, volumes: dict[str, Path]) -> None:
        """Claims a run reads and writes (`deeptune-models`, `deeptune-output`), handed to the
        trainer's user."""
        if self.real_node:
            hand_to_the_trainer(volumes)

    @property
    def trainer_image(self) -> str:
        """The trainer image, for pods of a test's own: the one built here, or the tag the suite
        loads into another cluster."""
        return TRAINER_IMAGE if self.real_node else harness.TRAINER_IMAGE

    def pod(self, pod_spec: dict[str, Any]) -> dict[str, Any]:
        """A pod spec of a test's own (its images local ones, as `trainer_image` gives), sent where
        the operator's pods go."""
        if self.real_node:
            pod_spec.update(nodeSelector=ON_THE_NODE, tolerations=TOLERATE_THE_NODE)
            for container in pod_spec["containers"]:
                container["imagePullPolicy"] = "Never"
        return pod_spec

    def readable(self, directory: Path) -> None:
        """A claim's directory whose files a pod only reads, made readable to the images' users."""
        if self.real_node:
            make_readable(directory)


PODS_ON_THE_REAL_NODE = Placement(real_node=True)
"""The local cluster's placement: the suite's, the demo's and the status fixtures' recorder's."""


def kubelet_pid(cluster: Cluster) -> int:
    """The real node's kubelet: what a test freezes or checks for the node itself."""
    return int((cluster.state_dir / "node" / "kubelet.pid").read_text())


def container_logs(cluster: Cluster, namespace: str, pod_prefix: str, container: str) -> list[str]:
    """What `container` of the pods named `pod_prefix…` in `namespace` wrote, oldest first, read from
    the kubelet's log files (polling the API server for logs costs the trainer CPU). Each line of
    those has the time, the stream and a partial-line tag before the text (the CRI log format)."""
    files = (cluster.state_dir / "node" / "pod-logs").glob(f"{namespace}_{pod_prefix}*/{container}/*.log")
    return [
        "\n".join(
            line.split(" ", 3)[3]
            for line in path.read_text(errors="replace").splitlines()
            if line.count(" ") >= 3
        )
        for path in sorted(files, key=lambda path: path.stat().st_mtime)
    ]
