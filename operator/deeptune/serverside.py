"""Server-side apply of child objects whose content follows a spec that can change.

`kube.ensure` creates once and never touches the object again, right for a trainer Job whose spec is
fixed with the run. A serving Deployment must follow every spec change, so its children are applied
with server-side apply: the operator's field manager owns what it sets, fields it stops setting are
removed, and fields that others own (an HPA's `replicas`) are left alone.

Like `ensure`, an existing object of the same name must belong to the same owner first.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import kopf
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from deeptune.builders.common import Manifest

FIELD_MANAGER = "deeptune-operator"
Outcome = Literal["created", "updated", "unchanged"]


@dataclass(frozen=True)
class _Kind:
    """Read and (for optional children) delete one kind; clients are made per call, once the
    credentials are loaded. Applies go through `_apply_patch`, the same for every kind."""

    plural: str
    read: Callable[[str, str], Any]
    delete: Callable[[str, str], Any] | None = None


def _custom(group: str, version: str, plural: str) -> _Kind:
    def api() -> client.CustomObjectsApi:
        return client.CustomObjectsApi()

    return _Kind(
        plural=plural,
        read=lambda name, ns: api().get_namespaced_custom_object(group, version, ns, plural, name),
        delete=lambda name, ns: api().delete_namespaced_custom_object(group, version, ns, plural, name),
    )


_KINDS: dict[tuple[str, str], _Kind] = {
    ("v1", "ConfigMap"): _Kind(
        plural="configmaps",
        read=lambda name, ns: client.CoreV1Api().read_namespaced_config_map(name, ns),
    ),
    ("v1", "Service"): _Kind(
        plural="services",
        read=lambda name, ns: client.CoreV1Api().read_namespaced_service(name, ns),
    ),
    ("apps/v1", "Deployment"): _Kind(
        plural="deployments",
        read=lambda name, ns: client.AppsV1Api().read_namespaced_deployment(name, ns),
    ),
    ("autoscaling/v2", "HorizontalPodAutoscaler"): _Kind(
        plural="horizontalpodautoscalers",
        read=lambda name, ns: client.AutoscalingV2Api().read_namespaced_horizontal_pod_autoscaler(name, ns),
        delete=lambda name, ns: client.AutoscalingV2Api().delete_namespaced_horizontal_pod_autoscaler(
            name, ns
        ),
    ),
    ("networking.k8s.io/v1", "NetworkPolicy"): _Kind(
        plural="networkpolicies",
        read=lambda name, ns: client.NetworkingV1Api().read_namespaced_network_policy(name, ns),
        delete=lambda name, ns: client.NetworkingV1Api().delete_namespaced_network_policy(name, ns),
    ),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _custom("monitoring.coreos.com", "v1", "servicemonitors"),
}


_NOT_YAML_PRINTABLE = re.compile("[\x7f-\x9f\ufffe\uffff]")


def _as_yaml_text(manifest: Manifest) -> bytes:
    """JSON that is also YAML the API server reads: characters outside the Basic Multilingual Plane as
    themselves (the JSON escapes of their surrogate pairs are not YAML), and the few that YAML does not
    allow unescaped (DEL, C1 controls; C0 ones json escapes already) as escapes."""
    text = json.dumps(manifest, ensure_ascii=False)
    return _NOT_YAML_PRINTABLE.sub(lambda match: f"\\u{ord(match.group()):04x}", text).encode()


def _apply_patch(kind: _Kind, manifest: Manifest, dry_run: bool) -> tuple[Manifest, int]:
    """One server-side apply request: the object after it, and the HTTP status (201: created).

    Sent as text the client does not re-encode (`_as_yaml_text`): its own JSON escapes characters
    outside the Basic Multilingual Plane (an emoji in a stop sequence) as surrogate pairs, which the
    API server, reading an apply patch as YAML, refuses."""
    api = client.ApiClient.get_default()
    meta, api_version = manifest["metadata"], manifest["apiVersion"]
    root = "/apis" if "/" in api_version else "/api"
    method, url, headers, body, _ = api.param_serialize(
        "PATCH",
        f"{root}/{api_version}/namespaces/{meta['namespace']}/{kind.plural}/{meta['name']}",
        query_params=[("fieldManager", FIELD_MANAGER), ("force", "true")] + [("dryRun", "All")] * dry_run,
        header_params={"Content-Type": "application/apply-patch+yaml", "Accept": "application/json"},
        body=_as_yaml_text(manifest),
        auth_settings=["BearerToken"],
    )
    response = api.call_api(method, url, header_params=headers, body=body)
    response.read()
    if not 200 <= response.status < 300:
        raise ApiException.from_response(http_resp=response, body=response.data.decode(), data=None)
    return dict(json.loads(response.data)), response.status


def _as_dict(obj: Any) -> Manifest:
    """A typed client object (or a custom object's dict) in its wire form."""
    return dict(client.ApiClient.get_default().sanitize_for_serialization(obj))


def _read(kind: _Kind, name: str, namespace: str) -> Manifest | None:
    try:
        return _as_dict(kind.read(name, namespace))
    except ApiException as error:
        if error.status == 404:
            return None
        raise


def _owner_uids(obj: Manifest) -> set[str]:
    return {ref["uid"] for ref in obj.get("metadata", {}).get("ownerReferences") or []}


def check_owner(existing: Manifest, wanted: Manifest) -> None:
    """Refuse to take over an object that is someone else's: one left by a deleted owner of the same
    name is waited for (garbage collection removes it); any other is a conflict a person must solve."""
    owners = _owner_uids(wanted)
    if not owners or owners & _owner_uids(existing):
        return
    meta, kind, name = existing.get("metadata", {}), wanted["kind"], wanted["metadata"]["name"]
    if meta.get("deletionTimestamp") or meta.get("ownerReferences"):
        raise kopf.TemporaryError(
            f"{kind} {name} still belongs to a deleted owner; waiting for it to go", delay=5
        )
    raise kopf.PermanentError(
        f"{kind} {name} already exists and is not ours: rename the resource or delete that object"
    )


def apply(manifest: Manifest, *, dry_run: bool = False) -> Outcome:
    """Create or update the object to match `manifest`; says which happened (or would: `dry_run`).

    "created" comes from the API server's 201, not from having read nothing before: two applies of the
    same new object at once (reconcile, and the status loop not seeing the Deployment in its index yet)
    both read nothing, and only one of them created it."""
    kind = _KINDS[(manifest["apiVersion"], manifest["kind"])]
    name, namespace = manifest["metadata"]["name"], manifest["metadata"]["namespace"]
    existing = _read(kind, name, namespace)
    if existing is not None:
        check_owner(existing, manifest)
    body, code = _apply_patch(kind, manifest, dry_run)
    if code == 201:
        return "created"
    if existing is None:
        return "unchanged"  # created a moment ago by the other apply, from the same spec
    return "updated" if _changed(existing, body, manifest) else "unchanged"


def _changed(before: Manifest, after: Manifest, manifest: Manifest) -> bool:
    """Whether the apply changed the object. Where the object keeps a generation (a Deployment, an
    HPA), by that and by the labels and annotations the manifest sets, not by its resourceVersion:
    the object's controller writes status (and its own annotations) between our read and our apply,
    which moves the resourceVersion and would report every re-apply (each operator restart while a
    Deployment's pods start) as an update."""
    old, new = before["metadata"], after["metadata"]
    if old.get("resourceVersion") == new.get("resourceVersion"):
        return False
    if new.get("generation") is None:
        return True  # a ConfigMap, a Service: nothing but us writes them
    ours = [
        (field, key) for field in ("labels", "annotations") for key in manifest["metadata"].get(field) or {}
    ]
    return old.get("generation") != new.get("generation") or any(
        (old.get(field) or {}).get(key) != (new.get(field) or {}).get(key) for field, key in ours
    )


def remove(api_version: str, kind_name: str, name: str, namespace: str, owner_uid: str) -> bool:
    """Delete a child the spec no longer asks for (an HPA or ServiceMonitor switched off); an object of
    that name that is not this owner's is left alone. True when something was deleted."""
    kind = _KINDS[(api_version, kind_name)]
    assert kind.delete is not None, f"{kind_name} is not an optional child"
    existing = _read(kind, name, namespace)  # None as well when the kind is not installed at all
    if existing is None or owner_uid not in _owner_uids(existing):
        return False
    try:
        kind.delete(name, namespace)
    except ApiException as error:
        if error.status != 404:
            raise
        return False
    return True
