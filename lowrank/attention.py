"""Decode attention for Hugging Face models: one kernel per layer over the filled cache.

``use_decode_attention(model)`` switches a transformers model to the attention implementation
``"lowrank_decode"``. At decode (one query token) it runs ``lowrank_kernels.decode_attention``:
grouped heads read their key/value head in place, and blocks of the static cache that the mask
hides (the part not written yet) load no keys or values. Everything else (prefill, sliding or
soft-capped variants, attention sinks, dropout while training) goes to transformers' own SDPA
implementation, and the masks are SDPA's, so the model computes the same function.

Why: on an H100 the compiled, graphed SmolLM2-135M decode step spent about 360 of its 1090 µs of
kernels in attention: cuDNN's SDPA and its reduction, and three fused kernels that prepare their
inputs, six kernels per layer over all 768 allocated positions
(bench/results/e2e_profile_h100_smollm2_shape_fused_20261207.md). With this kernel the attention and
the kernels feeding it took 246 µs (e2e_profile_h100_smollm2_shape_fused_decattn_20261207d.md).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ATTENTION_NAME", "decode_attention_applies", "register_decode_attention", "use_decode_attention"]

ATTENTION_NAME = "lowrank_decode"
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# keyword arguments of transformers' attention call that change the math beyond masked softmax attention
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks", "position_bias", "output_attentions")


def decode_attention_applies(query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                             dropout: float, kwargs: dict[str, Any]) -> bool:
    """Whether the decode kernel computes what SDPA would for this call: one query token, plain
    softmax attention, grouped heads, and a boolean mask of shape [B or 1, 1, 1, L] (or none)."""
    if query.dim() != 4 or query.shape[2] != 1 or key.dim() != 4 or key.shape != value.shape:
        return False
    if query.shape[-1] != key.shape[-1] or key.shape[1] == 0 or query.shape[1] % key.shape[1]:
        return False
    if query.dtype not in _KERNEL_DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        return False
    if dropout or any(kwargs.get(name) is not None and kwargs.get(name) is not False for name in _UNSUPPORTED_KWARGS):
        return False
    if attention_mask is not None:
        if attention_mask.dtype != torch.bool or attention_mask.dim() != 4:
            return False
        b, heads, q_len, kv_len = attention_mask.shape
        if heads != 1 or q_len != 1 or kv_len != key.shape[2] or b not in (1, query.shape[0]):
            return False
    return True


def _lowrank_decode_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                              attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                              **kwargs: Any) -> tuple[Tensor, None]:
    """transformers' attention-interface signature: query [B, Hq, T, D], key/value [B, Hkv, L, D];
    returns ([B, T, Hq, D], no weights)."""
    from lowrank_kernels.decode_attention import decode_attention

    if not decode_attention_applies(query, key, value, attention_mask, dropout, kwargs):
        return _sdpa()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    mask = attention_mask[:, 0, 0, :] if attention_mask is not None else None
    out = decode_attention(query[:, :, 0, :], key, value, mask, scale=scaling)
    return out.unsqueeze(1), None


def _sdpa():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS["sdpa"]


def register_decode_attention() -> str:
    """Register ``"lowrank_decode"`` with transformers' attention and mask interfaces (idempotent);
    returns the name. Its masks are SDPA's."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, _lowrank_decode_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return ATTENTION_NAME


def use_decode_attention(model: nn.Module) -> str:
    """Switch ``model`` (a transformers model running SDPA attention) to ``"lowrank_decode"``; returns the
    implementation it used before, so ``model.set_attn_implementation(previous)`` undoes it. Raises
    ``ValueError`` for a model on another implementation, since the fallback is SDPA."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        raise ValueError(f"use_decode_attention needs a transformers model with a config, got {type(model).__name__}")
    previous = config._attn_implementation
    if previous not in ("sdpa", ATTENTION_NAME):
        # prefill and every case the kernel does not cover go to SDPA, with SDPA's masks
        raise ValueError(f"use_decode_attention falls back to SDPA, but this model runs {previous!r} attention "
                         f"(e.g. Gemma 2 soft-caps its attention logits, which SDPA does not support)")
    register_decode_attention()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTENTION_NAME)
    else:  # pragma: no cover - transformers versions without it set the config field directly
        config._attn_implementation = ATTENTION_NAME
    return previous
