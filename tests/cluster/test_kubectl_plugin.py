"""`kubectl deeptune` as a user runs it: kubectl finds the `kubectl-deeptune` executable on PATH and
runs it against the real API server. The FineTuneJobs carry statuses recorded from real runs
(tests/unit/fixtures/status), written through the status subresource: no operator runs here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.harness import Cluster
from tests.conftest import ROOT

pytestmark = pytest.mark.cluster
FIXTURES = ROOT / "tests" / "unit" / "fixtures" / "status"


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A PATH with `kubectl-deeptune` on it, as pip's script for the package would put it."""
    bin_dir = tmp_path_factory.mktemp("bin")
    script = bin_dir / "kubectl-deeptune"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m deeptune.kubectl_plugin "$@"\n')
    script.chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


@pytest.fixture(scope="module")
def krew_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A PATH with `kubectl-deeptune` installed by krew, as its users get it: the release's archive
    and manifest (scripts/krew_plugin.py, this machine's platform), checked by krew's own validator,
    installed from the archive into a krew root of its own."""
    out = tmp_path_factory.mktemp("krew")
    built = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "krew_plugin.py"), "--version", "0.1.0", "--out", str(out),
         "--host-only"], capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    manifest = out / "deeptune.yaml"
    [archive] = out.glob("kubectl-deeptune-*.tar.gz")
    valid = subprocess.run(
        ["validate-krew-manifest", "-manifest", str(manifest), "-skip-install"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert valid.returncode == 0, valid.stderr
    root = out / "root"
    env = {**os.environ, "KREW_ROOT": str(root)}
    installed = subprocess.run(
        ["krew", "install", f"--manifest={manifest}", f"--archive={archive}"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr  # the archive's sha256 matched the manifest's
    return f"{root / 'bin'}:{os.environ['PATH']}"


def recorded(crds: Cluster, namespace: str, fixture: str, name: str, **status: Any) -> dict[str, Any]:
    """A FineTuneJob from a recorded one: its spec applied, its status written as the operator would."""
    obj = json.loads((FIXTURES / fixture).read_text())
    manifest = {"apiVersion": obj["apiVersion"], "kind": obj["kind"],
                "metadata": {"name": name, "namespace": namespace}, "spec": obj["spec"]}  # fmt: skip
    crds.apply(manifest)
    patch = json.dumps({"status": {**obj["status"], **status}})
    crds.kubectl("patch", "ftj", name, "-n", namespace, "--subresource=status", "--type=merge", "-p", patch)
    return dict(obj["status"])


def deeptune(crds: Cluster, path: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`kubectl deeptune ARGS` with the cluster's kubeconfig, on a terminal 200 columns wide."""
    env = {**os.environ, "PATH": path, "KUBECONFIG": str(crds.kubeconfig), "COLUMNS": "200"}
    return subprocess.run(
        ["kubectl", "deeptune", *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


def test_status_shows_progress_while_running_and_results_once_done(
    crds: Cluster, namespace: str, plugin_path: str
) -> None:
    recorded(crds, namespace, "finetunejob-running.json", "running")
    running = deeptune(crds, plugin_path, "status", "running", "-n", namespace)
    assert running.returncode == 0, running.stderr
    first, bar = running.stdout.splitlines()[:2]
    assert first.startswith(f"FineTuneJob running ({namespace}): Running — ")
    assert bar.startswith("[") and "%" in bar and "step " in bar

    done = recorded(crds, namespace, "finetunejob-succeeded.json", "done")
    shown = deeptune(crds, plugin_path, "status", "done", "-n", namespace)
    assert shown.returncode == 0, shown.stderr
    print(f"\n{running.stdout}\n{shown.stdout}")
    assert f"FineTuneJob done ({namespace}): Succeeded" in shown.stdout
    assert "[██████████████████████████████] 100%  step 120/120" in shown.stdout
    assert "artifacts: pvc deeptune-output, tiny-keywords/ (adapter adapter, merged –)" in shown.stdout
    rows = {line.split()[1]: line for line in shown.stdout.splitlines() if line.startswith("│ ")}
    assert "959.2" in rows["perplexity"] and "1.392" in rows["perplexity"] and "-957.8" in rows["perplexity"]
    assert done["evalResults"]["fineTuned"]["exactMatch"] == 1


def test_results_and_compare_put_the_numbers_side_by_side(
    crds: Cluster, namespace: str, plugin_path: str
) -> None:
    recorded(crds, namespace, "finetunejob-succeeded.json", "first")
    second = json.loads((FIXTURES / "finetunejob-succeeded.json").read_text())["status"]
    second["evalResults"]["fineTuned"]["exactMatch"] = 0.75
    recorded(crds, namespace, "finetunejob-succeeded.json", "second", evalResults=second["evalResults"])
    results = deeptune(crds, plugin_path, "results", "first", "-n", namespace)
    assert results.returncode == 0, results.stderr
    assert "first: validation split, 36 rows" in results.stdout
    compared = deeptune(crds, plugin_path, "compare", "first", "second", "-n", namespace)
    assert compared.returncode == 0, compared.stderr
    print(f"\n{compared.stdout}")
    row = next(line for line in compared.stdout.splitlines() if "exactMatch" in line)
    cells = [cell.strip() for cell in row.split("│")[1:5]]
    assert cells == ["exactMatch", "1", "0.75", "-0.25"]
    distilled = {**second["evalResults"], "teacher": {"exactMatch": 0.9}}
    recorded(crds, namespace, "finetunejob-succeeded.json", "student", evalResults=distilled)
    student = deeptune(crds, plugin_path, "results", "student", "-n", namespace)
    row = next(line for line in student.stdout.splitlines() if "exactMatch" in line)
    assert [cell.strip() for cell in row.split("│")[1:6]] == ["exactMatch", "0", "0.75", "+1", "0.9"]


def test_explain_failure_names_the_reason_and_where_to_read_on(
    crds: Cluster, namespace: str, plugin_path: str
) -> None:
    recorded(crds, namespace, "finetunejob-failed-invaliddataset.json", "broken")
    explained = deeptune(crds, plugin_path, "explain-failure", "broken", "-n", namespace)
    assert explained.returncode == 1
    assert f"FineTuneJob broken ({namespace}): Failed — InvalidDataset: " in explained.stdout
    assert "last failure: InvalidDataset (exit code 3): " in explained.stdout
    assert "(no trainer pod left" in explained.stdout  # nothing ran here: said, not a crash
    assert explained.stdout.rstrip().endswith("docs/troubleshooting.md#dataset-errors")
    missing = deeptune(crds, plugin_path, "status", "nope", "-n", namespace)
    assert (missing.returncode, missing.stderr.strip()) == (
        1,
        f'error: finetunejob "nope" not found in namespace {namespace}',
    )


def test_kubectl_lists_the_plugin(crds: Cluster, plugin_path: str, tmp_path: Path) -> None:
    env = {**os.environ, "PATH": plugin_path}
    listed = subprocess.run(
        ["kubectl", "plugin", "list"], capture_output=True, text=True, env=env, check=False
    )
    assert any(line.endswith("/kubectl-deeptune") for line in listed.stdout.splitlines()), listed.stdout


def test_the_plugin_krew_installs_runs_against_the_cluster(
    crds: Cluster, namespace: str, krew_path: str, plugin_path: str
) -> None:
    """The one-file plugin krew installed (its own packages, python3 from the PATH) answers as the
    pip-installed one does."""
    recorded(crds, namespace, "finetunejob-succeeded.json", "krewed")
    shown = deeptune(crds, krew_path, "results", "krewed", "-n", namespace)
    assert shown.returncode == 0, shown.stderr
    assert "krewed: validation split, 36 rows" in shown.stdout
    assert shown.stdout == deeptune(crds, plugin_path, "results", "krewed", "-n", namespace).stdout
