"""Pieces every child manifest shares: names, labels, owner references, pod security."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from deeptune.api.base import API_VERSION

Manifest = dict[str, Any]

MANAGED_BY = "deeptune-operator"
MAX_NAME = 63
"""Child names end up in label values (e.g. `job-name`), which Kubernetes caps at 63 characters."""


@dataclass(frozen=True)
class Owner:
    """The custom resource that owns a child; its deletion garbage-collects the child."""

    kind: str
    name: str
    namespace: str
    uid: str

    def reference(self) -> Manifest:
        return {
            "apiVersion": API_VERSION,
            "kind": self.kind,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def child_name(owner_name: str, suffix: str) -> str:
    """A deterministic child name within 63 characters (a hash keeps truncated names unique)."""
    name = f"{owner_name}-{suffix}"
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(owner_name.encode()).hexdigest()[:6]
    keep = MAX_NAME - len(suffix) - len(digest) - 2
    return f"{owner_name[:keep].rstrip('-.')}-{digest}-{suffix}"


def uid_label(kind: str) -> str:
    """The label holding the owner's uid: how the operator finds whose child an object is (the
    name label is cut to 63 characters, and a pod's owner is its Job, not the resource)."""
    return f"deeptune.dev/{kind.lower()}-uid"


def labels(owner: Owner, component: str) -> dict[str, str]:
    """Labels that find a resource's children (and let the operator index them)."""
    return {
        "app.kubernetes.io/name": "deeptune",
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        f"deeptune.dev/{owner.kind.lower()}": owner.name[:MAX_NAME].rstrip("-."),
        uid_label(owner.kind): owner.uid,
    }


def metadata(owner: Owner, name: str, component: str) -> Manifest:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": labels(owner, component),
        "ownerReferences": [owner.reference()],
    }


def pod_security_context() -> Manifest:
    """Non-root with the runtime's default seccomp profile, as the restricted Pod Security Standard asks."""
    return {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "fsGroup": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> Manifest:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
