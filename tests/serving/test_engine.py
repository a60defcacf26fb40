"""The continuous-batching engine in-process (no Triton): answers as static batching gives them, short
requests leave the batch first, stop sequences end a request early, a full queue refuses, a client
that went away is dropped."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from deeptune_serving.batcher import ManagerBatcher
from deeptune_serving.engine import CANCELLED, ContinuousEngine, Listener, Load
from deeptune_serving.generation import Completion, Generator, LoadSettings, RequestError, Sampling
from tests.serving.tiny import TinyModels

GREEDY = Sampling(max_new_tokens=8, temperature=0.0, top_p=1.0)
WAIT = 120.0


class Collected:
    """A listener's results, in arrival order across requests."""

    def __init__(self) -> None:
        self.pieces: dict[str, list[str]] = {}
        self.done: dict[str, Completion] = {}
        self.order: list[str] = []
        self.finished = threading.Condition()

    def listener(self, name: str, cancelled: threading.Event | None = None) -> Listener:
        def on_text(text: str) -> None:
            self.pieces.setdefault(name, []).append(text)

        def on_done(completion: Completion) -> None:
            with self.finished:
                self.done[name] = completion
                self.order.append(name)
                self.finished.notify_all()

        return Listener(on_text, on_done, (cancelled or threading.Event()).is_set)

    def wait(self, *names: str) -> None:
        with self.finished:
            assert self.finished.wait_for(lambda: set(names) <= set(self.done), WAIT), self.done


@pytest.fixture(scope="module")
def merged(tiny_models: TinyModels) -> Generator:
    return Generator.load(LoadSettings(model=str(tiny_models.merged)), max_new_tokens_limit=256)


@pytest.fixture
def engine(merged: Generator) -> Iterator[ContinuousEngine]:
    running = ContinuousEngine(merged, ManagerBatcher(merged, 4), max_waiting=4, check_interval=0)
    yield running
    running.close()


def test_answers_are_the_static_batchs(
    engine: ContinuousEngine, merged: Generator, tiny_models: TinyModels
) -> None:
    prompts = [merged.prompt(p, GREEDY) for p in tiny_models.prompts[:6]]
    collected = Collected()
    for index, prompt in enumerate(prompts):
        engine.submit(prompt, collected.listener(str(index)))
    collected.wait(*map(str, range(6)))
    static = merged.generate(prompts)
    for index, expected in enumerate(static):
        done = collected.done[str(index)]
        assert (done.text, done.finish_reason, done.completion_tokens) == (
            expected.text,
            expected.finish_reason,
            expected.completion_tokens,
        )
        assert "".join(collected.pieces.get(str(index), [])) == done.text
        assert done.prompt_tokens == len(prompt.ids)


def test_greedy_requests_beside_sampled_ones_are_still_greedy(
    engine: ContinuousEngine, merged: Generator, tiny_models: TinyModels
) -> None:
    """Each row samples on its own settings: the greedy half of a batch answers as static greedy
    decoding does, whatever the sampled half draws."""
    sampled = Sampling(max_new_tokens=8, temperature=1.5, top_p=0.9)
    texts = tiny_models.prompts[:4]
    collected = Collected()
    for index, text in enumerate(texts):
        settings = GREEDY if index % 2 == 0 else sampled
        engine.submit(merged.prompt(text, settings), collected.listener(str(index)))
    collected.wait(*map(str, range(4)))
    static = merged.generate([merged.prompt(text, GREEDY) for text in texts[::2]])
    assert [collected.done[name].text for name in ("0", "2")] == [completion.text for completion in static]
    assert all(collected.done[name].completion_tokens > 0 for name in ("1", "3"))


def test_a_short_request_is_not_held_behind_a_long_one(
    engine: ContinuousEngine, tiny_models: TinyModels
) -> None:
    """The base model (random weights) rambles on (22 tokens on this prompt); a 2-token request sent
    just after it ends first, where a static batch would have ended both together."""
    base = Generator.load(LoadSettings(model=str(tiny_models.base)), max_new_tokens_limit=256)
    engine_for_base = ContinuousEngine(base, ManagerBatcher(base, 4), max_waiting=4)
    try:
        collected = Collected()
        engine_for_base.submit(
            base.prompt(tiny_models.prompts[0], Sampling(200, 0.0, 1.0)), collected.listener("long")
        )
        engine_for_base.submit(
            base.prompt(tiny_models.prompts[1], Sampling(2, 0.0, 1.0)), collected.listener("short")
        )
        collected.wait("long", "short")
    finally:
        engine_for_base.close()
    assert collected.order == ["short", "long"]
    assert collected.done["short"].completion_tokens <= 2 < collected.done["long"].completion_tokens


def test_a_stop_sequence_ends_the_request(
    engine: ContinuousEngine, merged: Generator, tiny_models: TinyModels
) -> None:
    prompt = next(
        p for p, a in zip(tiny_models.prompts, tiny_models.answers, strict=True) if a == "the cat sleeps"
    )
    collected = Collected()
    engine.submit(merged.prompt(prompt, Sampling(8, 0.0, 1.0, stop=("cat",))), collected.listener("stopped"))
    collected.wait("stopped")
    assert (collected.done["stopped"].text, collected.done["stopped"].finish_reason) == (" the ", "stop")


def test_a_full_queue_refuses_and_a_gone_client_is_dropped(
    engine: ContinuousEngine, merged: Generator, tiny_models: TinyModels
) -> None:
    gone = threading.Event()
    collected = Collected()
    long = Sampling(200, 0.9, 1.0)
    for index in range(8):  # 4 running + 4 waiting
        engine.submit(merged.prompt(tiny_models.prompts[index], long), collected.listener(str(index), gone))
    with pytest.raises(RequestError, match=r"exceeds the maximum queue size of 4 waiting requests"):
        engine.submit(merged.prompt(tiny_models.prompts[8], GREEDY), collected.listener("refused"))
    assert engine.load() == Load(waiting=4, running=4), "what the autoscaler's gauges report"
    gone.set()  # every client goes away: their requests stop, each ended as cancelled
    collected.wait(*map(str, range(8)))
    assert {done.error for done in collected.done.values()} == {CANCELLED}
    assert not engine._running and engine.load() == Load(waiting=0, running=0)
    again = Collected()  # and the engine serves the next one
    engine.submit(merged.prompt(tiny_models.prompts[9], GREEDY), again.listener("next"))
    again.wait("next")
    assert again.done["next"].text.strip() == tiny_models.answers[9]


def test_a_request_that_waits_past_the_queue_timeout_is_refused(
    merged: Generator, tiny_models: TinyModels
) -> None:
    """One running slot, taken: the next request waits in the engine's queue, past its (tiny) timeout.
    The dispatcher looks after every output, so the first token of the running request is enough."""
    engine = ContinuousEngine(
        merged, ManagerBatcher(merged, 1), max_waiting=4, queue_timeout=0.001, check_interval=0
    )
    try:
        collected = Collected()
        engine.submit(merged.prompt(tiny_models.prompts[0], GREEDY), collected.listener("running"))
        engine.submit(merged.prompt(tiny_models.prompts[1], GREEDY), collected.listener("late"))
        collected.wait("running", "late")
    finally:
        engine.close()
    assert collected.done["running"].text.strip() == tiny_models.answers[0]
    assert str(collected.done["late"].error).startswith("Request timeout expired: not started after 0.001 s")
