"""Each object's spec, judged once per generation: the parsed spec, or why it cannot run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import ValidationError

from deeptune.api.base import describe_validation_error

Spec = TypeVar("Spec")


@dataclass(frozen=True)
class Invalid:
    """Why a spec cannot run: a validation error naming the field, or the API server's refusal of a
    child built from it (retrying cannot help until the spec changes)."""

    message: str


class SpecVerdicts(Generic[Spec]):
    """Specs are validated once per generation (a spec cannot change within one), not on every
    reconcile; a child the API server refused is this generation's verdict too."""

    def __init__(self, parse: Callable[[dict[str, Any]], Spec]) -> None:
        self._parse = parse
        self._by_uid: dict[str, tuple[int | None, Spec | Invalid]] = {}

    def get(self, obj: dict[str, Any]) -> Spec | Invalid:
        uid, generation = obj["metadata"]["uid"], obj["metadata"].get("generation")
        cached = self._by_uid.get(uid)
        if cached is not None and cached[0] == generation:
            return cached[1]
        try:
            verdict: Spec | Invalid = self._parse(dict(obj.get("spec") or {}))
        except ValidationError as error:
            verdict = Invalid(describe_validation_error(error))
        self._by_uid[uid] = (generation, verdict)
        return verdict

    def reject(self, obj: dict[str, Any], reason: str) -> Invalid:
        """The API server refused a child built from this generation's spec."""
        verdict = Invalid(reason)
        self._by_uid[obj["metadata"]["uid"]] = (obj["metadata"].get("generation"), verdict)
        return verdict

    def forget(self, uid: str) -> None:
        self._by_uid.pop(uid, None)
