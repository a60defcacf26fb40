"""DeepTune's resources carry no finalizer, so deleting one never waits for the operator. (A trainer
Job and its pods hold `deeptune.dev/result` until an operator has recorded the run: with none
running, they wait for the next one.)"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest

from tests.cluster import harness
from tests.cluster.harness import Cluster, Process, finetunejob, wait_for
from tests.unit.test_finetunejob_model import MINIMAL

pytestmark = pytest.mark.cluster
LEGACY = "deeptune.dev/finalizer"


@pytest.fixture
def own_operator(crds: Cluster) -> Iterator[Process]:
    """An operator this module stops and starts itself."""
    process = harness.start_operator(crds)
    yield process
    process.stop()


def test_no_finalizer_and_deletion_without_an_operator(
    own_operator: Process, crds: Cluster, namespace: str
) -> None:
    spec = copy.deepcopy(MINIMAL)
    spec["suspend"] = True
    crds.apply(finetunejob("plain", namespace, spec))
    legacy = finetunejob("legacy", namespace, spec)
    legacy["metadata"]["finalizers"] = [LEGACY]  # as an early build left it
    crds.apply(legacy)
    for name in ("plain", "legacy"):
        wait_for(f"{name}'s Job", lambda name=name: crds.get("job", f"{name}-train", namespace), 60)
    wait_for(
        "the early build's finalizer to be released",
        lambda: not (crds.get("finetunejob", "legacy", namespace) or {})["metadata"].get("finalizers"),
        60,
    )
    assert not crds.get("finetunejob", "plain", namespace)["metadata"].get("finalizers")  # type: ignore[index]

    own_operator.stop()
    crds.kubectl("delete", "finetunejob", "plain", "legacy", "-n", namespace, "--timeout=30s")
    assert crds.list("finetunejobs", namespace) == []

    def held() -> bool:
        jobs = crds.list("jobs", namespace)
        return len(jobs) == 2 and all(job["metadata"].get("deletionTimestamp") for job in jobs)

    wait_for("the orphaned Jobs to be marked for deletion", held, 60)
    assert all(
        job["metadata"]["finalizers"] == ["deeptune.dev/result"] for job in crds.list("jobs", namespace)
    )
    restarted = harness.start_operator(crds)
    try:
        wait_for("the Jobs to be let go and collected", lambda: crds.list("jobs", namespace) == [], 60)
    finally:
        restarted.stop()
