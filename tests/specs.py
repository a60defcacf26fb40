"""Spec manifests for tests: a base spec with a few fields changed."""

from __future__ import annotations

import copy
from typing import Any


def changed(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A copy of `base` with `a__b=value` meaning spec.a.b = value."""
    spec = copy.deepcopy(base)
    for path, value in changes.items():
        node = spec
        *parents, leaf = path.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return spec
