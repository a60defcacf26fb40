"""The operator's view of the cluster: kopf's in-memory indexes, filled by watches, read by the
reconcilers instead of the API server (no GET or LIST per reconcile)."""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from typing import Any

Obj = dict[str, Any]
Index = Mapping[Hashable, Iterable[Obj]]


class Cache:
    """Every index of the operator by its function's name, as kopf passes them to handlers.

    kopf hands the indexes only to handlers, and only once every index is filled from its first
    LIST; `fill` takes them from the first handler, so a reconcile never mistakes a child not yet
    listed for a missing one. Before that the cache has no keys."""

    def __init__(self) -> None:
        self._indexes: Mapping[str, Index] | None = None

    def fill(self, indexes: Mapping[str, Any]) -> None:
        if self._indexes is None:
            self._indexes = indexes

    def all(self, index: str, key: Hashable) -> list[Obj]:
        """The objects recorded under `key`."""
        assert self._indexes is not None, "the cache is read before kopf filled it"
        return list(self._indexes[index].get(key, []))

    def one(self, index: str, key: Hashable) -> Obj | None:
        found = self.all(index, key)
        return found[0] if found else None

    def keys(self, index: str) -> list[Hashable]:
        return list(self._indexes[index]) if self._indexes is not None else []
