"""The Argo CD health checks in deploy/argocd/health/, run by a real Lua 5.1 interpreter the way Argo CD
runs them (gopher-lua: Lua 5.1, only the base and table libraries, the object as the global `obj`).

FineTuneJob and ModelDeployment objects were recorded from real runs on the real node
(tests/unit/fixtures/status/record.py); FineTuneSweep and FederatedFineTune objects are constructed
from their status models below.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import typing
from pathlib import Path
from typing import Any

import jsonschema
import lupa.lua51
import pytest
import yaml

from deeptune.api.federatedfinetune import FederatedFineTuneStatus
from deeptune.api.federatedfinetune import parse_spec as parse_federation
from deeptune.api.finetunejob import FineTuneJobStatus, Phase
from deeptune.api.finetunesweep import FineTuneSweepStatus, Trial, parse_spec
from deeptune.api.modeldeployment import ModelDeploymentSpec, ModelDeploymentStatus, ModelState
from deeptune.status.conditions import invalid_spec_status
from deeptune.status.federatedfinetune import coordinator_output, observe_coordinator, observe_site
from deeptune.status.federatedfinetune import derive_status as derive_federation
from deeptune.status.finetunesweep import derive_status
from tests.conftest import ROOT

ARGOCD = ROOT / "deploy" / "argocd"
FIXTURES = Path(__file__).parent / "fixtures" / "status"
SCRIPT_FILES = {
    "FineTuneJob": "finetunejob.lua",
    "ModelDeployment": "modeldeployment.lua",
    "FineTuneSweep": "finetunejob-owners.lua",
    "FederatedFineTune": "finetunejob-owners.lua",  # made of FineTuneJobs too: one script for both
}
SCRIPTS = {kind: (ARGOCD / "health" / name).read_text() for kind, name in SCRIPT_FILES.items()}
ARGO_HEALTH = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}

# What Argo CD's Lua VM offers a custom health script (argo-cd util/lua/lua.go: base, table, package
# and a safe os); `string` is not opened, so strings have no methods either.
_SANDBOX = """
local script, obj = ...
local chunk = assert(loadstring(script, "=health.lua"))
local env = {table = table, obj = obj}
for _, name in ipairs({"assert", "error", "ipairs", "next", "pairs", "pcall", "select", "tonumber",
                       "tostring", "type", "unpack", "rawequal", "rawget", "rawset"}) do
  env[name] = _G[name]
end
debug.setmetatable("", nil)
setfenv(chunk, env)
return chunk()
"""


def health(kind: str, obj: dict[str, Any], script: str | None = None) -> tuple[str, str]:
    """(status, message) as Argo CD would show them for `obj`."""
    lua = lupa.lua51.LuaRuntime(unpack_returned_tuples=False)
    result = lua.execute(_SANDBOX, script or SCRIPTS[kind], lua.table_from(obj, recursive=True))
    answer = dict(result)
    assert answer["status"] in ARGO_HEALTH, answer
    return answer["status"], answer["message"]


def fixture(name: str) -> dict[str, Any]:
    return dict(json.loads((FIXTURES / name).read_text()))


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in obj["status"]["conditions"] if c["type"] == kind)


# --- FineTuneJob: recorded objects ------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "status", "message"),
    [
        ("pending", "Progressing", "JobNotCreated: the trainer Job is being created"),
        (
            "pending-unschedulable",
            "Progressing",
            "Unschedulable: 0/1 nodes are available: 1 Insufficient nvidia.com/gpu. "
            "preemption: 0/1 nodes are available: 1 No preemption victims found for incoming pod.",
        ),
        ("running", "Progressing", "Training: step 50/120 (41%), ETA 1s"),
        ("succeeded", "Healthy", "fine-tuning finished"),
        ("suspended", "Suspended", "suspended; set spec.suspend to false to resume"),
        (
            "failed-invalidspec",
            "Degraded",
            "InvalidSpec: spec.lora: targetModules: `auto` cannot be combined with explicit module names",
        ),
    ],
)
def test_finetunejob_health(name: str, status: str, message: str) -> None:
    assert health("FineTuneJob", fixture(f"finetunejob-{name}.json")) == (status, message)


@pytest.mark.parametrize(
    ("name", "trainer_says"),
    [
        (
            "failed-invaliddataset",
            "InvalidDataset: dataset.source.pvc: 3 of 3 rows are malformed (100.0%), more than "
            "dataset.maxBadRowRatio allows (5.0%)",
        ),
        (
            "failed-modelnotfound",
            "ModelNotFound: baseModel: no model found at claim deeptune-models, path 'deepseek-llm-7b'",
        ),
    ],
)
def test_a_failed_trainer_is_degraded_with_its_own_words(name: str, trainer_says: str) -> None:
    """The trainer's reason and message lead; the Job's words (which names the pod) follow."""
    obj = fixture(f"finetunejob-{name}.json")
    status, message = health("FineTuneJob", obj)
    assert status == "Degraded"
    assert message.startswith(trainer_says), message
    assert message.endswith("failed with exit code 3 matching FailJob rule at index 0)"), message
    assert "(Job: PodFailurePolicy: Container trainer for pod recording/" in message


def test_a_finetunejob_without_status_is_progressing() -> None:
    obj = fixture("finetunejob-pending.json")
    del obj["status"]
    assert health("FineTuneJob", obj) == (
        "Progressing",
        "Waiting for the DeepTune operator to report a status",
    )


def test_a_spec_change_the_operator_has_not_seen_is_progressing_not_healthy() -> None:
    obj = fixture("finetunejob-succeeded.json")
    obj["metadata"]["generation"] = 2
    assert health("FineTuneJob", obj) == (
        "Progressing",
        "Waiting for the DeepTune operator to observe generation 2",
    )


def test_running_before_the_first_scrape_shows_the_condition() -> None:
    obj = fixture("finetunejob-running.json")
    del obj["status"]["progress"]
    assert health("FineTuneJob", obj) == ("Progressing", "Training: the trainer is running")


def test_recorded_finetunejobs_cover_every_phase_and_match_the_model() -> None:
    seen = set()
    for path in FIXTURES.glob("finetunejob-*.json"):
        obj = json.loads(path.read_text())
        status = FineTuneJobStatus.model_validate(obj["status"])
        assert status.model_dump(mode="json", by_alias=True, exclude_none=True) == obj["status"], path.name
        assert path.name.startswith(f"finetunejob-{str(status.phase).lower()}"), path.name
        seen.add(status.phase)
    assert seen == set(typing.get_args(Phase))


# --- ModelDeployment: recorded objects --------------------------------------------------------

MODELDEPLOYMENT_HEALTH = {
    "pending": ("Progressing", "WaitingForPods: waiting for a serving pod to start"),
    "pending-finetunejobnotfound": (
        "Progressing",
        "FineTuneJobNotFound: model.fineTuneJobRef: FineTuneJob not-trained-yet not found",
    ),
    "pending-waitingforfinetunejob": (
        "Progressing",
        "WaitingForFineTuneJob: model.fineTuneJobRef: waiting for FineTuneJob paused to succeed "
        "(phase Suspended)",
    ),
    "pending-finetunejobfailed": (
        "Degraded",
        "FineTuneJobFailed: model.fineTuneJobRef: FineTuneJob broken-dataset failed, so there is no model "
        "to serve until it is rerun and succeeds: InvalidDataset: dataset.source.pvc: 3 of 3 rows are "
        "malformed (100.0%), more than dataset.maxBadRowRatio allows (5.0%); first: line 1: invalid JSON: "
        "Expecting value at column 1; line 2: invalid JSON: Expecting value at column 1; line 3: invalid "
        "JSON: Expecting value at column 1. Fix these rows, or raise dataset.maxBadRowRatio to skip them. "
        "(Job: PodFailurePolicy: Container trainer for pod recording/broken-dataset-train-zwd8g failed "
        "with exit code 3 matching FailJob rule at index 0)",
    ),
    "pending-scaledtozero": ("Healthy", "Scaled to zero: spec.replicas is 0"),
    "loading": ("Progressing", "Loading: Triton is loading the model (1 pod)"),
    "loaded": (
        "Healthy",
        "Model loaded, 1/1 replicas ready, OpenAI API at http://tiny-triton.recording.svc:9000/v1",
    ),
    "loaded-probefailed": (
        "Progressing",
        "ProbeFailed: InferenceServerException: the prompt's 12 tokens plus max_new_tokens 1 exceed "
        "the model's context of 2 tokens: shorten the prompt or lower max_new_tokens",
    ),
    "failedtoload": (
        "Degraded",
        "ModelLoadFailed: FileNotFoundError: no model at /mnt/pvc/deeptune-models/no-such-model: "
        "the directory does not exist",
    ),
    "failedtoload-invalidspec": (
        "Degraded",
        'InvalidSpec: the API server rejected a child: Deployment.apps "bad-node-selector-triton" is '
        'invalid: spec.template.spec.nodeSelector: Invalid value: "not a label key!": name part must '
        "consist of alphanumeric characters, '-', '_' or '.', and must start and end with an "
        "alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for "
        "validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')",
    ),
    "failedtoload-oomkilled": (
        "Degraded",
        "OOMKilled: the server ran out of memory loading the model: raise resources.memory",
    ),
}


@pytest.mark.parametrize(("name", "expected"), MODELDEPLOYMENT_HEALTH.items())
def test_modeldeployment_health(name: str, expected: tuple[str, str]) -> None:
    assert health("ModelDeployment", fixture(f"modeldeployment-{name}.json")) == expected


def test_every_modeldeployment_fixture_has_its_expected_health() -> None:
    on_disk = {path.name for path in FIXTURES.glob("modeldeployment-*.json")}
    assert on_disk == {f"modeldeployment-{name}.json" for name in MODELDEPLOYMENT_HEALTH}


def test_a_healthy_modeldeployment_without_an_openai_url_names_its_http_endpoint() -> None:
    """A status written before the OpenAI API existed has the HTTP endpoint only."""
    obj = fixture("modeldeployment-loaded.json")
    del obj["status"]["endpoints"]["openai"]
    assert health("ModelDeployment", obj) == (
        "Healthy",
        "Model loaded, 1/1 replicas ready, serving at http://tiny-triton.recording.svc:8000",
    )


def test_a_modeldeployment_without_status_or_with_an_unseen_spec_is_progressing() -> None:
    obj = fixture("modeldeployment-loaded.json")
    obj["metadata"]["generation"] = 2
    assert health("ModelDeployment", obj) == (
        "Progressing",
        "Waiting for the DeepTune operator to observe generation 2",
    )
    del obj["status"]
    assert health("ModelDeployment", obj)[0] == "Progressing"


def test_zero_replicas_under_an_autoscaler_is_not_scaled_to_zero() -> None:
    obj = fixture("modeldeployment-pending-scaledtozero.json")
    obj["spec"]["autoscaling"] = {"enabled": True}
    assert health("ModelDeployment", obj) == (
        "Progressing",
        "ScaledToZero: replicas is 0: no pod serves the model",
    )


def test_a_failed_finetunejob_is_degraded_whatever_the_replicas_and_recovers_when_rerun() -> None:
    """Argo CD cannot parse the message, so the reason alone decides; the rest stays Progressing."""
    obj = fixture("modeldeployment-pending-finetunejobfailed.json")
    failed = condition(fixture("finetunejob-failed-invaliddataset.json"), "Failed")
    assert condition(obj, "Ready")["message"].endswith(f"{failed['reason']}: {failed['message']}")
    obj["spec"]["replicas"] = 0
    assert health("ModelDeployment", obj)[0] == "Degraded"
    waiting = fixture("modeldeployment-pending-waitingforfinetunejob.json")
    obj["status"] = waiting["status"]  # the job rerun under the same name, not finished yet
    obj["spec"]["replicas"] = 1
    assert health("ModelDeployment", obj)[0] == "Progressing"


def test_an_adapter_of_another_base_is_degraded_with_both_bases_named() -> None:
    obj = fixture("modeldeployment-pending-waitingforfinetunejob.json")
    message = "adapters[0] (billing): FineTuneJob b was trained on x@main, but model's base model is y@main"
    for c in obj["status"]["conditions"]:
        if c["type"] == "Ready":
            c.update(reason="AdapterBaseMismatch", message=message)
    assert health("ModelDeployment", obj) == ("Degraded", f"AdapterBaseMismatch: {message}")


def test_a_rejected_spec_names_no_deployment_that_was_never_created() -> None:
    status = fixture("modeldeployment-failedtoload-invalidspec.json")["status"]
    assert not {"deploymentName", "endpoints", "replicas", "resolvedModel"} & set(status), status


def test_a_modeldeployment_failure_without_last_failure_uses_the_model_loaded_condition() -> None:
    obj = fixture("modeldeployment-failedtoload.json")
    del obj["status"]["lastFailure"]
    assert health("ModelDeployment", obj) == (
        "Degraded",
        f"ModelLoadFailed: {condition(obj, 'ModelLoaded')['message']}",
    )


def test_modeldeployment_fixtures_are_valid_and_recorded_ones_cover_every_model_state() -> None:
    recorded = set()
    for path in FIXTURES.glob("modeldeployment-*.json"):
        obj = json.loads(path.read_text())
        ModelDeploymentSpec.model_validate(obj["spec"])
        status = ModelDeploymentStatus.model_validate(obj["status"])
        assert status.model_dump(mode="json", by_alias=True, exclude_none=True) == obj["status"], path.name
        assert path.name.startswith(f"modeldeployment-{str(status.model_state).lower()}"), path.name
        assert not path.name.endswith(".constructed.json"), f"{path.name}: record it (record.py)"
        recorded.add(status.model_state)
    assert recorded == set(typing.get_args(ModelState))


# --- FineTuneSweep: objects constructed from the status model ---------------------------------

SWEEP_SPEC = yaml.safe_load((ROOT / "examples" / "finetune-tiny-sweep.yaml").read_text())["spec"]


def sweep(*trials: tuple[str, float | None], invalid: str | None = None) -> dict[str, Any]:
    """The example sweep with these trials (phase, objective), its status as the operator derives it."""
    records = [
        Trial(number=n, name=f"tiny-keywords-sweep-{n}", parameters={"hyperparameters.learningRate": 0.01},
              phase=phase, objective=objective)  # type: ignore[arg-type]
        for n, (phase, objective) in enumerate(trials)
    ]  # fmt: skip
    now = "2026-12-05T00:00:00Z"
    status = derive_status(
        parse_spec(SWEEP_SPEC), FineTuneSweepStatus(), records, outputs={}, generation=1, now=now
    )
    if invalid is not None:
        status = invalid_spec_status(status, invalid, 1, now)
    return {
        "apiVersion": "deeptune.dev/v1alpha1",
        "kind": "FineTuneSweep",
        "metadata": {"name": "tiny-keywords-sweep", "namespace": "ns", "generation": 1},
        "spec": SWEEP_SPEC,
        "status": status.to_wire(),
    }


SWEEPS = {
    "running": (
        sweep(("Succeeded", 0.5), ("Failed", None), ("Running", None)),
        ("Progressing", "Trials: 1 succeeded, 1 failed, 0 pruned, 1 running of 4; best so far "
                        "tiny-keywords-sweep-0 (0.5)"),
    ),
    "succeeded": (
        sweep(("Succeeded", 0.5), ("Failed", None), ("Pruned", None), ("Succeeded", 1.0)),
        ("Healthy", "BestTrialFound: tiny-keywords-sweep-3 is best: exactMatch 1 with "
                    "{'hyperparameters.learningRate': 0.01}"),
    ),
    "failed": (
        sweep(("Failed", None), ("Failed", None), ("Pruned", None), ("Failed", None)),
        ("Degraded", "NoTrialSucceeded: every trial failed or was pruned (3 failed, 1 pruned)"),
    ),
    "invalidspec": (
        sweep(invalid="spec.objective.metric f1 is not among template.evaluation.metrics: add it there"),
        ("Degraded", "InvalidSpec: spec.objective.metric f1 is not among template.evaluation.metrics: "
                     "add it there"),
    ),
}  # fmt: skip


@pytest.mark.parametrize(("name", "case"), SWEEPS.items())
def test_finetunesweep_health(name: str, case: tuple[dict[str, Any], tuple[str, str]]) -> None:
    obj, expected = case
    assert health("FineTuneSweep", obj) == expected


def test_a_sweep_without_status_or_with_an_unseen_spec_is_progressing() -> None:
    obj = SWEEPS["succeeded"][0]
    unseen = {**obj, "metadata": {**obj["metadata"], "generation": 2}}
    assert health("FineTuneSweep", unseen) == (
        "Progressing",
        "Waiting for the DeepTune operator to observe generation 2",
    )
    assert health("FineTuneSweep", {**obj, "status": {}})[0] == "Progressing"


# --- FederatedFineTune: objects constructed from the status model -----------------------------

FEDERATION_SPEC = yaml.safe_load((ROOT / "examples" / "finetune-tiny-federated.yaml").read_text())["spec"]


def federation(coordinator: dict[str, Any] | None, *sites: dict[str, Any] | None) -> dict[str, Any]:
    """The example federation, its coordinator's Job and its sites' FineTuneJobs as these."""
    spec, name = parse_federation(FEDERATION_SPEC), "tiny-keywords-federated"
    observed = [
        observe_site(site.namespace, f"{name}-federated", finetunejob)
        for site, finetunejob in zip(spec.sites, sites, strict=True)
    ]
    status = derive_federation(
        FederatedFineTuneStatus(), observe_coordinator(f"{name}-train", coordinator), observed,
        output=coordinator_output(spec, "ns", name), generation=1, now="2026-12-05T00:00:00Z",
    )  # fmt: skip
    meta = {"name": "tiny-keywords-federated", "namespace": "ns", "generation": 1}
    return {
        "kind": "FederatedFineTune",
        "metadata": meta,
        "spec": FEDERATION_SPEC,
        "status": status.to_wire(),
    }


COMPLETE = {"status": {"conditions": [{"type": "Complete", "status": "True"}]}}
FEDERATIONS = {
    "running": (
        federation(None, {"status": {"phase": "Succeeded"}}, {"status": {"phase": "Running"}}),
        ("Progressing", "RoundsRunning: coordinator running; sites not done: site-b"),
    ),
    "succeeded": (
        federation(COMPLETE, {"status": {"phase": "Succeeded"}}, {"status": {"phase": "Succeeded"}}),
        (
            "Healthy",
            "AdapterAveraged: the averaged adapter of 2 sites is in "
            "deeptune-output:ns/tiny-keywords-federated/adapter",
        ),
    ),
    "failed": (
        federation(None, {"status": {"phase": "Running"}}, {"status": {"phase": "Failed"}}),
        ("Degraded", "SiteFailed: site site-b (tiny-keywords-federated-federated) failed"),
    ),
}


@pytest.mark.parametrize(("name", "case"), FEDERATIONS.items(), ids=list(FEDERATIONS))
def test_federatedfinetune_health(name: str, case: tuple[dict[str, Any], tuple[str, str]]) -> None:
    obj, expected = case
    assert health("FederatedFineTune", obj) == expected


# --- the scripts as shipped ------------------------------------------------------------------


def test_the_argocd_cm_snippet_embeds_the_lua_files_verbatim() -> None:
    data = yaml.safe_load((ARGOCD / "argocd-cm.yaml").read_text())["data"]
    expected = {f"resource.customizations.health.deeptune.dev_{kind}": text for kind, text in SCRIPTS.items()}
    assert data == expected, "copy deploy/argocd/health/*.lua into deploy/argocd/argocd-cm.yaml again"


def test_the_sandbox_is_as_strict_as_argo_cd() -> None:
    """A script that calls the string library works in plain Lua but not in Argo CD, nor here."""
    obj = fixture("finetunejob-succeeded.json")
    for script in ('return {status = string.lower("Healthy")}', 'return {status = ("Healthy"):lower()}'):
        with pytest.raises(lupa.lua51.LuaError):
            health("FineTuneJob", obj, script)


def test_the_example_applications_fit_the_chart_and_sync_server_side() -> None:
    def application(name: str) -> dict[str, Any]:
        app = yaml.safe_load((ROOT / "examples" / "argocd" / name).read_text())
        assert (app["apiVersion"], app["kind"]) == ("argoproj.io/v1alpha1", "Application")
        assert "ServerSideApply=true" in app["spec"]["syncPolicy"]["syncOptions"]
        return dict(app["spec"])

    operator = application("deeptune-operator.yaml")
    chart = ROOT / operator["source"]["path"]
    assert (chart / "Chart.yaml").is_file()
    schema = json.loads((chart / "values.schema.json").read_text())
    jsonschema.validate(operator["source"]["helm"]["valuesObject"], schema)
    assert "ignoreDifferences" not in application("finetunejobs.yaml")


# --- Argo CD's own engine ----------------------------------------------------------------------


def test_argo_cds_own_lua_engine_agrees_on_every_recorded_object(tmp_path: Path) -> None:
    """lupa stands in for Argo CD above; here every recorded object (with the promotion gate's refusal,
    the constructed sweeps and federations) goes through Argo CD's util/lua, built from its Go module
    into a test binary (tests/localcluster/gomod/argocd-health), which must give the same status and
    message."""
    engine = shutil.which("argocd-health.test")
    assert engine, (
        "argocd-health.test is not on PATH: run `bash tests/localcluster/build.sh` (scripts/test.sh does)"
    )
    objects = [(path.name, json.loads(path.read_text())) for path in sorted(FIXTURES.glob("*.json"))]
    gated = fixture("modeldeployment-loaded.json")
    gated["status"]["conditions"].append(
        {
            "type": "Promoted",
            "status": "False",
            "reason": "PromotionGateFailed",
            "message": "exactMatch 0 missed",
        }
    )
    objects.append(("modeldeployment-loaded-promotiongatefailed", gated))
    objects += [(f"finetunesweep-{name}.constructed", obj) for name, (obj, _) in SWEEPS.items()]
    objects += [(f"federatedfinetune-{name}.constructed", obj) for name, (obj, _) in FEDERATIONS.items()]
    cases = []
    for name, obj in objects:
        status, message = health(obj["kind"], obj)
        cases.append(
            {
                "name": name,
                "script": SCRIPTS[obj["kind"]],
                "object": obj,
                "status": status,
                "message": message,
            }
        )
    gate = next(case for case in cases if case["name"] == "modeldeployment-loaded-promotiongatefailed")
    assert (gate["status"], gate["message"]) == ("Degraded", "PromotionGateFailed: exactMatch 0 missed")
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    env = {**os.environ, "DEEPTUNE_HEALTH_CASES": str(tmp_path / "cases.json")}
    done = subprocess.run(
        [engine, "-test.v"], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "--- PASS: TestHealthScripts" in done.stdout
