"""Two runs on one machine do not break each other: a second local control plane (its own state
directory, free ports) runs beside the session's, and down.sh stops all that runs under it (control
plane, a recorded process) and nothing of the session's. The real node is one per machine: the
second cluster's node.sh refuses to start one beside the session's and says whose it is."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import harness
from tests.cluster.harness import Cluster
from tests.cluster.real_node import NODE

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


def test_a_second_cluster_runs_beside_the_sessions_and_down_stops_all_of_it(
    cluster: Cluster, real_node: dict[str, Any]
) -> None:
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

        # One real node per machine: the session's holds kube-proxy's tables and the service range.
        refused = script("node.sh", env, timeout=300)
        assert refused.returncode != 0
        assert f"the cluster in {cluster.state_dir} has a real node on this machine" in refused.stderr
        assert f"DEEPTUNE_CLUSTER_DIR={cluster.state_dir} " in refused.stderr  # how to stop it
        assert not (state / "node").exists()

        # What down.sh stops besides the control plane: a process the harness recorded.
        sleeper = harness.start_process(["sleep", "600"], state / "sleeper.log", dict(os.environ))
        assert sleeper.record is not None and sleeper.record.parent == state / "processes"
        theirs = [*pids(state).values(), sleeper.popen.pid]
    finally:
        down = script("down.sh", env, timeout=120)
    assert down.returncode == 0, down.stderr
    assert sleeper.popen.wait(timeout=10) == -signal.SIGTERM
    assert [pid for pid in theirs if running(pid)] == [], down.stderr
    assert not state.exists() and not Path(f"{state}.lock").exists()

    assert pids(cluster.state_dir) == first, "the session's control plane was restarted"
    assert all(running(pid) for pid in first.values()), "down.sh stopped a process of the session's cluster"
    assert ready(cluster)
    node_ready = "jsonpath={.status.conditions[?(@.type=='Ready')].status}"
    assert cluster.kubectl("get", "node", NODE, "-o", node_ready).stdout == "True", "the session's node"
