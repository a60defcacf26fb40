"""The GitHub Actions workflows (.github/workflows): actionlint passes, every action is pinned to a
commit (a tag can be moved; a commit cannot), and the release builds every image the repository
defines and pushes the chart where README's install line pulls it from."""

from __future__ import annotations

import re
import shutil
import subprocess

import yaml

from tests.conftest import ROOT

WORKFLOWS = ROOT / ".github" / "workflows"
PINNED = re.compile(r"^[\w.-]+/[\w.-]+(/[\w./-]+)?@[0-9a-f]{40} # v\d+(\.\d+)*$")


def uses_lines() -> list[tuple[str, str]]:
    return [
        (path.name, line.split("uses:", 1)[1].strip())
        for path in sorted(WORKFLOWS.glob("*.yml"))
        for line in path.read_text().splitlines()
        if "uses:" in line and not line.lstrip().startswith("#")
    ]


def test_actionlint_passes() -> None:
    actionlint = shutil.which("actionlint")
    assert actionlint, (
        "actionlint is not on PATH: run `bash tests/localcluster/build.sh` (scripts/test.sh does)"
    )
    done = subprocess.run([actionlint, "-no-color"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_action_is_pinned_to_a_commit_with_its_tag_named() -> None:
    found = uses_lines()
    assert found
    loose = [f"{name}: {uses}" for name, uses in found if not PINNED.match(uses)]
    assert not loose, "pin each action as owner/repo@<40-hex commit> # vX.Y.Z:\n" + "\n".join(loose)
    tags: dict[str, set[str]] = {}
    for _, uses in found:
        tags.setdefault(uses.split("@")[0], set()).add(uses.split("@")[1])
    assert all(len(pins) == 1 for pins in tags.values()), f"one pin per action across workflows: {tags}"


def test_the_release_builds_every_image_and_pushes_the_chart_readme_installs() -> None:
    release = yaml.safe_load((WORKFLOWS / "release.yml").read_text())
    built = {entry["dockerfile"] for entry in release["jobs"]["images"]["strategy"]["matrix"]["include"]}
    dockerfiles = {str(path.relative_to(ROOT)) for path in ROOT.glob("*/Dockerfile")}
    assert built == dockerfiles
    chart_steps = "\n".join(step.get("run", "") for step in release["jobs"]["chart"]["steps"])
    assert 'helm push "dist/deeptune-$version.tgz" "oci://ghcr.io/$OWNER/charts"' in chart_steps
    assert "helm install deeptune oci://ghcr.io/deeptune/charts/deeptune" in (ROOT / "README.md").read_text()
