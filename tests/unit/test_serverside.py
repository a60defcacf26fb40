"""Apply patches are JSON text the API server reads as YAML: both must read the same object."""

from __future__ import annotations

import json

import yaml

from deeptune.serverside import _as_yaml_text

AWKWARD = {"stop": ["🙂", "\x7f", "\x85", "\x01", "\ufffe", "中文", 'quote " and \\ backslash']}


def test_apply_text_reads_the_same_as_yaml_and_as_json() -> None:
    text = _as_yaml_text(AWKWARD).decode()
    assert yaml.safe_load(text) == AWKWARD
    assert json.loads(text) == AWKWARD


def test_characters_outside_the_bmp_are_not_written_as_surrogate_escapes() -> None:
    text = _as_yaml_text(AWKWARD).decode()
    assert "🙂" in text and "\\ud83d" not in text
