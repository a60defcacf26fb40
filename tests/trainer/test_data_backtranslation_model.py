"""Back-translation through the default transformers translator, with a tiny random-weight T5.

The weights are random, so the "translation" is nonsense; what this proves is the plumbing: the
default factory loads a local seq2seq model offline and its output becomes an augmented train row.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from deeptune.api.finetunejob import DatasetSpec
from deeptune.api.trainer import TrainerPaths
from deeptune_trainer.data.backtranslation import transformers_translator
from deeptune_trainer.data.pipeline import prepare_dataset
from deeptune_trainer.errors import TrainerInputError

pytestmark = pytest.mark.trainer


def _tiny_t5(directory: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(
        ["where is my parcel", "我 的 快递 在 哪", "hello world"],
        trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]),
    )
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    config = T5Config(
        vocab_size=fast.vocab_size,
        d_model=16,
        d_ff=32,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        d_kv=8,
        pad_token_id=0,
        eos_token_id=1,
    )
    model = T5ForConditionalGeneration(config)
    model.generation_config.decoder_start_token_id = 0  # T5 starts decoding from the pad token
    # Random weights may emit end-of-sequence at once; suppressing it makes the output non-empty.
    model.generation_config.suppress_tokens = [0, 1, 2]
    fast.save_pretrained(directory)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_t5(tmp_path_factory.mktemp("tiny-t5"))


def test_default_translator_loads_a_local_model_offline(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    translate = transformers_translator(str(tiny_model), max_new_tokens=4)
    outputs = translate(["where is my parcel", "hello world", "我 的 快递"])
    assert len(outputs) == 3
    assert all(len(output.split()) == 4 for output in outputs)


def test_a_text_the_model_cannot_take_whole_is_not_translated(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cut to the model's input length, its paraphrase would have lost the end of the prompt."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    translate = transformers_translator(str(tiny_model), max_new_tokens=4)
    too_long, fits = translate(["where is my parcel " * 200, "hello world"])
    assert too_long is None and fits is not None and len(fits.split()) == 4


def test_unknown_model_is_a_clear_error_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TrainerInputError) as raised:
        transformers_translator("Helsinki-NLP/opus-mt-zh-en")
    assert raised.value.reason == "ModelNotFound"
    assert raised.value.message.startswith(
        "dataset.augmentation.backTranslation: cannot load translation model 'Helsinki-NLP/opus-mt-zh-en' ("
    )


def test_pipeline_back_translates_with_the_default_factory(tiny_model: Path, tmp_path: Path) -> None:
    spec = DatasetSpec.model_validate(
        {
            "source": {"inline": [{"prompt": "where is my parcel", "completion": "It ships tomorrow."}]},
            "augmentation": {
                "fraction": 1.0,
                "backTranslation": {
                    "forwardModel": str(tiny_model),
                    "backwardModel": str(tiny_model),
                    "maxNewTokens": 3,
                },
            },
        }
    )
    prepared = prepare_dataset(spec, TrainerPaths(output_dir=str(tmp_path)), seed=1)
    original, copy = prepared.train
    assert copy.augmented_by == "backTranslation"
    assert copy.target == original.target == "It ships tomorrow."
    assert len(copy.messages[0].content.split()) == 3
    assert prepared.report.augmented == 1
