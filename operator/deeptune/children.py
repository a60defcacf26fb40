"""The operator's writes to its children, one request path for every kind (the REST path from the
manifest's apiVersion and kind): create, server-side apply, merge-patch, delete, and the
finalizers.

Two ways to make a child, for two kinds of child:
- `create` makes it once and never touches it again: a trainer Job's pod template is fixed with the
  run (its few mutable fields are merge-patched, see `patch`).
- `apply` (server-side apply) keeps it as the spec says: the operator's field manager owns what it
  sets, fields it stops setting are removed, and fields that others own (an HPA's `replicas`) are
  left alone. Serving children follow every spec change this way.

An existing object of the same name must belong to the same owner: one left by a deleted owner of the
same name is waited for (`OwnerGoingError`); any other is a conflict a person must solve (`NotOursError`).
"""

from __future__ import annotations

import json
import re
from typing import Literal

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from deeptune.builders.common import Manifest

FIELD_MANAGER = "deeptune-operator"
REQUEST_TIMEOUT = (5.0, 30.0)
Outcome = Literal["created", "updated", "unchanged"]

LEGACY_FINALIZER = "deeptune.dev/finalizer"
"""The finalizer an early build (per-object kopf timers) put on the resources themselves: released by
the first reconcile that sees it, so such a resource can be deleted."""
PLURALS: dict[tuple[str, str], str] = {
    ("deeptune.dev/v1alpha1", "FineTuneJob"): "finetunejobs",
    ("deeptune.dev/v1alpha1", "ModelDeployment"): "modeldeployments",
    ("deeptune.dev/v1alpha1", "FineTuneSweep"): "finetunesweeps",
    ("deeptune.dev/v1alpha1", "FederatedFineTune"): "federatedfinetunes",
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Service"): "services",
    ("v1", "Pod"): "pods",
    ("batch/v1", "Job"): "jobs",
    ("apps/v1", "Deployment"): "deployments",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "horizontalpodautoscalers",
    ("networking.k8s.io/v1", "NetworkPolicy"): "networkpolicies",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitors",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobjects",
}


class NotOursError(Exception):
    """An object of the child's name exists and belongs to something else."""


class OwnerGoingError(Exception):
    """An object of the child's name still belongs to a deleted owner of the same name: garbage
    collection will remove it."""


def _path(api_version: str, kind: str, namespace: str, name: str | None = None) -> str:
    root = "/apis" if "/" in api_version else "/api"
    collection = f"{root}/{api_version}/namespaces/{namespace}/{PLURALS[(api_version, kind)]}"
    return f"{collection}/{name}" if name else collection


def _request(
    method: str,
    path: str,
    *,
    body: Manifest | list[Manifest] | bytes | None = None,
    content_type: str = "application/json",
    query: list[tuple[str, str]] | None = None,
) -> tuple[Manifest, int]:
    """One request through the shared client: the answer's object and the HTTP status. A JSON body
    goes as a mapping (the client encodes it); bytes are sent as they are."""
    api = client.ApiClient.get_default()
    method, url, headers, body, _ = api.param_serialize(
        method, path, query_params=query or [],
        header_params={"Content-Type": content_type, "Accept": "application/json"},
        body=body, auth_settings=["BearerToken"],
    )  # fmt: skip
    response = api.call_api(method, url, header_params=headers, body=body, _request_timeout=REQUEST_TIMEOUT)
    response.read()
    if not 200 <= response.status < 300:
        raise ApiException.from_response(http_resp=response, body=response.data.decode(), data=None)
    return dict(json.loads(response.data or b"{}")), response.status


_NOT_YAML_PRINTABLE = re.compile("[\x7f-\x9f\ufffe\uffff]")


def as_yaml_text(manifest: Manifest) -> bytes:
    """JSON that is also YAML the API server reads: characters outside the Basic Multilingual Plane as
    themselves (the JSON escapes of their surrogate pairs are not YAML, and an apply patch is read as
    YAML), and the few that YAML does not allow unescaped (DEL, C1 controls; C0 ones json escapes
    already) as escapes."""
    text = json.dumps(manifest, ensure_ascii=False)
    return _NOT_YAML_PRINTABLE.sub(lambda match: f"\\u{ord(match.group()):04x}", text).encode()


def read(api_version: str, kind: str, name: str, namespace: str) -> Manifest | None:
    """The object, or None when there is none (or its kind is not installed)."""
    try:
        return _request("GET", _path(api_version, kind, namespace, name))[0]
    except ApiException as error:
        if error.status == 404:
            return None
        raise


def listed(api_version: str, kind: str, namespace: str, selector: str) -> list[Manifest]:
    """The objects of a kind in a namespace that match a label selector, as the API server has them
    now (for the rare question the cache cannot answer: is an object it lacks gone, or late?)."""
    answer, _ = _request("GET", _path(api_version, kind, namespace), query=[("labelSelector", selector)])
    return list(answer["items"])


def owner_uids(obj: Manifest) -> set[str]:
    return {ref["uid"] for ref in obj.get("metadata", {}).get("ownerReferences") or []}


def check_owner(existing: Manifest, wanted: Manifest) -> None:
    """Raise `OwnerGoingError` or `NotOursError` unless `existing` belongs to `wanted`'s owner."""
    owners = owner_uids(wanted)
    if not owners or owners & owner_uids(existing):
        return
    meta, kind, name = existing.get("metadata", {}), wanted["kind"], wanted["metadata"]["name"]
    if meta.get("deletionTimestamp") or meta.get("ownerReferences"):
        raise OwnerGoingError(
            f"{kind} {name} still belongs to a deleted owner of the same name; waiting for it to go"
        )
    raise NotOursError(
        f"{kind} {name} already exists and is not ours: rename this resource or delete that {kind}"
    )


def create(manifest: Manifest, *, dry_run: bool = False) -> bool:
    """Create the object unless it exists already; True when this call created it. A dry run asks
    the API server whether it would (raising its refusal, 422) and creates nothing."""
    meta = manifest["metadata"]
    path = _path(manifest["apiVersion"], manifest["kind"], meta["namespace"])
    try:
        _request("POST", path, body=manifest, query=[("dryRun", "All")] * dry_run)
        return True
    except ApiException as error:
        if error.status != 409:
            raise
    if dry_run:
        return False
    existing = read(manifest["apiVersion"], manifest["kind"], meta["name"], meta["namespace"])
    if existing is not None:
        check_owner(existing, manifest)
    return False


def apply(manifest: Manifest, *, dry_run: bool = False) -> tuple[Outcome, Manifest]:
    """Create or update the object to match `manifest`: what happened (or would: `dry_run`), and the
    object after it.

    "created" comes from the API server's 201, not from having read nothing before (two applies of
    one new object at once both read nothing, and only one of them created it)."""
    meta = manifest["metadata"]
    existing = read(manifest["apiVersion"], manifest["kind"], meta["name"], meta["namespace"])
    if existing is not None:
        check_owner(existing, manifest)
    query = [("fieldManager", FIELD_MANAGER), ("force", "true")] + [("dryRun", "All")] * dry_run
    path = _path(manifest["apiVersion"], manifest["kind"], meta["namespace"], meta["name"])
    after, code = _request(
        "PATCH", path, body=as_yaml_text(manifest), content_type="application/apply-patch+yaml", query=query
    )
    if code == 201:
        return "created", after
    if existing is None:
        return "unchanged", after  # created a moment ago by the other apply, from the same spec
    return ("updated" if changed(existing, after, manifest) else "unchanged"), after


def changed(before: Manifest, after: Manifest, manifest: Manifest) -> bool:
    """Whether an apply changed the object. Where the object keeps a generation (a Deployment, an
    HPA), by that and by the labels and annotations the manifest sets, not by its resourceVersion:
    the object's controller writes status between our read and our apply, which moves the
    resourceVersion and would report every re-apply as an update."""
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


def patch(api_version: str, kind: str, name: str, namespace: str, changes: Manifest) -> Manifest:
    """Merge-patch an object (a Job's mutable fields; metadata)."""
    path = _path(api_version, kind, namespace, name)
    return _request("PATCH", path, body=changes, content_type="application/merge-patch+json")[0]


def remove(api_version: str, kind: str, name: str, namespace: str, owner_uid: str) -> bool:
    """Delete a child the spec no longer asks for; an object of that name that is not this owner's
    is left alone. True when something was deleted."""
    existing = read(api_version, kind, name, namespace)  # None as well when the kind is not installed
    if existing is None or owner_uid not in owner_uids(existing):
        return False
    return delete(api_version, kind, name, namespace)


def delete(api_version: str, kind: str, name: str, namespace: str) -> bool:
    """Delete an object (its dependents in the background); False when it was gone already."""
    try:
        _request("DELETE", _path(api_version, kind, namespace, name))
    except ApiException as error:
        if error.status != 404:
            raise
        return False
    return True


def holds(obj: Manifest, finalizer: str) -> bool:
    return finalizer in (obj["metadata"].get("finalizers") or [])


def release(obj: Manifest, kind: tuple[str, str], finalizer: str) -> bool:
    """Remove `finalizer` from an object (as cached) that holds it; True when it did. A JSON patch
    that tests the list it replaces: a finalizer another writer added meanwhile is never lost (the
    test fails, 422, and a later reconcile tries again from the newer version)."""
    meta = obj["metadata"]
    finalizers = list(meta.get("finalizers") or [])
    if not holds(obj, finalizer):
        return False
    operations = [
        {"op": "test", "path": "/metadata/finalizers", "value": finalizers},
        {"op": "replace", "path": "/metadata/finalizers", "value": [f for f in finalizers if f != finalizer]},
    ]
    path = _path(*kind, meta["namespace"], meta["name"])
    try:
        _request("PATCH", path, body=operations, content_type="application/json-patch+json")
    except ApiException as error:
        if error.status == 404:
            return False
        raise
    return True


def rejection(error: ApiException) -> str:
    """The API server's own words for a rejected object (its Status message), else the reason."""
    try:
        return str(json.loads(error.body or "{}").get("message") or error.reason)
    except ValueError:
        return str(error.reason)
