"""Server-side apply of child objects whose content follows a spec that can change.

`kube.ensure` creates once and never touches the object again, right for a trainer Job whose spec is
fixed with the run. A serving Deployment must follow every spec change, so its children are applied
with server-side apply: the operator's field manager owns what it sets, fields it stops setting are
removed, and fields that others own (an HPA's `replicas`) are left alone.

Like `ensure`, an existing object of the same name must belong to the same owner first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import kopf
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from deeptune.builders.common import Manifest

FIELD_MANAGER = "deeptune-operator"
_APPLY: dict[str, Any] = {
    "field_manager": FIELD_MANAGER,
    "force": True,
    "_content_type": "application/apply-patch+yaml",
}
Outcome = Literal["created", "updated", "unchanged"]


@dataclass(frozen=True)
class _Kind:
    """Read, apply and (for optional children) delete one kind; clients are made per call, once the
    credentials are loaded."""

    read: Callable[[str, str], Any]
    apply: Callable[[str, str, Manifest], tuple[Any, int, Any]]
    """The apply patch, with the HTTP status and headers (`*_with_http_info`): 201 says it created."""
    delete: Callable[[str, str], Any] | None = None


def _custom(group: str, version: str, plural: str) -> _Kind:
    def api() -> client.CustomObjectsApi:
        return client.CustomObjectsApi()

    return _Kind(
        read=lambda name, ns: api().get_namespaced_custom_object(group, version, ns, plural, name),
        apply=lambda name, ns, body: api().patch_namespaced_custom_object_with_http_info(
            group, version, ns, plural, name, body, **_APPLY
        ),
        delete=lambda name, ns: api().delete_namespaced_custom_object(group, version, ns, plural, name),
    )


_KINDS: dict[tuple[str, str], _Kind] = {
    ("v1", "ConfigMap"): _Kind(
        read=lambda name, ns: client.CoreV1Api().read_namespaced_config_map(name, ns),
        apply=lambda name, ns, body: client.CoreV1Api().patch_namespaced_config_map_with_http_info(
            name, ns, body, **_APPLY
        ),
    ),
    ("v1", "Service"): _Kind(
        read=lambda name, ns: client.CoreV1Api().read_namespaced_service(name, ns),
        apply=lambda name, ns, body: client.CoreV1Api().patch_namespaced_service_with_http_info(
            name, ns, body, **_APPLY
        ),
    ),
    ("apps/v1", "Deployment"): _Kind(
        read=lambda name, ns: client.AppsV1Api().read_namespaced_deployment(name, ns),
        apply=lambda name, ns, body: client.AppsV1Api().patch_namespaced_deployment_with_http_info(
            name, ns, body, **_APPLY
        ),
    ),
    ("autoscaling/v2", "HorizontalPodAutoscaler"): _Kind(
        read=lambda name, ns: client.AutoscalingV2Api().read_namespaced_horizontal_pod_autoscaler(name, ns),
        apply=lambda name, ns, body: (
            client.AutoscalingV2Api().patch_namespaced_horizontal_pod_autoscaler_with_http_info(
                name, ns, body, **_APPLY
            )
        ),
        delete=lambda name, ns: client.AutoscalingV2Api().delete_namespaced_horizontal_pod_autoscaler(
            name, ns
        ),
    ),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _custom("monitoring.coreos.com", "v1", "servicemonitors"),
}


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


def apply(manifest: Manifest) -> Outcome:
    """Create or update the object to match `manifest`; says which happened.

    "created" comes from the API server's 201, not from having read nothing before: two applies of the
    same new object at once (reconcile, and the status loop not seeing the Deployment in its index yet)
    both read nothing, and only one of them created it."""
    kind = _KINDS[(manifest["apiVersion"], manifest["kind"])]
    name, namespace = manifest["metadata"]["name"], manifest["metadata"]["namespace"]
    existing = _read(kind, name, namespace)
    if existing is not None:
        check_owner(existing, manifest)
    body, code, _ = kind.apply(name, namespace, manifest)
    if code == 201:
        return "created"
    if existing is None:
        return "unchanged"  # created a moment ago by the other apply, from the same spec
    before = existing["metadata"].get("resourceVersion")
    return "unchanged" if _as_dict(body)["metadata"].get("resourceVersion") == before else "updated"


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
