"""Scores on held-out rows: perplexity from the loss, the rest from greedy generations; preference
pairs also by how the model ranks their two answers.

The base model is scored before training on the same rows as the fine-tuned model after it, so the
delta shows what fine-tuning bought. Scales: BLEU 0-100 (sacrebleu's convention), every other
generation metric 0-1, perplexity ≥ 1.
"""

from __future__ import annotations

import math
import random
import re
import unicodedata
from collections.abc import Sequence
from typing import cast

import sacrebleu
import torch
from peft import PeftModel
from transformers import GenerationMixin, PreTrainedModel, PreTrainedTokenizerBase

from deeptune.api.finetunejob import EvalResults, FineTuneJobSpec, GenerationSpec
from deeptune_trainer.data.sample import Sample
from deeptune_trainer.formatting import IGNORE_INDEX, Collator, prompt_ids, tokenize_samples

GENERATION_METRICS = {"bleu", "rouge", "exactMatch", "accuracy", "f1"}

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_CJK_CHAR = re.compile(f"[{_CJK}]")
_ROUGE_TOKEN = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# --- perplexity -------------------------------------------------------------------------------


@torch.no_grad()
def target_log_likelihoods(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    samples: Sequence[Sample],
    *,
    max_length: int,
    batch_size: int,
    window_overlap: int = 0,
) -> list[tuple[float, int]]:
    """Each example's log-likelihood of its targets (prompt tokens do not count) and how many there
    are: one example a conversation, one a window of a document (`tokenize_samples`)."""
    examples = tokenize_samples(samples, tokenizer, max_length, window_overlap=window_overlap).examples
    collate = Collator(tokenizer.pad_token_id)
    device = _device(model)
    found: list[tuple[float, int]] = []
    model.eval()
    for start in range(0, len(examples), batch_size):
        batch = collate([example.feature() for example in examples[start : start + batch_size]])
        labels = batch.pop("labels").to(device)
        logits = model(**{name: tensor.to(device) for name, tensor in batch.items()}).logits
        targets = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
        )
        counts = (targets != IGNORE_INDEX).sum(dim=1)
        found += [(-total, int(count)) for total, count in zip(nll.sum(dim=1).tolist(), counts, strict=True)]
    return found


def perplexity(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    samples: Sequence[Sample],
    *,
    max_length: int,
    batch_size: int,
    window_overlap: int = 0,
) -> float:
    """exp of the mean negative log-likelihood per target token (prompt tokens do not count; a long
    document's, window by window, with the overlap as context)."""
    found = target_log_likelihoods(
        model, tokenizer, samples, max_length=max_length, batch_size=batch_size, window_overlap=window_overlap
    )
    tokens = sum(count for _, count in found)
    return math.exp(-sum(total for total, _ in found) / tokens) if tokens else math.nan


def preference_scores(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[Sample],
    *,
    max_length: int,
    batch_size: int,
) -> dict[str, float]:
    """How the model ranks each pair's answers: `preferenceAccuracy`, the share of pairs whose chosen
    answer is more likely than the rejected one, and `preferenceMargin`, the mean difference of their
    log-likelihoods (nats; summed over each answer's tokens, as DPO compares them)."""
    sizes = {"max_length": max_length, "batch_size": batch_size}
    chosen = target_log_likelihoods(model, tokenizer, pairs, **sizes)
    rejected = target_log_likelihoods(model, tokenizer, [pair.rejected_sample for pair in pairs], **sizes)
    margins = [good - bad for (good, _), (bad, _) in zip(chosen, rejected, strict=True)]
    return {
        "preferenceAccuracy": sum(margin > 0 for margin in margins) / len(margins),
        "preferenceMargin": sum(margins) / len(margins),
    }


# --- generation -------------------------------------------------------------------------------


@torch.no_grad()
def generate(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    samples: Sequence[Sample],
    generation: GenerationSpec,
    *,
    max_length: int,
    batch_size: int,
) -> list[str]:
    """The model's answers to the samples' prompts, in batches padded on the left.

    Left padding puts every prompt's last token at the same position, where generation continues.
    """
    device = _device(model)
    prompts = [prompt_ids(sample, tokenizer)[-max_length:] for sample in samples]
    sampling = generation.temperature > 0
    options = {"temperature": generation.temperature, "top_p": generation.top_p} if sampling else {}
    answers: list[str] = []
    model.eval()
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(ids)) + ids for ids in batch])
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
        output = cast(GenerationMixin, model).generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=generation.max_new_tokens,
            do_sample=sampling,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **options,
        )
        answers += [
            text.strip() for text in tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
        ]
    return answers


# --- text metrics -----------------------------------------------------------------------------


def has_chinese(texts: Sequence[str]) -> bool:
    return any(_CJK_CHAR.search(text) for text in texts)


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU; Chinese references are split into characters (sacrebleu's `zh` tokenizer)."""
    tokenize = "zh" if has_chinese(references) else "13a"
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)], tokenize=tokenize).score)


class _RougeTokenizer:
    """Chinese characters one by one, other scripts by words, lower-cased.

    rouge-score's default tokenizer keeps only [a-z0-9], so a Chinese answer would score 0 whatever it says.
    """

    def tokenize(self, text: str) -> list[str]:
        return _ROUGE_TOKEN.findall(text.lower())


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F1 over the rows."""
    from rouge_score import rouge_scorer  # noqa: PLC0415  (with nltk ~40 MB: loaded when ROUGE is asked for)

    kinds = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(kinds), tokenizer=_RougeTokenizer())
    totals = dict.fromkeys(kinds, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(reference, prediction)
        for kind in kinds:
            totals[kind] += scores[kind].fmeasure
    count = max(len(predictions), 1)
    return {kind: total / count for kind, total in totals.items()}


def normalize(text: str) -> str:
    """NFKC, case-folded, punctuation removed, whitespace collapsed: formatting is not the answer."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    kept = "".join(" " if unicodedata.category(char).startswith("P") else char for char in folded)
    return " ".join(kept.split())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    pairs = list(zip(predictions, references, strict=True))
    return sum(normalize(p) == normalize(r) for p, r in pairs) / len(pairs) if pairs else 0.0


def accuracy(predictions: Sequence[str], labels: Sequence[str]) -> float:
    """Share of rows whose normalized answer is the normalized label."""
    return exact_match(predictions, labels)


def macro_f1(predictions: Sequence[str], labels: Sequence[str]) -> float:
    """F1 averaged over the label classes, so rare classes weigh as much as frequent ones.

    The classes are those of the labels: a free-form answer that is no class counts as a miss of its
    row's class and does not become a class of its own.
    """
    predicted = [normalize(p) for p in predictions]
    expected = [normalize(label) for label in labels]
    scores = []
    for cls in sorted(set(expected)):
        tp = sum(p == cls and e == cls for p, e in zip(predicted, expected, strict=True))
        fp = sum(p == cls and e != cls for p, e in zip(predicted, expected, strict=True))
        fn = sum(p != cls and e == cls for p, e in zip(predicted, expected, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


def text_metrics(
    metrics: Sequence[str], predictions: Sequence[str], samples: Sequence[Sample]
) -> dict[str, float]:
    """The requested generation metrics of predictions against the samples' targets (or labels)."""
    references = [sample.target for sample in samples]
    labels = [sample.label if sample.label is not None else sample.target for sample in samples]
    scores: dict[str, float] = {}
    if "bleu" in metrics:
        scores["bleu"] = bleu(predictions, references)
    if "rouge" in metrics:
        scores.update(rouge(predictions, references))
    if "exactMatch" in metrics:
        scores["exactMatch"] = exact_match(predictions, references)
    if "accuracy" in metrics:
        scores["accuracy"] = accuracy(predictions, labels)
    if "f1" in metrics:
        scores["f1"] = macro_f1(predictions, labels)
    return scores


# --- evaluation -------------------------------------------------------------------------------


def generation_rows(samples: Sequence[Sample], spec: FineTuneJobSpec) -> list[Sample]:
    """The held-out rows that generation metrics use: maxSamples of them drawn with the run's seed (not
    the first ones: a file sorted by topic or length would bias the scores), the same for both models,
    in source order."""
    count = spec.evaluation.max_samples
    if len(samples) <= count:
        return list(samples)
    chosen = sorted(random.Random(spec.hyperparameters.seed).sample(range(len(samples)), count))
    return [samples[index] for index in chosen]


def evaluate(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    samples: Sequence[Sample],
    spec: FineTuneJobSpec,
) -> dict[str, float]:
    """The spec's metrics of `model` on the held-out `samples` (perplexity over all of them)."""
    metrics = spec.evaluation.metrics
    max_length = spec.hyperparameters.max_seq_length
    batch_size = spec.hyperparameters.per_device_batch_size
    scores: dict[str, float] = {}
    if "perplexity" in metrics:
        scores["perplexity"] = perplexity(
            model,
            tokenizer,
            samples,
            max_length=max_length,
            batch_size=batch_size,
            window_overlap=spec.dataset.window_overlap,
        )
    pairs = [sample for sample in samples if sample.rejected is not None]
    if pairs:  # what a preference-tuned model is judged by, whatever metrics are listed
        scores.update(
            preference_scores(model, tokenizer, pairs, max_length=max_length, batch_size=batch_size)
        )
    asked = [sample for sample in samples if not sample.is_document]  # documents answer no prompt
    if GENERATION_METRICS & set(metrics) and asked:
        rows = generation_rows(asked, spec)
        predictions = generate(
            model, tokenizer, rows, spec.evaluation.generation, max_length=max_length, batch_size=batch_size
        )
        scores.update(text_metrics(metrics, predictions, rows))
    return scores


def compare(fine_tuned: dict[str, float], baseline: dict[str, float] | None, samples: int) -> EvalResults:
    """The A/B result: both score sets and fine-tuned minus baseline for each metric both have."""
    delta = None
    if baseline is not None:
        delta = {name: fine_tuned[name] - baseline[name] for name in fine_tuned if name in baseline}
    return EvalResults(fine_tuned=fine_tuned, baseline=baseline, delta=delta, samples=samples)
