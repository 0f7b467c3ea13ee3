"""Tiny random-weight models of today's popular decoder families, with small trained tokenizers.

Each family is built from its transformers config class at hidden size 64 and 2 layers, keeping the
structure that matters to compression: q/k norms and head_dim != hidden/heads (Qwen3, Gemma), sliding
windows (Mistral, Gemma), tied embeddings (Gemma), fused qkv_proj / gate_up_proj (Phi-3), GPT-NeoX's
query_key_value / dense_h_to_4h, and mixture-of-experts blocks whose experts are fused 3-D parameters
in transformers 5 (Mixtral; Qwen2-MoE, which also has a shared expert made of nn.Linear).
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "gpt_neox", "mixtral", "qwen2_moe")
# Families whose real tokenizers put BOS in front of a text by default; the others' add nothing.
ADDS_BOS = frozenset({"llama", "mistral", "gemma2", "gemma3", "phi3", "mixtral"})
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3


def make_tokenizer(text: str, *, adds_bos: bool, vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on `text`; with `adds_bos` it puts <s> in front of every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS))
    if adds_bos:
        bos = bpe.token_to_id("<s>")
        bpe.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def make_model(family: str, vocab: int, seed: int = 0):
    """A random `family` model (hidden 64, 2 layers) in eval mode, with wider-than-default weights."""
    import transformers as tf

    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **ids)
    specs = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(head_dim=32)),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(sliding_window=16)),
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, dict(head_dim=32, sliding_window=8)),
        "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, dict(head_dim=32, sliding_window=8)),
        "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, {}),
        "gpt_neox": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, {}),
        "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM, dict(num_local_experts=4, num_experts_per_tok=2)),
        "qwen2_moe": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM,
                      dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                           shared_expert_intermediate_size=48)),
    }
    config_cls, model_cls, extra = specs[family]
    kwargs = {**common, **extra}
    if family == "gpt_neox":
        kwargs.pop("num_key_value_heads")
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs))
    with torch.no_grad():  # default init (std 0.02) gives near-uniform logits; spread them
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    return model.float().eval()


def save_family(family: str, path: Path, text: str, *, adds_bos: bool | None = None) -> Path:
    """Save a tiny `family` model with its tokenizer as a Hugging Face directory at `path`."""
    tokenizer = make_tokenizer(text, adds_bos=family in ADDS_BOS if adds_bos is None else adds_bos)
    model = make_model(family, len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
