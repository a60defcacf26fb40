"""Samples → token ids and labels, and batches of them.

The loss is taken only on what the assistant says: the final assistant turn and its end-of-sequence
token, and with `dataset.trainOn: allAssistantTurns` (the default, as Axolotl and LLaMA-Factory do)
every earlier assistant turn of a conversation too; user and system turns are given, not learned.
Prompts are rendered with the tokenizer's chat template, so the model is trained on the exact layout
it will be prompted with. A tokenizer without one is given
FALLBACK_CHAT_TEMPLATE when it is loaded, the plain layout

    ### User:
    {user turn}

    ### Assistant:
    {assistant turn}<eos>

and saved with it, so every artifact carries the template it was trained with and a server that
applies it prompts the model exactly as training did. Evaluation builds its generation prompts with the
same functions, so training and scoring agree.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from deeptune_trainer.data.sample import Message, Sample

IGNORE_INDEX = -100
"""Label value that the loss ignores (PyTorch's cross-entropy default)."""

FALLBACK_CHAT_TEMPLATE = (
    "{{ bos_token or '' }}"
    "{% for message in messages %}"
    "{{ '### ' + message['role'] | capitalize + ':\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
)
"""The layout for tokenizers that have no chat template (a Jinja chat template, as Hugging Face saves)."""

Feature = dict[str, list[int]]


@dataclass(frozen=True)
class Example:
    """One tokenized sample: the prompt part has IGNORE_INDEX labels, the completion part its ids."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool
    last_turn_only: bool = False
    """All assistant turns were asked for, but the template allowed the final one only."""

    def feature(self) -> Feature:
        return {"input_ids": self.input_ids, "labels": self.labels}


@dataclass(frozen=True)
class TokenizedSplit:
    examples: list[Example]
    truncated: int
    """Rows cut to max_seq_length (the dataset report's `truncated`)."""
    last_turn_only: int = 0
    """Conversations trained on their final turn only although all assistant turns were asked for: the
    chat template renders earlier turns differently once later ones follow (DeepSeek-R1's drops
    earlier reasoning), so the earlier turns' trained form does not exist."""

    @property
    def tokens(self) -> int:
        return sum(len(example.input_ids) for example in self.examples)


def _chat(messages: Iterable[Message]) -> list[dict[str, str]]:
    return [{"role": message.role, "content": message.content} for message in messages]


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    """Give a tokenizer without a chat template the fallback one (it is saved with the tokenizer)."""
    if not tokenizer.chat_template:
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE


def render_prompt(sample: Sample, tokenizer: PreTrainedTokenizerBase) -> str:
    """The text before the target, ending where the model starts to answer."""
    rendered = tokenizer.apply_chat_template(
        _chat(sample.prompt_messages), add_generation_prompt=True, tokenize=False
    )
    assert isinstance(rendered, str)
    return rendered


TARGET_MARK = "\U000f0000DEEPTUNE_TARGET\U000f0000"
"""Rendered in the target's place, then replaced by the target: the template decides what surrounds an
answer, never what it says (DeepSeek-R1's template would drop the `<think>` part of it)."""


def render_completion(sample: Sample, tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The target as written, wrapped as the template wraps an answer (its end-of-turn marker), when
    the prompt is a prefix of the rendering; else the target alone."""
    marked = [*_chat(sample.prompt_messages), {"role": "assistant", "content": TARGET_MARK}]
    full = tokenizer.apply_chat_template(marked, tokenize=False)
    if isinstance(full, str) and full.startswith(prompt) and full.count(TARGET_MARK) == 1:
        return full[len(prompt) :].replace(TARGET_MARK, sample.target)
    return sample.target


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # The template (or the fallback) already wrote the special tokens it wants.
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


def prompt_ids(sample: Sample, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids of the generation prompt: what the model is given at evaluation."""
    return _ids(tokenizer, render_prompt(sample, tokenizer))


def _fit(prompt: int, completion: int, max_length: int) -> tuple[int, int]:
    """How many prompt tokens (from its end) and completion tokens (from its start) a row cut to
    max_length keeps: the completion whole when it can be.

    The prompt loses its beginning (the question right before the answer matters most) but keeps at
    least half of max_length when the completion alone is that long; the completion loses its end.
    """
    if prompt + completion <= max_length:
        return prompt, completion
    keep_prompt = max(max_length - completion, min(prompt, max_length // 2))
    return keep_prompt, max_length - keep_prompt


def _turn_pieces(
    sample: Sample, tokenizer: PreTrainedTokenizerBase, prompt_text: str
) -> list[tuple[str, bool]] | None:
    """The final answer's prompt in pieces (text, whether it is an earlier assistant turn to train on);
    None when the template does not render each turn as a prefix of the next (then only the final turn
    can be trained)."""
    pieces: list[tuple[str, bool]] = []
    rendered = ""
    messages = _chat(sample.messages)
    for index, message in enumerate(messages[:-1]):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:index], add_generation_prompt=True, tokenize=False)
        through = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not (isinstance(before, str) and isinstance(through, str)):
            return None
        if not (before.startswith(rendered) and through.startswith(before)):
            return None
        pieces += [(before[len(rendered) :], False), (through[len(before) :], True)]
        rendered = through
    if not prompt_text.startswith(rendered):
        return None
    return [*pieces, (prompt_text[len(rendered) :], False)]


def tokenize_sample(
    sample: Sample, tokenizer: PreTrainedTokenizerBase, max_length: int, *, all_turns: bool = False
) -> Example:
    """Token ids and labels of a sample: labels on the final assistant turn, and with `all_turns` on
    every assistant turn (where the template allows: `_turn_pieces`)."""
    prompt_text = render_prompt(sample, tokenizer)
    several = all_turns and sum(m.role == "assistant" for m in sample.messages) > 1
    pieces = _turn_pieces(sample, tokenizer, prompt_text) if several else None
    prompt: list[int] = []
    prompt_labels: list[int] = []
    for text, trained in pieces or [(prompt_text, False)]:
        ids = _ids(tokenizer, text)
        prompt += ids
        prompt_labels += ids if trained else [IGNORE_INDEX] * len(ids)
    completion = _ids(tokenizer, render_completion(sample, tokenizer, prompt_text))
    if tokenizer.eos_token_id not in completion:
        completion.append(tokenizer.eos_token_id)
    keep_prompt, keep_completion = _fit(len(prompt), len(completion), max_length)
    start = len(prompt) - keep_prompt
    return Example(
        input_ids=prompt[start:] + completion[:keep_completion],
        labels=prompt_labels[start:] + completion[:keep_completion],
        truncated=keep_prompt + keep_completion < len(prompt) + len(completion),
        last_turn_only=several and pieces is None,
    )


def document_windows(
    sample: Sample, tokenizer: PreTrainedTokenizerBase, max_length: int, overlap: int = 0
) -> list[Example]:
    """A document (`Sample.is_document`) as windows of at most max_length tokens, every token learned
    once: each window after the first starts `overlap` tokens before the previous one ended and takes
    them as context only (IGNORE_INDEX labels), so a long document is trained whole, not truncated.
    The document is its text between the tokenizer's own beginning and end tokens: raw text, no chat
    template (continued pre-training)."""
    ids = [*_ids(tokenizer, sample.target), tokenizer.eos_token_id]
    if tokenizer.bos_token_id is not None:
        ids.insert(0, tokenizer.bos_token_id)
    step = max_length - overlap
    windows = []
    for start in range(0, max(len(ids) - overlap, 1), step):
        window = ids[start : start + max_length]
        context = overlap if start else 0
        windows.append(Example(window, [IGNORE_INDEX] * context + window[context:], truncated=False))
    return windows


def tokenize_samples(
    samples: Sequence[Sample],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    *,
    all_turns: bool = False,
    window_overlap: int = 0,
) -> TokenizedSplit:
    """Every sample's examples: one for a conversation (cut to max_length when it must be), a window
    each for the parts of a document (`document_windows`, with `window_overlap`)."""
    examples = []
    for sample in samples:
        if sample.is_document:
            examples += document_windows(sample, tokenizer, max_length, window_overlap)
        else:
            examples.append(tokenize_sample(sample, tokenizer, max_length, all_turns=all_turns))
    return TokenizedSplit(
        examples=examples,
        truncated=sum(example.truncated for example in examples),
        last_turn_only=sum(example.last_turn_only for example in examples),
    )


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins whose lengths add up to at most `capacity`.

    First-fit decreasing: the items are placed longest first (equal lengths in index order), each
    into the first bin that still has room, and a new bin is opened only when none has. It leaves
    far fewer half-empty bins than closing a bin as soon as the next item in order does not fit,
    and its output depends on the lengths alone. A segment tree over the bins' free space finds the
    first bin with room in O(log n), so a million examples take seconds, not hours.
    """
    if any(length > capacity for length in lengths):
        raise ValueError(f"an item is longer than the capacity {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    leaves = 1
    while leaves < len(lengths):
        leaves *= 2
    # free[1] is the root; the leaves free[leaves:] are the bins, unopened ones all free. An inner
    # node holds the most free space below it, so descending left whenever the left child has room
    # finds the first bin with room, and that is an open bin, or else the next unopened one.
    free = [capacity] * (2 * leaves)
    bins: list[list[int]] = []
    for index in order:
        length = lengths[index]
        node = 1
        while node < leaves:
            node = 2 * node if free[2 * node] >= length else 2 * node + 1
        slot = node - leaves
        if slot == len(bins):
            bins.append([])
        bins[slot].append(index)
        free[node] -= length
        while node > 1:
            node //= 2
            free[node] = max(free[2 * node], free[2 * node + 1])
    return bins


def pack(examples: Sequence[Example], max_length: int) -> list[Feature]:
    """Concatenate examples into rows of at most max_length tokens, by first-fit decreasing.

    The rows are the bins of `first_fit_decreasing` over the examples' lengths, in the order it
    opened them, each holding its examples in the order it placed them. Every token of every example
    is in exactly one row; the rows are no longer in dataset order (the Trainer shuffles them anyway).

    Padding-free packing: position_ids restart at 0 for every example, and transformers derives a
    block-diagonal causal mask from those restarts (when no attention_mask is given), so no token
    attends to another example. The first label of every example is masked so that the last token of
    one example is never trained to predict the first of the next.
    """
    rows: list[Feature] = []
    for members in first_fit_decreasing([len(example.input_ids) for example in examples], max_length):
        row: Feature = {"input_ids": [], "labels": [], "position_ids": []}
        for example in (examples[index] for index in members):
            row["input_ids"] += example.input_ids
            row["labels"] += [IGNORE_INDEX, *example.labels[1:]]
            row["position_ids"] += list(range(len(example.input_ids)))
        rows.append(row)
    return rows


class Collator:
    """Pads each batch to its longest row (right padding) and counts the padding it adds.

    Plain rows get an attention_mask. Packed rows (with position_ids) get none: their padding tail
    gets positions restarting at 0, which makes it one more independent segment, and its labels are
    ignored.

    With `logits_at_targets_only` (training), the batch also asks the model for logits only where
    they are scored: `logits_to_keep` marks the positions whose next token carries a label, and
    `shift_labels` holds those next tokens, flattened in the same order. transformers then runs the
    LM head and the cross-entropy on those positions alone (a few percent of them when prompts are
    long) instead of on every position, which gives the same loss and gradients for less compute
    and, with a vocabulary of 100k+ tokens, far less memory. The Trainer counts the loss tokens of
    gradient accumulation from `shift_labels` too. Only for models that take a boolean
    `logits_to_keep`, and not under nn.DataParallel (`training.logits_at_targets_only` decides).
    """

    def __init__(self, pad_token_id: int, *, logits_at_targets_only: bool = False) -> None:
        self.pad_token_id = pad_token_id
        self.logits_at_targets_only = logits_at_targets_only
        self.pad_tokens = 0
        self.total_tokens = 0

    @property
    def padding_waste(self) -> float:
        """Share of the batched tokens that were padding (0 when nothing was batched yet)."""
        return self.pad_tokens / self.total_tokens if self.total_tokens else 0.0

    def __call__(self, features: list[Feature]) -> dict[str, torch.Tensor]:
        width = max(len(feature["input_ids"]) for feature in features)
        packed = "position_ids" in features[0]
        columns: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
        columns.update({"position_ids": []} if packed else {"attention_mask": []})
        for feature in features:
            length = len(feature["input_ids"])
            pad = width - length
            columns["input_ids"].append(feature["input_ids"] + [self.pad_token_id] * pad)
            columns["labels"].append(feature["labels"] + [IGNORE_INDEX] * pad)
            if packed:
                columns["position_ids"].append(feature["position_ids"] + list(range(pad)))
            else:
                columns["attention_mask"].append([1] * length + [0] * pad)
            self.pad_tokens += pad
        self.total_tokens += width * len(features)
        batch = {name: torch.tensor(rows, dtype=torch.long) for name, rows in columns.items()}
        if self.logits_at_targets_only:
            labels = batch["labels"]
            next_labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
            scored = next_labels != IGNORE_INDEX
            batch["logits_to_keep"] = scored
            batch["shift_labels"] = next_labels[scored]
        return batch
