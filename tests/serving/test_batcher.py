"""Where continuous batching's tokens come from. With its model in a child process, as the server runs
it: the same answers as in-process decoding, a load failure reported with its reason, and a child that
dies ends every request with why, once, and refuses new ones (the Triton model then stops the server:
test_triton_failures.py). In-process: a request the manager refuses fails alone, and a manager that
stopped says so."""

from __future__ import annotations

import os
import queue
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from deeptune_serving.batcher import GenerationStoppedError, ManagerBatcher
from deeptune_serving.batcher_process import BatcherProcess
from deeptune_serving.engine import ContinuousEngine
from deeptune_serving.generation import Generator, LoadSettings, Prompter, RequestError, Sampling
from tests.serving.test_engine import GREEDY, Collected
from tests.serving.tiny import TinyModels


@pytest.fixture(scope="module")
def merged_settings(tiny_models: TinyModels) -> LoadSettings:
    return LoadSettings(model=str(tiny_models.merged))


@pytest.fixture(scope="module")
def prompter(merged_settings: LoadSettings) -> Prompter:
    return Prompter.load(merged_settings, max_new_tokens_limit=256)


@pytest.fixture
def batcher(merged_settings: LoadSettings) -> Iterator[BatcherProcess]:
    process = BatcherProcess(merged_settings, capacity=4, max_new_tokens_limit=256)
    yield process
    process.close()


def test_the_prompter_reads_what_the_loaded_model_says(
    prompter: Prompter, merged_settings: LoadSettings, tiny_models: TinyModels
) -> None:
    """No weights read, and the same eos ids, context and prompt ids as the model loaded whole."""
    loaded = Generator.load(merged_settings, max_new_tokens_limit=256)
    assert (prompter.eos_ids, prompter.context) == (loaded.eos_ids, loaded.context)
    assert prompter.context is not None
    message = [{"role": "user", "content": tiny_models.questions[0]}]
    assert prompter.chat_prompt(message, GREEDY) == loaded.chat_prompt(message, GREEDY)
    with pytest.raises(RequestError, match="exceed the model's context"):
        prompter.prompt("cat " * prompter.context, Sampling(8, 0.0, 1.0))


def test_answers_through_the_process_are_in_process_decodings(
    batcher: BatcherProcess, prompter: Prompter, tiny_models: TinyModels
) -> None:
    engine = ContinuousEngine(prompter, batcher, max_waiting=8, check_interval=0)
    try:
        collected = Collected()
        for index, question in enumerate(tiny_models.questions[:6]):
            prompt = prompter.chat_prompt([{"role": "user", "content": question}], GREEDY)
            engine.submit(prompt, collected.listener(str(index)))
        collected.wait(*map(str, range(6)))
    finally:
        engine.close()
    assert [collected.done[str(index)].text.strip() for index in range(6)] == tiny_models.answers[:6]
    assert all("".join(collected.pieces[str(index)]) == collected.done[str(index)].text for index in range(6))
    assert batcher._process.poll() == 0, "close ends the child"


def test_a_model_that_cannot_load_is_refused_with_the_childs_reason(tmp_path: Path) -> None:
    missing = f"{tmp_path}/no-such-model"
    with pytest.raises(RuntimeError, match=f"FileNotFoundError: no model at {missing}: the directory does"):
        BatcherProcess(LoadSettings(model=missing), capacity=1, max_new_tokens_limit=8)


def test_a_child_that_dies_ends_every_request_once_and_refuses_new_ones(
    batcher: BatcherProcess, prompter: Prompter, tiny_models: TinyModels
) -> None:
    reasons: list[str] = []
    engine = ContinuousEngine(prompter, batcher, max_waiting=8, check_interval=0, on_stopped=reasons.append)
    try:
        collected = Collected()
        os.kill(batcher._process.pid, signal.SIGSTOP)  # so that no request can finish before the kill
        for index in range(6):  # 4 handed to the child, 2 waiting here
            engine.submit(prompter.prompt(tiny_models.prompts[index], GREEDY), collected.listener(str(index)))
        os.kill(batcher._process.pid, signal.SIGKILL)
        collected.wait(*map(str, range(6)))
        expected = "the generation process was killed by SIGKILL: the server must be restarted"
        assert reasons == [expected]
        assert [collected.done[str(index)].error for index in range(6)] == [expected] * 6
        with pytest.raises(RequestError, match=expected):
            engine.submit(prompter.prompt(tiny_models.prompts[7], GREEDY), collected.listener("late"))
    finally:
        engine.close()


def test_the_child_ends_when_its_parent_goes_away(batcher: BatcherProcess) -> None:
    batcher._connection.close()  # what the parent's death does to the child's end
    assert batcher._process.wait(timeout=60) == 0


def test_a_request_the_manager_refuses_fails_alone(
    tiny_models: TinyModels, monkeypatch: pytest.MonkeyPatch
) -> None:
    merged = Generator.load(LoadSettings(model=str(tiny_models.merged)), max_new_tokens_limit=256)
    in_process = ManagerBatcher(merged, 2)
    engine = ContinuousEngine(merged, in_process, max_waiting=4, check_interval=0)
    try:
        accept = in_process._manager.add_request

        def add_request(ids: list[int], **options: object) -> object:
            if options["request_id"] == "r1":
                raise queue.Full("the manager's input queue is full")
            return accept(ids, **options)

        monkeypatch.setattr(in_process._manager, "add_request", add_request)
        collected = Collected()
        for index in range(2):
            engine.submit(merged.prompt(tiny_models.prompts[index], GREEDY), collected.listener(str(index)))
        collected.wait("0", "1")
    finally:
        engine.close()
    assert collected.done["0"].error == "generation failed: Full: the manager's input queue is full"
    assert collected.done["1"].text.strip() == tiny_models.answers[1]


def test_a_stopped_manager_says_so(tiny_models: TinyModels) -> None:
    in_process = ManagerBatcher(Generator.load(LoadSettings(model=str(tiny_models.merged))), 1)
    in_process.close()
    with pytest.raises(GenerationStoppedError, match="the generation loop stopped"):
        in_process.steps(0.1)
