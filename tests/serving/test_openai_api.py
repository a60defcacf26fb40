"""The OpenAI-compatible API, called with the `openai` client every LLM user has.

One serving container's command as the operator writes it (`serving_command`: the frontend, which
starts Triton from the nvidia-pytriton wheel), on loopback, serving the tiny fine-tuned model. Each
held-out question is sent as a user writes it; the model's own chat template (saved by the trainer)
turns it into the prompt it was trained on.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest

from deeptune.serving.repository import ModelLocation, repository_files, write_repository
from deeptune_serving.engine import RUNNING_METRIC, WAITING_METRIC
from deeptune_serving.openai_api import _triton_error
from tests.serving.conftest import cpu_spec
from tests.serving.tiny import TinyModels
from tests.serving.wheel_server import (
    RunningServer,
    WheelTriton,
    free_ports,
    loopback_serving_command,
    start,
)

pytestmark = pytest.mark.serving

MODEL = "keywords"
LIMIT = 64


@dataclass(frozen=True)
class Served:
    server: RunningServer
    client: openai.OpenAI
    base_url: str
    tiny: TinyModels
    mode: str
    """A key of SERVING_MODES."""
    streaming: bool


SERVING_MODES = {
    "continuous": {},
    "continuous-streaming": {"streaming": True},
    "dynamic": {"batching": {"mode": "dynamic"}},
}
"""The spec changes of each way the model can be served; the API must behave the same on all."""


@pytest.fixture(scope="module", params=list(SERVING_MODES))
def served(
    request: pytest.FixtureRequest,
    tiny_models: TinyModels,
    wheel_triton: WheelTriton,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Served]:
    """The same model served with continuous batching (answers whole, or streamed as generated) and
    with Triton's dynamic batcher."""
    http, grpc, metrics, api = free_ports(4)
    spec = cpu_spec(
        service={"httpPort": http, "grpcPort": grpc, "metricsPort": metrics, "openaiPort": api},
        generation={"maxNewTokensLimit": LIMIT},
        **SERVING_MODES[request.param],
    )
    location = ModelLocation(model=str(tiny_models.base), adapter=str(tiny_models.adapter))
    root = write_repository(repository_files(spec, location, MODEL), tmp_path_factory.mktemp("repository"))
    command = loopback_serving_command(wheel_triton, spec, root, MODEL)
    log = tmp_path_factory.mktemp("logs") / "serving.log"
    server = start(wheel_triton, command, log, (http, grpc, metrics))
    base_url = f"http://127.0.0.1:{api}/v1"
    try:
        server.wait_ready()
        client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
        yield Served(server, client, base_url, tiny_models, request.param, streaming=spec.streaming)
    finally:
        server.stop()


def _ask(served: Served, question: str, **options: object) -> openai.types.chat.ChatCompletion:
    return served.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], temperature=0, **options
    )


def test_chat_answers_held_out_questions_as_trained(served: Served) -> None:
    questions, answers = served.tiny.questions[:6], served.tiny.answers[:6]
    replies = [_ask(served, question) for question in questions]
    texts = [reply.choices[0].message.content or "" for reply in replies]
    print(f"\nchat replies: {texts}")
    exact = sum(text.strip() == answer for text, answer in zip(texts, answers, strict=True)) / len(answers)
    assert exact == 1.0  # the trainer's own evaluation of this model scores 1.0 on these rows
    reply = replies[0]
    assert reply.object == "chat.completion" and reply.model == MODEL
    assert reply.choices[0].finish_reason == "stop" and reply.choices[0].message.role == "assistant"
    assert reply.usage is not None and reply.usage.prompt_tokens > 5
    assert reply.usage.completion_tokens >= 1
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_pieces_join_to_the_whole_answer(served: Served) -> None:
    question = served.tiny.questions[1]
    whole = _ask(served, question).choices[0].message.content
    chunks = list(_ask(served, question, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    texts = [piece for piece in pieces if piece]
    # With `streaming` the model sends text as it is generated; without, all at once.
    assert len(texts) > 1 if served.streaming else len(texts) == 1


def test_completions_take_the_prompt_as_the_model_reads_it(served: Served) -> None:
    completion = served.client.completions.create(
        model=MODEL, prompt=served.tiny.prompts[2], max_tokens=8, temperature=0
    )
    assert completion.choices[0].text.strip() == served.tiny.answers[2]
    cut = served.client.completions.create(model=MODEL, prompt=served.tiny.prompts[2], max_tokens=1)
    assert cut.choices[0].finish_reason == "length" and cut.usage is not None
    assert cut.usage.completion_tokens == 1


def test_stop_and_seed(served: Served) -> None:
    question = next(
        q for q, a in zip(served.tiny.questions, served.tiny.answers, strict=True) if a == "the cat sleeps"
    )
    stopped = _ask(served, question, stop=["sleeps"]).choices[0]
    assert (stopped.message.content, stopped.finish_reason) == (" the cat ", "stop")
    messages = [{"role": "user", "content": question}]
    hot = {"temperature": 1.8, "seed": 11, "max_tokens": 8}
    first, again = (
        served.client.chat.completions.create(model=MODEL, messages=messages, **hot) for _ in "12"
    )
    if served.mode == "dynamic":  # a seeded request is generated alone, from its seed
        assert first.choices[0].message.content == again.choices[0].message.content
    else:  # continuous batching samples from one generator: seeds are accepted, not reproduced
        assert first.choices[0].message.content is not None and again.choices[0].finish_reason


def test_models_lists_the_served_model(served: Served) -> None:
    assert [model.id for model in served.client.models.list()] == [MODEL]


def test_the_engines_load_is_on_tritons_metrics_endpoint(served: Served) -> None:
    """The queue signal an autoscaler reads: with continuous batching Triton's own pending count stays
    at zero (the model takes every request at once), so the engine reports what waits and runs."""
    _ask(served, served.tiny.questions[0], max_tokens=2)
    time.sleep(0.5)  # the engine reports every 0.2 s
    metrics = served.server.metrics()
    gauges = {name: metrics.get((name, MODEL)) for name in (WAITING_METRIC, RUNNING_METRIC)}
    if served.mode == "dynamic":
        assert gauges == {WAITING_METRIC: None, RUNNING_METRIC: None}  # no engine: Triton's queue
    else:
        assert gauges == {WAITING_METRIC: 0.0, RUNNING_METRIC: 0.0}, "idle after the answer"


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(served: Served) -> None:
    with pytest.raises(openai.NotFoundError, match="The model `gpt-4o` does not exist"):
        served.client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match=f"this deployment's limit of {LIMIT}"):
        _ask(served, "topic: dog", max_tokens=LIMIT + 1)
    with pytest.raises(openai.BadRequestError, match="exceed the model's context of 512 tokens"):
        _ask(served, "word " * 600)
    with pytest.raises(openai.BadRequestError, match=r"messages\.0\.role"):
        served.client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "robot", "content": "hi"}],  # type: ignore[misc,list-item]
        )
    # A malformed body, as a hand-written client might send: OpenAI's error shape, status 400.
    request = urllib.request.Request(
        f"{served.base_url}/chat/completions", data=b'{"model": "keywords", "messages": "hi"}', method="POST"
    )
    request.add_header("Content-Type", "application/json")
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=30)
    assert raised.value.code == 400
    assert set(json.loads(raised.value.read())["error"]) == {"message", "type", "param", "code"}
    # A client that goes away mid-stream: the next request is served.
    with httpx.stream(
        "POST",
        f"{served.base_url}/chat/completions",
        json={
            "model": MODEL,
            "stream": True,
            "messages": [{"role": "user", "content": served.tiny.questions[3]}],
        },
        timeout=60,
    ) as response:
        next(response.iter_lines())
    assert _ask(served, served.tiny.questions[3]).choices[0].message.content.strip() == served.tiny.answers[3]


@pytest.mark.parametrize(
    ("status", "message", "expected"),
    [
        (400, "Exceeds maximum queue size", (429, "rate_limit_exceeded")),
        (400, "Request timeout expired", (503, "server_error")),
        (400, "top_p must be above 0", (400, "invalid_request_error")),
        (500, "stub died", (503, "server_error")),
    ],
)
def test_tritons_refusals_in_openai_terms(status: int, message: str, expected: tuple[int, str]) -> None:
    error = _triton_error(status, message)
    assert (error.status, error.kind) == expected and message in error.message


def test_the_frontend_exits_with_tritons_code(
    wheel_triton: WheelTriton, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A model that cannot load stops Triton (--exit-on-error): the container must end with it."""
    http, grpc, metrics, api = free_ports(4)
    spec = cpu_spec(service={"httpPort": http, "grpcPort": grpc, "metricsPort": metrics, "openaiPort": api})
    location = ModelLocation(model="/nonexistent/merged")
    root = write_repository(repository_files(spec, location, MODEL), tmp_path_factory.mktemp("broken"))
    process = subprocess.run(
        loopback_serving_command(wheel_triton, spec, root, MODEL),
        env=wheel_triton.env,
        capture_output=True,
        timeout=240,
        check=False,
    )
    assert process.returncode == 1, process.stderr.decode()[-3000:]


def test_sigterm_lets_triton_drain_and_ends_with_it(served: Served) -> None:
    """Last in the module (it stops the served fixture's server): the pod's SIGTERM reaches Triton,
    and the container ends when Triton has, with its exit code."""
    served.server.process.send_signal(signal.SIGTERM)
    assert served.server.process.wait(timeout=60) == 0
    assert not served.server.ready()  # Triton is gone too, not left running without the frontend


def test_triton_does_not_outlive_a_killed_frontend(
    wheel_triton: WheelTriton, tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """SIGKILL leaves the frontend no time to stop Triton: the kernel does it (PR_SET_PDEATHSIG)."""
    http, grpc, metrics, api = free_ports(4)
    spec = cpu_spec(service={"httpPort": http, "grpcPort": grpc, "metricsPort": metrics, "openaiPort": api})
    location = ModelLocation(model=str(tiny_models.merged))
    root = write_repository(repository_files(spec, location, MODEL), tmp_path_factory.mktemp("killed"))
    log = tmp_path_factory.mktemp("logs") / "killed.log"
    server = start(
        wheel_triton, loopback_serving_command(wheel_triton, spec, root, MODEL), log, (http, grpc, metrics)
    ).wait_ready()
    try:
        server.process.kill()
        server.process.wait(timeout=30)
        deadline = time.monotonic() + 30
        while server.ready() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not server.ready(), "Triton kept running without its frontend"
    finally:
        # Triton killed this way cannot stop its Python-backend stub, which stays behind holding the
        # model (in a pod the container's end takes it; here nothing would): stop it by its model path.
        subprocess.run(["pkill", "-KILL", "-f", str(root)], check=False)
