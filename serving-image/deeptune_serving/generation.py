"""Text generation behind the Triton model: load a causal LM, answer many prompts with few generate calls.

It knows nothing of Triton, so it is tested in-process. The serving image installs this package
(`deeptune_serving`); the model repository's `model.py` only imports `deeptune_serving.triton_model`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import torch
from jinja2 import TemplateError
from peft import PeftModel
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    GenerationConfig,
    GenerationMixin,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.generation.streamers import BaseStreamer

TextCallback = Callable[[int, str], None]
"""Called with (prompt index, new text) while generating, for streaming."""

FinishReason = Literal["stop", "length"]
"""Why a row ended, in the OpenAI API's words: eos or a stop sequence, or its token limit."""

CHAT_ROLES = ("system", "user", "assistant")


class RequestError(ValueError):
    """A problem with one request (a bad parameter, a prompt too long): only that request fails."""


@dataclass(frozen=True)
class Sampling:
    """Decoding settings of one prompt. Temperature 0 means greedy decoding."""

    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None = None
    """Sampling from this seed: the prompt is generated alone, so its answer does not depend on its batch."""
    stop: tuple[str, ...] = ()
    """This request's stop sequences, besides the deployment's."""

    def check(self, max_new_tokens_limit: int) -> None:
        """The bounds of the ModelDeployment's generation settings, applied to per-request values."""
        if not 1 <= self.max_new_tokens <= max_new_tokens_limit:
            raise RequestError(
                f"max_new_tokens (max_tokens in the OpenAI API) must be between 1 and"
                f" this deployment's limit of {max_new_tokens_limit} (spec.generation.maxNewTokensLimit),"
                f" got {self.max_new_tokens}"
            )
        if not 0 <= self.temperature <= 5:
            raise RequestError(f"temperature must be between 0 and 5, got {self.temperature:g}")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be above 0 and at most 1, got {self.top_p:g}")
        if len(self.stop) > 16 or any(not stop for stop in self.stop):
            raise RequestError("stop takes at most 16 sequences, none of them empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def batch_key(self, index: int) -> tuple[object, ...]:
        """Prompts with equal keys can share one generate call: greedy ones ignore top_p and seed,
        a seeded one runs alone."""
        if self.greedy:
            return ("greedy",)
        if self.seed is not None:
            return ("seeded", index)
        return ("sampled", self.temperature, self.top_p)


@dataclass(frozen=True)
class LoadSettings:
    """Where the weights are and how to load them."""

    model: str
    """A model directory, or a Hugging Face id."""
    adapter: str = ""
    """A peft LoRA adapter directory to apply to the model; empty for a merged model."""
    revision: str = "main"
    trust_remote_code: bool = False
    quantization: str = "none"
    """none, int8 or int4 (bitsandbytes, CUDA only)."""
    device: str = "cpu"
    """cpu, cuda:N, or auto (spread the model over every visible GPU)."""


@dataclass(frozen=True)
class Prompt:
    """A checked prompt: its token ids and decoding settings."""

    ids: list[int]
    sampling: Sampling


@dataclass
class Completion:
    """What one prompt produced: its text, token counts and why it ended, or why it failed."""

    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: FinishReason = "length"
    error: str | None = None


def _dtype(device: str) -> torch.dtype:
    if device == "cpu":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _quantization(kind: str, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    if kind == "none":
        return None
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"quantization {kind} loads the weights with bitsandbytes, which needs a CUDA GPU, and none is "
            "visible: give the ModelDeployment a GPU (resources.gpu) or set quantization to none"
        )
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def _check_directory(path: str, marker: str, what: str) -> None:
    """A path that names a directory must hold the model; otherwise it is a Hugging Face id."""
    if path.startswith(("/", ".")) and not (Path(path) / marker).is_file():
        state = "has no " + marker if Path(path).is_dir() else "does not exist"
        raise FileNotFoundError(f"no {what} at {path}: the directory {state}")


def _load_model(settings: LoadSettings) -> PreTrainedModel:
    _check_directory(settings.model, "config.json", "model")
    dtype = _dtype(settings.device)
    placement: dict[str, object] = {}
    if settings.device == "auto":
        placement = {"device_map": "auto"}
    elif settings.device != "cpu":
        placement = {"device_map": {"": settings.device}}
    quantization = _quantization(settings.quantization, dtype)
    model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(
        settings.model,
        revision=settings.revision,
        trust_remote_code=settings.trust_remote_code,
        dtype=dtype,
        quantization_config=quantization,
        **placement,
    )
    if settings.adapter:
        _check_directory(settings.adapter, "adapter_config.json", "LoRA adapter")
        adapted = PeftModel.from_pretrained(model, settings.adapter)
        # Folding the adapter into the weights once makes every token as cheap as a merged model's
        # (bitsandbytes weights cannot take it in exactly, so quantized models keep it separate).
        model = adapted.merge_and_unload() if quantization is None else adapted
    model.eval()
    return cast(PreTrainedModel, model)


def _load_tokenizer(settings: LoadSettings) -> PreTrainedTokenizerBase:
    """The adapter's tokenizer when it saved one (fine-tuning may have added tokens), else the model's."""
    has_own = settings.adapter and (Path(settings.adapter) / "tokenizer_config.json").is_file()
    source = settings.adapter if has_own else settings.model
    tokenizer = AutoTokenizer.from_pretrained(
        source, revision=settings.revision, trust_remote_code=settings.trust_remote_code
    )
    if tokenizer.pad_token is None:
        # Padding is masked out of attention, so any id will do, and eos always exists.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _eos_ids(generation: GenerationConfig, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    configured = generation.eos_token_id
    if configured is None:
        configured = tokenizer.eos_token_id
    return [configured] if isinstance(configured, int) else list(configured)


def _cut_at_stop(text: str, stop_sequences: Sequence[str]) -> tuple[str, bool]:
    """The text before the first stop sequence, and whether there was one."""
    found = [index for stop in stop_sequences if (index := text.find(stop)) >= 0]
    return (text[: min(found)], True) if found else (text, False)


def _stop_prefix_length(text: str, stop_sequences: Sequence[str]) -> int:
    """Length of the longest end of `text` that could be the start of a stop sequence."""
    longest = 0
    for stop in stop_sequences:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


class TextAssembler:
    """One row's generated tokens as text: it ends at eos, the row's own token limit or a stop sequence.

    A batch generates until its longest row is done, so each row applies its own limit here. While
    streaming, it hands out only text that cannot change any more: no half of a multi-byte character,
    nothing that may turn out to be the start of a stop sequence.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        limit: int,
        stop_sequences: Sequence[str],
        eos_ids: Sequence[int],
    ) -> None:
        self._tokenizer = tokenizer
        self._limit = limit
        self._stops = stop_sequences
        self._eos = set(eos_ids)
        self._tokens: list[int] = []
        self._decoded = ""
        """The text of `_tokens[:_read]`, built a window at a time."""
        self._window = 0
        """Where the decoding window starts: one text piece before `_read`."""
        self._read = 0
        self._emitted = ""
        self.done = False
        self.finish_reason: FinishReason = "length"

    def _decode(self, tokens: list[int] | None = None) -> str:
        text = self._tokenizer.decode(
            self._tokens if tokens is None else tokens,
            skip_special_tokens=True,
            clean_up_tokenization_spaces=False,
        )
        assert isinstance(text, str)  # one sequence in, one string out
        return text

    def _new_text(self, *, force: bool = False) -> str:
        """The text the tokens past `_read` add to `_decoded`.

        Decoding every token so far at each step would cost O(n) per token, O(n²) per answer (seconds
        of a server's time on a long one). So only a window is decoded: from the piece before the new
        tokens, since a token's text can depend on the one before it (a word's leading space, the
        bytes of one character), minus that piece's own text. While the window ends in half a
        character (U+FFFD), nothing is added unless `force`d (the answer is over)."""
        before = self._decode(self._tokens[self._window : self._read])
        window = self._decode(self._tokens[self._window :])
        if not force and (len(window) <= len(before) or window.endswith("\ufffd")):
            return ""
        self._window, self._read = self._read, len(self._tokens)
        return window[len(before) :]

    def push(self, token: int) -> str:
        """Take the next token; return the text that became final."""
        if self.done:
            return ""
        if token in self._eos:
            self.done, self.finish_reason = True, "stop"
            return self._flush()
        self._tokens.append(token)
        at_limit = len(self._tokens) >= self._limit
        self._decoded += self._new_text(force=at_limit)
        text, stopped = _cut_at_stop(self._decoded, self._stops)
        if stopped or at_limit:
            self.done = True
            self.finish_reason = "stop" if stopped else "length"
            return self._flush(text)
        safe = text[: len(text) - _stop_prefix_length(text, self._stops)]
        if not safe.startswith(self._emitted):
            return ""
        delta, self._emitted = safe[len(self._emitted) :], safe
        return delta

    def _flush(self, text: str | None = None) -> str:
        if text is None:
            self._decoded += self._new_text(force=True)
            text = _cut_at_stop(self._decoded, self._stops)[0]
        delta = text[len(self._emitted) :] if text.startswith(self._emitted) else ""
        self._emitted = text
        return delta

    def complete(self, tokens: Sequence[int]) -> str:
        """Take all of a row's tokens at once (no streaming), with a single decode; return its text."""
        for token in tokens:
            if token in self._eos:
                self.finish_reason = "stop"
                break
            if len(self._tokens) >= self._limit:
                break
            self._tokens.append(token)
        text, stopped = _cut_at_stop(self._decode(), self._stops)
        if stopped:
            self.finish_reason = "stop"
            self._tokens = self._tokens[: self._tokens_through_stop()]
        self.done = True
        return self._flush(text)

    def _tokens_through_stop(self) -> int:
        """The fewest leading tokens whose text holds a stop sequence (a binary search: few decodes)."""
        low, high = 1, len(self._tokens)
        while low < high:
            middle = (low + high) // 2
            if _cut_at_stop(self._decode(self._tokens[:middle]), self._stops)[1]:
                high = middle
            else:
                low = middle + 1
        return high

    def finish(self) -> str:
        """End the row (generation is over); return the text not handed out yet."""
        if self.done:
            return ""
        self.done = True
        return self._flush()

    @property
    def text(self) -> str:
        return self._emitted

    @property
    def tokens(self) -> int:
        """Tokens generated for this row, up to where its text ends."""
        return len(self._tokens)


class _BatchStreamer(BaseStreamer):
    """Receives each decoding step's tokens (one per row) from `generate` and passes on new text."""

    def __init__(self, assemblers: Sequence[TextAssembler], on_text: TextCallback) -> None:
        self._assemblers = assemblers
        self._on_text = on_text
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate first hands over the prompt itself
            self._prompt_seen = True
            return
        for row, token in enumerate(value.reshape(len(self._assemblers), -1)[:, -1].tolist()):
            if delta := self._assemblers[row].push(token):
                self._on_text(row, delta)

    def end(self) -> None:
        for row, assembler in enumerate(self._assemblers):
            if delta := assembler.finish():
                self._on_text(row, delta)


def chat_messages(raw: str) -> list[dict[str, str]]:
    """A request's `messages` (JSON: [{"role": ..., "content": ...}, ...]) checked, naming what is wrong."""
    try:
        messages = json.loads(raw)
    except json.JSONDecodeError as error:
        raise RequestError(f"messages is not valid JSON: {error}") from error
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content} objects")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(f"messages[{index}] must be an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise RequestError(f"messages[{index}].role must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise RequestError(f"messages[{index}].content must be text")
        checked.append({"role": role, "content": content})
    return checked


class Prompter:
    """Checks prompts and renders chat messages: the tokenizer and the model's config, not its weights,
    so the process that answers requests can do it while another process holds the model."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        eos_ids: list[int],
        context: int | None,
        stop_sequences: Sequence[str] = (),
        max_new_tokens_limit: int = 32_768,
    ) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.context = context
        """The model's context in tokens (max_position_embeddings), where its config says."""
        self.stop_sequences = tuple(stop_sequences)
        self.max_new_tokens_limit = max_new_tokens_limit

    @classmethod
    def load(
        cls, settings: LoadSettings, stop_sequences: Sequence[str] = (), max_new_tokens_limit: int = 32_768
    ) -> Prompter:
        """From the model's files alone (config, generation config, tokenizer); no weights are read."""
        _check_directory(settings.model, "config.json", "model")
        options = {"revision": settings.revision, "trust_remote_code": settings.trust_remote_code}
        config = AutoConfig.from_pretrained(settings.model, **options)
        try:
            generation = GenerationConfig.from_pretrained(settings.model, revision=settings.revision)
        except OSError:  # no generation_config.json: the model class would derive it from its config
            generation = GenerationConfig.from_model_config(config)
        tokenizer = _load_tokenizer(settings)
        return cls(
            tokenizer,
            _eos_ids(generation, tokenizer),
            getattr(config, "max_position_embeddings", None),
            stop_sequences,
            max_new_tokens_limit,
        )

    def prompt(self, text: str, sampling: Sampling) -> Prompt:
        """Check one prompt and its settings; raise RequestError naming what is wrong.

        The tokenizer adds its special tokens (DeepSeek's add BOS), except to a prompt that already
        starts with BOS, as one rendered by the chat template does: a second BOS confuses models.
        """
        bos = self.tokenizer.bos_token
        return self._checked(text, add_special_tokens=not (bos and text.startswith(bos)), sampling=sampling)

    def chat_prompt(self, messages: list[dict[str, str]], sampling: Sampling) -> Prompt:
        """Chat messages rendered with the model's own chat template (the one it was fine-tuned with:
        DeepTune saves it with every artifact), ending where the assistant answers."""
        if not self.tokenizer.chat_template:
            raise RequestError(
                "the model has no chat template, so chat messages cannot be rendered: send text_input "
                "(/v1/completions) with the prompt as the model was trained on it"
            )
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except TemplateError as error:  # e.g. a template that insists on alternating roles
            raise RequestError(f"the model's chat template refused these messages: {error}") from error
        # The template wrote every special token it wants (as apply_chat_template(tokenize=True) does).
        return self._checked(str(text), add_special_tokens=False, sampling=sampling)

    def _checked(self, text: str, *, add_special_tokens: bool, sampling: Sampling) -> Prompt:
        sampling.check(self.max_new_tokens_limit)
        ids: list[int] = self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        if not ids:
            raise RequestError("the prompt is empty")
        if self.context is not None and len(ids) + sampling.max_new_tokens > self.context:
            raise RequestError(
                f"the prompt's {len(ids)} tokens plus max_new_tokens {sampling.max_new_tokens} exceed the "
                f"model's context of {self.context} tokens: shorten the prompt or lower max_new_tokens"
            )
        return Prompt(ids=ids, sampling=sampling)


class Generator(Prompter):
    """A loaded model and tokenizer that generate for a batch of prompts at once."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        stop_sequences: Sequence[str] = (),
        max_new_tokens_limit: int = 32_768,
    ) -> None:
        context = getattr(model.config, "max_position_embeddings", None)
        eos_ids = _eos_ids(model.generation_config, tokenizer)
        super().__init__(tokenizer, eos_ids, context, stop_sequences, max_new_tokens_limit)
        self.model = model
        self.pad_id: int = tokenizer.pad_token_id

    @classmethod
    def load(
        cls, settings: LoadSettings, stop_sequences: Sequence[str] = (), max_new_tokens_limit: int = 32_768
    ) -> Generator:
        return cls(_load_model(settings), _load_tokenizer(settings), stop_sequences, max_new_tokens_limit)

    def generate(self, prompts: Sequence[Prompt], on_text: TextCallback | None = None) -> list[Completion]:
        """What every prompt produced, with as few generate calls as their settings allow: greedy prompts
        share one whatever their top_p and max_new_tokens, sampled ones one per (temperature, top_p), a
        seeded one runs alone. A call that fails (e.g. out of memory) is split in halves and retried, so
        only a prompt that fails alone gets the error; a streamed call is not retried (its text was sent).
        """
        groups: dict[tuple[object, ...], list[int]] = defaultdict(list)
        for index, prompt in enumerate(prompts):
            groups[prompt.sampling.batch_key(index)].append(index)
        completions = [Completion() for _ in prompts]
        for indices in groups.values():
            outcomes = self._generate_or_split(prompts, indices, on_text)
            for index, completion in zip(indices, outcomes, strict=True):
                completions[index] = completion
        return completions

    def _generate_or_split(
        self, prompts: Sequence[Prompt], indices: Sequence[int], on_text: TextCallback | None
    ) -> list[Completion]:
        batch = [prompts[i] for i in indices]
        try:
            return self._generate(batch, _relay(on_text, indices))
        except Exception as error:
            if on_text is not None or len(indices) == 1:
                failure = f"generation failed: {type(error).__name__}: {error}"
                return [Completion(error=failure) for _ in batch]
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            half = len(indices) // 2
            return [
                *self._generate_or_split(prompts, indices[:half], on_text),
                *self._generate_or_split(prompts, indices[half:], on_text),
            ]

    def _generate(self, batch: Sequence[Prompt], on_text: TextCallback | None) -> list[Completion]:
        width = max(len(prompt.ids) for prompt in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, prompt in enumerate(batch):  # left padding: every row's next token is at the end
            input_ids[row, width - len(prompt.ids) :] = torch.tensor(prompt.ids)
            attention_mask[row, width - len(prompt.ids) :] = 1
        stops = [(*self.stop_sequences, *prompt.sampling.stop) for prompt in batch]
        assemblers = [
            TextAssembler(self.tokenizer, prompt.sampling.max_new_tokens, row_stops, self.eos_ids)
            for prompt, row_stops in zip(batch, stops, strict=True)
        ]
        sampling = batch[0].sampling
        options: dict[str, object] = {"do_sample": not sampling.greedy}
        if not sampling.greedy:
            options |= {"temperature": sampling.temperature, "top_p": sampling.top_p}
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
        if shared := sorted(set.intersection(*(set(row_stops) for row_stops in stops))):
            # Lets rows stop early on the stops every row has (another row's own stop must not end
            # this one); each row's assembler cuts its text at its own stops.
            options |= {"stop_strings": shared, "tokenizer": self.tokenizer}
        with torch.inference_mode():
            output = cast(GenerationMixin, self.model).generate(
                input_ids=input_ids.to(self.model.device),
                attention_mask=attention_mask.to(self.model.device),
                max_new_tokens=max(prompt.sampling.max_new_tokens for prompt in batch),
                pad_token_id=self.pad_id,
                eos_token_id=self.eos_ids,
                streamer=None if on_text is None else _BatchStreamer(assemblers, on_text),
                **options,
            )
        if on_text is None:
            for assembler, tokens in zip(assemblers, output[:, width:].tolist(), strict=True):
                assembler.complete(tokens)
        return [
            Completion(
                text=assembler.text,
                prompt_tokens=len(prompt.ids),
                completion_tokens=assembler.tokens,
                finish_reason=assembler.finish_reason,
            )
            for prompt, assembler in zip(batch, assemblers, strict=True)
        ]


def _relay(on_text: TextCallback | None, indices: Sequence[int]) -> TextCallback | None:
    """A group's callback: maps a row of the group back to the prompt's index in the whole batch."""
    if on_text is None:
        return None
    return lambda row, text: on_text(indices[row], text)
