"""Idempotent creation of child objects through the Kubernetes API."""

from __future__ import annotations

import json
from typing import Any

import kopf
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from deeptune.builders.common import Manifest

_CREATE: dict[tuple[str, str], Any] = {
    ("v1", "ConfigMap"): lambda body, ns, **kw: client.CoreV1Api().create_namespaced_config_map(
        ns, body, **kw
    ),
    ("batch/v1", "Job"): lambda body, ns, **kw: client.BatchV1Api().create_namespaced_job(ns, body, **kw),
}
_READ: dict[tuple[str, str], Any] = {
    ("v1", "ConfigMap"): lambda name, ns: client.CoreV1Api().read_namespaced_config_map(name, ns),
    ("batch/v1", "Job"): lambda name, ns: client.BatchV1Api().read_namespaced_job(name, ns),
}


def load_credentials() -> None:
    """In-cluster credentials when running in a pod, else the user's kubeconfig."""
    from kubernetes import config  # noqa: PLC0415 - only the operator process needs it

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    # One client for the process: every `client.XxxApi()` then shares its connection pool. Without a
    # default, each of them builds a client of its own and opens (TLS handshake and all) a new
    # connection for every single request.
    client.ApiClient.set_default(client.ApiClient())


def _owner_uids(obj: Any) -> set[str]:
    return {ref.uid for ref in (obj.metadata.owner_references or [])}


def ensure(manifest: Manifest) -> bool:
    """Create the object unless it exists already; True when this call created it.

    An existing object with the same name must belong to the same owner: one left behind by a
    deleted resource of the same name is still being garbage-collected, so wait and retry.
    """
    key = (manifest["apiVersion"], manifest["kind"])
    meta = manifest["metadata"]
    try:
        _CREATE[key](manifest, meta["namespace"])
        return True
    except ApiException as error:
        if error.status != 409:
            raise
    existing = _READ[key](meta["name"], meta["namespace"])
    wanted = {ref["uid"] for ref in meta.get("ownerReferences", [])}
    if wanted and not wanted & _owner_uids(existing):
        if existing.metadata.deletion_timestamp or existing.metadata.owner_references:
            raise kopf.TemporaryError(
                f"{manifest['kind']} {meta['name']} still belongs to a deleted owner; waiting for it to go",
                delay=5,
            )
        raise kopf.PermanentError(
            f"{manifest['kind']} {meta['name']} already exists and is not ours: rename the resource"
            " or delete that object"
        )
    return False


def check_admissible(manifest: Manifest) -> None:
    """Raise the API server's refusal (422) of an object it would not create, creating nothing: a
    server-side dry run. An object that exists already passes."""
    try:
        _CREATE[(manifest["apiVersion"], manifest["kind"])](
            manifest, manifest["metadata"]["namespace"], dry_run="All"
        )
    except ApiException as error:
        if error.status != 409:
            raise


def patch_job_spec(name: str, namespace: str, job_spec: Manifest) -> None:
    """Merge-patch the mutable parts of a Job's spec (suspend, deadlines, TTL)."""
    client.BatchV1Api().patch_namespaced_job(name, namespace, {"spec": job_spec})


def rejection(error: ApiException) -> str:
    """The API server's own words for a rejected object (its Status message), else the reason."""
    try:
        return str(json.loads(error.body or "{}").get("message") or error.reason)
    except ValueError:
        return str(error.reason)
