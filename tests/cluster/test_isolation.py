"""Two runs on one machine do not break each other: a second local control plane (its own state
directory, free ports) runs beside the session's, and down.sh stops all that runs under it (control
plane, a node agent's pod whose agent is gone, a recorded process) and nothing of the session's."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.cluster import harness
from tests.cluster.harness import Cluster

pytestmark = pytest.mark.cluster

COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")


def running(pid: int) -> bool:
    """The process runs (a zombie has ended: only its parent's wait is missing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def pids(state: Path) -> dict[str, int]:
    return {name: int((state / f"{name}.pid").read_text()) for name in COMPONENTS}


def ports(state: Path) -> set[int]:
    lines = (state / "ports.env").read_text().split()
    return {int(line.split("=", 1)[1]) for line in lines}


def script(name: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run tests/localcluster/NAME as a user would."""
    command = ["bash", str(harness.LOCALCLUSTER / name)]
    return subprocess.run(command, env=env, check=False, capture_output=True, text=True, timeout=timeout)


def ready(cluster: Cluster) -> bool:
    return cluster.kubectl("get", "--raw", "/readyz", check=False).stdout.strip() == "ok"


def sleeper_pod() -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "sleeper", "namespace": "default"},
        "spec": {
            "nodeName": harness.NODE_NAME,
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "containers": [{"name": "main", "image": harness.TRAINER_IMAGE, "command": ["sleep", "600"]}],
        },
    }


def test_a_second_cluster_runs_beside_the_sessions_and_down_stops_all_of_it(cluster: Cluster) -> None:
    if not cluster.local:
        pytest.skip("needs the local control plane (tests/localcluster)")
    first = pids(cluster.state_dir)
    state = harness.private_state_dir(prefix="deeptune-isolation-")
    env = {**os.environ, "DEEPTUNE_CLUSTER_DIR": str(state), **dict.fromkeys(harness.PORT_VARIABLES, "0")}
    second = Cluster(state / "kubeconfig", state, local=True)
    try:
        up = script("up.sh", env, timeout=300)
        assert up.returncode == 0, up.stderr + harness.log_tails(sorted(state.glob("*.log")))
        assert not ports(cluster.state_dir) & ports(state), "the second cluster took a port of the first"
        assert ready(cluster) and ready(second)
        second.kubectl("create", "namespace", "only-in-the-second")
        assert cluster.kubectl("get", "namespace", "only-in-the-second", check=False).returncode != 0

        # What down.sh stops besides the control plane: the pod of a node agent that is gone (lost,
        # as a SIGKILLed run leaves it) and a process the harness recorded.
        agent = harness.start_node_agent(second)
        second.apply(sleeper_pod())
        phase = "jsonpath={.status.phase}"
        harness.wait_for(
            "the pod to run",
            lambda: second.kubectl("get", "pod", "sleeper", "-o", phase, check=False).stdout == "Running",
            timeout=60,
        )
        (pod_dir,) = (state / "node-agent" / "pods").glob("default_sleeper_*")
        pod = int((pod_dir / "pid").read_text())
        netns = Path("/run/netns") / f"dt-{pod_dir.name.rsplit('_', 1)[1]}"
        assert running(pod) and netns.exists()
        harness.lose_node_agent(agent)
        sleeper = harness.start_process(["sleep", "600"], state / "sleeper.log", dict(os.environ))
        assert sleeper.record is not None and sleeper.record.parent == state / "processes"
        theirs = [*pids(state).values(), pod, sleeper.popen.pid]
    finally:
        down = script("down.sh", env, timeout=120)
    assert down.returncode == 0, down.stderr
    assert sleeper.popen.wait(timeout=10) == -signal.SIGTERM
    harness.wait_for("the pod's process to end", lambda: not running(pod), timeout=10, interval=0.1)
    assert [pid for pid in theirs if running(pid)] == [], down.stderr
    assert not netns.exists()
    assert not state.exists() and not Path(f"{state}.lock").exists()

    assert pids(cluster.state_dir) == first, "the session's control plane was restarted"
    assert all(running(pid) for pid in first.values()), "down.sh stopped a process of the session's cluster"
    assert ready(cluster)
