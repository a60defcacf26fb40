"""The test node agent: TEST INFRASTRUCTURE standing in for the kubelet and a container runtime.

This machine has no container runtime, so kind cannot run here. The local control plane
(tests/localcluster) is real — API server, scheduler, controllers — and this agent is the only
stand-in: it registers a Node (with `nvidia.com/gpu` capacity, so GPU requests schedule), watches the
pods bound to it and runs each container's command as a local process:

- Images map to environments on this machine (`ImageMap`): the trainer image to the project's
  Python environment, the Triton image to the `tritonserver` binary from the nvidia-pytriton wheel
  (with the wheel's backends and caches mounted where Triton's image keeps them).
  An unknown image leaves the pod waiting in `ErrImagePull`, as a registry without it would.
- Each pod gets its own network namespace with an address on a bridge (its pod IP), and its own
  mount namespace where volumes appear at their mount paths: a PVC as the directory of its bound
  hostPath PersistentVolume, a ConfigMap or Secret as files, an emptyDir as a fresh directory.
- DNS as a kubelet sets it up: the pod's own UTS namespace with its hostname (`spec.hostname` or
  the pod's name), a managed `/etc/hosts` that names it (with its `subdomain`'s FQDN), and for
  dnsPolicy ClusterFirst an `/etc/resolv.conf` that points at the cluster DNS (`--cluster-dns`:
  the CoreDNS that tests/localcluster/up.sh starts) with the namespace's search list and ndots:5.
- It reports phase, container states, exit codes and termination messages to the pod status, and
  stops the processes of deleted pods. Users of real clusters never meet it.
- A pod left Running by an agent that is gone (a node lost and back, as after a reboot) has what is
  left of its processes killed and is reported Failed: `ContainerStatusUnknown`, exit code 137, as a
  kubelet reports a container it cannot find.
- HTTP readiness probes decide the container's `ready` (the first answer counts, no thresholds); a
  container with restartPolicy Always (or OnFailure, after a failure) is restarted with the kubelet's
  back-off, waiting in `CrashLoopBackOff` with its last termination in `lastState` meanwhile.

Not done (a real kubelet does these): image pulls, resource limits and OOM kills, liveness and
startup probes, user switching (processes run as this agent's user).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import fnmatch
import ipaddress
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from tests.serving.wheel_server import SERVING_PACKAGE_ROOT, install, serving_environment

LOG = logging.getLogger("node-agent")
BRIDGE = "dtbr0"
POD_CIDR = ipaddress.ip_network("10.244.0.0/16")
GATEWAY = ipaddress.ip_address("10.244.0.1")
GATEWAY_CIDR = f"{GATEWAY}/{POD_CIDR.prefixlen}"
BLOCK_LOCKS = Path("/run/lock/deeptune-pod-blocks")
"""Lock files, one per /24 of POD_CIDR, that the agents on this machine hold while they run."""
LOG_TAIL_BYTES = 2048
MESSAGE_LIMIT = 4096
BACKOFF_START = 10.0
BACKOFF_LIMIT = 300.0
"""The kubelet's restart back-off: 10 s, doubling, at most five minutes."""
STATUS_RETRY = 2.0
"""Seconds between tries to report a pod's status while the API server is unreachable."""


_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def _bytes(quantity: str) -> int:
    """A Kubernetes quantity (`256Mi`, `1G`, `1024`) in bytes, for tmpfs sizes."""
    for unit, factor in _UNITS.items():
        if quantity.endswith(unit):
            return int(float(quantity[: -len(unit)]) * factor)
    return int(float(quantity))


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class ImageEnvironment:
    """What an image means on this machine: directories put first on PATH, PYTHONPATH and so on, and
    directories of the image's filesystem (path in the container → directory here), bind-mounted
    read-only at their image paths (the mount points are created here if missing)."""

    path: tuple[str, ...] = ()
    extra_env: dict[str, str] = field(default_factory=dict)
    mounts: dict[str, str] = field(default_factory=dict)


class ImageMap:
    """Image patterns (fnmatch) to local environments, first match wins."""

    def __init__(self, entries: list[tuple[str, ImageEnvironment]]) -> None:
        self.entries = entries

    def resolve(self, image: str) -> ImageEnvironment | None:
        return next((env for pattern, env in self.entries if fnmatch.fnmatch(image, pattern)), None)


def _answers(url: str, timeout: float) -> bool:
    """Whether an HTTP probe succeeds (a 2xx or 3xx answer), as the kubelet judges it."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return bool(200 <= response.status < 400)
    except (urllib.error.URLError, OSError):
        return False


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True)


def _claim_block(first: int) -> tuple[int, IO[str]]:
    """A /24 block of the pod CIDR (1-254) that no other live agent on this machine holds, trying
    `first` first: held by an exclusive lock on a file in BLOCK_LOCKS until this process exits."""
    BLOCK_LOCKS.mkdir(parents=True, exist_ok=True)
    for offset in range(254):
        block = (first - 1 + offset) % 254 + 1
        handle = (BLOCK_LOCKS / f"{block}.lock").open("w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        return block, handle
    raise RuntimeError(f"all 254 pod address blocks are held by other agents ({BLOCK_LOCKS})")


class PodNetwork:
    """One network namespace per pod, joined to a host bridge by a veth pair (a minimal CNI)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._used: set[ipaddress.IPv4Address] = set()
        # Each agent takes its own /24 of the bridge's /16, so two clusters on one machine (each
        # with its agent) never hand out the same pod IP. Starting from one the pid picks, so an
        # agent started again (a node lost and back) takes another than its predecessor's, whose
        # pods may not all be gone yet.
        block, self._block_lock = _claim_block(os.getpid() % 254 + 1)
        self._subnet = ipaddress.ip_network(f"{POD_CIDR.network_address + block * 256}/24")
        if _run("ip", "link", "show", BRIDGE, check=False).returncode != 0:
            # Another agent may be making it at the same moment: whoever wins, it must exist after.
            _run("ip", "link", "add", BRIDGE, "type", "bridge", check=False)
            _run("ip", "link", "show", BRIDGE)
        if GATEWAY_CIDR not in _run("ip", "-o", "addr", "show", "dev", BRIDGE).stdout:
            _run("ip", "addr", "add", GATEWAY_CIDR, "dev", BRIDGE, check=False)
        _run("ip", "link", "set", BRIDGE, "up")

    def _allocate(self) -> ipaddress.IPv4Address:
        with self._lock:
            for address in self._subnet.hosts():
                if address not in self._used:
                    self._used.add(address)  # type: ignore[arg-type]
                    return address  # type: ignore[return-value]
        raise RuntimeError("pod CIDR exhausted")

    def create(self, key: str) -> tuple[str, str]:
        """A namespace named after the pod, with its address; returns (namespace, ip)."""
        address = self._allocate()
        netns, host_if = f"dt-{key}", f"vdt{key[:10]}"
        self.delete(netns, None)
        _run("ip", "netns", "add", netns)
        _run("ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _run("ip", "link", "set", host_if, "master", BRIDGE, "up")
        _run("ip", "-n", netns, "addr", "add", f"{address}/{POD_CIDR.prefixlen}", "dev", "eth0")
        _run("ip", "-n", netns, "link", "set", "eth0", "up")
        _run("ip", "-n", netns, "link", "set", "lo", "up")
        _run("ip", "-n", netns, "route", "add", "default", "via", str(GATEWAY))
        return netns, str(address)

    def delete(self, netns: str, ip: str | None) -> None:
        _run("ip", "netns", "del", netns, check=False)
        if ip:
            with self._lock:
                self._used.discard(ipaddress.ip_address(ip))  # type: ignore[arg-type]


def pod_hostname(pod: Any, cluster_domain: str) -> tuple[str, str | None]:
    """The pod's hostname and domain as the kubelet derives them: `spec.hostname` or the pod's name
    (cut to 63 characters), and `<subdomain>.<namespace>.svc.<cluster domain>` when the pod has a
    `spec.subdomain` (what a headless Service of that name publishes it under), else None."""
    hostname = pod.spec.hostname or pod.metadata.name
    if len(hostname) > 63:
        hostname = hostname[:63].rstrip("-.")
    subdomain = pod.spec.subdomain
    domain = f"{subdomain}.{pod.metadata.namespace}.svc.{cluster_domain}" if subdomain else None
    return hostname, domain


def hosts_file(pod: Any, ip: str, cluster_domain: str) -> str:
    """The kubelet's managed /etc/hosts: localhost, the pod's own name (and FQDN) at its IP, and
    `spec.hostAliases`."""
    hostname, domain = pod_hostname(pod, cluster_domain)
    names = f"{hostname}.{domain}\t{hostname}" if domain else hostname
    lines = [
        "# Kubernetes-managed hosts file.",
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        "fe00::0\tip6-localnet",
        "fe00::0\tip6-mcastprefix",
        "fe00::1\tip6-allnodes",
        "fe00::2\tip6-allrouters",
        f"{ip}\t{names}",
    ]
    aliases = pod.spec.host_aliases or []
    if aliases:
        lines += ["", "# Entries added by HostAliases."]
        lines += ["\t".join([alias.ip, *(alias.hostnames or [])]) for alias in aliases]
    return "\n".join(lines) + "\n"


def _host_resolver(
    path: Path = Path("/etc/resolv.conf"),
) -> tuple[list[str], list[str], dict[str, str | None]]:
    """Nameservers, search domains and options of this machine's resolv.conf."""
    servers: list[str] = []
    searches: list[str] = []
    options: dict[str, str | None] = {}
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            words = line.split("#", 1)[0].split()
            if len(words) > 1 and words[0] == "nameserver":
                servers.append(words[1])
            elif words and words[0] in ("search", "domain"):
                searches = words[1:]
            elif words and words[0] == "options":
                for option in words[1:]:
                    name, _, value = option.partition(":")
                    options[name] = value or None
    return servers, searches, options


def resolv_conf(pod: Any, cluster_dns: str | None, cluster_domain: str) -> str | None:
    """The pod's /etc/resolv.conf as the kubelet writes it for its dnsPolicy and dnsConfig, or None
    where it is this machine's own (dnsPolicy Default without dnsConfig)."""
    policy = pod.spec.dns_policy or "ClusterFirst"
    config = pod.spec.dns_config
    if policy in ("ClusterFirst", "ClusterFirstWithHostNet") and not cluster_dns:
        policy = "Default"  # as the kubelet does with no --cluster-dns (it logs a warning)
    if policy == "Default" and config is None:
        return None
    servers: list[str]
    searches: list[str]
    options: dict[str, str | None]
    if policy == "None":
        servers, searches, options = [], [], {}
    elif policy == "Default":
        servers, searches, options = _host_resolver()
    else:
        namespace = pod.metadata.namespace
        servers = [str(cluster_dns)]
        searches = [f"{namespace}.svc.{cluster_domain}", f"svc.{cluster_domain}", cluster_domain]
        options = {"ndots": "5"}
    if config is not None:
        servers += [server for server in config.nameservers or [] if server not in servers]
        searches += [search for search in config.searches or [] if search not in searches]
        for option in config.options or []:
            options[option.name] = option.value
    lines = [f"nameserver {server}" for server in servers]
    if searches:
        lines.append("search " + " ".join(searches))
    if options:
        lines.append("options " + " ".join(k if v is None else f"{k}:{v}" for k, v in options.items()))
    return "\n".join(lines) + "\n"


def _pod_own_directories(targets: list[str]) -> list[str]:
    """The outermost directories above mount targets that this machine lacks or holds empty: on a
    node the runtime makes them in the container's own root filesystem, so a pod mounting
    /models/a never sees another pod's /models/b. Here the pod gets a tmpfs at each, where its mount
    points are made, instead of leaving them behind on this machine for the next pod to find."""
    own: set[Path] = set()
    for target in map(Path, targets):
        for directory in reversed(target.parents[:-1]):  # from the top: /models before /models/a
            if not directory.exists() or (directory.is_dir() and not any(directory.iterdir())):
                own.add(directory)
                break
    return sorted(str(directory) for directory in own)


def _hiding_mounts_last(mounts: list[Any], sources: dict[str, Path]) -> list[Any]:
    """Mounts over a directory that holds other mounts' sources (e.g. an emptyDir at /tmp while
    the sources live under /tmp) must come after those, or they would hide them."""

    def hides_a_source(mount: Any) -> bool:
        target = Path(mount.mount_path)
        return any(source.is_relative_to(target) for source in sources.values())

    return sorted(mounts, key=hides_a_source)


class PodRunner(threading.Thread):
    """Runs one pod's (single) container and reports its status, like a kubelet's pod worker."""

    def __init__(self, agent: NodeAgent, pod: Any) -> None:
        super().__init__(daemon=True, name=f"pod-{pod.metadata.name}")
        self.agent = agent
        self.pod = pod
        self.key = pod.metadata.uid.replace("-", "")[:12]
        self.dir = agent.state_dir / "pods" / f"{pod.metadata.namespace}_{pod.metadata.name}_{self.key}"
        self.process: subprocess.Popen[bytes] | None = None
        self.stopping = threading.Event()
        self.netns: str | None = None
        self.ip: str | None = None
        self.start_time: str | None = None
        hostname, domain = pod_hostname(pod, agent.cluster_domain)
        self.hostname = f"{hostname}.{domain}" if domain and pod.spec.set_hostname_as_fqdn else hostname
        """The pod's hostname (UTS namespace and HOSTNAME), as the kubelet sets it."""

    # --- status reporting -------------------------------------------------------------------

    def _patch_status(self, status: dict[str, Any]) -> None:
        """Report the pod's status; while the API server is unreachable, keep trying (as a kubelet
        keeps syncing), or a container that ends meanwhile would stay Running for good."""
        meta = self.pod.metadata
        while True:
            try:
                self.agent.core.patch_namespaced_pod_status(
                    meta.name, meta.namespace, {"status": status}, _request_timeout=(5, 30)
                )
                return
            except ApiException as error:
                if error.status != 404:
                    LOG.warning("status of %s/%s: %s", meta.namespace, meta.name, error.reason)
                return
            except (HTTPError, OSError) as error:
                LOG.warning("status of %s/%s: %s; retrying", meta.namespace, meta.name, error)
                if self.stopping.wait(STATUS_RETRY) or self.agent.stopped:
                    return

    def _conditions(self, ready: bool, reason: str | None = None) -> list[dict[str, Any]]:
        now = _now()
        extra = {"reason": reason} if reason else {}
        return [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
            {"type": "Initialized", "status": "True", "lastTransitionTime": now},
            {"type": "ContainersReady", "status": str(ready), "lastTransitionTime": now, **extra},
            {"type": "Ready", "status": str(ready), "lastTransitionTime": now, **extra},
        ]

    def _container(self) -> Any:
        return self.pod.spec.containers[0]

    def _container_status(
        self, state: dict[str, Any], ready: bool, restarts: int = 0, last: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        container = self._container()
        return [
            {
                "name": container.name,
                "image": container.image,
                "imageID": f"local://{container.image}",
                "ready": ready,
                "restartCount": restarts,
                "started": "running" in state,
                "state": state,
                "lastState": {"terminated": last} if last else {},
            }
        ]

    def _waiting(self, reason: str, message: str) -> None:
        self._patch_status(
            {
                "phase": "Pending",
                "conditions": self._conditions(False, "ContainersNotReady"),
                "containerStatuses": self._container_status(
                    {"waiting": {"reason": reason, "message": message}}, False
                ),
            }
        )

    # --- volumes and environment ----------------------------------------------------------------

    def _claim_dir(self, claim: str) -> Path:
        ns = self.pod.metadata.namespace
        pvc = self.agent.core.read_namespaced_persistent_volume_claim(claim, ns)
        if not pvc.spec.volume_name:
            raise LookupError(f"PersistentVolumeClaim {claim} is not bound")
        pv = self.agent.core.read_persistent_volume(pvc.spec.volume_name)
        source = pv.spec.host_path or pv.spec.local
        if source is None:
            raise LookupError(f"PersistentVolume {pv.metadata.name} is neither hostPath nor local")
        return Path(source.path)

    def _write_items(
        self, target: Path, data: dict[str, str] | None, items: list[Any] | None, binary: bool = False
    ) -> None:
        """Each key as a file named after it, or, when `items` are given, only those keys at their paths."""
        target.mkdir(parents=True, exist_ok=True)
        data = data or {}
        paths = {item.key: item.path for item in items} if items else {key: key for key in data}
        for key, relative in paths.items():
            path = target / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            if binary:
                import base64

                path.write_bytes(base64.b64decode(data[key]))
            else:
                path.write_text(data[key])

    def _volume_sources(self) -> dict[str, Path]:
        """Each pod volume as a host directory."""
        sources: dict[str, Path] = {}
        ns = self.pod.metadata.namespace
        for volume in self.pod.spec.volumes or []:
            target = self.dir / "volumes" / volume.name
            if volume.persistent_volume_claim:
                sources[volume.name] = self._claim_dir(volume.persistent_volume_claim.claim_name)
                continue
            if volume.config_map:
                cm = self.agent.core.read_namespaced_config_map(volume.config_map.name, ns)
                self._write_items(target, cm.data, volume.config_map.items)
            elif volume.secret:
                secret = self.agent.core.read_namespaced_secret(volume.secret.secret_name, ns)
                self._write_items(target, secret.data, volume.secret.items, binary=True)
            else:
                target.mkdir(parents=True, exist_ok=True)
            sources[volume.name] = target
        return sources

    def _env_value(self, var: Any) -> str:
        if var.value is not None:
            return str(var.value)
        source, ns = var.value_from, self.pod.metadata.namespace
        if source.field_ref is not None:
            path = source.field_ref.field_path
            keyed = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
            if keyed:  # e.g. the Job controller's JOB_COMPLETION_INDEX
                return str((getattr(self.pod.metadata, keyed[1]) or {}).get(keyed[2], ""))
            fields = {
                "metadata.name": self.pod.metadata.name,
                "metadata.namespace": ns,
                "metadata.uid": self.pod.metadata.uid,
                "spec.nodeName": self.agent.name,
                "spec.serviceAccountName": self.pod.spec.service_account_name or "",
                "status.podIP": self.ip or "",
                "status.hostIP": str(GATEWAY),
            }
            return fields[path]
        if source.secret_key_ref is not None:
            import base64

            ref = source.secret_key_ref
            secret = self.agent.core.read_namespaced_secret(ref.name, ns)
            return base64.b64decode(secret.data[ref.key]).decode()
        if source.config_map_key_ref is not None:
            ref = source.config_map_key_ref
            return str(self.agent.core.read_namespaced_config_map(ref.name, ns).data[ref.key])
        raise LookupError(f"unsupported env source for {var.name}")

    def _environment(self, image_env: ImageEnvironment) -> dict[str, str]:
        env = {
            "PATH": ":".join([*image_env.path, "/usr/local/bin", "/usr/bin", "/bin"]),
            "HOSTNAME": self.hostname,
            "LANG": "C.UTF-8",
            **image_env.extra_env,
        }
        for var in self._container().env or []:
            env[var.name] = self._env_value(var)
        return env

    def _launcher(
        self, sources: dict[str, Path], image_env: ImageEnvironment, env: dict[str, str], termination: Path
    ) -> list[str]:
        """The shell that builds the pod's mount and UTS namespaces and then execs the container
        command."""
        container = self._container()
        path = shlex.quote(container.termination_message_path or "/dev/termination-log")
        lines = [
            "set -e",
            "mount --make-rprivate /",
            f"touch {path} && mount --bind {shlex.quote(str(termination))} {path}",
            f"printf %s {shlex.quote(self.hostname)} > /proc/sys/kernel/hostname",
        ]
        for name, target in (("hosts", "/etc/hosts"), ("resolv.conf", "/etc/resolv.conf")):
            if (self.dir / name).exists():
                lines.append(f"mount --bind {shlex.quote(str(self.dir / name))} {target}")
        targets = [*image_env.mounts, *(mount.mount_path for mount in container.volume_mounts or [])]
        for directory in _pod_own_directories(targets):
            lines.append(f"mkdir -p {shlex.quote(directory)}")
            lines.append(f"mount -t tmpfs -o size=1m,mode=755 tmpfs {shlex.quote(directory)}")
        for target, source in image_env.mounts.items():
            lines.append(f"mkdir -p {shlex.quote(target)}")
            lines.append(f"mount -o bind,ro {shlex.quote(source)} {shlex.quote(target)}")
        for mount in _hiding_mounts_last(container.volume_mounts or [], sources):
            source = sources[mount.name]
            if mount.sub_path:
                source = source / mount.sub_path
            volume = next(v for v in self.pod.spec.volumes if v.name == mount.name)
            if volume.empty_dir is not None and volume.empty_dir.medium == "Memory":
                size = _bytes(volume.empty_dir.size_limit or "64Mi")
                lines.append(f"mkdir -p {shlex.quote(mount.mount_path)}")
                lines.append(f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(mount.mount_path)}")
                continue
            lines.append(f"mkdir -p {shlex.quote(mount.mount_path)}")
            options = "bind,ro" if mount.read_only else "bind"
            lines.append(f"mount -o {options} {shlex.quote(str(source))} {shlex.quote(mount.mount_path)}")
        if container.working_dir:
            lines.append(f"cd {shlex.quote(container.working_dir)}")
        argv = [*(container.command or []), *(container.args or [])]
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        lines.append(f"exec env -i {exports} {shlex.join(argv)}")
        script = "\n".join(lines) + "\n"
        (self.dir / "launch.sh").write_text(script)  # for a person debugging the agent
        assert self.netns is not None
        # Passed inline: a script file under a directory that a mount hides could not be read on.
        return ["ip", "netns", "exec", self.netns, "unshare", "--mount", "--uts", "--", "sh", "-c", script]

    # --- lifecycle --------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._run()
        except Exception as error:  # the agent must outlive any one pod
            LOG.exception("pod %s failed to run", self.pod.metadata.name)
            self._finish(self._terminated(128, "StartError", f"test node agent: {error}", None))
        finally:
            if self.netns:
                self.agent.network.delete(self.netns, self.ip)
            self.agent.forget(self.pod.metadata.uid)

    def _run(self) -> None:
        container = self._container()
        image_env = self.agent.images.resolve(container.image)
        if image_env is None:
            self._waiting("ErrImagePull", f"image {container.image!r} is not known to the test node agent")
            self.stopping.wait()
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "hostname").write_text(self.hostname)  # its processes' HOSTNAME, for down.sh
        self.netns, self.ip = self.agent.network.create(self.key)
        self._write_dns_files()
        sources = self._volume_sources()
        env = self._environment(image_env)
        restarts, last = 0, None
        while True:
            terminated = self._run_container(sources, image_env, env, restarts, last)
            if self.stopping.is_set():
                return
            if not self._restarts_after(terminated["exitCode"]):
                self._finish(terminated)
                return
            restarts, last = restarts + 1, terminated
            delay = min(BACKOFF_START * 2 ** (restarts - 1), BACKOFF_LIMIT)
            message = f"back-off {delay:.0f}s restarting failed container={container.name}"
            self._patch_status(
                {
                    "phase": "Running",
                    "conditions": self._conditions(False, "ContainersNotReady"),
                    "containerStatuses": self._container_status(
                        {"waiting": {"reason": "CrashLoopBackOff", "message": message}}, False, restarts, last
                    ),
                }
            )
            LOG.info("pod %s: %s", self.pod.metadata.name, message)
            if self.stopping.wait(delay):
                return

    def _write_dns_files(self) -> None:
        """The pod's /etc/hosts and /etc/resolv.conf (none where it keeps this machine's), which
        the launcher mounts over the machine's in the pod's mount namespace."""
        assert self.ip is not None
        (self.dir / "hosts").write_text(hosts_file(self.pod, self.ip, self.agent.cluster_domain))
        resolv = resolv_conf(self.pod, self.agent.cluster_dns, self.agent.cluster_domain)
        if resolv is None:
            (self.dir / "resolv.conf").unlink(missing_ok=True)
        else:
            (self.dir / "resolv.conf").write_text(resolv)

    def _restarts_after(self, code: int) -> bool:
        policy = self.pod.spec.restart_policy or "Always"
        return policy == "Always" or (policy == "OnFailure" and code != 0)

    def _run_container(
        self,
        sources: dict[str, Path],
        image_env: ImageEnvironment,
        env: dict[str, str],
        restarts: int,
        last: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """Run the container once, reporting it running (and ready, by its readiness probe); returns
        its termination state."""
        container = self._container()
        termination = self.dir / "termination-log"
        termination.write_text("")  # a fresh message for each run, as the kubelet gives
        command = self._launcher(sources, image_env, env, termination)
        log_path = self.dir / f"{container.name}.log"
        if log_path.exists():
            log_path.replace(self.dir / f"{container.name}.previous.log")
        started = _now()
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        (self.dir / "pid").write_text(str(self.process.pid))  # its process group, for a later agent
        if self.stopping.is_set():  # deleted while starting: stop() may have missed this process
            self.stop(0)
        ended = threading.Event()
        lock = threading.Lock()

        def report(ready: bool) -> None:
            with lock:
                if ended.is_set():
                    return
                self._patch_status(
                    {
                        "phase": "Running",
                        "hostIP": str(GATEWAY),
                        "podIP": self.ip,
                        "podIPs": [{"ip": self.ip}],
                        "startTime": self.start_time or started,
                        "conditions": self._conditions(ready, None if ready else "ContainersNotReady"),
                        "containerStatuses": self._container_status(
                            {"running": {"startedAt": started}}, ready, restarts, last
                        ),
                    }
                )

        self.start_time = self.start_time or started
        probe = container.readiness_probe
        report(ready=probe is None or probe.http_get is None)
        if probe is not None and probe.http_get is not None:
            threading.Thread(
                target=self._probe_readiness, args=(self.process, probe, report), daemon=True
            ).start()
        LOG.info("started %s/%s at %s", self.pod.metadata.namespace, self.pod.metadata.name, self.ip)
        code = self.process.wait()
        with lock:
            ended.set()
        message = termination.read_text(errors="replace")[:MESSAGE_LIMIT]
        policy = container.termination_message_policy or "File"
        if not message and code != 0 and policy == "FallbackToLogsOnError":
            message = log_path.read_bytes()[-LOG_TAIL_BYTES:].decode(errors="replace")
        return self._terminated(code, "Completed" if code == 0 else "Error", message, started)

    def _probe_readiness(self, process: subprocess.Popen[bytes], probe: Any, report: Any) -> None:
        """Poll an HTTP readiness probe while the process runs, reporting each change of readiness."""
        http = probe.http_get
        port = http.port
        if not str(port).isdigit():
            port = next(p.container_port for p in self._container().ports or [] if p.name == port)
        url = f"{(http.scheme or 'HTTP').lower()}://{self.ip}:{port}{http.path or '/'}"
        ready = False
        if self.stopping.wait(probe.initial_delay_seconds or 0):
            return
        while process.poll() is None:
            answered = _answers(url, float(probe.timeout_seconds or 1))
            if answered != ready:
                ready = answered
                report(ready)
            if self.stopping.wait(probe.period_seconds or 10):
                return

    @staticmethod
    def _terminated(code: int, reason: str, message: str, started: str | None) -> dict[str, Any]:
        if code < 0:  # killed by a signal, reported the way container runtimes do
            code = 128 - code
        finished = _now()
        return {
            "exitCode": code,
            "reason": reason,
            "message": message,
            "startedAt": started or finished,
            "finishedAt": finished,
        }

    def _finish(self, terminated: dict[str, Any]) -> None:
        phase = "Succeeded" if terminated["exitCode"] == 0 else "Failed"
        self._patch_status(
            {
                "phase": phase,
                "conditions": self._conditions(False, "PodCompleted"),
                "containerStatuses": self._container_status({"terminated": terminated}, False),
            }
        )
        LOG.info("pod %s ended: %s (exit %d)", self.pod.metadata.name, phase, terminated["exitCode"])

    def lost(self) -> None:
        """The pod ran under an agent that is gone (a node lost and back, as after a reboot): kill
        what is left of its container and report it as a kubelet reports a container it cannot find."""
        with contextlib.suppress(OSError, ValueError):
            group = int((self.dir / "pid").read_text())
            environ = Path(f"/proc/{group}/environ").read_bytes().split(b"\0")
            if f"HOSTNAME={self.hostname}".encode() in environ:  # not a recycled pid
                os.killpg(group, signal.SIGKILL)
        self.agent.network.delete(f"dt-{self.key}", None)
        message = "The container could not be located when the pod was terminated"
        self._finish(self._terminated(137, "ContainerStatusUnknown", message, None))

    def stop(self, grace: float) -> None:
        """SIGTERM the container's process group, SIGKILL after the grace period."""
        self.stopping.set()
        process = self.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


class NodeAgent:
    """Registers the Node, keeps its Lease fresh, and runs the pods bound to it."""

    def __init__(
        self,
        api: client.ApiClient,
        *,
        name: str,
        state_dir: Path,
        images: ImageMap,
        capacity: dict[str, str],
        max_grace: float = 10.0,
        cluster_dns: str | None = None,
        cluster_domain: str = "cluster.local",
    ) -> None:
        self.core = client.CoreV1Api(api)
        self.coordination = client.CoordinationV1Api(api)
        self.name = name
        self.state_dir = state_dir
        self.images = images
        self.capacity = capacity
        self.max_grace = max_grace
        self.cluster_dns = cluster_dns
        """The cluster DNS server's address (the kubelet's --cluster-dns); None: pods keep this
        machine's resolv.conf."""
        self.cluster_domain = cluster_domain
        self.network = PodNetwork()
        self.runners: dict[str, PodRunner] = {}
        self.started: set[str] = set()
        """Uids of the pods this agent has run: a Running pod not among them ran under a lost agent."""
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def _node_status(self) -> dict[str, Any]:
        now = _now()
        return {
            "capacity": self.capacity,
            "allocatable": self.capacity,
            "addresses": [
                {"type": "InternalIP", "address": str(GATEWAY)},
                {"type": "Hostname", "address": self.name},
            ],
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "TestNodeAgentReady",
                    "message": "the DeepTune test node agent is running pods",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }
            ],
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "kubeletVersion": "v0.0.0-deeptune-test-node-agent",
                "kubeProxyVersion": "",
                "containerRuntimeVersion": "deeptune-test-node-agent://0",
                "bootID": "",
                "kernelVersion": os.uname().release,
                "machineID": "",
                "osImage": "local processes",
                "systemUUID": "",
            },
        }

    def register(self) -> None:
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.name,
                "labels": {
                    "kubernetes.io/hostname": self.name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "deeptune.dev/test-node-agent": "true",
                },
            },
        }
        with contextlib.suppress(ApiException):
            self.core.create_node(node)
        self.core.patch_node_status(self.name, {"status": self._node_status()})
        self._renew_lease()

    def _renew_lease(self) -> None:
        node = self.core.read_node(self.name)
        lease = {
            "metadata": {
                "name": self.name,
                "namespace": "kube-node-lease",
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "Node", "name": self.name, "uid": node.metadata.uid}
                ],
            },
            "spec": {
                "holderIdentity": self.name,
                "leaseDurationSeconds": 40,
                "renewTime": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            },
        }
        try:
            self.coordination.patch_namespaced_lease(self.name, "kube-node-lease", lease)
        except ApiException as error:
            if error.status != 404:
                raise
            self.coordination.create_namespaced_lease("kube-node-lease", lease)

    def heartbeat(self, interval: float = 10.0) -> None:
        while not self._stop.wait(interval):
            try:
                self._renew_lease()
                self.core.patch_node_status(self.name, {"status": self._node_status()})
            except Exception:  # a restarted API server must not end the heartbeat
                LOG.warning("heartbeat failed", exc_info=True)

    def forget(self, uid: str) -> None:
        with self._lock:
            self.runners.pop(uid, None)

    def _handle(self, pod: Any) -> None:
        uid = pod.metadata.uid
        with self._lock:
            runner = self.runners.get(uid)
        if pod.metadata.deletion_timestamp is not None:
            grace = min(float(pod.spec.termination_grace_period_seconds or 30), self.max_grace)
            if runner is not None:
                runner.stop(grace)
            with contextlib.suppress(ApiException):
                self.core.delete_namespaced_pod(
                    pod.metadata.name,
                    pod.metadata.namespace,
                    grace_period_seconds=0,
                    body=client.V1DeleteOptions(grace_period_seconds=0, preconditions={"uid": uid}),
                )
            return
        if runner is None and pod.status.phase in (None, "Pending"):
            runner = PodRunner(self, pod)
            with self._lock:
                self.runners[uid] = runner
                self.started.add(uid)
            runner.start()
        elif pod.status.phase == "Running" and uid not in self.started:
            with self._lock:
                self.started.add(uid)
            PodRunner(self, pod).lost()

    def serve(self) -> None:
        """Watch this node's pods until stopped, re-listing after API server restarts."""
        threading.Thread(target=self.heartbeat, daemon=True, name="heartbeat").start()
        selector = f"spec.nodeName={self.name}"
        while not self._stop.is_set():
            try:
                for event in watch.Watch().stream(
                    self.core.list_pod_for_all_namespaces, field_selector=selector, timeout_seconds=60
                ):
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self._handle(event["object"])
            except Exception:
                LOG.warning("pod watch interrupted; retrying", exc_info=True)
                time.sleep(1)

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def shutdown(self) -> None:
        """Stop every pod's processes and remove their network namespaces (the process exits right
        after, before the runner threads could)."""
        self._stop.set()
        for runner in list(self.runners.values()):
            runner.stop(1.0)
            if runner.netns:
                self.network.delete(runner.netns, runner.ip)


TRITON_IMAGES = ("*tritonserver*", "*deeptune/serving*")
"""NVIDIA's Triton images (nvcr.io/nvidia/tritonserver:<release>-py3) and DeepTune's serving image
built on them."""
TRITON_ENV_KEYS = (
    "LD_LIBRARY_PATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "TOKENIZERS_PARALLELISM",
    "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
)  # fmt: skip
SERVING_PACKAGE_PATH = "/opt/deeptune/serving"
"""The directory that holds `deeptune_serving` in the serving image."""
SERVING_ENV_PATH = "/opt/deeptune/serving-env"
"""Where pods see the serving environment (fixed: a pod's /tmp emptyDir must not hide it)."""


def triton_environment(work_dir: Path, venv: Path) -> ImageEnvironment | None:
    """The nvidia-pytriton wheel's Triton as Triton's image: `tritonserver` on PATH (after the
    environment's `bin`, whose `python3` the backend stub finds its packages with), the environment
    tests/serving/wheel_server.py prepares (library path, thread counts; no PYTHONPATH), the Python
    backend and caches mounted at /opt/tritonserver, where the image has them and where `tritonserver`
    looks by default, and this checkout's serving package where the image has it, in a serving
    environment of its own. None when the serving extra is not installed."""
    try:
        triton = install(work_dir)
    except ImportError:  # no pytriton in this environment
        return None
    serving_env = serving_environment(work_dir / "serving-env", SERVING_PACKAGE_PATH).parent
    return ImageEnvironment(
        path=(f"{SERVING_ENV_PATH}/bin", str(venv / "bin"), str(triton.executable.parent)),
        extra_env={key: triton.env[key] for key in TRITON_ENV_KEYS if key in triton.env},
        mounts={
            "/opt/tritonserver/backends": str(triton.backend_directory),
            "/opt/tritonserver/caches": str(triton.cache_directory),
            SERVING_PACKAGE_PATH: str(SERVING_PACKAGE_ROOT),
            SERVING_ENV_PATH: str(serving_env),
        },
    )


def default_images(project_root: Path, venv: Path, triton: ImageEnvironment | None) -> ImageMap:
    """The images DeepTune's pods use, mapped to this machine's environments."""
    # The project and its environment appear at fixed paths, as in the real image: wherever the
    # checkout lives (CI clones under /tmp), a pod's own /tmp emptyDir must not hide the code.
    src, env = "/opt/deeptune/src", "/opt/deeptune/venv"
    python_env = ImageEnvironment(
        path=(f"{env}/bin",),
        extra_env={
            "PYTHONPATH": f"{src}/operator:{src}/trainer-image",
            "VIRTUAL_ENV": env,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        },
        mounts={src: str(project_root), env: str(venv)},
    )
    entries = [("*deeptune/trainer*", python_env), ("*deeptune/operator*", python_env)]
    if triton is not None:
        entries += [(pattern, triton) for pattern in TRITON_IMAGES]
    return ImageMap(entries)


def main() -> None:
    parser = argparse.ArgumentParser(description="DeepTune test node agent (test infrastructure)")
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--name", default="deeptune-test-node")
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--gpus", default="4")
    parser.add_argument(
        "--cluster-dns",
        help="the cluster DNS server's address, for pods with dnsPolicy ClusterFirst (the kubelet's "
        "--cluster-dns; tests/localcluster/up.sh writes CoreDNS's to cluster-dns.env); without it "
        "pods keep this machine's resolv.conf",
    )
    parser.add_argument("--cluster-domain", default="cluster.local")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api = config.new_client_from_config(args.kubeconfig)
    root = Path(__file__).resolve().parents[2]
    venv = Path(
        os.environ.get("VIRTUAL_ENV", Path(shutil.which("python") or "python").resolve().parent.parent)
    )
    agent = NodeAgent(
        api,
        name=args.name,
        state_dir=args.state_dir,
        images=default_images(root, venv, triton_environment(args.state_dir / "triton", venv)),
        capacity={
            "cpu": "16",
            "memory": "64Gi",
            "pods": "110",
            "nvidia.com/gpu": args.gpus,
            "ephemeral-storage": "100Gi",
        },
        cluster_dns=args.cluster_dns,
        cluster_domain=args.cluster_domain,
    )
    LOG.info("cluster DNS: %s", args.cluster_dns or "none (pods keep this machine's resolv.conf)")
    agent.register()

    def stop(*_: object) -> None:
        agent.shutdown()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    agent.serve()


if __name__ == "__main__":
    main()
