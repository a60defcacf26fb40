"""Apply patches are JSON text the API server reads as YAML: both must read the same object. What an
apply changed is told by the object, not by its resourceVersion alone."""

from __future__ import annotations

import json

import yaml

from deeptune.children import as_yaml_text, changed

AWKWARD = {"stop": ["🙂", "\x7f", "\x85", "\x01", "\ufffe", "中文", 'quote " and \\ backslash']}


def test_apply_text_reads_the_same_as_yaml_and_as_json() -> None:
    text = as_yaml_text(AWKWARD).decode()
    assert yaml.safe_load(text) == AWKWARD
    assert json.loads(text) == AWKWARD


def test_characters_outside_the_bmp_are_not_written_as_surrogate_escapes() -> None:
    text = as_yaml_text(AWKWARD).decode()
    assert "🙂" in text and "\\ud83d" not in text


def deployment(version: str, generation: int, labels: dict[str, str], **status: int) -> dict[str, object]:
    meta = {"resourceVersion": version, "generation": generation, "labels": labels}
    return {"metadata": meta, "status": status}


def test_a_status_write_between_read_and_apply_is_no_update() -> None:
    manifest = {"metadata": {"labels": {"app": "a"}}}
    read = deployment("10", 1, {"app": "a"})
    assert not changed(read, deployment("11", 1, {"app": "a"}, readyReplicas=1), manifest)
    assert changed(read, deployment("12", 2, {"app": "a"}), manifest)  # the spec changed
    assert changed(read, deployment("12", 1, {"app": "b"}), {"metadata": {"labels": {"app": "b"}}})
    config_map = {"metadata": {"resourceVersion": "10"}}
    assert changed(config_map, {"metadata": {"resourceVersion": "11"}}, {"metadata": {}})
