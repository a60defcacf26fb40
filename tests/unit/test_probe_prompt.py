"""The operator's model check must not be answerable by Triton's response cache."""

from __future__ import annotations

from deeptune.probe import probe_prompt


def test_each_probe_sends_a_prompt_no_earlier_request_sent() -> None:
    prompts = [probe_prompt() for _ in range(64)]
    assert len(set(prompts)) == len(prompts)
    assert all(prompt.startswith("Hello ") for prompt in prompts)
