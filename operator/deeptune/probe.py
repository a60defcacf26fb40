"""The operator's own check that a serving pod answers, as a client would.

The kubelet's readiness probe only knows that Triton says it is ready. This check does what a client
would: server ready, model ready, then one generation of a single token, timed. On the Python
backend through Triton's HTTP endpoint with tritonclient: KServe-v2 `infer` for a model that is not
decoupled, Triton's `generate_stream` for one that is (continuous batching or streaming; Triton's
`infer` refuses those). On vLLM through the OpenAI API (Triton's OpenAI frontend): `/v1/models` lists
the model, `/v1/completions` answers. Its result becomes `status.lastProbe` and gates the `Ready`
condition.
"""

from __future__ import annotations

import json
import secrets
import time

import aiohttp
import numpy as np
import tritonclient.http.aio as triton
from tritonclient.utils import InferenceServerException

from deeptune.api.modeldeployment import ProbeResult

MESSAGE_LIMIT = 1024


def probe_prompt() -> str:
    """A prompt no earlier request sent, so Triton's response cache cannot answer for a dead model."""
    return f"Hello {secrets.token_hex(4)}"


def _inputs() -> list[triton.InferInput]:
    """One new prompt, one new token: the cheapest request that still runs the model end to end."""
    text = triton.InferInput("text_input", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[probe_prompt().encode()]], dtype=np.object_))
    tokens = triton.InferInput("max_new_tokens", [1, 1], "INT32")
    tokens.set_data_from_numpy(np.array([[1]], dtype=np.int32))
    return [text, tokens]


async def _generate_once(address: str, model: str, timeout: float) -> bool:
    """One token from a decoupled model through Triton's generate_stream; True when text came back."""
    body = {"text_input": probe_prompt(), "max_new_tokens": 1}
    url = f"http://{address}/v2/models/{model}/generate_stream"
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
        session.post(url, json=body) as response,
    ):
        events = [
            json.loads(line.removeprefix("data:"))
            for line in (await response.text()).splitlines()
            if line.startswith("data:")
        ]
    errors = [str(event["error"]) for event in events if "error" in event]
    if response.status != 200 or errors:
        raise InferenceServerException(errors[0] if errors else f"generate_stream answered {response.status}")
    return any("text_output" in event for event in events)


def _truncated(result: ProbeResult) -> ProbeResult:
    result.message = result.message[:MESSAGE_LIMIT]
    return result


def _elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)


async def probe_server(address: str, model: str, *, decoupled: bool, timeout: float, now: str) -> ProbeResult:
    """Check the Triton server at `address` (`host:port` of its HTTP endpoint) and its `model`.

    Failures become the result's message; the probe itself never raises for an unhealthy server.
    """
    result = ProbeResult(time=now)
    client = triton.InferenceServerClient(address, conn_timeout=timeout)
    try:
        result.server_ready = await client.is_server_ready()
        result.model_ready = result.server_ready and await client.is_model_ready(model)
        if not result.model_ready:
            result.message = (
                "the server is not ready" if not result.server_ready else f"model {model} is not ready"
            )
        else:
            started = time.perf_counter()
            if decoupled:
                result.inference_ok = await _generate_once(address, model, timeout)
            else:
                output = (await client.infer(model, _inputs())).as_numpy("text_output")
                result.inference_ok = output is not None and output.size == 1
            result.latency_ms = _elapsed_ms(started)
            result.message = "" if result.inference_ok else "the inference returned no text_output"
    except (InferenceServerException, aiohttp.ClientError, TimeoutError, OSError) as error:
        result.message = f"{type(error).__name__}: {error}"
    finally:
        await client.close()
    return _truncated(result)


async def probe_openai(address: str, model: str, *, timeout: float, now: str) -> ProbeResult:
    """Check the OpenAI-compatible API at `address` (`host:port`) and its `model`: listed by
    `/v1/models`, and one greedy token from `/v1/completions`. Never raises for an unhealthy server."""
    result = ProbeResult(time=now)
    base = f"http://{address}/v1"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
            async with session.get(f"{base}/models") as listed:
                result.server_ready = listed.status == 200
                listing = await listed.json() if result.server_ready else {}
            entries = listing.get("data", []) if isinstance(listing, dict) else []
            ids = [str(entry.get("id")) for entry in entries if isinstance(entry, dict)]
            result.model_ready = model in ids
            if not result.server_ready:
                result.message = f"/v1/models answered {listed.status}"
            elif not result.model_ready:
                result.message = f"model {model} is not served (the server lists {', '.join(ids) or 'none'})"
            else:
                started = time.perf_counter()
                body = {"model": model, "prompt": probe_prompt(), "max_tokens": 1, "temperature": 0}
                async with session.post(f"{base}/completions", json=body) as answered:
                    reply = await answered.json(content_type=None)
                result.latency_ms = _elapsed_ms(started)
                choices = (reply.get("choices") if answered.status == 200 else None) or [{}]
                result.inference_ok = isinstance(choices[0].get("text"), str)
                if not result.inference_ok:
                    result.message = f"/v1/completions answered {answered.status}: {json.dumps(reply)}"
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as error:
        result.message = f"{type(error).__name__}: {error}"
    return _truncated(result)
