"""Federated fine-tuning through the cluster: examples/finetune-tiny-federated.yaml as a user applies
it, with two site namespaces that each hold half of the keyword task on their own claims. The sites
reach the coordinator through its headless Service and cluster DNS; only adapter weights and numbers
cross between namespaces."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from deeptune_trainer.synthetic import keyword_rows
from tests.cluster import harness
from tests.cluster.harness import Cluster, Process, wait_for
from tests.cluster.real_node import hand_to_the_trainer
from tests.conftest import load_example

pytestmark = [pytest.mark.cluster, pytest.mark.trainer]
HALVES = {"a": ("猫", "dog"), "b": ("雨", "sun")}
FEDERATION_LABEL = "deeptune.dev/federatedfinetune"


@pytest.fixture
def sites(
    crds: Cluster,
    namespace: str,
    tiny_volumes: dict[str, Path],
    trainer_pods: Callable[[dict[str, Any]], dict[str, Any]],
) -> Iterator[dict[str, dict[str, Any]]]:
    """Two site namespaces with the claims the template names: the same base model as the
    coordinator's, and each its own rows (half the task each); on the local cluster, handed to the
    trainer image's user like the coordinator's."""
    made: dict[str, dict[str, Any]] = {}
    try:
        for index, (suffix, keywords) in enumerate(HALVES.items()):
            site = f"{namespace}-{suffix}"
            crds.kubectl("create", "namespace", site)
            dirs = harness.provision_claims(crds, site, harness.TINY_CLAIMS)
            shutil.copytree(
                tiny_volumes["deeptune-models"] / "tiny-llama", dirs["deeptune-models"] / "tiny-llama"
            )
            rows = keyword_rows(120, seed=index + 1, keywords=keywords)
            lines = (json.dumps(row, ensure_ascii=False) for row in rows)
            (dirs["deeptune-data"] / "keywords-site.jsonl").write_text(
                "\n".join(lines) + "\n", encoding="utf-8"
            )
            if crds.local:
                hand_to_the_trainer(dirs)
            made[site] = {"dirs": dirs, "rows": rows}
        yield made
    finally:
        for site in made:
            crds.kubectl("delete", "namespace", site, "--wait=false", check=False)


def apply_example(
    crds: Cluster,
    namespace: str,
    sites: dict[str, dict[str, Any]],
    trainer_pods: Callable[[dict[str, Any]], dict[str, Any]],
) -> str:
    """examples/finetune-tiny-federated.yaml in `namespace` with these sites, its pods placed where
    `trainer_pods` puts a FineTuneJob's; its name."""
    manifest = load_example("finetune-tiny-federated.yaml")
    manifest["metadata"]["namespace"] = namespace
    manifest["spec"]["sites"] = [{"namespace": site} for site in sites]
    trainer_pods({"spec": manifest["spec"]["template"]})
    crds.apply(manifest)
    return str(manifest["metadata"]["name"])


def claims(pod: dict[str, Any]) -> set[str]:
    volumes = pod["spec"]["volumes"]
    return {v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v}


def files_under(directory: Path) -> Iterator[Path]:
    return (path for path in directory.rglob("*") if path.is_file())


def test_two_sites_train_one_adapter_that_answers_both_without_pooling_their_rows(
    operator: Process,
    crds: Cluster,
    namespace: str,
    tiny_volumes: dict[str, Path],
    sites: dict[str, dict[str, Any]],
    *,
    trainer_pods: Callable[[dict[str, Any]], dict[str, Any]],
) -> None:
    name = apply_example(crds, namespace, sites, trainer_pods)

    def finished() -> dict[str, Any] | None:
        status = (crds.get("federatedfinetune", name, namespace) or {}).get("status") or {}
        return status if status.get("phase") in ("Succeeded", "Failed") else None

    status = wait_for(f"{name} to finish", finished, timeout=600)
    assert status["phase"] == "Succeeded", status
    # Each site scored the final average on its own held-out rows: it answers both halves of the task.
    # (Trained on one half alone, an adapter scores 0 on the other: tests/trainer/test_federation.py.)
    by_site = {site["namespace"]: site for site in status["sites"]}
    assert sorted(by_site) == sorted(sites)
    for site in by_site.values():
        assert site["phase"] == "Succeeded"
        results = site["evalResults"]
        assert results["fineTuned"]["exactMatch"] >= 0.8 > results["baseline"]["exactMatch"] + 0.5, site

    output = tiny_volumes["deeptune-output"] / status["output"]["path"]
    assert (output / "adapter" / "adapter_model.safetensors").is_file()
    record = json.loads((output / "federation.json").read_text())
    assert record["rounds"] == 10
    assert {site: report["trainRows"] for site, report in record["sites"].items()} == {s: 96 for s in sites}

    # Rows stay where they are: a site's pod mounts its own namespace's claims (a claim is named
    # within its namespace); the coordinator's mounts no data claim; no row of a site is in any file
    # the coordinator or the other site wrote.
    coordinator = crds.list("pods", namespace, f"{FEDERATION_LABEL}={name}")
    assert [claims(pod) for pod in coordinator] == [{"deeptune-models", "deeptune-output"}]
    for site, made in sites.items():
        pods = crds.list("pods", site, f"deeptune.dev/finetunejob={name}-federated")
        assert pods and all(claims(pod) == set(harness.TINY_CLAIMS) for pod in pods)
        others = [other["dirs"]["deeptune-output"] for other in sites.values() if other is not made]
        written = [path.read_bytes() for directory in (output, *others) for path in files_under(directory)]
        prompts = [row["prompt"].encode() for row in made["rows"]]
        assert not [prompt for prompt in prompts if any(prompt in content for content in written)]
        assert any(prompts[0] in path.read_bytes() for path in files_under(made["dirs"]["deeptune-data"]))

    # Deleting the federation deletes its coordinator (garbage collection) and its sites (the operator:
    # an owner reference cannot reach another namespace).
    crds.kubectl("delete", "fft", name, "-n", namespace, "--timeout=120s")
    wait_for(
        "the sites to be deleted",
        lambda: not any(crds.list("finetunejob", site, f"{FEDERATION_LABEL}={name}") for site in sites),
        timeout=120,
    )


def test_a_site_with_broken_data_fails_the_federation_and_nothing_waits_for_it(
    operator: Process,
    crds: Cluster,
    namespace: str,
    sites: dict[str, dict[str, Any]],
    trainer_pods: Callable[[dict[str, Any]], dict[str, Any]],
) -> None:
    broken, healthy = list(sites)
    (sites[broken]["dirs"]["deeptune-data"] / "keywords-site.jsonl").unlink()
    name = apply_example(crds, namespace, sites, trainer_pods)

    def failed() -> dict[str, Any] | None:
        status = (crds.get("federatedfinetune", name, namespace) or {}).get("status") or {}
        return status if status.get("phase") == "Failed" else None

    status = wait_for(f"{name} to fail", failed, timeout=300)
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "SiteFailed", ready
    assert f"site {broken} ({name}-federated) failed: " in ready["message"], ready
    assert "dataset.source" in ready["message"] and "keywords-site.jsonl" in ready["message"], ready
    # The rounds cannot finish: the coordinator's Job goes, the healthy site is suspended, not left
    # waiting for a site that will never come.
    wait_for(
        "the coordinator's Job to be deleted",
        lambda: not crds.list("jobs", namespace, f"{FEDERATION_LABEL}={name}"),
        timeout=120,
    )
    site = crds.get("finetunejob", f"{name}-federated", healthy) or {}
    assert site["spec"].get("suspend") is True, site.get("spec")
