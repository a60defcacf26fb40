"""The local DeepTune stack on the local control plane: shared by the cluster tests and the demo.

Brings up (or reuses) the control plane from tests/localcluster, installs the CRDs, starts the
operator as a process, and provisions hostPath PersistentVolumes so PVCs bind. (The real node that
runs the pods is tests/localcluster/node.sh: tests/cluster/real_node.py.)

Each run gets a control plane of its own by default: a private state directory (`private_state_dir`)
and free ports, so that two runs on one machine never meet. DEEPTUNE_CLUSTER_DIR names a cluster to
reuse (or to start there) instead. A run stops only a cluster it started itself
(`finish_local_cluster`). Every process started here is recorded in its cluster's state directory
(`processes/*.pid`), so that `tests/localcluster/down.sh` stops it with the control plane, whatever
became of the run that started it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
LOCALCLUSTER = ROOT / "tests" / "localcluster"
TRAINER_IMAGE = "deeptune/trainer:test"
"""The operator's default trainer image in the suite: on another cluster (kind), the tag the trainer
image is loaded under; on the local one, tests that run a trainer name the image built here."""
TINY_CLAIMS = ["deeptune-models", "deeptune-data", "deeptune-output"]
"""The PVCs examples/finetune-tiny.yaml uses."""
PORT_VARIABLES = tuple(
    f"DEEPTUNE_{port}_PORT" for port in ("APISERVER", "ETCD", "ETCD_PEER", "KCM", "SCHEDULER")
)
"""up.sh's port settings: unset, each is 0 here (a free port)."""


@dataclass
class Cluster:
    """kubectl against one cluster, with the few conveniences the tests need."""

    kubeconfig: Path
    state_dir: Path
    local: bool
    started: bool = False
    """Whether this run started the (local) cluster, and so may stop it."""

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["kubectl", "--kubeconfig", str(self.kubeconfig), *args],
            check=False,
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{result.stderr}")
        return result

    def apply(
        self, manifest: dict[str, Any] | str, *extra: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        text = manifest if isinstance(manifest, str) else yaml.safe_dump(manifest)
        return self.kubectl("apply", "-f", "-", *extra, input=text, check=check)

    def get(self, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
        result = self.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
        return json.loads(result.stdout) if result.returncode == 0 else None

    def list(self, kind: str, namespace: str, selector: str | None = None) -> list[dict[str, Any]]:
        args = ["get", kind, "-n", namespace, "-o", "json"]
        if selector:
            args += ["-l", selector]
        return list(json.loads(self.kubectl(*args).stdout)["items"])


def finetunejob(name: str, namespace: str, spec: dict[str, Any]) -> dict[str, Any]:
    """A FineTuneJob manifest."""
    return {
        "apiVersion": "deeptune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def modeldeployment(name: str, namespace: str, spec: dict[str, Any]) -> dict[str, Any]:
    """A ModelDeployment manifest."""
    return {
        "apiVersion": "deeptune.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def events_for(cluster: Cluster, kind: str, name: str, namespace: str) -> list[dict[str, Any]]:
    """The Events posted about one object."""
    selector = f"involvedObject.kind={kind},involvedObject.name={name}"
    result = cluster.kubectl("get", "events", "-n", namespace, "--field-selector", selector, "-o", "json")
    return list(json.loads(result.stdout)["items"])


def wait_for(what: str, probe: Callable[[], Any], timeout: float, interval: float = 1.0) -> Any:
    """Poll until `probe` returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last seen: {last!r}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log_tails(paths: list[Path], limit: int = 6000) -> str:
    parts = []
    for path in paths:
        if path.exists():
            parts.append(f"\n===== {path} (tail) =====\n{path.read_text(errors='replace')[-limit:]}")
    return "".join(parts)


@dataclass
class Process:
    popen: subprocess.Popen[bytes]
    log: Path
    ports: dict[str, int] = field(default_factory=dict)
    record: Path | None = None
    """Its pid file in the state directory of its cluster (for down.sh), while it runs."""

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        if self.record is not None:
            self.record.unlink(missing_ok=True)


_records: list[Path] = []
"""Where `start_process` records a process whose log lies outside any cluster's state directory:
the state directory of the local cluster this run started or reused last."""


def start_process(args: list[str], log: Path, env: dict[str, str]) -> Process:
    """Start a process of the local stack, logging to `log`, and record it (`processes/NAME-PID.pid`:
    its pid and start time) in the state directory of its cluster (the one that holds `log`, else
    this run's local cluster), for down.sh to stop it if this run does not."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        popen = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    state = next((d for d in log.parents if (d / ".deeptune-cluster").exists()), None)
    state = state or (_records[-1] if _records else None)
    record = None
    if state is not None:
        record = state / "processes" / f"{log.stem}-{popen.pid}.pid"
        record.parent.mkdir(exist_ok=True)
        record.write_text(f"{popen.pid} {_start_time(popen.pid)} {shlex.join(args)}\n")
    return Process(popen, log, record=record)


def _start_time(pid: int) -> str:
    """The process's start time (field 22 of /proc/PID/stat): with the pid, it names one process."""
    try:
        return (Path(f"/proc/{pid}") / "stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "0"


def private_state_dir(prefix: str = "deeptune-cluster-") -> Path:
    """A new, empty state directory for a cluster of this run's own: under DEEPTUNE_RUN_DIR when
    set (CI's .ci/run sets it, to stop whatever a run killed half-way left), else under $TMPDIR or
    /tmp."""
    parent = os.environ.get("DEEPTUNE_RUN_DIR") or None
    if parent:
        Path(parent).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


def local_state_dir() -> Path:
    """DEEPTUNE_CLUSTER_DIR when set (its cluster is reused when up, else started there), else a
    private state directory."""
    chosen = os.environ.get("DEEPTUNE_CLUSTER_DIR")
    return Path(chosen) if chosen else private_state_dir()


def start_local_cluster(state: Path) -> Cluster:
    """Build the binaries if missing and start the control plane in `state`, on free ports unless
    DEEPTUNE_*_PORT say otherwise (a no-op when it is up there: then `started` is False)."""
    env = {**os.environ, "DEEPTUNE_CLUSTER_DIR": str(state)}
    for variable in PORT_VARIABLES:
        env[variable] = env.get(variable) or "0"
    subprocess.run(["bash", str(LOCALCLUSTER / "build.sh")], check=True, env=env)
    kubeconfig = state / "kubeconfig"
    before = _identity(kubeconfig)
    up = subprocess.run(
        ["bash", str(LOCALCLUSTER / "up.sh")], check=False, env=env, capture_output=True, text=True
    )
    if up.returncode != 0:
        raise RuntimeError(
            f"the local control plane did not come up (state and logs: {state}):\n"
            f"{up.stderr}{log_tails(sorted(state.glob('*.log')))}"
        )
    _records[:] = [state]
    # up.sh writes a new kubeconfig (last) for each cluster it starts, and leaves a healthy one be.
    started = before is None or _identity(kubeconfig) != before
    return Cluster(kubeconfig, state, local=True, started=started)


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino, stat.st_mtime_ns)


def stop_command(state: Path) -> str:
    """The command that stops everything started under `state` (control plane, operator, node
    agent, pods) and removes it."""
    down = shlex.quote(str(LOCALCLUSTER / "down.sh"))
    return f"DEEPTUNE_CLUSTER_DIR={shlex.quote(str(state))} bash {down}"


def keep_cluster() -> bool:
    """DEEPTUNE_KEEP_CLUSTER=1: keep the local cluster a run started."""
    return os.environ.get("DEEPTUNE_KEEP_CLUSTER", "") not in ("", "0")


def finish_local_cluster(cluster: Cluster, keep: bool = False) -> str:
    """At the end of a run: stop the local cluster (and all that runs under its state directory) if
    this run started it and neither `keep` nor DEEPTUNE_KEEP_CLUSTER asks to keep it; a cluster the
    run found up is left running. Returns what became of it, for the user."""
    state = cluster.state_dir
    if cluster.started and not (keep or keep_cluster()):
        stop_local_cluster(state)
        return f"Stopped the local cluster and removed {state}."
    found = "" if cluster.started else ", as it was when this run began"
    return (
        f"The local cluster keeps running{found} (state and logs: {state}):\n"
        f"    export KUBECONFIG={cluster.kubeconfig}\n"
        "To stop it and everything still running under it (operator, real node, pods):\n"
        f"    {stop_command(state)}"
    )


def stop_component(cluster: Cluster, name: str) -> list[str]:
    """SIGKILL one control-plane process that up.sh started (`kube-apiserver`, `etcd`, ...), as a
    crash would; returns its command line, so that `start_component` can start it again as it was."""
    pid = int((cluster.state_dir / f"{name}.pid").read_text())
    proc = Path(f"/proc/{pid}")
    argv = [os.readlink(proc / "exe"), *(proc / "cmdline").read_bytes().decode().split("\0")[1:-1]]
    os.kill(pid, signal.SIGKILL)
    wait_for(f"{name} (pid {pid}) to exit", lambda: _exited(proc), 30, 0.1)
    return argv


def _exited(proc: Path) -> bool:
    """Gone, or a zombie whose threads have all ended (until then its sockets may still be open)."""
    try:
        zombie = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        return zombie and len(os.listdir(proc / "task")) <= 1
    except OSError:
        return True


def start_component(cluster: Cluster, name: str, argv: list[str]) -> None:
    """Start a control-plane process again, detached as up.sh starts it (its log appended to), and
    wait until the API server answers /readyz."""
    log = cluster.state_dir / f"{name}.log"
    launch = 'nohup setsid "$@" >> "$LOG" 2>&1 < /dev/null & echo $!'
    pid = subprocess.run(
        ["bash", "-c", launch, "start", *argv],
        env={**os.environ, "LOG": str(log)}, check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    (cluster.state_dir / f"{name}.pid").write_text(f"{pid}\n")

    def ready() -> bool:
        if _exited(Path(f"/proc/{pid}")):
            raise AssertionError(f"{name} exited at once:{log_tails([log], limit=2000)}")
        return cluster.kubectl("get", "--raw", "/readyz", check=False).stdout.strip() == "ok"

    wait_for("the API server to be ready", ready, timeout=120, interval=0.2)


def stop_local_cluster(state: Path) -> None:
    """down.sh: stop everything started under `state` and remove it."""
    env = {**os.environ, "DEEPTUNE_CLUSTER_DIR": str(state)}
    subprocess.run(["bash", str(LOCALCLUSTER / "down.sh")], env=env, check=False)


def install_crds(cluster: Cluster) -> None:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    wait_established(cluster, "crd", "--all")


def wait_established(cluster: Cluster, *crds: str) -> None:
    """`kubectl wait --for=condition=Established`, retried: kubectl fails at once, instead of
    waiting, on a CRD whose status has no conditions yet (a fresh-clone CI run met it)."""

    def established() -> bool:
        waited = cluster.kubectl("wait", "--for=condition=Established", *crds, "--timeout=30s", check=False)
        return waited.returncode == 0

    wait_for(f"{' '.join(crds)} to be Established", established, timeout=60, interval=0.5)


def cluster_dns(cluster: Cluster) -> dict[str, str]:
    """The local cluster's DNS as up.sh started it (`cluster-dns.env`): CLUSTER_DNS, the address of
    its CoreDNS on the pods' bridge, and CLUSTER_DOMAIN; empty when it runs none."""
    path = cluster.state_dir / "cluster-dns.env"
    lines = path.read_text().splitlines() if path.exists() else []
    return dict(line.split("=", 1) for line in lines if "=" in line)


def start_operator(
    cluster: Cluster,
    status_interval: float = 1.0,
    identity: str = "operator-0",
    log_name: str = "operator.log",
    lease: str = "deeptune-operator",
) -> Process:
    """The operator, started as users start it (`python -m deeptune`). `identity` is its name in the
    leader Lease: a restarted operator with the same one takes its Lease back at once, as a restarted
    container in the same pod does."""
    ports = {"metrics": free_port(), "liveness": free_port()}
    env = {
        **os.environ,
        "KUBECONFIG": str(cluster.kubeconfig),
        "DEEPTUNE_TRAINER_IMAGE": TRAINER_IMAGE,
        "DEEPTUNE_STATUS_INTERVAL": str(status_interval),
        "DEEPTUNE_METRICS_PORT": str(ports["metrics"]),
        "DEEPTUNE_LIVENESS_PORT": str(ports["liveness"]),
        "DEEPTUNE_OPERATOR_IDENTITY": identity,
        "DEEPTUNE_LEASE_NAME": lease,
    }
    process = start_process([sys.executable, "-m", "deeptune"], cluster.state_dir / log_name, env)
    process.ports = ports
    return process


def provision_claims(cluster: Cluster, namespace: str, claims: list[str]) -> dict[str, Path]:
    """A bound PVC per name, each backed by a hostPath PV directory; returns claim → directory."""
    dirs: dict[str, Path] = {}
    for claim in claims:
        directory = cluster.state_dir / "volumes" / namespace / claim
        directory.mkdir(parents=True, exist_ok=True)
        pv_name = f"{namespace}-{claim}"
        cluster.apply(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {"name": pv_name, "labels": {"deeptune.dev/test": "true"}},
                "spec": {
                    "capacity": {"storage": "10Gi"},
                    "accessModes": ["ReadWriteOnce"],
                    "persistentVolumeReclaimPolicy": "Retain",
                    "storageClassName": "",
                    "hostPath": {"path": str(directory), "type": "Directory"},
                    "claimRef": {"namespace": namespace, "name": claim},
                },
            }
        )
        cluster.apply(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": claim, "namespace": namespace},
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "storageClassName": "",
                    "volumeName": pv_name,
                    "resources": {"requests": {"storage": "10Gi"}},
                },
            }
        )
        dirs[claim] = directory
    for claim in claims:
        wait_for(
            f"PVC {claim} to bind",
            lambda claim=claim: (
                (cluster.get("pvc", claim, namespace) or {}).get("status", {}).get("phase") == "Bound"
            ),
            timeout=60,
        )
    return dirs


def seed_tiny_volumes(dirs: dict[str, Path], rows: int = 240) -> None:
    """Put what examples/finetune-tiny*.yaml read on their claims: a tiny model (and one half its
    width) and the keyword task (as pairs, with most answers wrong, and held-out rows too)."""
    from deeptune_trainer.synthetic import keyword_pairs, keyword_rows, mostly_wrong, tokenizer_texts
    from deeptune_trainer.tinymodels import build_smaller_model, build_tiny_model

    model_dir = dirs["deeptune-models"] / "tiny-llama"
    if not (model_dir / "config.json").exists():
        build_tiny_model("llama", model_dir, tokenizer_texts())
    student_dir = dirs["deeptune-models"] / "tiny-llama-small"  # a distillation student
    if not (student_dir / "config.json").exists():
        build_smaller_model(model_dir, student_dir)
    train = keyword_rows(rows, seed=1)
    held_out = keyword_rows(40, seed=2, exclude={row["prompt"] for row in train})
    files = {
        "keywords.jsonl": train,
        "keyword-pairs.jsonl": keyword_pairs(rows, seed=1),
        "keywords-noisy.jsonl": mostly_wrong(train),
        "keywords-held-out.jsonl": held_out,
    }
    for name, content in files.items():
        lines = (json.dumps(row, ensure_ascii=False) for row in content)
        (dirs["deeptune-data"] / name).write_text("\n".join(lines) + "\n", encoding="utf-8")


@contextlib.contextmanager
def keda_crd(cluster: Cluster) -> Iterator[Path]:
    """KEDA's ScaledObject CRD (from KEDA's Go module: tests/localcluster/keda_crds.sh), installed for
    the `with` block and removed after it. KEDA's operator is not run."""
    found = subprocess.run(
        ["bash", str(LOCALCLUSTER / "keda_crds.sh")],
        capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip
    assert found.returncode == 0, f"KEDA's CRDs could not be fetched (keda_crds.sh):\n{found.stderr[-2000:]}"
    crd = Path(found.stdout.strip()) / "keda.sh_scaledobjects.yaml"
    cluster.kubectl("apply", "--server-side", "-f", str(crd))
    wait_established(cluster, "crd/scaledobjects.keda.sh")
    try:
        yield crd
    finally:
        cluster.kubectl("delete", "-f", str(crd), "--wait=true", check=False)
