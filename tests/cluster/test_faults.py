"""Faults on the real control plane: the operator SIGKILLed and restarted in every phase of a
FineTuneJob and a ModelDeployment, the API server killed while a job trains, 50 FineTuneJobs created
and deleted at once, and the node lost (all its processes killed) and back. On the local cluster the
operator's pods run on the real node (tests/localcluster/node.sh), in the trainer and serving
images; the lost node is that node, crashed and restarted on its state.

Each test prints a `FIGURES` line (kills per phase, events by reason, recovery time, leaks) that
docs/reliability.md quotes. Watches (kubectl --watch, in the background) see every child ever
created, so a child deleted and recreated between two looks still counts as a duplicate.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster import harness
from tests.cluster.harness import Cluster, Process, finetunejob, modeldeployment, wait_for
from tests.cluster.real_node import Placement, container_logs, kubelet_pid, lost_node
from tests.cluster.test_finetunejob_training import newest_complete_checkpoint, tiny_manifest
from tests.unit.test_finetunejob_model import MINIMAL

pytestmark = pytest.mark.cluster
GROUP, VERSION = "deeptune.dev", "v1alpha1"
FTJ_LABEL = "deeptune.dev/finetunejob"
MDEP_LABEL = "deeptune.dev/modeldeployment"
FTJ = "tiny-keywords"
STEPS = 1500
"""Training steps of the fault runs: 10 s (an idle machine) to a minute (two busy cores), long enough
for kills while the trainer runs. Where a test needs a phase to last, it freezes a process instead
(SIGSTOP), so that no figure depends on the machine's speed."""
LOAD_TIMEOUT = 300


# --- tools ------------------------------------------------------------------------------------


class Api:
    """The Python client on the test cluster: polling with it costs far less CPU than kubectl, which
    the trainer needs."""

    def __init__(self, cluster: Cluster) -> None:
        self.api = config.new_client_from_config(str(cluster.kubeconfig))
        self.custom = client.CustomObjectsApi(self.api)
        self.core = client.CoreV1Api(self.api)
        self.batch = client.BatchV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)

    def resource(self, plural: str, name: str, namespace: str) -> dict[str, Any]:
        try:
            return dict(self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name))
        except ApiException as error:
            if error.status == 404:
                return {}
            raise

    def status(self, plural: str, name: str, namespace: str) -> dict[str, Any]:
        return dict(self.resource(plural, name, namespace).get("status") or {})

    def events(self, kind: str, name: str, namespace: str) -> list[Any]:
        selector = f"involvedObject.kind={kind},involvedObject.name={name}"
        return list(self.core.list_namespaced_event(namespace, field_selector=selector).items)

    def reasons(self, kind: str, name: str, namespace: str) -> collections.Counter[str]:
        return collections.Counter(e.reason for e in self.events(kind, name, namespace))


@dataclass
class UidWatch:
    """Every object of a kind that matches a selector, as `kubectl get --watch` reported it: the
    uids ever seen, whatever was deleted since."""

    cluster: Cluster
    kind: str
    namespace: str
    selector: str
    output: Path = field(init=False)
    process: subprocess.Popen[bytes] = field(init=False)

    def __post_init__(self) -> None:
        self.output = self.cluster.state_dir / f"watch-{self.namespace}-{self.kind}.txt"
        with self.output.open("wb") as out:
            self.process = subprocess.Popen(
                [
                    "kubectl", "--kubeconfig", str(self.cluster.kubeconfig), "get", self.kind,
                    "-n", self.namespace, "-l", self.selector, "--watch",
                    "-o", "jsonpath={.metadata.uid}{' '}{.metadata.name}{'\\n'}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip

    def uids(self) -> set[str]:
        lines = self.output.read_text().splitlines()
        return {line.split()[0] for line in lines if line.strip()}

    def stop(self) -> None:
        assert self.process.poll() is None, f"the watch of {self.kind} ended early: {self.output.read_text()}"
        self.process.terminate()
        self.process.wait()


@pytest.fixture
def watches(crds: Cluster, namespace: str) -> Iterator[Callable[[str, str], UidWatch]]:
    started: list[UidWatch] = []

    def watch(kind: str, selector: str) -> UidWatch:
        started.append(UidWatch(crds, kind, namespace, selector))
        return started[-1]

    yield watch
    for one in started:
        if one.process.poll() is None:
            one.process.terminate()
            one.process.wait()


@dataclass
class CrashingOperator:
    """The operator, SIGKILLed and started again; each kill and each start is recorded with where
    the resource stood (its phase as `where` says it), and when."""

    cluster: Cluster
    where: Callable[[], str]
    process: Process | None = None
    kills: list[str] = field(default_factory=list)
    starts: list[str] = field(default_factory=list)
    timeline: list[str] = field(default_factory=list)
    began: float = field(default_factory=time.monotonic)

    def start(self) -> None:
        assert self.process is None or self.process.popen.poll() is not None
        self._note(self.starts, "start")
        self.process = harness.start_operator(self.cluster)
        url = f"http://127.0.0.1:{self.process.ports['liveness']}/healthz"
        wait_for("the operator's liveness endpoint", lambda: _answers(url), 60, interval=0.1)

    def kill(self) -> None:
        assert self.process is not None and self.process.popen.poll() is None, "the operator died by itself"
        self.process.popen.send_signal(signal.SIGKILL)
        self.process.popen.wait()
        self._note(self.kills, "kill")
        log = self.cluster.state_dir / "operator.log"  # kept for a look; the next start rewrites it
        shutil.copy(log, self.cluster.state_dir / f"operator.killed-{len(self.kills)}.log")

    def _note(self, record: list[str], what: str) -> None:
        record.append(self.where())
        self.timeline.append(f"{time.monotonic() - self.began:.0f}s {what} {record[-1]}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


def counted(process: Process, name: str, kind: str) -> float:
    """One of the operator's counters for `kind` (0 while it does not answer)."""
    url = f"http://127.0.0.1:{process.ports['metrics']}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=2) as page:
            text = page.read().decode()
    except OSError:
        return 0.0
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and sample.labels.get("kind") == kind
    )


def reconciles(process: Process, kind: str) -> float:
    return counted(process, "deeptune_operator_reconciles_total", kind)


def wait_two_resyncs(cluster: Cluster, process: Process, kind: str, plural: str) -> None:
    """Wait for two more resync passes of `kind`, and as many reconciles as they take for every
    object: after that, what has not changed in status will not (state decides, not a timer)."""
    objects = len(json.loads(cluster.kubectl("get", plural, "-A", "-o", "json").stdout)["items"])
    passes, done = counted(process, "deeptune_operator_resyncs_total", kind), reconciles(process, kind)

    def two_passes() -> bool:
        resynced = counted(process, "deeptune_operator_resyncs_total", kind) - passes >= 2
        return resynced and reconciles(process, kind) - done >= 2 * objects

    wait_for(f"two resyncs of every {kind}", two_passes, 120, 0.2)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@pytest.fixture
def crashing_operator(crds: Cluster) -> Iterator[CrashingOperator]:
    """No operator runs until the test starts one (this module uses no shared operator); the test
    says how to tell where a kill lands."""
    operator = CrashingOperator(crds, where=lambda: "unknown")
    yield operator
    operator.stop()


@pytest.fixture
def own_operator(crds: Cluster) -> Iterator[Process]:
    process = harness.start_operator(crds)
    yield process
    process.stop()


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    """The process stopped (SIGSTOP) while inside, so that a phase lasts whatever the machine's speed."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def trainer_logs(crds: Cluster, namespace: str) -> list[str]:
    """The trainer logs of the run's pods on the real node, oldest first."""
    return container_logs(crds, namespace, f"{FTJ}-train-", "trainer")


def signal_trainers(namespace: str, sig: signal.Signals) -> int:
    """Signal the process groups of the trainers of pods in `namespace` (found by the env the Job
    gives them), leaving any other session's trainers alone."""
    found = 0
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"deeptune_trainer" in cmdline and f"POD_NAMESPACE={namespace}".encode() in environ:
            os.killpg(os.getpgid(int(proc.name)), sig)
            found += 1
    return found


def bounded_events(reasons: collections.Counter[str], exactly_once: set[str]) -> None:
    """An Event goes out with the status write that records a transition, and a restarted operator
    starts from the status written last, so no transition is reported twice: at most one Event per
    reason. A kill between the write and the post can lose one, so only those the test waited for
    are exactly one."""
    for reason in exactly_once:
        assert reasons[reason] == 1, (reason, reasons)
    assert all(count <= 1 for count in reasons.values()), f"an Event repeated: {dict(reasons)}"


def figures(name: str, **values: Any) -> None:
    print(f"\nFIGURES {name}: {json.dumps(values, sort_keys=True)}")


# --- the operator killed through a FineTuneJob's life -------------------------------------------


@pytest.mark.trainer
def test_operator_killed_in_every_phase_of_a_finetunejob(
    crashing_operator: CrashingOperator,
    crds: Cluster,
    namespace: str,
    trainer_pods: Callable[[dict[str, Any]], dict[str, Any]],
    watches: Callable[[str, str], UidWatch],
) -> None:
    if not crds.local:
        pytest.skip("LOUD SKIP: starts and kills operator processes of its own next to the local cluster")
    api, operator = Api(crds), crashing_operator
    jobs, config_maps, pods = (watches(kind, FTJ_LABEL) for kind in ("jobs", "configmaps", "pods"))
    started = time.monotonic()

    def status() -> dict[str, Any]:
        return api.status("finetunejobs", FTJ, namespace)

    def job() -> Any:
        found = api.batch.list_namespaced_job(namespace, label_selector=FTJ_LABEL).items
        return found[0] if found else None

    def job_complete() -> bool:
        found = job()
        conditions = (found.status.conditions or []) if found else []
        return any(c.type == "Complete" and c.status == "True" for c in conditions)

    def step() -> int:
        return int((status().get("progress") or {}).get("step") or 0)

    def where() -> str:
        """The phase in status, and whether the Job has finished while status says Running."""
        phase = status().get("phase") or "New"
        return f"{phase} (Job complete)" if phase == "Running" and job_complete() else phase

    operator.where, operator.began = where, time.monotonic()
    kill = operator.kill

    # Created while no operator runs; the first operator dies as soon as it is up.
    crds.apply(trainer_pods(tiny_manifest(namespace, maxSteps=STEPS)))
    operator.start()
    kill()
    # Pending: the Job exists and its Event is out; the kubelet is frozen, so the pod stays Pending
    # for as long as the look takes.
    with frozen(kubelet_pid(crds)):
        operator.start()
        wait_for("Pending, the Job and JobCreated", lambda: (
            status().get("phase") == "Pending"
            and job() and api.reasons("FineTuneJob", FTJ, namespace)["JobCreated"]
        ), 60, interval=0.1)  # fmt: skip
        kill()
    # Running: first when status shows progress, then twice more once a new operator has moved it on.
    operator.start()
    wait_for("progress in status", lambda: status().get("phase") == "Running" and step() > 0, 300, 0.2)
    kill()
    for _ in range(2):
        before = step()
        operator.start()
        wait_for("progress after the restart", lambda before=before: step() > before, 120, 0.2)
        assert status().get("phase") == "Running", "the run ended too soon: raise STEPS"
        kill()
    # Kept down while the Job completes: the Job has finished, status still says Running.
    wait_for("the Job to complete with no operator running", job_complete, 300, 0.5)
    operator.start()
    wait_for("Succeeded", lambda: status().get("phase") == "Succeeded", 60, 0.2)
    wait_for("the Succeeded Event", lambda: api.reasons("FineTuneJob", FTJ, namespace)["Succeeded"], 30, 0.2)
    final = status()
    kill()
    # A restart after the end changes nothing: no status write, no Event, no Job.
    operator.start()
    assert operator.process is not None
    wait_two_resyncs(crds, operator.process, "FineTuneJob", "finetunejobs")
    assert status() == final
    elapsed = time.monotonic() - started

    for watch in (jobs, config_maps, pods):
        watch.stop()
    assert len(jobs.uids()) == 1, f"Jobs created: {jobs.uids()}"
    assert len(config_maps.uids()) == 1, f"ConfigMaps created: {config_maps.uids()}"
    assert len(pods.uids()) == 1, f"trainer pods created: {pods.uids()}"
    assert job() is not None and job().metadata.uid in jobs.uids()

    assert final["phase"] == "Succeeded"
    assert final["progress"]["step"] == STEPS and final["progress"]["percent"] == 100
    results = final["evalResults"]
    assert results["fineTuned"]["exactMatch"] > results["baseline"]["exactMatch"]

    kills, starts = collections.Counter(operator.kills), collections.Counter(operator.starts)
    assert {"Pending", "Running", "Succeeded"} <= set(kills), operator.timeline
    assert "Running (Job complete)" in starts, operator.timeline
    events = api.events("FineTuneJob", FTJ, namespace)
    reasons = collections.Counter(e.reason for e in events)
    bounded_events(reasons, exactly_once={"JobCreated", "Succeeded"})
    assert [e.reason for e in events if e.type != "Normal"] == []
    figures(
        "operator killed through a FineTuneJob",
        kills=len(operator.kills),
        kills_by_phase=dict(kills),
        starts_by_phase=dict(starts),
        timeline=operator.timeline,
        events=dict(reasons),
        jobs=len(jobs.uids()),
        seconds=round(elapsed),
    )


# --- the operator killed through a ModelDeployment's life ---------------------------------------


@pytest.fixture
def model_claim(crds: Cluster, namespace: str, tmp_path: Path, placement: Placement) -> str:
    """A bound PVC `models` holding a random-weight Llama-architecture model at `tiny-llama/`, readable
    to the serving image's user."""
    pytest.importorskip("pytriton", reason="the serving extra (nvidia-pytriton) is not installed")
    from deeptune_trainer.synthetic import tokenizer_texts
    from deeptune_trainer.tinymodels import build_tiny_model

    directory = harness.provision_claims(crds, namespace, ["models"])["models"]
    build_tiny_model("llama", directory / "tiny-llama", tokenizer_texts())
    placement.readable(directory)
    return "models"


@pytest.mark.serving
def test_operator_killed_in_every_phase_of_a_modeldeployment(
    crashing_operator: CrashingOperator,
    crds: Cluster,
    namespace: str,
    model_claim: str,
    watches: Callable[[str, str], UidWatch],
    *,
    placement: Placement,
) -> None:
    if not crds.local:
        pytest.skip("starts and kills operator processes of its own next to the local cluster")
    api, operator, name = Api(crds), crashing_operator, "served"
    kinds = ("deployments", "replicasets", "pods", "configmaps", "services")
    seen = {kind: watches(kind, MDEP_LABEL) for kind in kinds}

    def status() -> dict[str, Any]:
        return api.status("modeldeployments", name, namespace)

    def deployment() -> Any:
        found = api.apps.list_namespaced_deployment(namespace, label_selector=MDEP_LABEL).items
        return found[0] if found else None

    def pod_ready() -> bool:
        found = deployment()
        return bool(found and (found.status.ready_replicas or 0) >= 1)

    def ready() -> bool:
        conditions = {c["type"]: c["status"] for c in status().get("conditions", [])}
        return conditions.get("Ready") == "True"

    def where() -> str:
        """The model state in status, and whether the pod is ready while status does not say so."""
        state = status().get("modelState") or "New"
        return f"{state} (pod ready)" if not ready() and pod_ready() else ("Ready" if ready() else state)

    operator.where, operator.began = where, time.monotonic()
    reasons = lambda: api.reasons("ModelDeployment", name, namespace)  # noqa: E731
    spec = placement.modeldeployment(
        {
            "model": {"merged": {"pvc": {"claimName": model_claim, "path": "tiny-llama"}}},
            "resources": {"gpu": 0, "cpu": "1", "sharedMemory": "256Mi"},
            "generation": {"maxNewTokens": 4},
        }
    )
    # Created while no operator runs; the first operator dies as soon as it is up.
    crds.apply(modeldeployment(name, namespace, spec))
    operator.start()
    operator.kill()
    # The Deployment is there and its Event out: Triton is starting.
    operator.start()
    wait_for(
        "the Deployment and DeploymentCreated",
        lambda: deployment() and reasons()["DeploymentCreated"],
        60,
        0.1,
    )
    operator.kill()
    # Loading: twice, each once the new operator has reconciled (so it has looked at the pod, still
    # loading: Triton takes seconds to import torch and load), before the window below.
    for _ in range(2):
        operator.start()
        process = operator.process
        assert process is not None
        wait_for("a reconcile", lambda p=process: reconciles(p, "ModelDeployment") >= 1, 60, 0.05)
        operator.kill()
    # Kept down while the pod becomes ready: status does not know yet.
    wait_for("the serving pod to be ready with no operator running", pod_ready, LOAD_TIMEOUT, 0.5)
    operator.start()
    wait_for("Ready=True", ready, 120, 0.2)
    wait_for("the Ready Event", lambda: reasons()["Ready"], 30, 0.2)
    final = status()
    operator.kill()
    # A restart once it serves: no new Deployment revision, no Event.
    operator.start()
    assert operator.process is not None
    wait_two_resyncs(crds, operator.process, "ModelDeployment", "modeldeployments")
    assert ready() and status()["lastProbe"]["inferenceOk"]
    elapsed = time.monotonic() - operator.began

    for watch in seen.values():
        watch.stop()
    created = {kind: len(watch.uids()) for kind, watch in seen.items()}
    assert created == dict.fromkeys(kinds, 1), f"children created: {created}"
    (served,) = api.apps.list_namespaced_deployment(namespace, label_selector=MDEP_LABEL).items
    assert served.metadata.generation == 1, "a restarted operator changed the Deployment (a rollout)"

    probe = final["lastProbe"]
    assert probe["serverReady"] and probe["modelReady"] and probe["inferenceOk"], probe
    assert (final["replicas"], final["readyReplicas"], final["modelState"]) == (1, 1, "Loaded")

    kills, starts = collections.Counter(operator.kills), collections.Counter(operator.starts)
    assert "Loading" in kills and "Ready" in kills, operator.timeline
    assert "Loading (pod ready)" in starts, operator.timeline
    events = api.events("ModelDeployment", name, namespace)
    counted = collections.Counter(e.reason for e in events)
    bounded_events(counted, exactly_once={"DeploymentCreated", "Ready"})
    assert "DeploymentUpdated" not in counted, "a restarted operator said it updated the Deployment"
    assert [e.reason for e in events if e.type != "Normal"] == []
    figures(
        "operator killed through a ModelDeployment",
        kills=len(operator.kills),
        kills_by_phase=dict(kills),
        starts_by_phase=dict(starts),
        timeline=operator.timeline,
        events=dict(counted),
        children=created,
        seconds=round(elapsed),
    )


# --- the API server killed while a job trains ---------------------------------------------------

OUTAGE = 12.0
"""Seconds the API server stays down: longer than kopf's first watch retries (1+1+2+3+5 s), well
within its last (54 s in all), after which kopf gives a watch up."""


@pytest.mark.trainer
def test_api_server_killed_while_a_finetunejob_trains(
    own_operator: Process,
    crds: Cluster,
    namespace: str,
    trainer_pods: Callable[[dict[str, Any]], dict[str, Any]],
) -> None:
    if not crds.local:
        pytest.skip("LOUD SKIP: kills the local cluster's API server process")
    api = Api(crds)

    def status() -> dict[str, Any]:
        return api.status("finetunejobs", FTJ, namespace)

    def trainer_jobs() -> list[str]:
        jobs = api.batch.list_namespaced_job(namespace, label_selector=FTJ_LABEL).items
        return [job.metadata.uid for job in jobs]

    steps = STEPS
    crds.apply(trainer_pods(tiny_manifest(namespace, maxSteps=steps)))

    def training() -> bool:
        found = trainer_logs(crds, namespace)
        return bool(found) and any(line.startswith("step ") for line in found[0].splitlines())

    wait_for("the trainer's first steps", training, 300, 0.05)
    # The trainer is frozen through the outage, so that it still trains once the API server is back
    # whatever the machine's speed, and progress shows the recovery. (A trainer that ends during an
    # outage is reported once it is back: docs/reliability.md.)
    assert signal_trainers(namespace, signal.SIGSTOP) == 1
    (job_uid,) = trainer_jobs()
    before = status()
    argv = harness.stop_component(crds, "kube-apiserver")
    try:
        time.sleep(OUTAGE)
        restarted = time.monotonic()
    finally:
        harness.start_component(crds, "kube-apiserver", argv)
        back = time.monotonic()
        signal_trainers(namespace, signal.SIGCONT)
    api = Api(crds)  # a fresh connection pool
    at_restart = status()

    def moved_on() -> bool:
        now = status()
        return now.get("phase") != at_restart.get("phase") or now.get("progress") != at_restart.get(
            "progress"
        )

    wait_for("a status update after the restart", moved_on, 120, 0.2)
    first_update = time.monotonic() - back
    updated = status()
    wait_for("Succeeded", lambda: status().get("phase") == "Succeeded", 300, 0.5)
    recovered = time.monotonic() - back
    final = status()

    assert own_operator.popen.poll() is None, "the operator exited"
    os.kill(kubelet_pid(crds), 0)  # the kubelet lived through the outage
    assert trainer_jobs() == [job_uid]
    assert len(api.core.list_namespaced_pod(namespace, label_selector=FTJ_LABEL).items) == 1
    assert final["progress"]["step"] == steps and final["evalResults"]["fineTuned"]
    reasons = api.reasons("FineTuneJob", FTJ, namespace)
    bounded_events(reasons, exactly_once={"JobCreated", "Pending", "Running", "Succeeded"})
    figures(
        "API server killed while a FineTuneJob trains",
        outage_seconds=round(back - restarted + OUTAGE, 1),
        api_server_start_seconds=round(back - restarted, 1),
        step_before=(before.get("progress") or {}).get("step"),
        step_at_restart=(at_restart.get("progress") or {}).get("step"),
        first_update={"phase": updated.get("phase"), "step": (updated.get("progress") or {}).get("step")},
        first_status_update_after_restart_seconds=round(first_update, 1),
        succeeded_after_restart_seconds=round(recovered, 1),
        events=dict(reasons),
    )


# --- 50 FineTuneJobs created and deleted at once -------------------------------------------------

MANY = 50


def test_fifty_finetunejobs_created_and_deleted_concurrently(
    own_operator: Process, crds: Cluster, namespace: str, watches: Callable[[str, str], UidWatch]
) -> None:
    api = Api(crds)
    seen = {kind: watches(kind, FTJ_LABEL) for kind in ("jobs", "configmaps", "pods")}
    names = [f"many-{i:02d}" for i in range(MANY)]
    spec = {**MINIMAL, "suspend": True}  # suspended: Jobs without trainers

    def create(name: str) -> None:
        api.custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, "finetunejobs", finetunejob(name, namespace, spec)
        )

    def delete(name: str) -> None:
        api.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, "finetunejobs", name)

    def children(kind: str) -> list[Any]:
        listing = {
            "jobs": api.batch.list_namespaced_job,
            "configmaps": api.core.list_namespaced_config_map,
            "pods": api.core.list_namespaced_pod,
        }[kind]
        return list(listing(namespace, label_selector=FTJ_LABEL).items)

    def phases() -> collections.Counter[str]:
        found = api.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "finetunejobs")["items"]
        return collections.Counter((item.get("status") or {}).get("phase") for item in found)

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(create, names))
    wait_for(f"{MANY} Suspended FineTuneJobs", lambda: phases() == {"Suspended": MANY}, 180, 1)
    settled = time.monotonic() - started
    assert len(children("jobs")) == len(children("configmaps")) == MANY

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(delete, names))
    wait_for(
        "the children to be garbage-collected",
        lambda: not any(children(kind) for kind in ("jobs", "configmaps", "pods")),
        180,
        1,
    )
    collected = time.monotonic() - started
    wait_two_resyncs(crds, own_operator, "FineTuneJob", "finetunejobs")  # nothing comes back
    left = {kind: len(children(kind)) for kind in ("jobs", "configmaps", "pods")}
    assert left == {"jobs": 0, "configmaps": 0, "pods": 0}, left
    assert phases() == {}

    for watch in seen.values():
        watch.stop()
    created = {kind: len(watch.uids()) for kind, watch in seen.items()}
    assert created == {"jobs": MANY, "configmaps": MANY, "pods": 0}, f"children ever created: {created}"
    posted = [
        e for e in api.core.list_namespaced_event(namespace).items if e.involved_object.kind == "FineTuneJob"
    ]
    job_events = collections.Counter(e.reason for e in posted)
    assert job_events["JobCreated"] == MANY, job_events
    repeated = collections.Counter((e.involved_object.name, e.reason) for e in posted).most_common(1)
    assert repeated[0][1] == 1, f"an Event repeated: {repeated}"
    assert own_operator.popen.poll() is None
    figures(
        "50 FineTuneJobs created and deleted concurrently",
        created=created,
        left=left,
        seconds_to_all_suspended=round(settled, 1),
        seconds_to_garbage_collected=round(collected, 1),
        events=dict(job_events),
    )


# --- a lost node that comes back ----------------------------------------------------------------


@pytest.mark.trainer
def test_lost_node_comes_back_and_the_run_resumes_from_its_checkpoint(
    own_operator: Process,
    crds: Cluster,
    namespace: str,
    trainer_pods: Callable[[dict[str, Any]], dict[str, Any]],
    tiny_volumes: dict[str, Path],
) -> None:
    """The real node is lost at once (kubelet, containerd, kube-proxy and the trainer's container
    SIGKILLed, as at a power cut) and comes back on the state it left (a reboot). Kubernetes itself
    fails nothing over here: with its only node lost, the node lifecycle controller enters
    full-disruption mode and evicts nothing (docs/reliability.md), and this local cluster gives
    nodes a year's grace anyway. The kubelet finds the container gone and reports it as a kubelet
    does (terminated, reason Unknown, exit code 255); the Job retries the pod, and the trainer
    resumes from its newest checkpoint."""
    if not crds.local:
        pytest.skip("LOUD SKIP: kills the local cluster's real node")
    api, interval = Api(crds), 50
    steps = STEPS // 2

    def status() -> dict[str, Any]:
        return api.status("finetunejobs", FTJ, namespace)

    crds.apply(trainer_pods(tiny_manifest(namespace, maxSteps=steps, checkpointSteps=interval)))
    checkpoints = tiny_volumes["deeptune-output"] / FTJ / "checkpoints"

    def logged_steps(log: str) -> list[int]:
        return [int(line.split()[1].split("/")[0]) for line in log.splitlines() if line.startswith("step ")]

    def past_checkpoint() -> bool:
        """Between checkpoints, so that the loss costs steps (at most one interval's)."""
        logs = trainer_logs(crds, namespace)
        done = newest_complete_checkpoint(checkpoints) >= 2 * interval
        return done and bool(logs) and max(logged_steps(logs[0]), default=0) >= 2 * interval + 20

    wait_for("steps past the second checkpoint", past_checkpoint, timeout=300, interval=0.05)
    with lost_node(crds):
        assert signal_trainers(namespace, signal.SIGKILL) == 0, "a trainer outlived its node"
        lost = time.monotonic()
        # Nothing reports the trainer's end while the node is gone.
        wait_two_resyncs(crds, own_operator, "FineTuneJob", "finetunejobs")
        while_lost = status()
        assert while_lost["phase"] == "Running" and not while_lost.get("retries")
    wait_for("Succeeded", lambda: status().get("phase") == "Succeeded", 300, 0.5)
    final = status()
    recovered = time.monotonic() - lost

    assert final["retries"] == 1, final
    assert (final["lastFailure"]["reason"], final["lastFailure"]["exitCode"]) == ("Unknown", 255), final
    assert "lost with its node" in final["lastFailure"]["message"]
    assert final["progress"]["step"] == steps
    assert len(api.batch.list_namespaced_job(namespace, label_selector=FTJ_LABEL).items) == 1
    logs = trainer_logs(crds, namespace)
    assert len(logs) == 2
    killed_at = max(logged_steps(logs[0]))
    resumed = [line for line in logs[1].splitlines() if "resuming from checkpoint-" in line]
    assert resumed, logs[1][-2000:]
    checkpoint = int(resumed[0].rsplit("-", 1)[1])
    assert killed_at - checkpoint <= interval + 10, "lost more than a checkpoint interval (+ a logging step)"
    reasons = api.reasons("FineTuneJob", FTJ, namespace)
    # One Event per transition: Pending, Running, then Pending (the retry waits) and Running again.
    assert reasons == {"JobCreated": 1, "Pending": 2, "Running": 2, "Succeeded": 1}, reasons
    figures(
        "lost node back",
        killed_at_step=killed_at,
        resumed_from=checkpoint,
        steps_lost=killed_at - checkpoint,
        seconds_from_loss_to_succeeded=round(recovered, 1),
        status_while_lost={
            "phase": while_lost["phase"],
            "step": (while_lost.get("progress") or {}).get("step"),
        },
        events=dict(reasons),
    )
