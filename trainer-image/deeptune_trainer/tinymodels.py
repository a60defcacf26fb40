"""Tiny models with random weights and a tokenizer trained on the fly, saved like a hub checkpoint.

Nothing can be downloaded here, yet every code path (loading, LoRA targeting, training, generation,
export) must run on the real architectures. These models are small enough to build and train in
seconds on a CPU: a DeepSeek-V3 one (MLA attention, MoE with routed and shared experts, dense and MoE
layers) and a Llama one (the architecture of deepseek-llm and deepseek-coder).

`python -m deeptune_trainer.tinymodels --kind llama --out DIR` puts one into a directory, e.g. a
"PVC" for the demo and the cluster tests.
"""

from __future__ import annotations

import argparse
import string
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    DeepseekV3Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

ModelKind = Literal["deepseek_v3", "llama"]

BOS, EOS, PAD = "<|begin|>", "<|end|>", "<|pad|>"
VOCAB_SIZE = 768
HIDDEN = 64
INIT_STD = HIDDEN**-0.5
"""Fan-in scaled init. The usual 0.02 suits widths in the thousands; at width 64 it caps the logits
near ±1.3 (the final norm fixes the hidden state's scale), so a model with a frozen head, as under
LoRA, could never become confident."""

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n\n"
    "{% else %}Assistant: {{ message['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
"""DeepSeek's own layout (`User: ...\\n\\nAssistant: ...<eos>`), so formatting is tested on a real shape."""

_SEED_TEXT = (
    string.ascii_letters
    + string.digits
    + string.punctuation
    + " User: Assistant: the a of to and is in that it for"
    + (
        " 你好世界我们是的了在有和人这中大为上个国不以要他时来用们生到作地于出就分对成会可主发年动"
        "同工也能下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物"
        "现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间"
        "样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情"
        "者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少"
        "图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处队南给色光门"
        "即保治北造百规热领七海口东导器压志世金增争济阶油思术极交受联什认六共权收证改清己美再采转更"
        "单风切打白教速花带安场身车例真务具万每目至达走积示议声报斗完类八离华名确才科张信马节话米整"
        "空元况今集温传土许步群广石记需段研界拉林律叫且究观越织装影算低持音众书布复容儿须际商非验连"
        "断深难近矿千周委素技备半办青省列习响约支般史感劳便团往酸历市克何除消构府称太准精值号率族维"
        "划选标写存候毛亲快效斯院查江型眼王按格养易置派层片始却专状育厂京识适属圆包火住调满县局照参"
        "红细引听该铁价严"
    )
)
"""Every printable ASCII character and a few hundred common Chinese characters, so their merges exist."""


def train_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (no unknown tokens, Chinese included) with DeepSeek-style chat template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_SEED_TEXT, *texts], trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def _special_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def tiny_config(
    kind: ModelKind, tokenizer: PreTrainedTokenizerFast, head_dim: int | None = None
) -> PretrainedConfig:
    """A config of the real architecture at toy size (hidden 64, a few layers). `head_dim` (Llama
    only) widens the attention heads: vLLM's CPU attention refuses heads narrower than 32."""
    ids = {**_special_ids(tokenizer), "initializer_range": INIT_STD}
    if kind == "llama":
        return LlamaConfig(
            hidden_size=HIDDEN,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=head_dim or HIDDEN // 4,
            max_position_embeddings=512,
            **ids,
        )
    # Layer 0 is dense, layers 1-2 are MoE (first_k_dense_replace): both kinds of MLP are exercised.
    return DeepseekV3Config(
        hidden_size=HIDDEN,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        max_position_embeddings=512,
        **ids,
    )


def build_tiny_model(
    kind: ModelKind,
    out_dir: str | Path,
    texts: Iterable[str] = (),
    *,
    seed: int = 0,
    head_dim: int | None = None,
) -> Path:
    """Write a random-weight model of `kind` and a tokenizer fitted to `texts` into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(texts)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, tokenizer, head_dim))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_smaller_model(source_dir: str | Path, out_dir: str | Path, *, seed: int = 0) -> Path:
    """A random-weight model of `source_dir`'s architecture at half its width, with its tokenizer: a
    student for distillation tests that shares the teacher's vocabulary (as `logits` needs)."""
    out = Path(out_dir)
    config = AutoConfig.from_pretrained(source_dir)
    config.hidden_size //= 2
    config.intermediate_size //= 2
    config.head_dim = config.hidden_size // config.num_attention_heads
    config.initializer_range = config.hidden_size**-0.5
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source_dir).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a tiny random-weight model and its tokenizer.")
    parser.add_argument("--kind", choices=["deepseek_v3", "llama"], default="llama")
    parser.add_argument("--out", required=True, help="directory to write the model into")
    parser.add_argument("--text-file", help="extra text to fit the tokenizer to (one sample a line)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    hf_logging.disable_progress_bar()
    texts = Path(args.text_file).read_text(encoding="utf-8").splitlines() if args.text_file else []
    out = build_tiny_model(args.kind, args.out, texts, seed=args.seed)
    print(f"wrote a tiny {args.kind} model to {out}")


if __name__ == "__main__":
    main()
