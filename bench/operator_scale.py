"""Benchmark: how fast and how cheaply the operator turns FineTuneJobs into Jobs, and Job outcomes into
status, at 1, 100 and 1000 objects.

Why: a cluster's FineTuneJobs pile up (finished ones stay until deleted), and an operator that polls or
re-reads per object gets slower and costlier with every one; DeepTune's should not (reconcile writes
children; one level-based reconciler per kind reads kopf's watch-fed cache, queued by the events that
concern each object, and writes status only when it changed).

What runs: a private local control plane (tests/localcluster: its own state directory and free
ports, stopped at the end; DEEPTUNE_BENCH_CLUSTER_DIR=DIR uses the one in DIR instead, reused if up and
then left running; the bench never takes DEEPTUNE_CLUSTER_DIR's, where another operator may run), the
CRDs, and the operator as users run it (`python -m deeptune`, the default 5 s status interval). No node
agent: trainer pods stay Pending (unschedulable), so only the operator and the control plane work.

First, warm latency: after one object (the first after a start pays for the client's lazy setup),
30 FineTuneJobs one at a time (each created when the previous one's Job appeared): apply → Job with
nothing else going on. Then for each size N, in a fresh namespace:

1. N FineTuneJobs (examples/finetune-tiny.yaml, renamed) are created by 8 client threads; the client
   notes when each create returned, and a Job watch notes when each Job appeared: apply → Job latency.
2. Once the Job controller has started every Job (made its pod) and all N sit in Pending, the
   operator's CPU and RSS are sampled over a few status intervals (/proc of its process): what N
   idle objects cost; and its status writes are counted over that window: none is expected, since
   nothing an object's status shows changed (every object is still reconciled at each resync).
3. Every Job is marked finished through its status subresource, as the Job controller writes it
   (SuccessCriteriaMet, then Complete); a FineTuneJob watch notes when each shows Succeeded: Job done →
   Succeeded latency.
4. The API server's own request counter (apiserver_request_total) before and after gives the requests
   per FineTuneJob by verb and resource. Rows only the operator makes are exact (creates of Jobs and
   ConfigMaps, patches of FineTuneJobs and their status, reads); Events and pods are also written by
   the Job controller and the scheduler, so they are left out.

    python bench/operator_scale.py            # 1, 100, 1000 objects: ten minutes or so on 2 cores
    python bench/operator_scale.py --smoke    # 1 and 10 objects, 5 one at a time: what CI runs

Prints a table and writes JSON to bench/results/operator_scale-<host>.json (…-smoke.json for --smoke).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config, watch
from prometheus_client.parser import text_string_to_metric_families
from urllib3.exceptions import ProtocolError

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from bench.machine import machine_info, save_report  # noqa: E402

from tests.cluster import harness  # noqa: E402

GROUP, VERSION, PLURAL = "deeptune.dev", "v1alpha1", "finetunejobs"
STATUS_INTERVAL = 5.0  # the operator's default
CLIENT_THREADS = 8
OPERATOR_ROWS = {
    ("DRYRUN-POST", "jobs", ""),
    ("POST", "jobs", ""),
    ("POST", "configmaps", ""),
    ("PATCH", "jobs", ""),
    ("PATCH", "finetunejobs", ""),
    ("PATCH", "finetunejobs", "status"),
    ("GET", "jobs", ""),
    ("GET", "configmaps", ""),
    ("LIST", "jobs", ""),
    ("LIST", "pods", ""),
    ("LIST", "finetunejobs", ""),
}
"""(verb, resource, subresource) rows of apiserver_request_total that only the operator produces here
(the benchmark's own requests are POST finetunejobs, PATCH jobs/status and WATCHes). GETs of
finetunejobs are left out: the garbage collector reads owners when it meets new dependents."""


@dataclass
class Size:
    objects: int
    create_seconds: float
    apply_to_job_ms: dict[str, float]
    idle_cpu_percent: float
    idle_rss_mb: float
    done_to_succeeded_ms: dict[str, float]
    requests_per_object: dict[str, float]
    status_writes_per_object: float
    reconcile_mean_ms: float
    """Mean time of one reconcile (the first: dry run, ConfigMap, Job, Event; most: reading the cache
    and finding nothing to write)."""
    reconciles_per_object: float
    idle_status_writes_per_object: float
    """Status patches per object while nothing changed (the idle window): 0 expected."""


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {"p50": at(0.5), "p95": at(0.95), "max": ordered[-1], "mean": statistics.fmean(ordered)}


class Seen:
    """When each object first met a condition, from a watch in a background thread."""

    def __init__(self, list_call: Callable[..., Any], namespace: str, test: Callable[[Any], str | None]):
        self.at: dict[str, float] = {}
        self._watch = watch.Watch()
        self._thread = threading.Thread(
            target=self._run, args=(list_call, namespace, test), daemon=True, name="watch"
        )
        self._thread.start()

    def _run(self, list_call: Callable[..., Any], namespace: str, test: Callable[[Any], str | None]) -> None:
        try:
            for event in self._watch.stream(list_call, namespace, timeout_seconds=3600):
                name = test(event["object"])
                if name is not None and name not in self.at:
                    self.at[name] = time.time()
        except ProtocolError:  # `stop` closed the stream
            return

    def wait(self, names: list[str], timeout: float) -> None:
        deadline = time.time() + timeout
        while any(name not in self.at for name in names):
            if time.time() > deadline:
                missing = [n for n in names if n not in self.at]
                raise TimeoutError(f"{len(missing)} of {len(names)} never showed, e.g. {missing[:3]}")
            time.sleep(0.2)

    def stop(self) -> None:
        self._watch.stop()


def request_counts(api: client.ApiClient) -> Counter[tuple[str, str, str]]:
    """apiserver_request_total summed by (verb, resource, subresource); dry runs count apart, as
    verb "DRYRUN-POST" etc."""
    response = api.call_api("GET", f"{api.configuration.host}/metrics")
    response.read()
    text = response.data.decode()
    counts: Counter[tuple[str, str, str]] = Counter()
    for family in text_string_to_metric_families(text):
        if family.name != "apiserver_request":
            continue
        for sample in family.samples:
            if sample.name == "apiserver_request_total":
                labels = sample.labels
                verb = f"DRYRUN-{labels['verb']}" if labels.get("dry_run") else labels["verb"]
                counts[(verb, labels["resource"], labels.get("subresource", ""))] += sample.value
    return counts


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def process_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def finetunejob(name: str, namespace: str) -> dict[str, Any]:
    manifest = yaml.safe_load((HERE.parent / "examples" / "finetune-tiny.yaml").read_text())
    manifest["metadata"] = {"name": name, "namespace": namespace}
    return dict(manifest)


def mark_finished(batch: client.BatchV1Api, name: str, namespace: str) -> None:
    """What the Job controller writes when the trainer exits 0 (the API server checks the shape)."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    condition = {"status": "True", "lastTransitionTime": now, "reason": "CompletionsReached", "message": ""}
    batch.patch_namespaced_job_status(
        name,
        namespace,
        {
            "status": {
                "active": 0,
                "succeeded": 1,
                "completionTime": now,
                "conditions": [
                    {**condition, "type": "SuccessCriteriaMet"},
                    {**condition, "type": "Complete"},
                ],
            }
        },
    )


def job_started(job: Any) -> str | None:
    return str(job.metadata.name).removesuffix("-train") if job.status and job.status.start_time else None


def succeeded(obj: dict[str, Any]) -> str | None:
    return str(obj["metadata"]["name"]) if (obj.get("status") or {}).get("phase") == "Succeeded" else None


def run_size(api: client.ApiClient, operator: harness.Process, objects: int, idle_seconds: float) -> Size:
    core, batch, custom = client.CoreV1Api(api), client.BatchV1Api(api), client.CustomObjectsApi(api)
    namespace = f"bench-{objects}-{int(time.time())}"
    core.create_namespace({"metadata": {"name": namespace}})
    names = [f"ftj-{i:04d}" for i in range(objects)]
    jobs = Seen(batch.list_namespaced_job, namespace, lambda job: job.metadata.name.removesuffix("-train"))
    running = Seen(batch.list_namespaced_job, namespace, job_started)
    done = Seen(
        lambda ns, **kw: custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, **kw),
        namespace,
        succeeded,
    )
    pid = operator.popen.pid
    before = request_counts(api)
    counters_before = operator_counters(operator)
    created: dict[str, float] = {}

    def create(name: str) -> None:
        body = finetunejob(name, namespace)
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
        created[name] = time.time()

    started = time.time()
    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        list(pool.map(create, names))
    create_seconds = time.time() - started
    jobs.wait(names, timeout=120 + objects)
    running.wait(names, timeout=120 + objects)  # the Job controller has made every pod
    time.sleep(2 * STATUS_INTERVAL)  # every object Pending, settled
    writes_before = operator_counters(operator)["status_writes"]
    cpu_before, idle_started = process_cpu_seconds(pid), time.time()
    rss = []
    while time.time() - idle_started < idle_seconds:
        rss.append(process_rss_mb(pid))
        time.sleep(1)
    idle_cpu = 100 * (process_cpu_seconds(pid) - cpu_before) / (time.time() - idle_started)
    idle_writes = operator_counters(operator)["status_writes"] - writes_before
    finished: dict[str, float] = {}

    def finish(name: str) -> None:
        finished[name] = time.time()
        mark_finished(batch, f"{name}-train", namespace)

    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        list(pool.map(finish, names))
    done.wait(names, timeout=120 + objects)
    time.sleep(1)  # the last status writes' requests reach the counter
    after = request_counts(api)
    counters = operator_counters(operator)
    counters.subtract(counters_before)
    for seen in (jobs, running, done):
        seen.stop()
    delete_namespace(core, namespace)  # and its children, before the next size's counts start
    delta = after - before
    return Size(
        objects=objects,
        create_seconds=create_seconds,
        apply_to_job_ms=percentiles([1000 * (jobs.at[n] - created[n]) for n in names]),
        idle_cpu_percent=idle_cpu,
        idle_rss_mb=max(rss),
        done_to_succeeded_ms=percentiles([1000 * (done.at[n] - finished[n]) for n in names]),
        requests_per_object={
            " ".join(part for part in row if part): delta[row] / objects
            for row in sorted(OPERATOR_ROWS)
            if delta[row]
        },
        status_writes_per_object=counters["status_writes"] / objects,
        reconcile_mean_ms=1000 * counters["reconcile_sum"] / max(1, counters["reconcile_count"]),
        reconciles_per_object=counters["reconcile_count"] / objects,
        idle_status_writes_per_object=idle_writes / objects,
    )


def one_at_a_time(api: client.ApiClient, count: int) -> dict[str, float]:
    """apply → Job of `count` FineTuneJobs made one after another, each once the previous one's Job
    exists: the latency of one object on an otherwise idle operator."""
    core, batch, custom = client.CoreV1Api(api), client.BatchV1Api(api), client.CustomObjectsApi(api)
    namespace = f"bench-warm-{int(time.time())}"
    core.create_namespace({"metadata": {"name": namespace}})
    jobs = Seen(batch.list_namespaced_job, namespace, lambda job: job.metadata.name.removesuffix("-train"))
    latencies = []
    for n in range(count):
        name = f"warm-{n:03d}"
        custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, finetunejob(name, namespace)
        )
        created = time.time()
        jobs.wait([name], timeout=60)
        latencies.append(1000 * (jobs.at[name] - created))
    jobs.stop()
    delete_namespace(core, namespace)
    return percentiles(latencies)


def delete_namespace(core: client.CoreV1Api, namespace: str) -> None:
    core.delete_namespace(namespace)

    def gone() -> bool:
        try:
            core.read_namespace(namespace)
        except client.ApiException as error:
            return error.status == 404
        return False

    harness.wait_for(f"namespace {namespace} to go", gone, timeout=600)


def operator_counters(operator: harness.Process) -> Counter[str]:
    """The operator's own counters for FineTuneJobs: status patches, and the time spent in and the
    runs of reconciles."""
    import urllib.request  # noqa: PLC0415

    with urllib.request.urlopen(f"http://127.0.0.1:{operator.ports['metrics']}/metrics", timeout=10) as page:
        text = page.read().decode()
    counts: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("kind") != "FineTuneJob":
                continue
            if sample.name == "deeptune_operator_status_writes_total":
                counts["status_writes"] += sample.value
            elif sample.name.startswith("deeptune_operator_reconcile_duration_seconds_"):
                suffix = sample.name.rsplit("_", 1)[1]
                if suffix in ("sum", "count"):
                    counts[f"{sample.labels['handler']}_{suffix}"] += sample.value
    return counts


def row_line(size: Size) -> str:
    job, done = size.apply_to_job_ms, size.done_to_succeeded_ms
    return (
        f"{size.objects:>6} {size.create_seconds:>8.1f} {job['p50']:>8.0f} {job['p95']:>8.0f} "
        f"{done['p50']:>8.0f} {done['p95']:>8.0f} {size.idle_cpu_percent:>7.1f} {size.idle_rss_mb:>7.0f} "
        f"{size.status_writes_per_object:>7.1f} {size.idle_status_writes_per_object:>7.2f} "
        f"{size.reconciles_per_object:>7.1f} {size.reconcile_mean_ms:>7.1f}"
    )


HEADER = (
    f"{'FTJs':>6} {'create s':>8} {'job p50':>8} {'job p95':>8} {'done p50':>8} {'done p95':>8} "
    f"{'idle %':>7} {'RSS MB':>7} {'writes':>7} {'idle wr':>7} {'recs':>7} {'rec ms':>7}\n"
    f"{'':>6} {'':>8} {'(ms: apply → Job)':>17} {'(ms: Job done → Succeeded)':>26}"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 100, 1000])
    parser.add_argument("--idle-seconds", type=float, default=20.0, help="CPU/RSS sampling window")
    parser.add_argument("--smoke", action="store_true", help="1 and 10 objects, short windows (CI)")
    parser.add_argument(
        "--keep", action="store_true", help="leave the control plane running (also DEEPTUNE_KEEP_CLUSTER=1)"
    )
    args = parser.parse_args()
    sizes, idle = ([1, 10], 3.0) if args.smoke else (args.sizes, args.idle_seconds)
    sequential = 5 if args.smoke else 30
    # A control plane of this run's own (free ports): never one a concurrent run (a CI smoke run) uses.
    chosen = os.environ.get("DEEPTUNE_BENCH_CLUSTER_DIR")
    state = Path(chosen) if chosen else harness.private_state_dir(prefix="deeptune-bench-")
    load_start = os.getloadavg()
    cluster = harness.start_local_cluster(state)
    operator = None
    try:
        harness.install_crds(cluster)
        operator = harness.start_operator(cluster, status_interval=STATUS_INTERVAL)
        api = config.new_client_from_config(str(cluster.kubeconfig))
        api.user_agent = "deeptune-bench"
        harness.wait_for("the operator's metrics", lambda: _listening(operator), 60)
        first = one_at_a_time(api, 1)
        warm = one_at_a_time(api, sequential)
        print(f"apply → Job, one at a time: first after start {first['p50']:.0f} ms; the next {sequential}:"
              f" p50 {warm['p50']:.0f} ms, p95 {warm['p95']:.0f} ms\n")  # fmt: skip
        print(HEADER)
        results = []
        for objects in sizes:
            results.append(run_size(api, operator, objects, idle))
            print(row_line(results[-1]), flush=True)
        print("\nAPI requests per FineTuneJob (only rows the operator alone produces):")
        for size in results:
            rows = ", ".join(f"{row} {n:.2f}" for row, n in size.requests_per_object.items())
            print(f"  {size.objects:>5}: {rows}")
    finally:
        if operator is not None:
            operator.stop()
        print(harness.finish_local_cluster(cluster, keep=args.keep), flush=True)
    load_end = os.getloadavg()
    report = {
        "machine": machine_info(load_average_start=load_start, load_average_end=load_end),
        "settings": {
            "sizes": sizes,
            "idle_seconds": idle,
            "status_interval": STATUS_INTERVAL,
            "threads": CLIENT_THREADS,
            "one_at_a_time": sequential,
        },
        "first_apply_to_job_ms": first["p50"],
        "warm_apply_to_job_ms": warm,
        "results": [asdict(size) for size in results],
    }
    save_report("operator_scale", report, smoke=args.smoke)


def _listening(operator: harness.Process) -> bool:
    try:
        operator_counters(operator)
    except OSError:
        return False
    return True


if __name__ == "__main__":
    main()
