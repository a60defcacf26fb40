"""Fixtures for the cluster suite: a real control plane, the real node, and the operator.

By default the suite brings up a local control plane (tests/localcluster) of its own, in a private
state directory on free ports, so that another run on the machine (CI's, a demo's) is never touched,
and tears it down at the end with all that runs under it (DEEPTUNE_KEEP_CLUSTER=1 keeps it, and the
summary says where it is and how to stop it). DEEPTUNE_CLUSTER_DIR=DIR uses the cluster in DIR
instead: reused if it is up (and then left running), else started there. Set
DEEPTUNE_TEST_KUBECONFIG to run against another cluster (e.g. kind) instead; the real node is then
not started, and the trainer image must be loaded there.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import harness
from tests.cluster.harness import Cluster, Process
from tests.cluster.real_node import PODS_ON_THE_REAL_NODE, Placement, running

EXTERNAL_KUBECONFIG = os.environ.get("DEEPTUNE_TEST_KUBECONFIG")


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    if EXTERNAL_KUBECONFIG:
        yield Cluster(Path(EXTERNAL_KUBECONFIG), Path(os.environ.get("TMPDIR", "/tmp")), local=False)
        return
    cluster = harness.start_local_cluster(harness.local_state_dir())
    try:
        yield cluster
    finally:
        outcome = harness.finish_local_cluster(cluster)
        if not cluster.started or harness.keep_cluster():
            _SUMMARY.append(outcome)


_SUMMARY: list[str] = []
"""What became of the local cluster, when it keeps running: said at the end of the run."""


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in _SUMMARY:
        terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def crds(cluster: Cluster) -> Cluster:
    harness.install_crds(cluster)
    return cluster


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="session")
def real_node(cluster: Cluster) -> Iterator[dict[str, Any]]:
    """The real node (tests/localcluster/node.sh), started when a test first asks for it and stopped
    at the end of the run (one real node per machine); yields the machine's state from before it
    started."""
    if not cluster.local:
        pytest.skip("LOUD SKIP: the real node joins the local control plane only (tests/localcluster)")
    if os.geteuid() != 0:
        pytest.skip("LOUD SKIP: a real node needs root (containerd, cgroups)")
    with running(cluster) as before:
        yield before


@pytest.fixture(scope="session")
def placement(request: pytest.FixtureRequest, cluster: Cluster) -> Placement:
    """Where the operator's pods run: on the local cluster, the real node (started if it is not), in
    the images built from the project's Dockerfiles; on another cluster (kind), where it puts them."""
    if not cluster.local:
        return Placement(real_node=False)
    request.getfixturevalue("real_node")
    return PODS_ON_THE_REAL_NODE


@pytest.fixture
def trainer_pods(
    placement: Placement, tiny_volumes: dict[str, Path]
) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Where a FineTuneJob's pods run, as a change to its manifest (see `placement`), with the tiny
    claims handed to the trainer image's user."""
    placement.claims(tiny_volumes)
    return placement.finetunejob


@pytest.fixture(scope="module")
def operator(crds: Cluster) -> Iterator[Process]:
    """One operator per test module, so a module that runs its own (the Helm chart's) has the
    cluster to itself."""
    process = harness.start_operator(crds)
    yield process
    process.stop()


@pytest.fixture
def tiny_volumes(crds: Cluster, namespace: str) -> dict[str, Path]:
    """Bound PVCs with what examples/finetune-tiny.yaml reads: a tiny model and the keyword task."""
    dirs = harness.provision_claims(crds, namespace, harness.TINY_CLAIMS)
    harness.seed_tiny_volumes(dirs)
    return dirs


@pytest.fixture(autouse=True)
def _logs_on_failure(request: pytest.FixtureRequest, cluster: Cluster) -> Iterator[None]:
    """Print the operator's log and the pods' (the real node's container logs) when a cluster test
    fails."""
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        state = cluster.state_dir
        containers = sorted((state / "node" / "pod-logs").glob("*/*/*.log"))  # the kubelet's podLogsDir
        logs = [state / "operator.log", *containers]
        print(harness.log_tails(logs), file=sys.stderr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{report.when}", report)
