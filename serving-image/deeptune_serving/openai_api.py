"""The OpenAI-compatible API of a ModelDeployment, in front of Triton's generate endpoints.

Why a layer of our own: Triton's own OpenAI frontend drives the server through the in-process
`tritonserver` Python bindings, which the Triton images carry but the `nvidia-pytriton` wheel (the
Triton this project can test with) does not, and PyPI offers only a placeholder. So this frontend stays
thin: it checks an OpenAI request, hands the messages (or prompt) and decoding settings to Triton's
`/v2/models/<model>/generate_stream` on loopback (one event from a batched model, one per piece from
a streaming one), and turns the answer — text, token counts, finish reason — into OpenAI's shapes.
The chat template is applied in the model, next to the tokenizer it was saved with, so a chat request
is rendered exactly as training rendered it.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field


@dataclass(frozen=True)
class FrontendSettings:
    """What the frontend serves and where Triton is."""

    model: str
    """The model's name: Triton's model name and `model` in OpenAI requests."""
    triton_url: str
    """Triton's HTTP endpoint, e.g. http://127.0.0.1:8000."""
    timeout_seconds: float = 600.0


class ApiError(Exception):
    """An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


class _Request(BaseModel):
    """Fields every generation request shares; fields this server does not use are ignored, as
    OpenAI clients send many."""

    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    stop: str | Annotated[list[str], Field(max_length=16)] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: Annotated[int, Field(ge=1, le=1)] = 1


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def plain(self) -> dict[str, str]:
        """As the chat template takes it: text content; `developer` is the newer name of `system`."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(_Request):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None


class CompletionRequest(_Request):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    """OpenAI's default for completions."""


def _triton_inputs(request: ChatCompletionRequest | CompletionRequest) -> dict[str, Any]:
    """The generate endpoint's JSON: each key one of the Triton model's inputs; unset ones are left to
    the deployment's defaults."""
    if isinstance(request, ChatCompletionRequest):
        inputs: dict[str, Any] = {
            "messages": json.dumps([message.plain() for message in request.messages], ensure_ascii=False)
        }
        max_tokens = request.max_completion_tokens or request.max_tokens
    else:
        prompt = request.prompt if isinstance(request.prompt, str) else request.prompt[0]
        inputs, max_tokens = {"text_input": prompt}, request.max_tokens
    settings = {
        "max_new_tokens": max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "seed": request.seed,
        "stop": None if request.stop is None else json.dumps(request.stop, ensure_ascii=False),
    }
    return inputs | {key: value for key, value in settings.items() if value is not None}


def _triton_error(status: int, message: str) -> ApiError:
    """Triton's refusal in OpenAI's terms: a full queue is 429 (retry later), a request that waited
    past the queue timeout 503, anything else the request's own fault."""
    if "queue size" in message:
        return ApiError(429, f"the model's queue is full: {message}", "rate_limit_exceeded")
    if "timeout" in message.lower():
        return ApiError(503, f"the request waited too long in the model's queue: {message}", "server_error")
    if status >= 500:
        return ApiError(503, message, "server_error")
    return ApiError(400, message)


def _error_text(body: bytes) -> str:
    """The message of Triton's refusal: `{"error": ...}`, as JSON or as one server-sent event."""
    text = body.decode("utf-8", errors="replace").strip().removeprefix("data:").strip()
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        return text
    return str(parsed.get("error", parsed)) if isinstance(parsed, dict) else text


def _usage(answer: dict[str, Any]) -> dict[str, int]:
    prompt, completion = int(answer.get("prompt_tokens", 0)), int(answer.get("completion_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Frontend:
    """The API's handlers, holding one HTTP client to Triton."""

    def __init__(self, settings: FrontendSettings, client: httpx.AsyncClient) -> None:
        self.settings = settings
        self.client = client

    def check_model(self, model: str) -> None:
        if model != self.settings.model:
            raise ApiError(
                404,
                f"The model `{model}` does not exist: this server serves `{self.settings.model}`",
                param="model",
            )

    async def generate(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The whole answer: the stream's text joined, with the last event's counts and finish reason.
        (Triton's `generate` refuses decoupled models, which send one response per piece.)"""
        pieces, last = [], {}
        async for event in self.stream(inputs):
            pieces.append(event.get("text_output", ""))
            last = event
        return last | {"text_output": "".join(pieces)}

    async def stream(self, inputs: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Triton's server-sent events, each a dict of the model's outputs; an error event raises."""
        url = f"/v2/models/{self.settings.model}/generate_stream"
        try:
            async with self.client.stream("POST", url, json=inputs) as response:
                if response.status_code != 200:
                    raise _triton_error(response.status_code, _error_text(await response.aread()))
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    event = json.loads(line.removeprefix("data:"))
                    if "error" in event:
                        raise _triton_error(400, str(event["error"]))
                    yield event
        except httpx.HTTPError as error:
            raise ApiError(503, f"the model server is not reachable: {error}", "server_error") from error

    async def ready(self) -> bool:
        try:
            response = await self.client.get(f"/v2/models/{self.settings.model}/ready")
        except httpx.HTTPError:
            return False
        return response.status_code == 200


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def _events(
    frontend: Frontend, inputs: dict[str, Any], chunk: Any, include_usage: bool
) -> AsyncIterator[str]:
    """OpenAI's stream: one chunk per piece of text, the finish reason on the last, optionally a usage
    chunk, then `[DONE]`. An error after the stream began is sent as an error event (the status is
    already 200), as OpenAI's own server does."""
    try:
        last: dict[str, Any] = {}
        async for event in frontend.stream(inputs):
            last = event
            if text := event.get("text_output", ""):
                yield _sse(chunk(text, None))
        yield _sse(chunk("", last.get("finish_reason") or "stop"))
        if include_usage:
            yield _sse(chunk(None, None) | {"choices": [], "usage": _usage(last)})
    except ApiError as error:
        yield _sse(error.body())
    yield _sse("[DONE]")


def create_app(settings: FrontendSettings) -> FastAPI:
    """The FastAPI application: `/v1/models`, `/v1/chat/completions`, `/v1/completions`, `/health`."""
    client = httpx.AsyncClient(base_url=settings.triton_url, timeout=settings.timeout_seconds)
    frontend = Frontend(settings, client)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await client.aclose()

    app = FastAPI(title="DeepTune OpenAI-compatible API", docs_url=None, redoc_url=None, lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"] if part != "body")
        message = f"{where}: {first['msg']}" if where else str(first["msg"])
        return JSONResponse(ApiError(400, message, param=where or None).body(), status_code=400)

    @app.get("/health")
    async def health() -> JSONResponse:
        ready = await frontend.ready()
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        entry = {"id": settings.model, "object": "model", "created": 0, "owned_by": "deeptune"}
        return {"object": "list", "data": [entry]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: ChatCompletionRequest) -> dict[str, Any] | StreamingResponse:
        frontend.check_model(request.model)
        identity = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": settings.model,
        }
        inputs = _triton_inputs(request)
        if request.stream:

            def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
                delta = {} if text is None else {"role": "assistant", "content": text}
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
                return identity | {"object": "chat.completion.chunk", "choices": [choice]}

            usage = bool((request.stream_options or {}).get("include_usage"))
            return StreamingResponse(_events(frontend, inputs, chunk, usage), media_type="text/event-stream")
        answer = await frontend.generate(inputs)
        message = {"role": "assistant", "content": answer.get("text_output", "")}
        choice = {"index": 0, "message": message, "finish_reason": answer.get("finish_reason") or "stop"}
        return identity | {"object": "chat.completion", "choices": [choice], "usage": _usage(answer)}

    @app.post("/v1/completions", response_model=None)
    async def completions(request: CompletionRequest) -> dict[str, Any] | StreamingResponse:
        frontend.check_model(request.model)
        identity = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": settings.model}
        inputs = _triton_inputs(request)
        if request.stream:

            def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
                return identity | {"object": "text_completion", "choices": [choice]}

            usage = bool((request.stream_options or {}).get("include_usage"))
            return StreamingResponse(_events(frontend, inputs, chunk, usage), media_type="text/event-stream")
        answer = await frontend.generate(inputs)
        choice = {
            "index": 0,
            "text": answer.get("text_output", ""),
            "finish_reason": answer.get("finish_reason") or "stop",
            "logprobs": None,
        }
        return identity | {"object": "text_completion", "choices": [choice], "usage": _usage(answer)}

    return app
