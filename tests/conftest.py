"""Shared test helpers: paths and the example manifests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def load_example(name: str) -> dict[str, Any]:
    """The first document of an example manifest."""
    return next(doc for doc in yaml.safe_load_all((ROOT / "examples" / name).read_text()) if doc)


@pytest.fixture
def tiny_manifest() -> dict[str, Any]:
    return load_example("finetune-tiny.yaml")


@pytest.fixture
def big_manifest() -> dict[str, Any]:
    return load_example("finetune.yaml")
