"""Generated specs against the real API server: what it admits, the operator can handle.

The specs of tests/unit/test_spec_properties.py (the examples, mutated: wrong types, numbers out of
range, bad enums and patterns, unknown, missing and null fields, cross-field conflicts) are created
with a server-side dry run, as `kubectl apply` would (strict field validation). Then:

- a spec the API server rejects is rejected with a message that names a field the mutations touched;
- a spec it admits is accepted by the models, read as the operator reads it (the stored object, with
  the server's defaults and pruned nulls). The exceptions are the checks only the models make; each
  reaches the operator's InvalidSpec path (a ValidationError) and is listed in MODEL_ONLY_CHECKS;
- the children the operator builds for an admitted spec are created (dry run, through the same client
  calls as the operator) or rejected with 422 Invalid, which the handlers report as InvalidSpec.
  Anything else (a 400, a client-side error) would be retried by kopf forever.

The figures (specs tried, admitted, rejected, disagreements) are printed at the end of the module.
"""

from __future__ import annotations

import copy
import json
import re
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from deeptune import children
from deeptune.api.base import GROUP, VERSION, describe_validation_error
from tests.cluster.harness import Cluster, keda_crd
from tests.conftest import ROOT
from tests.unit.test_spec_properties import (
    PARSERS,
    REGRESSIONS,
    SEEDS,
    Generated,
    Mutation,
    Path,
    Regression,
    children_of,
    dotted,
    generated_specs,
    names_a_mutation,
    put,
)

pytestmark = pytest.mark.cluster

PLURALS = {"FineTuneJob": "finetunejobs", "ModelDeployment": "modeldeployments"}

MODEL_ONLY_CHECKS: dict[str, str] = {
    "lora: targetModules: `auto` cannot be combined with explicit module names": (
        "docs/troubleshooting.md: the example of what the schema does not say and the operator checks"
    ),
}
"""Rejections only the models make (the API server admits the spec): message → where it is documented.
The operator reports each as InvalidSpec (tests/cluster/test_finetunejob_flow.py shows one)."""

MODEL_ONLY_EXAMPLES: dict[str, tuple[str, dict[Path, Any]]] = {
    "lora: targetModules: `auto` cannot be combined with explicit module names": (
        "FineTuneJob",
        {("lora", "targetModules"): ["auto", "q_proj"]},
    ),
}
"""For each documented model-only check: the kind, and the changes to its minimal spec that make it."""

OPERATOR_GAPS: dict[str, str] = {}
"""Failures that need a fix outside the models: pattern → why and the fix. Each is counted in the
module's summary rather than failing it; add one only with a strict xfail test reproducing it, and
remove both once the fix lands (none are open)."""


NAMES = st.sampled_from(["fuzz", "f.u-z.z", "x" * 63, "long." + "y" * 200, "9lives"])
"""Object names: child names, labels and Triton's model name are derived from them."""


@dataclass
class Tally:
    """What the generated specs did, for the module's summary."""

    tried: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    model_only: Counter[str] = field(default_factory=Counter)
    server_only: Counter[str] = field(default_factory=Counter)
    children_rejected: Counter[str] = field(default_factory=Counter)
    known_gaps: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        lines = [f"generated specs tried: {dict(self.tried)}"]
        lines += [f"  {kind}: {outcome}: {count}" for (kind, outcome), count in sorted(self.outcomes.items())]
        lines.append(f"models reject what the server admits: {dict(self.model_only)}")
        lines.append(f"server rejects what the models accept (input as written): {dict(self.server_only)}")
        lines.append(f"children rejected with 422 (reported as InvalidSpec): {dict(self.children_rejected)}")
        lines.append(f"known operator gaps met: {dict(self.known_gaps)}")
        return "\n".join(lines)


TALLY = Tally()


@pytest.fixture(scope="module")
def api(crds: Cluster) -> Iterator[client.ApiClient]:
    """The client, with KEDA's ScaledObject CRD installed meanwhile: the ScaledObjects built for
    generated specs meet KEDA's own schema and rules."""
    api_client = config.new_client_from_config(str(crds.kubeconfig))
    with keda_crd(crds):
        yield api_client
    print(f"\n{TALLY.summary()}")
    (crds.state_dir / "spec-fuzz.json").write_text(
        json.dumps({k: {str(key): v for key, v in c.items()} for k, c in vars(TALLY).items()}, indent=2)
    )


@pytest.fixture(scope="module")
def fuzz_namespace(crds: Cluster) -> Iterator[str]:
    name = f"fuzz-{uuid.uuid4().hex[:8]}"
    crds.kubectl("create", "namespace", name)
    yield name
    crds.kubectl("delete", "namespace", name, "--wait=false", check=False)


# --- the API server's answers ----------------------------------------------------------------------


def status_of(error: ApiException) -> dict[str, Any]:
    try:
        return dict(json.loads(error.body or "{}"))
    except ValueError:
        return {"message": str(error.reason)}


def server_path(text: str) -> Path:
    """`spec.env[0].name` → ("env", 0, "name")."""
    parts: list[str | int] = []
    for piece in re.findall(r"[^.\[\]]+|\[[^\]]*\]", text.removeprefix(".")):
        index = piece[1:-1] if piece.startswith("[") else None
        # A list index is a bracketed run of ASCII digits ("¹".isdigit() is true, and a key may be "¹")
        parts.append(int(index) if index is not None and re.fullmatch(r"[0-9]+", index) else index or piece)
    return tuple(parts[1:]) if parts[:1] == ["spec"] else tuple(parts)


def server_complaints(status: dict[str, Any]) -> list[tuple[Path, str]]:
    """(field path under spec, message) for each problem the API server names."""
    causes = (status.get("details") or {}).get("causes") or []
    out = [
        (server_path(cause["field"]), cause.get("message", ""))
        for cause in causes
        if cause.get("field") and "some validation rules were not checked" not in cause.get("message", "")
    ]
    out += [
        (server_path(name), "unknown field")
        for name in re.findall(r'unknown field "([^"]+)"', status.get("message", ""))
    ]
    out += [
        (server_path(name), "duplicate field")
        for name in re.findall(r'duplicate field "([^"]+)"', status.get("message", ""))
    ]
    return out


def dry_run_create(api: client.ApiClient, kind: str, namespace: str, name: str, spec: dict[str, Any]) -> Any:
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name}, "spec": spec}
    return client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURALS[kind], body, dry_run="All", field_validation="Strict"
    )


def dry_run_child(api: client.ApiClient, manifest: dict[str, Any]) -> None:
    """Create a child as the operator does (trainer children are created, serving ones applied),
    through the operator's own request path, dry run."""
    client.ApiClient.set_default(api)  # what deeptune.children uses, as in the operator after login
    trainer = manifest["metadata"]["labels"]["app.kubernetes.io/component"] == "trainer"
    if trainer:
        children.create(manifest, dry_run=True)
    elif manifest["kind"] != "ServiceMonitor":  # the Prometheus Operator's CRD is not installed here
        children.apply(manifest, dry_run=True)


def category(text: str) -> str:
    """A rejection without its values, to count alike ones together."""
    text = re.sub(r'"[^"]*"', '"…"', text)
    return re.sub(r"\[\d+\]", "[]", re.sub(r"\b\d+\b", "N", text))[:160]


# --- the property ----------------------------------------------------------------------------------


def rejected(kind: str, error: ApiException, generated: Generated, models_accept: bool) -> list[str]:
    """The API server said no: with a 400 or 422 naming a field the mutations touched."""
    TALLY.outcomes[(kind, f"rejected {error.status}")] += 1
    status = status_of(error)
    message = status.get("message", "")
    if models_accept:  # lax pydantic coercions ("3" for 3), mostly: the server is the stricter one
        TALLY.server_only[category(message)] += 1
    if error.status not in (400, 422):
        return [f"the API server answered {error.status}: {message}"]
    if not any(names_a_mutation(path, text, generated.mutations) for path, text in server_complaints(status)):
        return [f"the API server's rejection names no mutated field: {message}"]
    return []


def model_only(error: ValidationError) -> list[str]:
    """The models refused an admitted spec: fine (InvalidSpec) for the documented checks only."""
    problems = []
    for problem in error.errors():
        text = (
            ".".join(str(part) for part in problem["loc"])
            + ": "
            + problem["msg"].removeprefix("Value error, ")
        )
        TALLY.model_only[text] += 1
        if text not in MODEL_ONLY_CHECKS:
            problems.append(f"the server admits, the models reject (undocumented): {text}")
    return problems


def children_created(api: client.ApiClient, manifests: list[dict[str, Any]]) -> list[str]:
    """Each child dry-run created: done, or refused with 422 (InvalidSpec). Anything else is retried."""
    problems = []
    for manifest in manifests:
        try:
            dry_run_child(api, manifest)
        except ApiException as error:
            text = f"{manifest['kind']}: {status_of(error).get('message')}"
            if error.status == 422:
                TALLY.children_rejected[category(text)] += 1
            else:
                problems.append(
                    f"a child is rejected with {error.status}, which kopf retries forever: {text}"
                )
        except Exception as error:  # e.g. the client's own validation of a typed body
            problems.append(f"creating a {manifest['kind']} raised {type(error).__name__}: {error}")
    return problems


def check(api: client.ApiClient, namespace: str, generated: Generated, name: str) -> list[str]:
    """Problems with one generated spec (none is what the property wants)."""
    kind, parse = generated.kind, PARSERS[generated.kind]
    TALLY.tried[kind] += 1
    try:
        parse(copy.deepcopy(generated.spec))
        models_accept = True
    except ValidationError:
        models_accept = False
    try:
        stored = dry_run_create(api, kind, namespace, name, copy.deepcopy(generated.spec))
    except ApiException as error:
        return rejected(kind, error, generated, models_accept)
    TALLY.outcomes[(kind, "admitted")] += 1
    try:
        parsed = parse(copy.deepcopy(stored["spec"]))  # what the operator reads: defaulted, nulls pruned
    except ValidationError as error:
        return model_only(error)
    except Exception as error:  # the property: nothing but ValidationError
        return [f"the models raised {type(error).__name__} on an admitted spec: {error}"]
    try:
        manifests = children_of(kind, name, namespace, parsed)
    except Exception as error:  # in a handler, retried forever
        return [f"building the children raised {type(error).__name__}: {error}"]
    return children_created(api, manifests)


def unknown(problems: list[str]) -> list[str]:
    """The problems that are not known operator gaps (those are counted)."""
    out = []
    for problem in problems:
        gap = next((pattern for pattern in OPERATOR_GAPS if re.search(pattern, problem)), None)
        if gap is None:
            out.append(problem)
        else:
            TALLY.known_gaps[gap] += 1
    return out


FUZZ_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,
    ],
)


@pytest.mark.parametrize("kind", ["FineTuneJob", "ModelDeployment"])
def test_what_the_api_server_admits_the_operator_handles(
    api: client.ApiClient, fuzz_namespace: str, kind: str
) -> None:
    @FUZZ_SETTINGS
    @given(generated=generated_specs(kind), name=NAMES)
    def admitted_specs_are_handled(generated: Generated, name: str) -> None:
        assert unknown(check(api, fuzz_namespace, generated, name)) == []

    admitted_specs_are_handled()


def test_model_only_checks_are_the_documented_ones(
    api: client.ApiClient, fuzz_namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each documented model-only check, made on purpose: the document it cites says it, the API server
    admits the spec, the models refuse it with that message alone, and the generated specs' property
    takes it as documented. Self-contained: it reads nothing another test leaves (the module's tally);
    that the generated specs meet no undocumented one is their own property (`model_only`)."""
    assert set(MODEL_ONLY_EXAMPLES) == set(MODEL_ONLY_CHECKS), "each documented check needs an example"
    for message, (kind, changes) in MODEL_ONLY_EXAMPLES.items():
        document = MODEL_ONLY_CHECKS[message].partition(":")[0]
        assert message in (ROOT / document).read_text(), f"{document} does not say: {message}"
        spec = copy.deepcopy(SEEDS[kind][0])  # a minimal spec of the kind
        for path, value in changes.items():
            put(spec, path, copy.deepcopy(value))
        stored = dry_run_create(api, kind, fuzz_namespace, "documented", copy.deepcopy(spec))
        with pytest.raises(ValidationError) as caught:
            PARSERS[kind](stored["spec"])
        assert describe_validation_error(caught.value) == f"spec.{message}"
        tally = Tally()
        monkeypatch.setattr(sys.modules[__name__], "TALLY", tally)  # the module's figures stay the fuzz's
        generated = Generated(kind, spec, [Mutation("conflict", path) for path in changes])
        assert check(api, fuzz_namespace, generated, "documented") == []
        assert tally.outcomes == Counter({(kind, "admitted"): 1}), tally.summary()
        assert tally.model_only == Counter({message: 1}), tally.summary()


@pytest.mark.parametrize("regression", REGRESSIONS, ids=lambda r: f"{r.kind}:{dotted(r.field)}")
def test_regressions_are_rejected_at_apply(
    api: client.ApiClient, fuzz_namespace: str, regression: Regression
) -> None:
    """What the generated specs found, now refused by the API server itself, naming the field."""
    with pytest.raises(ApiException) as caught:
        dry_run_create(api, regression.kind, fuzz_namespace, "regression", regression.spec())
    status = status_of(caught.value)
    mutation = [Mutation("regression", regression.field)]
    assert any(names_a_mutation(path, text, mutation) for path, text in server_complaints(status)), status
