"""A sweep's trial: a FineTuneJob made from the template, its number and values kept on it."""

from __future__ import annotations

import json
import posixpath

from pydantic import JsonValue

from deeptune.api.base import API_VERSION
from deeptune.api.finetunejob import KIND as FINETUNEJOB
from deeptune.api.finetunesweep import FineTuneSweepSpec, trial_spec
from deeptune.builders.common import Manifest, Owner, child_name, metadata

TRIAL_NUMBER = "deeptune.dev/trial-number"
TRIAL_PARAMETERS = "deeptune.dev/trial-parameters"
"""The values a trial runs with, as JSON by template path: its record even before it reports."""
PRUNED = "deeptune.dev/pruned"
"""Set (with why) when the sweep stopped the trial."""


def trial_name(sweep: str, number: int) -> str:
    return child_name(sweep, str(number))


def build_trial(owner: Owner, spec: FineTuneSweepSpec, number: int, values: dict[str, JsonValue]) -> Manifest:
    """Trial `number`: the template with `values` set, writing under the template's output path in a
    directory of its own (or, with no path, where any FineTuneJob of its name writes)."""
    name = trial_name(owner.name, number)
    body = trial_spec(spec.template, values)
    if spec.template.output.pvc.path:
        body["output"]["pvc"]["path"] = posixpath.join(spec.template.output.pvc.path, name)
    meta = metadata(owner, name, "trial")
    meta["annotations"] = {TRIAL_NUMBER: str(number), TRIAL_PARAMETERS: json.dumps(values, sort_keys=True)}
    return {"apiVersion": API_VERSION, "kind": FINETUNEJOB, "metadata": meta, "spec": body}


def prune_patch(reason: str) -> Manifest:
    """What stops a trial: suspend (its checkpoints stay, so it could go on), and the mark why."""
    return {"metadata": {"annotations": {PRUNED: reason}}, "spec": {"suspend": True}}
