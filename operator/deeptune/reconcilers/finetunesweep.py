"""The FineTuneSweep reconciler: record the trials, stop those the pruner gives up on, start new ones
while the budget allows, and name the best.

Level-based like the others: the trials are the FineTuneJobs the sweep owns (in the cache) and the
records its status keeps; Optuna's decisions are made afresh from them (`deeptune.search`). Trial
names are numbered, so a trial made twice (a reconcile that ran before the cache saw the first) is
found, not duplicated. Deleting the sweep deletes its trials (owner references).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from kubernetes.client.exceptions import ApiException

from deeptune import children, events, search
from deeptune.api.base import API_VERSION
from deeptune.api.finetunejob import KIND as FINETUNEJOB
from deeptune.api.finetunejob import FineTuneJobStatus, OutputStatus
from deeptune.api.finetunesweep import KIND, PLURAL, FineTuneSweepSpec, FineTuneSweepStatus, Trial, parse_spec
from deeptune.builders import finetunesweep as build
from deeptune.builders.common import Owner
from deeptune.cache import Cache
from deeptune.config import Settings
from deeptune.status import finetunesweep as derive
from deeptune.status.conditions import invalid_spec_status, is_invalid_spec, now
from deeptune.statuswriter import StatusWriter, phase_update
from deeptune.verdicts import Invalid, SpecVerdicts

Obj = dict[str, Any]
LOG = logging.getLogger(__name__)
TRIAL = (API_VERSION, FINETUNEJOB)

# The cache's indexes (kopf index functions of these names, in deeptune.registration).
OBJECTS = "finetunesweeps"
TRIALS = "sweep_trials"
"""The FineTuneJobs a sweep owns, by the sweep's uid."""


class FineTuneSweepReconciler:
    """Holds what reconciles of sweeps share: spec verdicts and the status writer."""

    def __init__(self, settings: Settings, cache: Cache, enqueue: Callable[[str], None]) -> None:
        self.settings, self.cache, self.enqueue = settings, cache, enqueue
        self.verdicts: SpecVerdicts[FineTuneSweepSpec] = SpecVerdicts(parse_spec)
        self.writer = StatusWriter(KIND, PLURAL)

    def keys(self) -> list[str]:
        return [str(key) for key in self.cache.keys(OBJECTS)]

    async def reconcile(self, uid: str) -> float | None:
        cached = self.cache.one(OBJECTS, uid)
        if cached is None or cached["metadata"].get("deletionTimestamp"):
            self.verdicts.forget(uid)
            self.writer.forget(uid)
            return None  # garbage collection deletes the trials
        obj = self.writer.current(cached)
        previous = FineTuneSweepStatus.model_validate(obj.get("status") or {})
        generation = obj["metadata"].get("generation")
        spec = self.verdicts.get(obj)
        if isinstance(spec, Invalid):
            await self._refuse(obj, previous, spec.message)
            return None
        if is_invalid_spec(previous) and previous.observed_generation == generation:
            return None  # reported already; a spec change gets a fresh start
        meta = obj["metadata"]
        owner = Owner(kind=KIND, name=meta["name"], namespace=meta["namespace"], uid=uid)
        finetunejobs = {f["metadata"]["name"]: f for f in self.cache.all(TRIALS, uid)}
        trials = await self._observe(owner, spec, previous, finetunejobs)
        found: list[events.Event] = []
        for index, trial in enumerate(trials):
            if trial.phase in ("Pending", "Running") and search.should_prune(spec, trial, trials):
                trials[index] = await self._prune(owner, trial)
                found.append(events.Event("Normal", "TrialPruned", f"{trial.name}: {trials[index].message}"))
        try:
            while _room(spec, trials):
                trial, made = await self._start(owner, spec, trials, finetunejobs)
                trials.append(trial)
                if made:
                    found.append(events.Event("Normal", "TrialCreated", f"{trial.name}: {_values(trial)}"))
        except ApiException as error:
            if error.status != 422:
                raise
            await self._refuse(obj, previous, f"the API server rejected a trial: {children.rejection(error)}")
            return None
        outputs = {name: _output(f) for name, f in finetunejobs.items()}
        new = derive.derive_status(spec, previous, trials, outputs=outputs, generation=generation, now=now())
        await self.writer.write(obj, phase_update(previous, new, found))
        return None

    async def _observe(
        self,
        owner: Owner,
        spec: FineTuneSweepSpec,
        previous: FineTuneSweepStatus,
        finetunejobs: dict[str, Obj],
    ) -> list[Trial]:
        """Every trial: those the cache has, as their FineTuneJobs show them; recorded ones it lacks,
        after one live read says whether they are gone or only not cached yet."""
        recorded = {t.name: t for t in previous.trials}
        for name in recorded.keys() - finetunejobs.keys():
            if recorded[name].phase in derive.ENDED:
                continue
            live = await asyncio.to_thread(children.read, *TRIAL, name, owner.namespace)
            if live is not None and owner.uid in children.owner_uids(live):
                finetunejobs[name] = live
        trials = {
            name: derive.observe_trial(finetunejob, recorded.get(name), spec)
            for name, finetunejob in finetunejobs.items()
            if derive.trial_number(finetunejob) is not None
        }
        for name, trial in recorded.items():
            trials.setdefault(name, derive.gone(trial))
        return sorted(trials.values(), key=lambda t: t.number)

    async def _start(
        self, owner: Owner, spec: FineTuneSweepSpec, trials: list[Trial], finetunejobs: dict[str, Obj]
    ) -> tuple[Trial, bool]:
        """The next trial, made with Optuna's values; True when this call made it (a FineTuneJob of
        its number may exist already, made by a reconcile whose status write was lost)."""
        number = max((t.number for t in trials), default=-1) + 1
        values = search.next_values(spec, trials, number)
        manifest = build.build_trial(owner, spec, number, values)
        made = await asyncio.to_thread(children.create, manifest)
        name = manifest["metadata"]["name"]
        if made:
            LOG.info("created trial %s/%s with %s", owner.namespace, name, values)
        else:
            existing = await asyncio.to_thread(children.read, *TRIAL, name, owner.namespace)
            manifest = existing or manifest
        finetunejobs[name] = manifest
        return derive.observe_trial(manifest, None, spec), made

    async def _prune(self, owner: Owner, trial: Trial) -> Trial:
        latest = trial.evaluations[-1]
        reason = (
            f"validation loss {latest.eval_loss:.4g} at step {latest.step} trails the median of "
            "finished trials"
        )
        patch = build.prune_patch(reason)
        await asyncio.to_thread(children.patch, *TRIAL, trial.name, owner.namespace, patch)
        LOG.info("pruned trial %s/%s: %s", owner.namespace, trial.name, reason)
        return trial.model_copy(update={"phase": "Pruned", "message": reason})

    async def _refuse(self, obj: Obj, previous: FineTuneSweepStatus, message: str) -> None:
        self.verdicts.reject(obj, message)
        generation = obj["metadata"].get("generation")
        new = invalid_spec_status(previous, message, generation, now())
        await self.writer.write(obj, phase_update(previous, new, []))


def _room(spec: FineTuneSweepSpec, trials: list[Trial]) -> bool:
    """Whether another trial may start: the budget is not spent and fewer than `parallelism` run."""
    under_way = sum(t.phase not in derive.ENDED for t in trials)
    return len(trials) < spec.trials and under_way < spec.parallelism


def _values(trial: Trial) -> str:
    return ", ".join(f"{path}={json.dumps(value)}" for path, value in sorted(trial.parameters.items()))


def _output(finetunejob: Obj) -> OutputStatus | None:
    return FineTuneJobStatus.model_validate(finetunejob.get("status") or {}).output
