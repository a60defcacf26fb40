"""The FederatedFineTune reconciler: start the coordinator and one FineTuneJob per site, follow them,
and clean up after a federation that failed or is gone.

Level-based like the others. The coordinator's children are owned (garbage collection removes
them); the sites' FineTuneJobs live in other namespaces, where an owner reference cannot point, so
the reconciler deletes those of a federation that no longer exists (found by their uid label; a
live read confirms the federation is gone before anything is deleted). Nothing is made again once
the federation has ended: a finished Job removed by its TTL stays finished.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from kubernetes.client.exceptions import ApiException

from deeptune import children, events
from deeptune.api.base import API_VERSION
from deeptune.api.federatedfinetune import (
    KIND,
    PLURAL,
    FederatedFineTuneSpec,
    FederatedFineTuneStatus,
    parse_spec,
)
from deeptune.api.finetunejob import KIND as FINETUNEJOB
from deeptune.builders import federatedfinetune as build
from deeptune.builders.common import Owner, uid_label
from deeptune.builders.finetunejob import job_name
from deeptune.cache import Cache
from deeptune.config import Settings
from deeptune.status import federatedfinetune as derive
from deeptune.status.conditions import invalid_spec_status, now
from deeptune.statuswriter import StatusWriter, phase_update
from deeptune.verdicts import Invalid, SpecVerdicts

Obj = dict[str, Any]
LOG = logging.getLogger(__name__)
SITE = (API_VERSION, FINETUNEJOB)
ENDED = ("Succeeded", "Failed")

# The cache's indexes (kopf index functions of these names, in deeptune.registration).
OBJECTS = "federatedfinetunes"
JOBS = "federation_jobs"
"""The coordinator's Job, by the federation's uid."""
SITES = "federation_sites"
"""The sites' FineTuneJobs (any namespace), by the federation's uid."""


class FederatedFineTuneReconciler:
    """Holds what reconciles of federations share: spec verdicts and the status writer."""

    def __init__(self, settings: Settings, cache: Cache, enqueue: Callable[[str], None]) -> None:
        self.settings, self.cache, self.enqueue = settings, cache, enqueue
        self.verdicts: SpecVerdicts[FederatedFineTuneSpec] = SpecVerdicts(parse_spec)
        self.writer = StatusWriter(KIND, PLURAL)

    def keys(self) -> list[str]:
        """Every federation, and every uid whose sites are left (their federation may be gone)."""
        return sorted({str(key) for key in (*self.cache.keys(OBJECTS), *self.cache.keys(SITES))})

    async def reconcile(self, uid: str) -> float | None:
        cached = self.cache.one(OBJECTS, uid)
        if cached is None or cached["metadata"].get("deletionTimestamp"):
            self.verdicts.forget(uid)
            self.writer.forget(uid)
            await self._remove_orphans(uid)
            return None
        obj = self.writer.current(cached)
        previous = FederatedFineTuneStatus.model_validate(obj.get("status") or {})
        generation = obj["metadata"].get("generation")
        spec = self.verdicts.get(obj)
        if isinstance(spec, Invalid):
            await self._refuse(obj, previous, spec.message)
            return None
        if previous.phase in ENDED:
            return None  # final (an invalid spec too, immutable as it is): nothing is made again
        meta = obj["metadata"]
        owner = Owner(kind=KIND, name=meta["name"], namespace=meta["namespace"], uid=uid)
        new = self._derive(owner, spec, previous, generation)
        found: list[events.Event] = []
        if new.phase == "Running":
            try:
                found += await self._start(owner, spec)
            except (ApiException, children.NotOursError) as error:
                if isinstance(error, ApiException) and error.status != 422:
                    raise
                problem = children.rejection(error) if isinstance(error, ApiException) else str(error)
                await self._refuse(obj, previous, problem)
                return None
        elif new.phase == "Failed":
            await self._stop(owner, new)
        await self.writer.write(obj, phase_update(previous, new, found))
        return None

    def _derive(
        self,
        owner: Owner,
        spec: FederatedFineTuneSpec,
        previous: FederatedFineTuneStatus,
        generation: int | None,
    ) -> FederatedFineTuneStatus:
        """The status the coordinator's Job and the sites' FineTuneJobs (as cached) give."""
        sites = {f["metadata"]["namespace"]: f for f in self.cache.all(SITES, owner.uid)}
        jobs = self.cache.all(JOBS, owner.uid)
        return derive.derive_status(
            previous,
            derive.observe_coordinator(job_name(owner), jobs[0] if jobs else None),
            [
                derive.observe_site(s.namespace, build.site_name(owner), sites.get(s.namespace))
                for s in spec.sites
            ],
            output=derive.coordinator_output(spec, owner.namespace, owner.name),
            generation=generation,
            now=now(),
        )

    async def _start(self, owner: Owner, spec: FederatedFineTuneSpec) -> list[events.Event]:
        """Make what is missing: the coordinator's children, then each site's FineTuneJob."""
        made: list[events.Event] = []
        for manifest in build.build_coordinator(owner, spec, self.settings.builder):
            await asyncio.to_thread(children.create, manifest)
        for site in spec.sites:
            manifest = build.build_site(owner, spec, site)
            if await asyncio.to_thread(children.create, manifest):
                made.append(
                    events.Event(
                        "Normal",
                        "SiteCreated",
                        f"FineTuneJob {site.namespace}/{manifest['metadata']['name']}",
                    )
                )
                continue
            name = manifest["metadata"]["name"]
            existing = await asyncio.to_thread(children.read, *SITE, name, site.namespace)
            labels = (existing or {}).get("metadata", {}).get("labels") or {}
            if existing is not None and labels.get(uid_label(KIND)) != owner.uid:
                raise children.NotOursError(
                    f"sites: FineTuneJob {site.namespace}/{name} exists and is not this federation's: "
                    "create this FederatedFineTune under another name (its sites are named after it)"
                )
        return made

    async def _stop(self, owner: Owner, status: FederatedFineTuneStatus) -> None:
        """After a failure the rounds cannot finish: the coordinator's Job goes (it would wait for the
        failed site for ever), and sites still running are suspended (their checkpoints stay). Safe
        to repeat (a status write that failed brings the next reconcile here again)."""
        await asyncio.to_thread(
            children.remove, "batch/v1", "Job", job_name(owner), owner.namespace, owner.uid
        )
        for site in status.sites:
            if site.phase not in ENDED:
                patch = {"spec": {"suspend": True}}
                try:
                    await asyncio.to_thread(children.patch, *SITE, site.fine_tune_job, site.namespace, patch)
                except ApiException as error:
                    if error.status != 404:
                        raise

    async def _remove_orphans(self, uid: str) -> None:
        """Delete the sites of a federation that is gone (confirmed by a live read of it)."""
        for site in self.cache.all(SITES, uid):
            meta = site["metadata"]
            namespace, _, name = (meta.get("annotations") or {}).get(build.FEDERATION, "/").partition("/")
            live = (
                await asyncio.to_thread(children.read, API_VERSION, KIND, name, namespace) if name else None
            )
            if live is not None and live["metadata"].get("uid") == uid:
                continue  # still there: only the cache is behind
            if await asyncio.to_thread(children.delete, *SITE, meta["name"], meta["namespace"]):
                LOG.info("deleted site %s/%s of a deleted federation", meta["namespace"], meta["name"])

    async def _refuse(self, obj: Obj, previous: FederatedFineTuneStatus, message: str) -> None:
        self.verdicts.reject(obj, message)
        new = invalid_spec_status(previous, message, obj["metadata"].get("generation"), now())
        await self.writer.write(obj, phase_update(previous, new, []))
