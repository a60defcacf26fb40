"""Condition bookkeeping shared by every resource's status, as the Kubernetes API conventions ask."""

from __future__ import annotations

import datetime as dt

from deeptune.api.base import Condition


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
