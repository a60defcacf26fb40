"""The project's Dockerfiles take their base image as a build argument (the test suite's real node
builds them on local stand-ins: tests/localcluster/images.sh) that defaults to the public image a
user's `docker build` gets."""

from __future__ import annotations

import re

import pytest

from tests.conftest import ROOT

PUBLIC_BASES = {
    "operator/Dockerfile": ("PYTHON_IMAGE", "python:3.11.7-slim-bookworm"),
    "trainer-image/Dockerfile": ("PYTHON_IMAGE", "python:3.11.7-slim-bookworm"),
    "serving-image/Dockerfile": ("TRITON_IMAGE", "nvcr.io/nvidia/tritonserver:24.10-py3"),
}


def test_every_dockerfile_is_listed() -> None:
    assert {str(p.relative_to(ROOT)) for p in ROOT.glob("*/Dockerfile")} == set(PUBLIC_BASES)


@pytest.mark.parametrize("dockerfile", sorted(PUBLIC_BASES))
def test_the_base_is_a_build_argument_defaulting_to_the_public_image(dockerfile: str) -> None:
    argument, public = PUBLIC_BASES[dockerfile]
    text = (ROOT / dockerfile).read_text()
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    froms = [line for line in lines if line.startswith("FROM ")]
    assert froms == [f"FROM ${{{argument}}}"], froms
    (default,) = [m.group(1) for line in lines if (m := re.fullmatch(rf"ARG {argument}=(\S+)", line))]
    assert default == public
    assert lines.index(f"ARG {argument}={public}") < lines.index(froms[0])
