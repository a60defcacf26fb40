"""Kubernetes Events about the custom resources, posted directly (core/v1).

kopf's `kopf.event` works only inside a kopf handler; the reconcilers run outside them (on the
controllers' workers), so every Event goes through here. Events are best effort: a failure is
logged, never raised.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from typing import Any, Literal

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from deeptune.status.conditions import now

COMPONENT = "deeptune-operator"
MESSAGE_LIMIT = 1024
REQUEST_TIMEOUT = (5.0, 30.0)
"""Seconds to connect and to read: a post that hangs must not hold a worker for long."""
LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


def manifest(obj: dict[str, Any], event: Event, at: str) -> dict[str, Any]:
    """The core/v1 Event about `obj` (any mapping with apiVersion, kind and metadata)."""
    meta = obj["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": obj["apiVersion"],
            "kind": obj["kind"],
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
        },
        "type": event.type,
        "reason": event.reason,
        "message": event.message[:MESSAGE_LIMIT],
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "reportingInstance": socket.gethostname(),
        "firstTimestamp": at,
        "lastTimestamp": at,
        "count": 1,
    }


def post(obj: dict[str, Any], event: Event) -> None:
    namespace = obj["metadata"]["namespace"]
    body: Any = manifest(obj, event, now())  # the client takes wire-form dicts as well as its models
    try:
        client.CoreV1Api().create_namespaced_event(namespace, body, _request_timeout=REQUEST_TIMEOUT)
    except ApiException as error:
        LOG.warning("could not post %s event %s: %s", event.type, event.reason, error.reason)
    except (HTTPError, OSError) as error:  # the API server is unreachable
        LOG.warning("could not post %s event %s: %s", event.type, event.reason, error)
