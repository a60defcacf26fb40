"""Condition bookkeeping shared by every resource's status, as the Kubernetes API conventions ask."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any, Protocol, TypeVar

from deeptune.api.base import Condition

INVALID_SPEC = "InvalidSpec"


class PhasedStatus(Protocol):
    """A status with a phase and Ready/Running/Failed conditions (a sweep's, a federation's)."""

    @property
    def phase(self) -> str | None: ...

    @property
    def conditions(self) -> list[Condition]: ...

    def model_copy(self: S, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> S: ...

    def to_wire(self) -> dict[str, Any]: ...


S = TypeVar("S", bound=PhasedStatus)


def now() -> str:
    """The current time as Kubernetes writes it (RFC 3339, seconds, UTC)."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_conditions(
    previous: list[Condition],
    wanted: dict[str, tuple[bool, str, str]],
    generation: int | None,
    now: str,
) -> list[Condition]:
    """Conditions by type; lastTransitionTime moves only when a condition's status flips."""
    before = {c.type: c for c in previous}
    result = []
    for kind, (value, reason, message) in wanted.items():
        status = "True" if value else "False"
        old = before.get(kind)
        changed = old is None or old.status != status
        result.append(
            Condition(
                type=kind,
                status=status,
                reason=reason,
                message=message,
                last_transition_time=now if changed or old is None else old.last_transition_time,
                observed_generation=generation,
            )
        )
    return result


def phase_conditions(
    previous: list[Condition], phase: str, reason: str, message: str, *, generation: int | None, now: str
) -> list[Condition]:
    """Ready, Running and Failed of a resource that runs and then succeeds or fails (a sweep, a
    federation): the one its phase names is True, all three say why."""
    wanted = {
        "Ready": (phase == "Succeeded", reason, message),
        "Running": (phase == "Running", reason, message),
        "Failed": (phase == "Failed", reason, message),
    }
    return set_conditions(previous, wanted, generation, now)


def invalid_spec_status(previous: S, message: str, generation: int | None, now: str) -> S:
    """A spec that cannot run: Failed/InvalidSpec; what was made and recorded already is kept."""
    conditions = phase_conditions(
        previous.conditions, "Failed", INVALID_SPEC, message, generation=generation, now=now
    )
    update = {"phase": "Failed", "observed_generation": generation, "conditions": conditions}
    return previous.model_copy(update=update, deep=True)


def is_invalid_spec(status: PhasedStatus) -> bool:
    failed = (c for c in status.conditions if c.type == "Failed" and c.status == "True")
    return any(c.reason == INVALID_SPEC for c in failed)
