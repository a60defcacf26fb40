"""A FederatedFineTune's status from its coordinator's Job and its sites' FineTuneJobs. Pure:
recorded objects in, status out."""

from __future__ import annotations

import posixpath
from typing import Any

from deeptune.api.federatedfinetune import (
    CoordinatorStatus,
    FederatedFineTuneSpec,
    FederatedFineTuneStatus,
    SiteStatus,
)
from deeptune.api.finetunejob import FineTuneJobStatus, OutputStatus
from deeptune.status.conditions import phase_conditions

Obj = dict[str, Any]


def _job_condition(job: Obj, kind: str) -> Obj | None:
    conditions = (job.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == kind and c.get("status") == "True"), None)


def observe_coordinator(job_name: str, job: Obj | None) -> CoordinatorStatus:
    """The coordinator as its Job shows it (a Job not cached yet is starting)."""
    if job is None:
        return CoordinatorStatus(job_name=job_name)
    if _job_condition(job, "Complete"):
        return CoordinatorStatus(job_name=job_name, phase="Succeeded")
    failed = _job_condition(job, "Failed")
    if failed:
        message = (
            f"{failed.get('reason', 'Failed')}: {failed.get('message', '')}; see kubectl logs job/{job_name}"
        )
        return CoordinatorStatus(job_name=job_name, phase="Failed", message=message)
    return CoordinatorStatus(job_name=job_name)


def observe_site(namespace: str, name: str, finetunejob: Obj | None) -> SiteStatus:
    """A site as its FineTuneJob shows it."""
    if finetunejob is None:
        return SiteStatus(namespace=namespace, fine_tune_job=name, message="not created yet")
    status = FineTuneJobStatus.model_validate(finetunejob.get("status") or {})
    ready = next((c for c in status.conditions if c.type == "Ready"), None)
    message = ready.message if ready is not None and status.phase == "Failed" else ""
    return SiteStatus(
        namespace=namespace, fine_tune_job=name, phase=status.phase, eval_results=status.eval_results,
        message=message,
    )  # fmt: skip


def coordinator_output(spec: FederatedFineTuneSpec, namespace: str, name: str) -> OutputStatus:
    """Where the coordinator saves the averaged adapter (as a FineTuneJob of its name would)."""
    pvc = spec.template.output.pvc
    path = pvc.path or posixpath.join(namespace, name)
    return OutputStatus(claim_name=pvc.claim_name, path=path, adapter_path=posixpath.join(path, "adapter"))


def derive_status(
    previous: FederatedFineTuneStatus,
    coordinator: CoordinatorStatus,
    sites: list[SiteStatus],
    *,
    output: OutputStatus,
    generation: int | None,
    now: str,
) -> FederatedFineTuneStatus:
    """Failed as soon as the coordinator or a site failed (the rounds need them all); Succeeded when
    all succeeded; Running until then."""
    failed_sites = [site for site in sites if site.phase == "Failed"]
    if coordinator.phase == "Failed":
        phase, reason, message = "Failed", "CoordinatorFailed", coordinator.message
    elif failed_sites:
        site = failed_sites[0]
        phase, reason = "Failed", "SiteFailed"
        message = f"site {site.namespace} ({site.fine_tune_job}) failed: {site.message}".rstrip(": ")
    elif coordinator.phase == "Succeeded" and all(site.phase == "Succeeded" for site in sites):
        phase, reason = "Succeeded", "AdapterAveraged"
        message = (
            f"the averaged adapter of {len(sites)} sites is in {output.claim_name}:{output.adapter_path}"
        )
    else:
        waiting = [site.namespace for site in sites if site.phase != "Succeeded"]
        phase, reason = "Running", "RoundsRunning"
        message = f"coordinator {coordinator.phase.lower()}; sites not done: {', '.join(waiting) or 'none'}"
    conditions = phase_conditions(previous.conditions, phase, reason, message, generation=generation, now=now)
    return FederatedFineTuneStatus(
        phase=phase, observed_generation=generation, conditions=conditions, coordinator=coordinator,
        sites=sites, output=output if phase == "Succeeded" else None,
    )  # fmt: skip
