"""The baseline of bench/trainer.py: LoRA fine-tuning as the transformers and peft docs show it.

This is the script a user writes without DeepTune, kept deliberately plain so the benchmark compares
against something real rather than a straw man or a hand-tuned rival:

- each row becomes one string (the chat template over prompt and completion) and is tokenized whole;
- `DataCollatorForLanguageModeling(mlm=False)` pads every batch to its longest row and takes the
  loss on every real token, prompt included;
- `get_peft_model` puts LoRA on all Llama projections (q, k, v, o, gate, up, down);
- the stock `Trainer` runs it.

bench/trainer.py gives it the same model, rows and hyperparameters as our trainer. The only things
added for the measurement are `include_num_input_tokens_seen="non_padding"` (the Trainer's own count
of real tokens, used for both sides), the step clock passed in `callbacks`, and no progress bar.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def plain_lora_trainer(
    model_dir: Path,
    rows: Sequence[dict[str, str]],
    *,
    output_dir: Path,
    max_length: int,
    batch_size: int,
    steps: int,
    learning_rate: float,
    lora_r: int,
    lora_alpha: int,
    warmup_ratio: float,
    weight_decay: float,
    logging_steps: int,
    seed: int,
    callbacks: Sequence[TrainerCallback] = (),
) -> Trainer:
    """A ready-to-run `Trainer` over prompt/completion `rows`; call `.train()` on it."""
    set_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)

    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}],
            tokenize=False,
        )
        for row in rows
    ]
    # The template already writes the BOS and EOS tokens.
    train_dataset = [
        dict(tokenizer(text, truncation=True, max_length=max_length, add_special_tokens=False))
        for text in texts
    ]

    lora = LoraConfig(
        r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, lora)

    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch_size,
        max_steps=steps,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=warmup_ratio,  # a float below 1 is a share of the total steps
        weight_decay=weight_decay,
        seed=seed,
        logging_steps=logging_steps,
        save_strategy="no",
        report_to="none",
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
    )
    return Trainer(
        model=peft_model,
        args=args,
        train_dataset=train_dataset,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
