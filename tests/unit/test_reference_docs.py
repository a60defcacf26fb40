"""docs/reference.md is generated from the CRDs and cannot drift from them."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT

REFERENCE = ROOT / "docs" / "reference.md"


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_reference", ROOT / "scripts" / "gen_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen_reference = _load_generator()


def crds() -> list[dict[str, Any]]:
    return [yaml.safe_load(path.read_text()) for path in sorted((ROOT / "crds").glob("*.yaml"))]


def property_paths(node: dict[str, Any], path: str) -> Iterator[str]:
    for name, child in node.get("properties", {}).items():
        yield f"{path}.{name}"
        yield from property_paths(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from property_paths(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from property_paths(node["additionalProperties"], f"{path}.<key>")


def test_the_committed_reference_is_up_to_date() -> None:
    assert gen_reference.main(["--check"]) == 0, "run `python scripts/gen_reference.py`"


def test_check_fails_on_a_stale_reference(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stale = tmp_path / "reference.md"
    stale.write_text(REFERENCE.read_text().replace("| `spec.method` |", "| `spec.methods` |", 1))
    assert gen_reference.main(["--check", "--out", str(stale)]) == 1
    assert "python scripts/gen_reference.py" in capsys.readouterr().err
    assert gen_reference.main(["--check", "--out", str(tmp_path / "missing.md")]) == 1


def test_every_field_rule_and_column_is_documented() -> None:
    """In each resource's section: every field (a field that embeds another resource's spec as a
    link to that section, whose fields are checked there), rule and printer column."""
    text = REFERENCE.read_text()
    for crd in crds():
        kind = crd["spec"]["names"]["kind"]
        section = text.split(f"\n## {kind}\n", 1)[1].split("\n## ", 1)[0]
        embedded = {path for (owner, path) in gen_reference.EMBEDDED if owner == kind}
        version = crd["spec"]["versions"][0]
        schema = version["schema"]["openAPIV3Schema"]
        for part in ("spec", "status"):
            for path in property_paths(schema["properties"][part], part):
                if any(path.startswith(f"{field}.") for field in embedded):
                    continue
                assert f"| `{path}` |" in section, path
        for path in embedded:
            target = gen_reference.EMBEDDED[(kind, path)]
            assert f"every field and rule as in [{target}](#{target.lower()})" in section, path
        for column in version["additionalPrinterColumns"]:
            assert f"| {column['name']} | {column['type']} | `{column['jsonPath']}` |" in section
        for path, rule in gen_reference.rules(schema["properties"]["spec"], "spec", frozenset(embedded)):
            if rule["rule"] == "self == oldSelf":
                immutable = next(line for line in section.splitlines() if line.startswith("Immutable"))
                assert f"`{path}`" in immutable and rule["message"].split(" ", 1)[1] in immutable, path
            else:
                rule_cells = f"{gen_reference.code(rule['rule'])} | {gen_reference.cell(rule['message'])}"
                assert f"| `{path}` | {rule_cells} |" in section, path


def test_constraints_read_as_the_schema_says() -> None:
    text = REFERENCE.read_text()
    rows = {line.split(" | ")[0].strip("| `"): line for line in text.splitlines() if line.startswith("| `")}
    assert "| string | `lora` | one of `lora`, `qlora`, `full`; immutable |" in rows["spec.method"]
    assert "| number |  | > 0; < 1 |" in rows["spec.hyperparameters.learningRate"]
    assert "| int-or-string | `8Gi` |" in rows["spec.resources.sharedMemory"]
    assert "required; length 1–253" in rows["spec.output.pvc.claimName"]


QUOTED = [
    "the model has no chat template, so chat messages cannot be rendered",
    "caches responses (spec.responseCache), so it serves greedy decoding",
    "exceeds the maximum queue size",
    "the request waited too long in the model's queue",
    "the trainer ran out of memory: raise resources.memory, or lower batch size or max length",
    "lower hyperparameters.perDeviceBatchSize or maxSeqLength",
    "dataset.maxBadRowRatio allows",
    "*.jsonl, *.json, *.csv or *.parquet, or set dataset.format",
    "It decodes as GB18030/GBK, common for Chinese files saved by Excel.",
    "cannot tell the sample style from the columns",
    "spec.preference (algorithm dpo or orpo) to tune on them",
    "but their tokenizers differ",
    "it must hold at least one row",
    "no rows left after cleaning",
    "does not exist; check the claim's path or the ConfigMap key",
    "(config.json, tokenizer files, weights) or fix baseModel.pvc.path",
    "the model is gated: accept its licence on the hub and set baseModel.tokenSecretRef",
    "loads the weights with bitsandbytes, which needs a CUDA GPU, and none is",
    "cannot be combined with explicit module names",
]


def test_troubleshooting_quotes_messages_the_code_still_prints() -> None:
    doc = " ".join((ROOT / "docs" / "troubleshooting.md").read_text().split())
    sources = "".join(
        path.read_text()
        for tree in ("operator", "trainer-image", "serving-image")
        for path in (ROOT / tree).rglob("*.py")
    )
    for fragment in QUOTED:
        assert fragment in doc, f"troubleshooting.md no longer quotes: {fragment}"
        assert fragment in sources, f"the code no longer says: {fragment}; update docs/troubleshooting.md"
