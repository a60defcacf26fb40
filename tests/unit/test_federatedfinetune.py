"""FederatedFineTune: its spec's checks, the coordinator's and the sites' children, the status they
give, and the reconciler's clean-up across namespaces."""

from __future__ import annotations

import asyncio
import copy
import json
from typing import Any

import pytest
from pydantic import ValidationError

from deeptune import children
from deeptune.api.base import API_VERSION
from deeptune.api.federatedfinetune import FederatedFineTuneStatus, parse_spec
from deeptune.api.finetunejob import parse_spec as parse_finetunejob_spec
from deeptune.api.trainer import FEDERATION_PORT, TrainerConfig
from deeptune.builders.common import Owner, uid_label
from deeptune.builders.federatedfinetune import FEDERATION, build_coordinator, build_site, coordinator_address
from deeptune.builders.finetunejob import ChildSettings
from deeptune.cache import Cache
from deeptune.config import Settings
from deeptune.crdgen import RESOURCES
from deeptune.reconcilers.federatedfinetune import JOBS, OBJECTS, SITES, FederatedFineTuneReconciler
from deeptune.status.federatedfinetune import (
    coordinator_output,
    derive_status,
    observe_coordinator,
    observe_site,
)
from tests.conftest import load_example
from tests.unit.conftest import Api

Obj = dict[str, Any]
UID = "fed-uid"
EXAMPLE = load_example("finetune-tiny-federated.yaml")
OWNER = Owner(kind="FederatedFineTune", name="kw", namespace="hub", uid=UID)
NOW = "2026-12-05T00:00:00Z"


def example_spec(**changes: Any) -> Obj:
    spec = copy.deepcopy(EXAMPLE["spec"])
    spec.update(changes)
    return spec


def refusal(spec: Obj) -> str:
    with pytest.raises(ValidationError) as raised:
        parse_spec(spec)
    return str(raised.value)


def test_the_example_federates_two_sites_whose_specs_are_valid_finetunejobs() -> None:
    spec = parse_spec(example_spec())
    assert [site.namespace for site in spec.sites] == ["site-a", "site-b"] and spec.rounds == 10
    for site in spec.sites:
        manifest = build_site(OWNER, spec, site)
        parsed = parse_finetunejob_spec(manifest["spec"])
        assert parsed.federation is not None and parsed.federation.coordinator == coordinator_address(OWNER)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sites": [{"namespace": "a"}, {"namespace": "a"}]}, "sites: each namespace may appear once"),
        ({"sites": [{"namespace": "a"}]}, "at least 2 items"),
        ({"federation": {"coordinator": "x.y:1"}}, "template.federation is the operator's to set"),
        ({"queueName": "q"}, "template.queueName cannot hold a federation's sites"),
        ({"method": "full"}, "sites[0] (site-a) cannot run: template: federation averages LoRA adapters"),
        ({"distributed": {"nodes": 2}}, "federation averages LoRA adapters trained by one process per site"),
    ],
)
def test_a_federation_that_cannot_run_says_which_field_and_what_to_do(change: Obj, message: str) -> None:
    spec = example_spec()
    if "sites" in change:
        spec.update(change)
    else:
        spec["template"].update(change)
    assert message in refusal(spec)


def test_a_site_may_read_its_rows_from_its_own_source() -> None:
    spec = example_spec(
        sites=[{"namespace": "a"}, {"namespace": "b", "source": {"url": "https://b.example/rows.jsonl"}}]
    )
    parsed = parse_spec(spec)
    first, second = (build_site(OWNER, parsed, site)["spec"]["dataset"]["source"] for site in parsed.sites)
    assert first == EXAMPLE["spec"]["template"]["dataset"]["source"]
    assert second == {"url": "https://b.example/rows.jsonl"}


def test_the_coordinator_reads_no_rows_holds_no_gpu_and_is_reached_through_a_headless_service() -> None:
    spec = parse_spec(example_spec())
    spec.template.resources.gpu = 1
    config_map, service, job = build_coordinator(OWNER, spec, ChildSettings())
    config = TrainerConfig.model_validate_json(config_map["data"]["config.json"])
    assert config.coordinator is not None and (config.coordinator.rounds, config.coordinator.sites) == (10, 2)
    assert config.spec.dataset.source.inline == [] and config.paths.dataset is None
    assert config.paths.output_dir == "/mnt/pvc/deeptune-output/hub/kw"
    pod = job["spec"]["template"]
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in pod["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {"deeptune-models", "deeptune-output"}, "the data claim is the sites' alone"
    container = pod["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in json.dumps(container["resources"])
    assert {"name": "flower", "containerPort": FEDERATION_PORT} in container["ports"]
    assert "finalizers" not in job["metadata"] and "finalizers" not in pod["metadata"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["ports"][0]["port"] == FEDERATION_PORT
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert coordinator_address(OWNER) == f"{service['metadata']['name']}.hub.svc:{FEDERATION_PORT}"
    for child in (config_map, service, job):
        assert child["metadata"]["ownerReferences"][0]["uid"] == UID


def test_a_site_is_a_finetunejob_in_its_namespace_marked_not_owned() -> None:
    spec = parse_spec(example_spec())
    site = build_site(OWNER, spec, spec.sites[1])
    meta = site["metadata"]
    assert (meta["namespace"], meta["name"]) == ("site-b", "kw-federated")
    assert "ownerReferences" not in meta, (
        "garbage collection deletes dependents of an owner in another namespace"
    )
    assert meta["labels"][uid_label("FederatedFineTune")] == UID
    assert meta["annotations"][FEDERATION] == "hub/kw"


# --- status ---------------------------------------------------------------------------------


def job(condition: str | None, message: str = "") -> Obj:
    conditions = [{"type": condition, "status": "True", "reason": "BackoffLimitExceeded", "message": message}]
    return {"status": {"conditions": conditions if condition else []}}


def site_ftj(phase: str | None, exact_match: float | None = None) -> Obj:
    status: Obj = {"phase": phase} if phase else {}
    if exact_match is not None:
        status["evalResults"] = {"fineTuned": {"exactMatch": exact_match}, "baseline": {"exactMatch": 0.0}}
    if phase == "Failed":
        status["conditions"] = [
            {"type": "Ready", "status": "False", "reason": "InvalidDataset", "message": "line 3: no prompt",
             "lastTransitionTime": NOW}
        ]  # fmt: skip
    return {"status": status}


def derive(coordinator: Obj | None, sites: list[Obj | None]) -> FederatedFineTuneStatus:
    spec = parse_spec(example_spec())
    observed = [observe_site(s.namespace, "kw-federated", f) for s, f in zip(spec.sites, sites, strict=True)]
    return derive_status(
        FederatedFineTuneStatus(), observe_coordinator("kw-train", coordinator), observed,
        output=coordinator_output(spec, "hub", "kw"), generation=1, now=NOW,
    )  # fmt: skip


def test_the_federation_succeeds_when_the_coordinator_and_every_site_did() -> None:
    running = derive(job(None), [site_ftj("Succeeded", 1.0), site_ftj("Running")])
    assert running.phase == "Running" and running.output is None
    assert "site-b" in running.conditions[1].message
    done = derive(job("Complete"), [site_ftj("Succeeded", 1.0), site_ftj("Succeeded", 0.9)])
    assert done.phase == "Succeeded"
    assert done.output is not None and done.output.adapter_path == "hub/kw/adapter"
    assert [s.eval_results.fine_tuned["exactMatch"] for s in done.sites if s.eval_results] == [1.0, 0.9]


def test_a_failed_site_or_coordinator_fails_the_federation_with_its_reason() -> None:
    site_failed = derive(job(None), [site_ftj("Running"), site_ftj("Failed")])
    assert site_failed.phase == "Failed"
    ready = site_failed.conditions[0]
    assert ready.reason == "SiteFailed" and "site-b (kw-federated) failed: line 3: no prompt" in ready.message
    coordinator_failed = derive(job("Failed", "Job has reached the specified backoff limit"), [None, None])
    assert coordinator_failed.phase == "Failed"
    assert "kubectl logs job/kw-train" in coordinator_failed.conditions[0].message
    assert coordinator_failed.sites[0].message == "not created yet"


# --- the reconciler ---------------------------------------------------------------------------


def federation_object(spec: Obj, status: Obj | None = None) -> Obj:
    return {
        "apiVersion": "deeptune.dev/v1alpha1",
        "kind": "FederatedFineTune",
        "metadata": {"name": "kw", "namespace": "hub", "uid": UID, "generation": 1, "resourceVersion": "3"},
        "spec": spec,
        "status": status or {},
    }


def reconcile(federations: list[Obj], sites: list[Obj], jobs: list[Obj] | None = None) -> None:
    cache = Cache()
    cache.fill(
        {OBJECTS: {UID: federations} if federations else {}, SITES: {UID: sites}, JOBS: {UID: jobs or []}}
    )
    reconciler = FederatedFineTuneReconciler(Settings(), cache, lambda uid: None)
    assert reconciler.keys() == [UID]
    asyncio.run(reconciler.reconcile(UID))


@pytest.fixture
def deleted(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(children, "delete", lambda *a: calls.append(a) or True)
    return calls


def test_a_new_federation_starts_its_coordinator_and_a_finetunejob_per_site(api: Api, reads: Obj) -> None:
    reconcile([federation_object(example_spec())], [])
    made = [(call[1], call[2]) for call in api.named("create")]
    assert made == [("ConfigMap", "kw-config"), ("Service", "kw-coordinator"), ("Job", "kw-train"),
                    ("FineTuneJob", "kw-federated"), ("FineTuneJob", "kw-federated")]  # fmt: skip
    assert api.written()["phase"] == "Running"
    assert [e.reason for e in api.events] == ["SiteCreated", "SiteCreated"]


def test_a_site_name_taken_by_someone_elses_finetunejob_is_refused(api: Api, reads: dict[str, Obj]) -> None:
    api.existing["kw-federated"] = {"metadata": {"name": "kw-federated", "labels": {}}}
    reads["kw-federated"] = api.existing["kw-federated"]
    reconcile([federation_object(example_spec())], [])
    status = api.written()
    assert status["phase"] == "Failed"
    assert (
        "FineTuneJob site-a/kw-federated exists and is not this federation's"
        in status["conditions"][0]["message"]
    )


def test_a_failed_federation_stops_its_coordinator_and_suspends_running_sites(api: Api, reads: Obj) -> None:
    sites = [
        {"metadata": {"name": "kw-federated", "namespace": "site-a"}, **site_ftj("Running")},
        {"metadata": {"name": "kw-federated", "namespace": "site-b"}, **site_ftj("Failed")},
    ]
    reconcile([federation_object(example_spec(), {"phase": "Running"})], sites)
    assert api.written()["phase"] == "Failed"
    assert api.named("create") == [], "nothing is made for a federation that cannot finish"
    assert [call[1:4] for call in api.named("remove")] == [("batch/v1", "Job", "kw-train")]
    assert [call[1:] for call in api.named("patch")] == [
        ("deeptune.dev/v1alpha1", "FineTuneJob", "kw-federated", "site-a", {"spec": {"suspend": True}})
    ]


def test_an_ended_federation_makes_nothing_again(api: Api, reads: Obj) -> None:
    reconcile([federation_object(example_spec(), {"phase": "Succeeded"})], [], [job("Complete")])
    assert api.named("create") == []


def test_the_sites_of_a_deleted_federation_are_deleted_once_a_live_read_confirms_it(
    api: Api, reads: dict[str, Obj], deleted: list[tuple[str, ...]]
) -> None:
    site = {
        "metadata": {"name": "kw-federated", "namespace": "site-a", "annotations": {FEDERATION: "hub/kw"}}
    }
    reads["kw"] = {"metadata": {"uid": UID}}  # the cache is behind: the federation is still there
    reconcile([], [site])
    assert deleted == []
    del reads["kw"]
    reconcile([], [site])
    assert deleted == [("deeptune.dev/v1alpha1", "FineTuneJob", "kw-federated", "site-a")]


def test_the_operator_can_address_every_resource_it_defines() -> None:
    """A live read of a federation (before deleting its sites) goes through the same request path."""
    for module, _, _ in RESOURCES:
        assert children.PLURALS[(API_VERSION, module.KIND)] == module.PLURAL
