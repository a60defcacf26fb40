"""Cluster DNS as on a real cluster: the pods of an Indexed Job published by a headless Service find
each other as `<job>-<index>.<service>`, the names a multi-node training run rendezvouses by.

On the local cluster the records come from CoreDNS (built from its Go module; tests/localcluster/
up.sh starts it) whose kubernetes plugin reads the EndpointSlices the controller manager fills from
the pods' IPs and hostnames, and the pods run on the real node (tests/localcluster/node.sh), whose
kubelet gives each the hostname, /etc/hosts and /etc/resolv.conf. Peers are found through DNS
alone, and a name outside the cluster does not resolve: nothing is forwarded off this machine.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.cluster import harness
from tests.cluster.harness import Cluster
from tests.cluster.real_node import Placement

pytestmark = pytest.mark.cluster

JOB = "ranks"
SERVICE = "ranks-svc"
PORT = 29500
DOMAIN = "cluster.local"

RANK = r"""
import json, os, socket, sys, threading, time

index = int(os.environ["JOB_COMPLETION_INDEX"])
port = int(os.environ["PORT"])
peer = f"{os.environ['JOB']}-{1 - index}.{os.environ['SERVICE']}"
deadline = time.monotonic() + 90
me = socket.gethostname()
report = {"hostname": me, "HOSTNAME": os.environ.get("HOSTNAME"), "peer": peer}


def lookup(name):
    try:
        return sorted({info[4][0] for info in socket.getaddrinfo(name, None, socket.AF_INET)})
    except socket.gaierror as error:
        return error.errno


def serve(server):  # the peer's connection: its name in, ours back
    conn, (address, _) = server.accept()
    with conn:
        report["accepted_from"] = address
        report["accepted_says"] = conn.recv(256).decode()
        conn.sendall(me.encode())


try:
    with open("/etc/resolv.conf") as f:
        report["resolv.conf"] = f.read()
    report["fqdn"] = socket.getfqdn()
    server = socket.create_server(("", port))
    server.settimeout(90)
    thread = threading.Thread(target=serve, args=(server,))
    thread.start()
    while isinstance(resolved := lookup(peer), int):  # until the peer's record is published
        assert time.monotonic() < deadline, f"{peer} did not resolve: {resolved}"
        time.sleep(0.2)
    report["resolved"] = resolved
    while "peer_says" not in report:
        try:
            with socket.create_connection((resolved[0], port), timeout=5) as conn:
                conn.sendall(me.encode())
                report["peer_says"] = conn.recv(256).decode()
        except OSError:  # the peer does not listen yet
            assert time.monotonic() < deadline, f"could not connect to {peer} at {resolved}"
            time.sleep(0.2)
    thread.join()
    report["kubernetes"] = lookup("kubernetes.default.svc.cluster.local")
    report["kubernetes.default"] = lookup("kubernetes.default")
    report["kube-dns"] = lookup("kube-dns.kube-system")
    report["outside"] = lookup("example.com")
    code = 0
except BaseException as error:
    report["error"] = repr(error)
    code = 1
with open("/dev/termination-log", "w") as f:
    json.dump(report, f)
print(json.dumps(report))
sys.exit(code)
"""


@dataclass
class Ranks:
    namespace: str
    pods: dict[int, dict[str, Any]]
    """Completion index → the pod."""
    reports: dict[int, dict[str, Any]]
    """Completion index → what the pod found (its termination message)."""

    def ip(self, index: int) -> str:
        return str(self.pods[index]["status"]["podIP"])


def job(namespace: str, placement: Placement) -> dict[str, Any]:
    pod_spec: dict[str, Any] = {
        "subdomain": SERVICE,
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "containers": [
            {
                "name": "rank",
                "image": placement.trainer_image,
                "command": ["python", "-c", RANK],
                "env": [
                    {"name": "JOB", "value": JOB},
                    {"name": "SERVICE", "value": SERVICE},
                    {"name": "PORT", "value": str(PORT)},
                ],
            }
        ],
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": JOB, "namespace": namespace},
        "spec": {
            "completionMode": "Indexed",
            "completions": 2,
            "parallelism": 2,
            "backoffLimit": 0,
            "template": {"spec": placement.pod(pod_spec)},
        },
    }


def headless_service(namespace: str) -> dict[str, Any]:
    """What a multi-node training run publishes its pods with."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": SERVICE, "namespace": namespace},
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {"batch.kubernetes.io/job-name": JOB},
            "ports": [{"name": "rendezvous", "port": PORT}],
        },
    }


def finished(cluster: Cluster, namespace: str) -> str | None:
    status = (cluster.get("job", JOB, namespace) or {}).get("status", {})
    for condition in status.get("conditions", []):
        if condition["type"] in ("Complete", "Failed") and condition["status"] == "True":
            return str(condition["type"])
    return None


@pytest.fixture(scope="module")
def ranks(cluster: Cluster, placement: Placement) -> Iterator[Ranks]:
    """Two ranks of an Indexed Job behind a headless Service, each of which resolves the other as
    `<job>-<index>.<service>`, connects to it, and reports what it found."""
    if cluster.local and not harness.cluster_dns(cluster):
        pytest.skip("the local cluster runs no DNS (DEEPTUNE_CLUSTER_DNS=off, or up.sh was not run as root)")
    namespace = f"t-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", namespace)
    try:
        cluster.apply(headless_service(namespace))
        cluster.apply(job(namespace, placement))
        outcome = harness.wait_for("the Job to finish", lambda: finished(cluster, namespace), timeout=180)
        pods = {
            int(pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]): pod
            for pod in cluster.list("pods", namespace, f"batch.kubernetes.io/job-name={JOB}")
        }
        reports = {}
        for index, pod in pods.items():
            terminated = pod["status"]["containerStatuses"][0]["state"].get("terminated", {})
            reports[index] = json.loads(terminated.get("message") or "{}")
        assert outcome == "Complete", f"the Job failed; the pods found: {reports}"
        assert sorted(pods) == [0, 1]
        yield Ranks(namespace, pods, reports)
    finally:
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def test_ranks_resolve_each_other_by_hostname_and_subdomain_and_connect(ranks: Ranks) -> None:
    for index in (0, 1):
        peer = 1 - index
        report = ranks.reports[index]
        assert ranks.pods[index]["status"]["phase"] == "Succeeded"
        assert report["peer"] == f"{JOB}-{peer}.{SERVICE}"
        assert report["resolved"] == [ranks.ip(peer)], report
        # Over the pod network, straight from the peer's address.
        assert report["peer_says"] == f"{JOB}-{peer}"
        assert report["accepted_from"] == ranks.ip(peer)
        assert report["accepted_says"] == f"{JOB}-{peer}"


def test_pods_get_the_hostname_hosts_and_resolv_conf_a_kubelet_gives(cluster: Cluster, ranks: Ranks) -> None:
    dns = harness.cluster_dns(cluster) if cluster.local else {}
    for index in (0, 1):
        report = ranks.reports[index]
        # spec.hostname (the Job controller's `<job>-<index>`), not the pod's name.
        assert report["hostname"] == report["HOSTNAME"] == f"{JOB}-{index}"
        assert ranks.pods[index]["metadata"]["name"] != f"{JOB}-{index}"
        # /etc/hosts names the pod under its subdomain.
        assert report["fqdn"] == f"{JOB}-{index}.{SERVICE}.{ranks.namespace}.svc.{DOMAIN}"
        lines = report["resolv.conf"].splitlines()
        assert f"search {ranks.namespace}.svc.{DOMAIN} svc.{DOMAIN} {DOMAIN}" in lines
        assert "options ndots:5" in lines
        if dns:
            assert [line for line in lines if line.startswith("nameserver")] == [
                f"nameserver {dns['CLUSTER_DNS']}"
            ]


def test_services_resolve_to_their_cluster_ips(cluster: Cluster, ranks: Ranks) -> None:
    service = cluster.get("service", "kubernetes", "default")
    assert service is not None
    cluster_ip = service["spec"]["clusterIP"]
    for report in ranks.reports.values():
        assert report["kubernetes"] == [cluster_ip]
        assert report["kubernetes.default"] == [cluster_ip]  # through the search list
        # kube-dns's ClusterIP is the nameserver the pods were given.
        nameservers = [
            line.split()[1] for line in report["resolv.conf"].splitlines() if line.startswith("nameserver")
        ]
        assert report["kube-dns"] == nameservers


def query(server: str, name: str, qtype: str = "A") -> str:
    """Ask `server` about `name` with tests/localcluster/dns_query.py: `RCODE [DATA...]`."""
    command = [sys.executable, str(harness.LOCALCLUSTER / "dns_query.py"), server, name, qtype]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode in (0, 1), result.stderr  # 2: no answer at all
    return result.stdout.strip()


def test_names_outside_the_cluster_do_not_resolve(cluster: Cluster, ranks: Ranks) -> None:
    if not cluster.local:
        pytest.skip("another cluster's DNS may forward names outside it")
    for report in ranks.reports.values():
        assert report["outside"] == socket.EAI_NONAME  # an answer (NXDOMAIN), not a timeout
    # What CoreDNS answers, asked from this machine: NXDOMAIN, at once, for anything not the cluster's.
    server = harness.cluster_dns(cluster)["CLUSTER_DNS"]
    assert query(server, "example.com") == "NXDOMAIN"
    assert query(server, "example.com", "AAAA") == "NXDOMAIN"
    assert query(server, "8.8.8.8.in-addr.arpa", "PTR") == "NXDOMAIN"
    assert query(server, "localhost") == "NXDOMAIN"
    # The cluster's own names resolve, forward and reverse.
    cluster_ip = (cluster.get("service", "kubernetes", "default") or {})["spec"]["clusterIP"]
    assert query(server, f"kubernetes.default.svc.{DOMAIN}") == f"NOERROR {cluster_ip}"
    reverse = ".".join(reversed(cluster_ip.split("."))) + ".in-addr.arpa"
    assert query(server, reverse, "PTR") == f"NOERROR kubernetes.default.svc.{DOMAIN}."


def test_the_service_range_does_not_leave_this_machine(cluster: Cluster, ranks: Ranks) -> None:
    """From this machine, a ClusterIP leads only to what a Service proxies (kube-proxy on the real
    node) and never off the machine through the default route: under it lies up.sh's blackhole
    route, and the kubernetes Service (which has no endpoints here) is refused at once."""
    if not cluster.local:
        pytest.skip("the local cluster's routes")
    routes = subprocess.run(
        ["ip", "route", "show", "type", "blackhole"], check=True, capture_output=True, text=True
    )
    assert "blackhole 10.96.0.0/16" in [line.strip() for line in routes.stdout.splitlines()]
    try:
        socket.create_connection(("10.96.0.1", 443), timeout=5).close()
    except TimeoutError:
        pytest.fail("a connection to a ClusterIP went looking for a route instead of failing at once")
    except OSError:
        pass  # refused on the spot: the blackhole route
    else:
        pytest.fail("a connection to the kubernetes Service's ClusterIP was answered")
