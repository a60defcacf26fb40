"""The FineTuneJob resource: what to fine-tune, on which data, how, and what came of it."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, ConfigDict, Field, JsonValue, field_validator, model_validator

from deeptune.api.base import (
    LONG_TEXT,
    SHORT_TEXT,
    Affinity,
    ApiModel,
    Condition,
    ConfigMapKeyRef,
    CpuQuantity,
    EnvList,
    ImageReference,
    Name,
    ObjectName,
    PullSecrets,
    PvcLocation,
    Quantity,
    SecretKeyRef,
    Toleration,
    cel,
    cel_rules,
    exactly_one,
    immutable,
    nested_default,
    null_means_default,
    unchanged,
)

KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SHORT_NAME = "ftj"

Method = Literal["lora", "qlora", "full"]
Metric = Literal["perplexity", "bleu", "rouge", "accuracy", "f1", "exactMatch"]
Score = Literal[Metric, "preferenceAccuracy", "preferenceMargin"]
"""A score a run reports: the listed metrics, and for preference pairs (always) how it ranks them."""
Phase = Literal["Pending", "Running", "Succeeded", "Failed", "Suspended"]

DEFAULT_LEARNING_RATE: dict[str, float] = {"lora": 2.0e-4, "qlora": 2.0e-4, "full": 2.0e-5}
"""Learning rates that work for most DeepSeek-sized models; full fine-tuning needs a much smaller one."""


KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
"""How a Job asks Kueue to admit it: Kueue then flips its `suspend` when quota allows."""
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
"""A Kueue WorkloadPriorityClass for the Job's Workload: its priority in the queue and for preemption."""
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
"""A LocalQueue's name, which must also be a label value (at most 63 characters)."""

PREFERENCE_STYLE_MESSAGE = (
    "dataset.style preference is for preference tuning: set spec.preference (algorithm dpo or orpo), "
    "or use a supervised style"
)
PREFERENCE_NEEDS_PAIRS_MESSAGE = (
    "spec.preference trains on pairs: set dataset.style to preference (or auto) and give rows with "
    "prompt, chosen and rejected columns"
)
PREFERENCE_SHARDING_MESSAGE = (
    "spec.preference does not run under distributed.strategy fsdp or deepspeed yet: use ddp (or auto), "
    "or method lora or qlora to fit the model"
)
DISTILLATION_PREFERENCE_MESSAGE = "distillation and preference cannot be combined: choose one"
FEDERATION_SHAPE_MESSAGE = (
    "federation averages LoRA adapters trained by one process per site: use method lora or qlora, one pod "
    "(distributed.nodes 1) with at most one GPU, and neither preference nor distillation"
)
DISTILLATION_SHARDING_MESSAGE = (
    "spec.distillation does not run under distributed.strategy fsdp or deepspeed yet: use ddp (or auto), "
    "or method lora or qlora to fit the student"
)
WINDOW_OVERLAP_MESSAGE = (
    "dataset.windowOverlap must be below hyperparameters.maxSeqLength (a window's length)"
)
ROPE_SCALING_MERGE_MESSAGE = (
    "ropeScaling changes the base model's config, which an adapter alone does not carry: set "
    "output.mergeAdapter to true (serving then loads the merged model with it), or use method full"
)
PREFERENCE_PACKING_MESSAGE = (
    "hyperparameters.packing is for supervised rows; preference pairs are batched as pairs: set it to false"
)
PROCESSES_PER_GPU_MESSAGE = (
    "distributed.processesPerNode must equal resources.gpu (one process per GPU), "
    "or be left unset to get that"
)
QUEUED_SUSPEND_MESSAGE = (
    "suspend cannot hold a run queued in Kueue (queueName): Kueue starts every Job it admits. To hold "
    'it, deactivate its Workload (kubectl patch workload NAME --type merge -p \'{"spec":{"active":false}}\')'
)
WORKLOAD_PRIORITY_MESSAGE = (
    "workloadPriorityClassName is Kueue's: set queueName too (the LocalQueue the run waits in)"
)
QLORA_SHARDING_MESSAGE = (
    "distributed.strategy fsdp or deepspeed cannot shard QLoRA's 4-bit weights: use strategy ddp (or auto) "
    "with method qlora, or method lora with fsdp or deepspeed"
)
OFFLOAD_STRATEGY_MESSAGE = (
    "distributed.offload is DeepSpeed's ZeRO-Offload: set distributed.strategy to deepspeed, "
    "or offload to none"
)


HUB_ID_PATTERN = r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)?$"
"""A Hugging Face repository id, `org/name` or `name` (ASCII: the API server's `\\w` is ASCII-only)."""


def _ascii_url(value: str) -> str:
    if not URL_CHARACTERS.match(value):
        raise ValueError(URL_MESSAGE)
    return value


URL_CHARACTERS = re.compile(r"^[!-~]+$")
URL_MESSAGE = "must be printable ASCII without spaces (percent-encode other characters)"
Url = Annotated[
    str,
    Field(
        max_length=LONG_TEXT,
        pattern=r"^https?://\S+$",
        json_schema_extra={
            "x-kubernetes-validations": [cel(f"self.matches('{URL_CHARACTERS.pattern}')", URL_MESSAGE)]
        },
    ),
    AfterValidator(_ascii_url),
]
"""An http(s) URL. `\\S` in the pattern is Unicode-aware for pydantic and ASCII-only for the API server,
so the rule (the same for both) settles the rest: the trainer's HTTP client sends ASCII only."""


class BaseModelSpec(ApiModel):
    """The pretrained model to start from: a Hugging Face id, or a directory on a PVC."""

    model_config = cel_rules(
        cel("has(self.name) != has(self.pvc)", "set exactly one of name (a Hugging Face id) or pvc")
    )

    name: Annotated[str, Field(max_length=SHORT_TEXT, pattern=HUB_ID_PATTERN)] | None = None
    """Hugging Face model id, e.g. `deepseek-ai/deepseek-llm-7b-base`; downloaded by the trainer."""
    revision: Annotated[str, Field(max_length=SHORT_TEXT)] = "main"
    """Branch, tag or commit of the Hugging Face repository."""
    token_secret_ref: SecretKeyRef | None = None
    """Secret key holding a Hugging Face token, for gated or private models."""
    pvc: PvcLocation | None = None
    """A model directory (config.json, tokenizer, weights) on a PersistentVolumeClaim."""
    trust_remote_code: bool = False
    """Run modelling code shipped with the model repository. Only for repositories you trust."""

    @model_validator(mode="after")
    def _one_source(self) -> BaseModelSpec:
        exactly_one(self, ("name", "pvc"))
        return self


SPLIT_PATTERN = r"^[A-Za-z0-9_]+$"
"""A split's name as the Hub's file-naming convention uses it (`train`, `validation`, `test`)."""
FileGlob = Annotated[str, Field(max_length=SHORT_TEXT, pattern=r"^[^/ \t\r\n][^ \t\r\n]*$")]
"""A glob relative to a repository's root, e.g. `en/*.parquet` (fnmatch: `*` also crosses `/`)."""


class HubDataset(ApiModel):
    """A dataset repository on the Hugging Face Hub, read at one revision; the trainer caches it on the
    output volume (HF_HOME), so a retried run does not download it again."""

    name: Annotated[str, Field(max_length=SHORT_TEXT, pattern=HUB_ID_PATTERN)]
    """The dataset's repository id, e.g. `org/support-chats`."""
    revision: Annotated[str, Field(max_length=SHORT_TEXT)] = "main"
    """Branch, tag or commit; the commit it resolved to is recorded in the data report."""
    split: Annotated[str, Field(max_length=SHORT_TEXT, pattern=SPLIT_PATTERN)] = "train"
    """Which files to read, by the Hub's naming convention: those whose path has the split's name as a
    word (`data/train-00000-of-00002.parquet`, `train.jsonl`, `train/part-1.csv`); when no file names
    any split, every data file is `train`."""
    files: Annotated[list[FileGlob], Field(min_length=1, max_length=100)] | None = None
    """Globs of the files to read instead of choosing them by split, e.g. `["en/*.parquet"]`."""
    token_secret_ref: SecretKeyRef | None = None
    """Secret key holding a Hugging Face token, for private or gated datasets. Without it the base
    model's token (baseModel.tokenSecretRef), if any, is used."""


class DataSource(ApiModel):
    """Where rows come from: a file on a PVC, a ConfigMap key, an http(s) URL, a Hugging Face Hub
    dataset, or inline rows."""

    model_config = cel_rules(
        cel(
            "[has(self.pvc), has(self.configMap), has(self.url), has(self.hub), has(self.inline)]"
            ".filter(x, x).size() == 1",
            "set exactly one of pvc, configMap, url, hub or inline",
        )
    )

    pvc: PvcLocation | None = None
    """A file on a PersistentVolumeClaim."""
    config_map: ConfigMapKeyRef | None = None
    """A key of a ConfigMap in the same namespace (small datasets)."""
    url: Url | None = None
    """An http(s) URL the trainer downloads: printable ASCII (percent-encode anything else)."""
    hub: HubDataset | None = None
    """A dataset on the Hugging Face Hub, by name, revision and split."""
    inline: Annotated[list[dict[str, JsonValue]], Field(max_length=1000)] | None = None
    """Rows written in the manifest itself (at most 1000; for demos and tests)."""

    @model_validator(mode="after")
    def _one_source(self) -> DataSource:
        exactly_one(self, ("pvc", "config_map", "url", "hub", "inline"))
        return self


class FieldMapping(ApiModel):
    """Which column holds which part of a sample, for each sample style."""

    prompt: Name = "prompt"
    completion: Name = "completion"
    instruction: Name = "instruction"
    input: Name = "input"
    output: Name = "output"
    messages: Name = "messages"
    label: Name = "label"
    """For label-style data (classification): the column with the expected label."""
    chosen: Name = "chosen"
    """For preference pairs: the answer to prefer (text, or one assistant message)."""
    rejected: Name = "rejected"
    """For preference pairs: the answer to move away from, to the same prompt."""
    text: Name = "text"
    """For documents (`style: text`): the document."""


DEFAULT_VALIDATION_RATIO = 0.1


class ValidationSplit(ApiModel):
    """Held-out rows for evaluation: a share of the dataset, or a source of their own."""

    ratio: Annotated[float, Field(gt=0, lt=1), null_means_default(DEFAULT_VALIDATION_RATIO)] = (
        DEFAULT_VALIDATION_RATIO
    )
    """Share of rows held out when no separate source is given."""
    source: DataSource | None = None
    """A separate validation dataset (same format and field mapping)."""


class TestSplit(ApiModel):
    """Rows kept for the final scores only: the validation split picks the checkpoint (early stopping),
    so scores on it flatter the model; scores on rows nothing was chosen by do not."""

    ratio: Annotated[float, Field(gt=0, lt=1), null_means_default(DEFAULT_VALIDATION_RATIO)] = (
        DEFAULT_VALIDATION_RATIO
    )
    """Share of rows held out when no separate source is given (taken before the validation share)."""
    source: DataSource | None = None
    """A separate test dataset (same format and field mapping)."""


class Normalization(ApiModel):
    """Text normalization of the prompts (and, with `targets`, the answers) before training. Dedup
    always compares a folded form of every turn (NFKC, case, punctuation and spacing ignored)."""

    unicode: bool = True
    """Unicode NFKC normalization (unifies full-width letters and digits, ligatures, ...)."""
    punctuation: bool = True
    """Unify full-width and half-width punctuation within a row's dominant script."""
    whitespace: bool = True
    """Collapse runs of spaces and tabs, trim lines, drop zero-width characters."""
    case_fold: bool = False
    """Lower-case everything (off by default: case often matters for code and names)."""
    targets: bool = False
    """Also rewrite the answers (assistant turns), which the model learns to write. Off by default:
    NFKC turns `E=mc²` into `E=mc2` and `x₁` into `x1`, and collapsing spaces changes code. Dedup
    compares normalized answers either way. Fenced code blocks are never normalized."""


class NearDedup(ApiModel):
    """Near-duplicate removal by MinHash over character n-grams."""

    enabled: bool = True
    threshold: Annotated[float, Field(gt=0, le=1)] = 0.85
    """Estimated Jaccard similarity above which a row is dropped as a near duplicate."""
    ngram: Annotated[int, Field(ge=1, le=32)] = 5
    """Character n-gram length (characters, so Chinese and English are treated alike)."""


PiiType = Literal["email", "phone", "idCard", "bankCard", "ipAddress"]


class PiiFilter(ApiModel):
    """Personal and sensitive data: redact it in place, drop the row, or leave it."""

    action: Literal["redact", "drop", "off"] = "redact"
    types: Annotated[list[PiiType], Field(max_length=5)] = [
        "email",
        "phone",
        "idCard",
        "bankCard",
        "ipAddress",
    ]


class Cleaning(ApiModel):
    """Cleaning rules, applied in order: normalize, length bounds, degenerate rows, PII, dedup."""

    model_config = cel_rules(
        cel(
            "!has(self.minChars) || !has(self.maxChars) || self.minChars <= self.maxChars",
            "minChars must not exceed maxChars",
        )
    )

    normalization: Annotated[Normalization, Field(json_schema_extra=nested_default())] = Field(
        default_factory=Normalization
    )
    exact_dedup: bool = True
    """Drop rows whose normalized text equals an earlier row's."""
    near_dedup: Annotated[NearDedup, Field(json_schema_extra=nested_default())] = Field(
        default_factory=NearDedup
    )
    min_chars: Annotated[int, Field(ge=0)] = 1
    """Rows whose completion (or last assistant turn) is shorter are dropped."""
    max_chars: Annotated[int, Field(ge=1)] = 100_000
    """Rows whose whole text is longer are dropped."""
    drop_degenerate: bool = True
    """Drop rows whose completion repeats the prompt or is one character repeated."""
    pii: Annotated[PiiFilter, Field(json_schema_extra=nested_default())] = Field(default_factory=PiiFilter)

    @model_validator(mode="after")
    def _bounds(self) -> Cleaning:
        if self.min_chars > self.max_chars:
            raise ValueError("minChars must not exceed maxChars")
        return self


Thesaurus = Literal["wordnet", "cilin"]


class SynonymReplacement(ApiModel):
    """Replace words by synonyms from a user dictionary and packaged thesauri."""

    dictionary: Annotated[dict[str, list[str]], Field(max_length=10_000)] = {}
    """Word to its synonyms, e.g. `{"快速": ["迅速", "飞快"], "big": ["large"]}`."""
    dictionary_config_map: ConfigMapKeyRef | None = None
    """A ConfigMap key holding the dictionary as JSON, for large dictionaries."""
    thesauri: Annotated[list[Thesaurus], Field(max_length=2)] = []
    """Thesauri shipped in the trainer image (nothing is downloaded) whose synonyms join the
    dictionary's, which win where both have a word: `wordnet` (English: Princeton WordNet 3.0) and
    `cilin` (Chinese: HIT-IR's 同义词词林扩展版, whose license is HIT-IR's own, for research: check
    that it fits your use). Only a word's senses in which it is itself the lemma are used, so an
    inflected word is not replaced by another's base form."""
    probability: Annotated[float, Field(gt=0, le=1)] = 0.3
    """Chance that each dictionary word found in a row is replaced."""


class BackTranslation(ApiModel):
    """Paraphrase by translating to a pivot language and back with seq2seq models. A paraphrase is kept
    only when the models took the whole prompt, it changed more than punctuation or case, its length
    stays within the ratios and it shares enough with the original; the data report counts the rest
    by reason."""

    forward_model: Name
    """Translation model into the pivot language, e.g. `Helsinki-NLP/opus-mt-zh-en`."""
    backward_model: Name
    """Translation model back from the pivot language, e.g. `Helsinki-NLP/opus-mt-en-zh`."""
    max_new_tokens: Annotated[int, Field(ge=1, le=4096)] = 256
    min_length_ratio: Annotated[float, Field(gt=0, le=1)] = 0.5
    """A paraphrase shorter than this share of the original is dropped (a translation that lost part)."""
    max_length_ratio: Annotated[float, Field(ge=1, le=10)] = 2.0
    """A paraphrase longer than this multiple of the original is dropped (a translation that rambled)."""
    min_similarity: Annotated[float, Field(ge=0, le=1)] = 0.2
    """Least share of character bigrams a paraphrase shares with the original (Jaccard): below it, the
    round trip changed the meaning or produced noise."""


PerturbationTemplate = Annotated[str, Field(min_length=6, max_length=1000)]


class InstructionPerturbation(ApiModel):
    """The instruction asked another way: reworded, with irrelevant context, with typos."""

    reword: bool = True
    """Frame the instruction with an opening and a closing phrase in its language, drawn from built-in
    pools (over a hundred framings per language), or with `templates`."""
    templates: Annotated[
        list[PerturbationTemplate],
        Field(
            max_length=100,
            json_schema_extra={
                "x-kubernetes-validations": [
                    cel(
                        "self.all(t, t.contains('{text}'))",
                        "each template holds {text}, where the instruction goes",
                    )
                ]
            },
        ),
    ] = []
    """Your own framings for `reword` instead of the built-in ones, each with `{text}` where the
    instruction goes, e.g. `"Hi team, {text} Thanks!"`: the phrasings your users really write."""
    insert_context: bool = True
    """Put an irrelevant sentence before or after the instruction."""
    typos: Annotated[float, Field(ge=0, le=0.5)] = 0.0
    """Share of Latin-script words (four letters or more) that get one typo (two neighbouring letters
    swapped, one dropped or one doubled)."""

    @field_validator("templates")
    @classmethod
    def _templates_hold_the_text(cls, templates: list[str]) -> list[str]:
        for index, template in enumerate(templates):
            if "{text}" not in template:
                raise ValueError(
                    f"templates[{index}] has no {{text}}: each holds {{text}}, where the instruction goes"
                )
        return templates


class EmbeddingCheck(ApiModel):
    """Drops augmented copies whose meaning drifted: the cosine similarity of a sentence embedding of
    the copy's prompt and of the original's must reach `minSimilarity`. The model is
    multilingual-e5-small (4-bit, in the trainer image: nothing is downloaded). E5's similarities sit
    high — unrelated sentences score about 0.75 — so useful thresholds are near 1."""

    min_similarity: Annotated[float, Field(ge=0, le=1)] = 0.9


class Augmentation(ApiModel):
    """Augmentation of the train split (never the validation split)."""

    fraction: Annotated[float, Field(gt=0, le=1)] = 0.2
    """Share of train rows that get one augmented copy."""
    synonyms: SynonymReplacement | None = None
    back_translation: BackTranslation | None = None
    instruction_perturbation: InstructionPerturbation | None = None
    embedding_check: EmbeddingCheck | None = None
    """Off unless given: every copy, whatever made it, is kept only if it means what its original did;
    the data report counts the copies dropped, by method."""
    seed: int = 1234


class DatasetSpec(ApiModel):
    """The user's data and how to read, clean, augment and split it."""

    source: DataSource
    format: Literal["auto", "jsonl", "json", "csv", "parquet"] = "auto"
    """File format; `auto` decides by the file's extension (inline rows need none)."""
    style: Literal["auto", "promptCompletion", "instruction", "chat", "preference", "text"] = "auto"
    """Sample style; `auto` decides by the columns present. `preference` rows are pairs (prompt, chosen,
    rejected: TRL's preference format, the prompt as text or a list of messages) for `spec.preference`.
    `text` rows are documents, trained on every token (continued pre-training); one longer than
    `hyperparameters.maxSeqLength` is split into windows (`windowOverlap`), not truncated."""
    fields: Annotated[FieldMapping, Field(json_schema_extra=nested_default())] = Field(
        default_factory=FieldMapping
    )
    validation: Annotated[ValidationSplit, Field(json_schema_extra=nested_default())] = Field(
        default_factory=ValidationSplit
    )
    window_overlap: Annotated[int, Field(ge=0)] = 0
    """`style: text`: tokens each window of a long document repeats from the window before, as context
    it is not trained on again (a sliding window); below `hyperparameters.maxSeqLength`."""
    train_on: Literal["allAssistantTurns", "lastTurn"] = "allAssistantTurns"
    """Which turns of a conversation the loss is taken on: every assistant turn (as Axolotl and
    LLaMA-Factory do), or only the final one. Prompt/completion and instruction rows have one."""
    reasoning_traces: Literal["keep", "strip"] = "keep"
    """`<think>…</think>` in answers (DeepSeek-R1-style data): `keep` trains on them as written (even
    where the chat template drops them from its rendering), `strip` removes them, to train answers
    without the reasoning."""
    test: TestSplit | None = None
    """Off unless given: the final scores (`status.evalResults`) then come from the validation split,
    and `evalResults.split` says so."""
    max_bad_row_ratio: Annotated[float, Field(ge=0, le=1)] = 0.05
    """Malformed rows are skipped and counted; past this share of all rows the run fails."""
    cleaning: Annotated[Cleaning, Field(json_schema_extra=nested_default())] = Field(default_factory=Cleaning)
    augmentation: Augmentation | None = None
    """Off unless given."""


class LoraSpec(ApiModel):
    """LoRA adapter settings (used by the lora and qlora methods)."""

    r: Annotated[int, Field(ge=1, le=1024)] = 16
    alpha: Annotated[int, Field(ge=1, le=4096)] = 32
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.05
    bias: Literal["none", "all", "lora_only"] = "none"
    target_modules: Annotated[list[Annotated[str, Field(max_length=SHORT_TEXT)]], Field(max_length=64)] = [
        "auto"
    ]
    """Module names to adapt; `auto` picks them per architecture (attention and MLP projections)."""

    @model_validator(mode="after")
    def _auto_alone(self) -> LoraSpec:
        if "auto" in self.target_modules and len(self.target_modules) > 1:
            raise ValueError("targetModules: `auto` cannot be combined with explicit module names")
        return self


class Hyperparameters(ApiModel):
    """Optimisation settings. Unset ones get defaults that suit the method."""

    learning_rate: Annotated[float, Field(gt=0, lt=1)] | None = None
    """Peak learning rate; defaults to 2e-4 for lora/qlora and 2e-5 for full fine-tuning."""
    epochs: Annotated[float, Field(gt=0, le=1000)] = 3
    max_steps: Annotated[int, Field(ge=1)] | None = None
    """Stop after this many optimizer steps (overrides epochs)."""
    per_device_batch_size: Annotated[int, Field(ge=1, le=4096)] = 4
    gradient_accumulation_steps: Annotated[int, Field(ge=1, le=4096)] = 4
    max_seq_length: Annotated[int, Field(ge=16, le=1_048_576)] = 2048
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.03
    weight_decay: Annotated[float, Field(ge=0, le=1)] = 0.01
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 42
    """Seeds Python, NumPy and torch (NumPy takes 0 to 2^32-1)."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """`auto` picks bf16 where the GPU supports it, else fp16 on GPU, fp32 on CPU."""
    gradient_checkpointing: bool = True
    packing: bool = False
    """Pack several short samples into one sequence (less padding, higher throughput)."""
    checkpoint_steps: Annotated[int, Field(ge=1)] = 100
    """Save a checkpoint every N steps; a retried pod loses at most N steps."""
    logging_steps: Annotated[int, Field(ge=1)] = 10


class EarlyStopping(ApiModel):
    """Stop when the validation loss stops improving, and export the checkpoint where it was lowest (not
    the last one). A checkpoint is saved at every evaluation (`evaluation.evalSteps`, else every epoch)
    instead of every `checkpointSteps`, so the best one is on disk to restore. The validation split then
    chose the model: give `dataset.test` for scores on rows that did not."""

    patience: Annotated[int, Field(ge=1, le=1000)] = 3
    """Evaluations without improvement before training stops."""
    metric: Literal["evalLoss"] = "evalLoss"
    threshold: Annotated[float, Field(ge=0)] = 0.0
    """Minimum improvement that counts."""


class GenerationSpec(ApiModel):
    """Decoding settings for generation-based metrics."""

    max_new_tokens: Annotated[int, Field(ge=1, le=32_768)] = 128
    temperature: Annotated[float, Field(ge=0, le=5)] = 0.0
    """0 means greedy decoding, which makes evaluation reproducible."""
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0


class EvaluationSpec(ApiModel):
    """How the fine-tuned model is scored against the base model on held-out rows."""

    metrics: Annotated[list[Metric], Field(max_length=6)] = ["perplexity", "bleu", "rouge", "exactMatch"]
    baseline: bool = True
    """Score the base model on the same held-out rows first, for an A/B comparison."""
    max_samples: Annotated[int, Field(ge=1, le=100_000)] = 200
    """Held-out rows used for generation metrics (perplexity uses the whole split)."""
    eval_steps: Annotated[int, Field(ge=1)] | None = None
    """Compute the eval loss every N steps during training (default: once per epoch)."""
    generation: Annotated[GenerationSpec, Field(json_schema_extra=nested_default())] = Field(
        default_factory=GenerationSpec
    )


class ResourcesSpec(ApiModel):
    """What the training pod asks of the cluster."""

    gpu: Annotated[int, Field(ge=0, le=64)] = 1
    gpu_resource_name: Annotated[
        str,
        Field(
            max_length=SHORT_TEXT,
            pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)+/"
            r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$",
        ),
    ] = "nvidia.com/gpu"
    """The extended resource GPUs are requested as: a domain, `/`, a name (`amd.com/gpu`)."""
    cpu: CpuQuantity | None = None
    memory: Quantity | None = None
    gpu_memory: Quantity | None = None
    """Memory of one GPU (e.g. `80Gi`). With it the operator refuses a run of a known DeepSeek model
    that cannot fit, before any GPU is held, and says the cheapest change that would (`status.plan`)."""
    shared_memory: Quantity = "8Gi"
    """Size of /dev/shm (data loader workers and NCCL need more than the container default)."""
    node_selector: Annotated[dict[str, str], Field(max_length=64)] = {}
    tolerations: Annotated[list[Toleration], Field(max_length=64)] = []
    affinity: Affinity | None = None
    """A Kubernetes affinity (node affinity, pod affinity and anti-affinity), written to the pod."""
    priority_class_name: ObjectName | None = None


Strategy = Literal["auto", "ddp", "fsdp", "deepspeed"]
Offload = Literal["none", "optimizer", "optimizerAndParameters"]


class RopeScaling(ApiModel):
    """Extend the context a RoPE model attends over beyond what it was trained for: the base model's
    config gets the scaling (and `factor` times its max_position_embeddings), training runs with it,
    and the exported model's config carries it, so serving uses it too."""

    type: Literal["linear", "dynamic", "yarn"] = "yarn"
    """`linear` interpolates positions; `dynamic` (NTK-aware) scales only past the original length;
    `yarn` interpolates by frequency band, the method DeepSeek-V2/V3 ship with."""
    factor: Annotated[float, Field(gt=1, le=64)] = 2.0
    """How many times the model's max_position_embeddings the context becomes."""


class FineTuneJobRef(ApiModel):
    """A succeeded FineTuneJob in the same namespace: its merged model, else its adapter on its base model."""

    name: ObjectName


class TeacherModel(BaseModelSpec):
    """A distillation teacher: a Hugging Face id or a directory on a PVC (either with an adapter on
    top), or a FineTuneJob's result."""

    model_config = cel_rules(
        cel(
            "[has(self.name), has(self.pvc), has(self.fineTuneJobRef)].filter(x, x).size() == 1",
            "set exactly one of name (a Hugging Face id), pvc or fineTuneJobRef",
        ),
        cel(
            "!has(self.adapter) || !has(self.fineTuneJobRef)",
            "adapter goes with name or pvc: a fineTuneJobRef brings its own",
            field_path=".adapter",
        ),
    )

    fine_tune_job_ref: FineTuneJobRef | None = None
    """A FineTuneJob of this namespace: the run waits until it has succeeded, then learns from its
    merged model, else from its adapter on its base model."""
    adapter: PvcLocation | None = None
    """A PEFT adapter directory on a PVC, merged into the teacher (name or pvc) before it teaches."""

    @model_validator(mode="after")
    def _one_source(self) -> TeacherModel:
        exactly_one(self, ("name", "pvc", "fine_tune_job_ref"))
        if self.adapter is not None and self.fine_tune_job_ref is not None:
            raise ValueError("adapter goes with name or pvc: a fineTuneJobRef brings its own")
        return self


class DistillationSpec(ApiModel):
    """Knowledge distillation: the model being trained (the student, `baseModel`) learns from a
    teacher model as well as, or instead of, from the data's answers."""

    teacher: TeacherModel
    """The teacher: a Hugging Face id, a directory on a PVC, or a FineTuneJob's result."""
    mode: Literal["logits", "sequences"] = "logits"
    """`logits`: on the data's answers, the student matches the teacher's next-token distributions
    (softened by `temperature`) as well as the answers themselves (`alpha` weighs the two); the two
    models must share a tokenizer. `sequences`: the teacher answers every training prompt (greedy,
    `maxNewTokens`) and the student is trained on its answers instead of the data's; any tokenizer."""
    temperature: Annotated[float, Field(gt=0, le=20)] = 2.0
    """`logits`: how much both distributions are softened before they are compared."""
    alpha: Annotated[float, Field(ge=0, le=1)] = 0.5
    """`logits`: the weight of matching the teacher; 1 - alpha is the weight of the data's answers."""
    max_new_tokens: Annotated[int, Field(ge=1, le=32_768)] = 256
    """`sequences`: the longest answer the teacher writes."""


HOST_PORT_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?:[0-9]{1,5}$"


class FederationSpec(ApiModel):
    """One site's part in federated fine-tuning (Flower): where its coordinator listens."""

    coordinator: Annotated[str, Field(max_length=253, pattern=HOST_PORT_PATTERN)]
    """`host:port` of the coordinator's Flower server, e.g. `keywords-coordinator.fl.svc:9092`."""


class PreferenceSpec(ApiModel):
    """Preference tuning on pairs (`dataset.style: preference`) with TRL, instead of supervised
    fine-tuning: the model learns to rank the chosen answer over the rejected one."""

    algorithm: Literal["dpo", "orpo"] = "dpo"
    """`dpo`: Direct Preference Optimization against a frozen reference (the base model: the adapter
    switched off with lora/qlora, log-probabilities computed once before training with full).
    `orpo`: odds-ratio preference optimization, no reference model; it also learns the chosen
    answers as supervised fine-tuning does."""
    beta: Annotated[float, Field(gt=0, le=100)] = 0.1
    """DPO's β (how far from the reference the model may move: higher stays closer), or ORPO's λ
    (the weight of the odds-ratio term against the supervised one)."""


class DistributedSpec(ApiModel):
    """How the run spreads over processes and nodes: PyTorch's own engine, one process per GPU.

    Every pod starts `processesPerNode` workers with torch.distributed's elastic launcher; with
    `nodes` > 1 the pods are an Indexed Job behind a headless Service and meet at pod 0 (c10d
    rendezvous). When one pod fails they all stop, the Job replaces them, and the run resumes from
    the newest complete checkpoint.
    """

    strategy: Strategy = "auto"
    """`ddp` replicates the model on every process (fastest when it fits one device); `fsdp` shards
    weights, gradients and optimizer state across all of them (FSDP2); `deepspeed` shards the same
    with DeepSpeed's ZeRO stage 3, and can offload to host memory. `auto` picks ddp when the model
    and its training state fit one device, else fsdp."""
    offload: Offload = "none"
    """With strategy deepspeed: keep the optimizer state (ZeRO-Offload), or the parameters too, in the
    pod's memory instead of the GPUs'. Slower steps; fits a larger model on the same GPUs."""
    processes_per_node: Annotated[int, Field(ge=1, le=64)] | None = None
    """Worker processes in each pod; default one per GPU (`resources.gpu`), or 1 without GPUs."""
    nodes: Annotated[int, Field(ge=1, le=64)] = 1
    """Pods the run spans, each with `resources` of its own (one per node: spread them with
    `resources.affinity`)."""


class OutputSpec(ApiModel):
    """Where the adapter, merged model, evaluation results and model card are written."""

    pvc: PvcLocation
    """Claim and path for the artifacts (checkpoints go there too, so a retry resumes)."""
    merge_adapter: bool = False
    """Also save the base model with the adapter merged in (what serving loads fastest)."""
    quantized_export: Literal["none", "int8", "int4"] = "none"
    """Also save a bitsandbytes-quantized copy (needs a GPU)."""


UNCHANGED_OPTIONAL_FIELDS = (
    *("image", "imagePullPolicy", "imagePullSecrets", "env"),
    *("earlyStopping", "preference", "ropeScaling", "distillation", "federation"),
)
"""Optional fields kept as the resource was created (an immutable rule on the field itself would not
see it set or removed)."""


class FineTuneJobSpec(ApiModel):
    """Desired state of a FineTuneJob."""

    model_config = cel_rules(
        *(unchanged(field) for field in UNCHANGED_OPTIONAL_FIELDS),
        cel(
            "self.method != 'qlora' || !has(self.resources) || !has(self.resources.gpu)"
            " || self.resources.gpu > 0",
            "method qlora needs a GPU: set resources.gpu to 1 or more, or use method lora",
            field_path=".method",
        ),
        cel(
            "!has(self.distributed) || !has(self.distributed.processesPerNode) || !has(self.resources)"
            " || !has(self.resources.gpu) || self.resources.gpu == 0"
            " || self.distributed.processesPerNode == self.resources.gpu",
            PROCESSES_PER_GPU_MESSAGE,
            field_path=".distributed.processesPerNode",
        ),
        cel(
            "!has(self.workloadPriorityClassName) || has(self.queueName)",
            WORKLOAD_PRIORITY_MESSAGE,
            field_path=".workloadPriorityClassName",
        ),
        cel(
            "!has(self.queueName) || !has(self.suspend) || !self.suspend",
            QUEUED_SUSPEND_MESSAGE,
            field_path=".suspend",
        ),
        cel(
            "self.method != 'qlora' || !has(self.distributed) || !has(self.distributed.strategy)"
            " || !(self.distributed.strategy in ['fsdp', 'deepspeed'])",
            QLORA_SHARDING_MESSAGE,
            field_path=".distributed.strategy",
        ),
        cel(
            "!has(self.distributed) || !has(self.distributed.offload) || self.distributed.offload == 'none'"
            " || (has(self.distributed.strategy) && self.distributed.strategy == 'deepspeed')",
            OFFLOAD_STRATEGY_MESSAGE,
            field_path=".distributed.offload",
        ),
        cel(
            # Both have server-side defaults, so both are set by the time rules run.
            "self.dataset.windowOverlap < self.hyperparameters.maxSeqLength",
            WINDOW_OVERLAP_MESSAGE,
            field_path=".dataset.windowOverlap",
        ),
        cel(
            "!has(self.ropeScaling) || (has(self.method) && self.method == 'full')"
            " || (has(self.output.mergeAdapter) && self.output.mergeAdapter)",
            ROPE_SCALING_MERGE_MESSAGE,
            field_path=".ropeScaling",
        ),
        cel(
            "!has(self.distillation) || !has(self.distributed) || !has(self.distributed.strategy)"
            " || !(self.distributed.strategy in ['fsdp', 'deepspeed'])",
            DISTILLATION_SHARDING_MESSAGE,
            field_path=".distributed.strategy",
        ),
        cel(
            "!has(self.federation) || (self.method != 'full' && !has(self.preference)"
            " && !has(self.distillation)"
            " && (!has(self.distributed) || !has(self.distributed.nodes) || self.distributed.nodes == 1)"
            " && (!has(self.resources) || !has(self.resources.gpu) || self.resources.gpu <= 1))",
            FEDERATION_SHAPE_MESSAGE,
            field_path=".federation",
        ),
        cel(
            "!has(self.distillation) || !has(self.preference)",
            DISTILLATION_PREFERENCE_MESSAGE,
            field_path=".distillation",
        ),
        cel(
            "has(self.preference) || !has(self.dataset.style) || self.dataset.style != 'preference'",
            PREFERENCE_STYLE_MESSAGE,
            field_path=".dataset.style",
        ),
        cel(
            "!has(self.preference) || !has(self.dataset.style)"
            " || self.dataset.style in ['auto', 'preference']",
            PREFERENCE_NEEDS_PAIRS_MESSAGE,
            field_path=".preference",
        ),
        cel(
            "!has(self.preference) || !has(self.distributed) || !has(self.distributed.strategy)"
            " || !(self.distributed.strategy in ['fsdp', 'deepspeed'])",
            PREFERENCE_SHARDING_MESSAGE,
            field_path=".distributed.strategy",
        ),
        cel(
            "!has(self.preference) || !has(self.hyperparameters) || !has(self.hyperparameters.packing)"
            " || !self.hyperparameters.packing",
            PREFERENCE_PACKING_MESSAGE,
            field_path=".hyperparameters.packing",
        ),
        cel(
            "!has(self.output.quantizedExport) || self.output.quantizedExport == 'none'"
            " || !has(self.resources) || !has(self.resources.gpu) || self.resources.gpu > 0",
            "output.quantizedExport needs a GPU: set resources.gpu to 1 or more, or set it to none",
            field_path=".output.quantizedExport",
        ),
    )

    base_model: Annotated[BaseModelSpec, Field(json_schema_extra=immutable("baseModel"))]
    dataset: Annotated[DatasetSpec, Field(json_schema_extra=immutable("dataset"))]
    method: Annotated[Method, Field(json_schema_extra=immutable("method"))] = "lora"
    lora: Annotated[LoraSpec, Field(json_schema_extra={**nested_default(), **immutable("lora")})] = Field(
        default_factory=LoraSpec
    )
    hyperparameters: Annotated[
        Hyperparameters, Field(json_schema_extra={**nested_default(), **immutable("hyperparameters")})
    ] = Field(default_factory=Hyperparameters)
    preference: PreferenceSpec | None = None
    """Off unless given: preference tuning (DPO, ORPO) on pairs instead of supervised fine-tuning."""
    distillation: DistillationSpec | None = None
    """Off unless given: learn from a teacher model (knowledge distillation)."""
    federation: FederationSpec | None = None
    """Off unless given: this run is one site of a federated fine-tuning (usually made by a
    FederatedFineTune): its rows never leave the pod; each round it trains the adapter the coordinator
    sends and returns the weights, which the coordinator averages with the other sites'."""
    rope_scaling: RopeScaling | None = None
    """Off unless given: a longer context than the base model's. With lora or qlora set
    output.mergeAdapter, so what is served carries it."""
    early_stopping: EarlyStopping | None = None
    """Off unless given. Immutable, like every field below that shapes the trainer's pod (image, pull
    policy and secrets, env); suspend, backoffLimit, activeDeadlineSeconds and
    ttlSecondsAfterFinished may change and reach the running Job."""
    evaluation: Annotated[
        EvaluationSpec, Field(json_schema_extra={**nested_default(), **immutable("evaluation")})
    ] = Field(default_factory=EvaluationSpec)
    resources: Annotated[
        ResourcesSpec, Field(json_schema_extra={**nested_default(), **immutable("resources")})
    ] = Field(default_factory=ResourcesSpec)
    """Immutable like the training settings: a Job's pod template cannot change once created."""
    distributed: Annotated[
        DistributedSpec, Field(json_schema_extra={**nested_default(), **immutable("distributed")})
    ] = Field(default_factory=DistributedSpec)
    """Immutable: the Job's shape (pods, processes) is fixed with the run."""
    output: Annotated[OutputSpec, Field(json_schema_extra=immutable("output"))]
    suspend: bool = False
    """Pause the run: the Job's pods are stopped; resuming continues from the newest checkpoint.
    Not with `queueName`: Kueue decides when a queued Job runs (hold it by deactivating its Workload)."""
    queue_name: (
        Annotated[
            str,
            Field(max_length=63, pattern=DNS_LABEL_PATTERN, json_schema_extra=immutable("queueName")),
        ]
        | None
    ) = None
    """A Kueue LocalQueue in this namespace: the Job is made suspended with Kueue's
    `kueue.x-k8s.io/queue-name` label and runs when Kueue admits it (quota, priority). Kueue then owns
    the Job's `suspend`."""
    workload_priority_class_name: (
        Annotated[
            str,
            Field(
                max_length=63,
                pattern=DNS_LABEL_PATTERN,
                json_schema_extra=immutable("workloadPriorityClassName"),
            ),
        ]
        | None
    ) = None
    """A Kueue WorkloadPriorityClass: the run's priority in its queue (and for preemption), apart from
    the pods' own `resources.priorityClassName`, which Kueue uses when this is not set."""
    backoff_limit: Annotated[int, Field(ge=0, le=100)] = 3
    """Pod retries before the run is marked Failed."""
    active_deadline_seconds: Annotated[int, Field(ge=1)] | None = None
    ttl_seconds_after_finished: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    """Delete the finished Job (not the FineTuneJob or its artifacts) after this long."""
    image: ImageReference | None = None
    """Trainer image override (default: the operator's configured trainer image)."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    image_pull_secrets: PullSecrets = []
    env: EnvList = []
    """Extra environment for the trainer; take secrets by valueFrom.secretKeyRef, never inline."""

    @model_validator(mode="after")
    def _gpu_requirements(self) -> FineTuneJobSpec:
        if self.method == "qlora" and self.resources.gpu == 0:
            raise ValueError("method qlora needs a GPU: set resources.gpu to 1 or more, or use method lora")
        if self.output.quantized_export != "none" and self.resources.gpu == 0:
            raise ValueError(
                "output.quantizedExport needs a GPU: set resources.gpu to 1 or more, or set it to none"
            )
        return self

    @model_validator(mode="after")
    def _distributed_shape(self) -> FineTuneJobSpec:
        requested = self.distributed.processes_per_node
        if requested is not None and self.resources.gpu and requested != self.resources.gpu:
            raise ValueError(PROCESSES_PER_GPU_MESSAGE)
        if self.method == "qlora" and self.distributed.strategy in ("fsdp", "deepspeed"):
            raise ValueError(QLORA_SHARDING_MESSAGE)
        if self.distributed.offload != "none" and self.distributed.strategy != "deepspeed":
            raise ValueError(OFFLOAD_STRATEGY_MESSAGE)
        if self.queue_name and self.suspend:
            raise ValueError(QUEUED_SUSPEND_MESSAGE)
        if self.workload_priority_class_name and not self.queue_name:
            raise ValueError(WORKLOAD_PRIORITY_MESSAGE)
        return self

    @model_validator(mode="after")
    def _long_text(self) -> FineTuneJobSpec:
        if self.dataset.window_overlap >= self.hyperparameters.max_seq_length:
            raise ValueError(WINDOW_OVERLAP_MESSAGE)
        if self.rope_scaling is not None and self.method != "full" and not self.output.merge_adapter:
            raise ValueError(ROPE_SCALING_MERGE_MESSAGE)
        return self

    @model_validator(mode="after")
    def _federation_shape(self) -> FineTuneJobSpec:
        if self.federation is not None and (
            self.method == "full"
            or self.preference is not None
            or self.distillation is not None
            or self.distributed.nodes > 1
            or self.resources.gpu > 1
        ):
            raise ValueError(FEDERATION_SHAPE_MESSAGE)
        return self

    @model_validator(mode="after")
    def _preference_shape(self) -> FineTuneJobSpec:
        if self.preference is not None and self.distillation is not None:
            raise ValueError(DISTILLATION_PREFERENCE_MESSAGE)
        if self.distillation is not None and self.distributed.strategy in ("fsdp", "deepspeed"):
            raise ValueError(DISTILLATION_SHARDING_MESSAGE)
        if self.preference is None:
            if self.dataset.style == "preference":
                raise ValueError(PREFERENCE_STYLE_MESSAGE)
            return self
        if self.dataset.style not in ("auto", "preference"):
            raise ValueError(PREFERENCE_NEEDS_PAIRS_MESSAGE)
        if self.distributed.strategy in ("fsdp", "deepspeed"):
            raise ValueError(PREFERENCE_SHARDING_MESSAGE)
        if self.hyperparameters.packing:
            raise ValueError(PREFERENCE_PACKING_MESSAGE)
        return self

    @property
    def processes_per_node(self) -> int:
        """Workers in each pod: the user's number, else one per GPU, else one."""
        return self.distributed.processes_per_node or self.resources.gpu or 1

    @property
    def world_size(self) -> int:
        """Worker processes in the whole run."""
        return self.processes_per_node * self.distributed.nodes

    @property
    def learning_rate(self) -> float:
        """The learning rate in force: the user's, or the method's default."""
        return self.hyperparameters.learning_rate or DEFAULT_LEARNING_RATE[self.method]


# --- status ---------------------------------------------------------------------------------


class Progress(ApiModel):
    """Training progress scraped from the trainer's metrics endpoint while it runs."""

    step: int | None = None
    """Optimizer steps done."""
    total_steps: int | None = None
    """Optimizer steps the run will take (from epochs or maxSteps)."""
    epoch: float | None = None
    """Epochs done, fractional."""
    percent: int | None = None
    """step / totalSteps, 0-100."""
    eta: str | None = None
    """Estimated time left, e.g. `1h12m`."""
    train_loss: float | None = None
    """Training loss at the last logging step (completion tokens only)."""
    eval_loss: float | None = None
    """Loss on the validation split at the last evaluation."""
    learning_rate: float | None = None
    """Learning rate in force at the last logging step."""
    tokens_per_second: float | None = None
    """Training throughput in tokens per second, measured by the trainer."""
    last_update_time: str | None = None
    """When the operator last read the trainer's metrics."""


MetricScores = dict[str, float]


class EvalResults(ApiModel):
    """Scores on the held-out rows for the fine-tuned model, the base model, and their difference."""

    fine_tuned: MetricScores = {}
    baseline: MetricScores | None = None
    delta: MetricScores | None = None
    teacher: MetricScores | None = None
    """With distillation: the teacher's scores on the same rows."""
    samples: int | None = None
    split: Literal["validation", "test"] | None = None
    """The held-out rows scored: `test` when `dataset.test` is given, else `validation` (which early
    stopping also chose the checkpoint by)."""
    step: int | None = None
    """The training step whose weights were scored and exported: with early stopping, that of the
    lowest validation loss, not the last one."""


class DatasetReport(ApiModel):
    """What the data pipeline did to the user's rows."""

    rows_read: int = 0
    bad_rows: int = 0
    rows_kept: int = 0
    duplicates_removed: int = 0
    near_duplicates_removed: int = 0
    filtered_by_length: int = 0
    degenerate_removed: int = 0
    pii_redacted: int = 0
    pii_dropped: int = 0
    augmented: int = 0
    train_rows: int = 0
    validation_rows: int = 0
    test_rows: int | None = None
    """Only when `dataset.test` is given."""
    truncated: int = 0


class Lineage(ApiModel):
    """What produced a run's model, as digests: two runs with equal digests had the same inputs, and
    a served model's digest names the run that made it."""

    config: str
    """`sha256:` of the spec's training-defining fields (base model, dataset spec, method, LoRA,
    hyperparameters): what decides the trajectory; the same for a rerun on changed data."""
    datasets: dict[str, str] = {}
    """`sha256:` of each data source's content, by its spec path (e.g. `dataset.source`)."""
    dataset_commits: dict[str, str] = {}
    """The commit each Hugging Face Hub source was read at, by its spec path."""
    base_model: str | None = None
    """`name@commit` for a Hub model, or `sha256:` of the model directory's files on a PVC."""
    artifacts: dict[str, str] = {}
    """`sha256:` of each artifact directory written (`adapter`, `merged`, `quantized`)."""
    trainer_image: str | None = None
    """The image the trainer ran, as its pod reports it (`imageID`: a registry digest where the runtime
    pulled one); the operator adds it, so the model card, written inside the pod, does not carry it."""


class OutputStatus(ApiModel):
    """Where the artifacts of a finished run are."""

    claim_name: str
    path: str
    adapter_path: str | None = None
    merged_path: str | None = None
    quantized_path: str | None = None


class FailureInfo(ApiModel):
    """The last failure of a trainer pod, from its termination state."""

    reason: str
    message: str = ""
    exit_code: int | None = None


class MemoryPlan(ApiModel):
    """The memory estimate per GPU, for models whose shape the operator knows."""

    summary: str
    """E.g. `lora on 8 GPUs (fsdp): 38.6 GiB per GPU of 80 GiB (weights ..., optimizer ..., ...)`."""
    strategy: str
    world_size: int
    gib_per_gpu: float
    fits: bool | None = None
    """Unknown without `resources.gpuMemory`."""
    offloaded_gib_per_pod: float | None = None
    """With `distributed.offload`: what each pod keeps in its own memory (with `resources.gpuMemory`,
    a run whose `resources.memory` is smaller is refused)."""


class WorkerPod(ApiModel):
    """One pod of a run over several pods: its index in the Indexed Job and where it stands."""

    index: int
    name: str
    phase: str
    """The pod's phase: Pending, Running, Succeeded or Failed."""


class Attempt(ApiModel):
    """One trainer pod of the run (a first try or a retry, one node of a run over several)."""

    pod: str
    node: str | None = None
    started: str | None = None
    """When the kubelet started the pod: its node and GPUs are held from then on."""
    finished: str | None = None
    """When its last container ended (none while it runs)."""
    seconds: int | None = None
    """Node-seconds: finished minus started."""
    gpu_resource: str | None = None
    """The GPU resource the pod asked for, e.g. nvidia.com/gpu."""
    gpus: int = 0
    gpu_seconds: int | None = None


class Usage(ApiModel):
    """What the run used, every attempt counted once it finished."""

    attempts: list[Attempt] = []
    node_seconds: int = 0
    gpu_seconds: int = 0
    estimated_cost: float | None = None
    """GPU-hours times the operator's price per GPU-hour of each resource (the chart's
    `costs.gpuHourPrices`); none without prices, or while a GPU resource used has none."""


class FineTuneJobStatus(ApiModel):
    """Observed state of a FineTuneJob, written only by the operator."""

    model_config = ConfigDict(extra="ignore")

    phase: Phase | None = None
    """Pending, Running, Succeeded, Failed or Suspended: what `kubectl get ftj` shows."""
    observed_generation: int | None = None
    """The spec generation this status describes."""
    conditions: list[Condition] = []
    """Ready (the run succeeded), Running, Suspended and Failed, each with a reason and message."""
    job_name: str | None = None
    """The batch/v1 Job that runs the trainer."""
    start_time: str | None = None
    completion_time: str | None = None
    retries: int | None = None
    """Trainer pods that failed and were retried."""
    progress: Progress | None = None
    """Scraped from the trainer while it runs; final values when it ends."""
    eval_results: EvalResults | None = None
    """Fine-tuned vs base model on the held-out rows, from the trainer's summary."""
    dataset: DatasetReport | None = None
    """What cleaning and augmentation did to the rows."""
    output: OutputStatus | None = None
    """Where the artifacts are."""
    lineage: Lineage | None = None
    """Digests of what produced the model (config, data, base model) and of what was written."""
    world_size: int | None = None
    """Worker processes of the run: processes per pod × pods."""
    workers: list[WorkerPod] | None = None
    """The newest pod of each index, for a run over several pods."""
    plan: MemoryPlan | None = None
    """Will it fit? The estimate per GPU for a known DeepSeek model, made before the Job."""
    usage: Usage | None = None
    """Node- and GPU-seconds of every trainer pod, retries included, and their estimated cost."""
    last_failure: FailureInfo | None = None
    """Why the last trainer pod failed: the trainer's own reason, or the container's (e.g. OOMKilled)."""


PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Progress %", "type": "integer", "jsonPath": ".status.progress.percent"},
    {"name": "Eval Loss", "type": "number", "jsonPath": ".status.progress.evalLoss"},
    {"name": "Method", "type": "string", "jsonPath": ".spec.method", "priority": 1},
    {"name": "Base Model", "type": "string", "jsonPath": ".spec.baseModel.name", "priority": 1},
    {"name": "GPU-s", "type": "integer", "jsonPath": ".status.usage.gpuSeconds", "priority": 1},
    {"name": "Cost", "type": "number", "jsonPath": ".status.usage.estimatedCost", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def parse_spec(spec: dict[str, Any]) -> FineTuneJobSpec:
    """Validate a spec as it comes from Kubernetes (camelCase, possibly defaulted by the API server)."""
    return FineTuneJobSpec.model_validate(spec)
