"""Perplexity on non-overlapping chunks, and short generation samples."""

from __future__ import annotations

import math

import torch
from torch import nn

from compress.data import pack_tokens, tokenize_text

__all__ = ["perplexity", "perplexity_of_ids", "generate_samples"]


@torch.inference_mode()
def perplexity_of_ids(
    model: nn.Module,
    chunks: torch.Tensor,
    *,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "perplexity",
) -> float:
    """exp(mean next-token NLL) over [n, seq_len] chunks; each chunk is scored independently.

    The NLL is summed in float64 over every predicted token (seq_len − 1 per chunk), so the
    result does not depend on the batch size.
    """
    device = next(model.parameters()).device
    total_nll = 0.0
    total_tokens = 0
    starts = range(0, chunks.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch", leave=False)
    for start in starts:
        batch = chunks[start : start + batch_size].to(device)
        logits = model(input_ids=batch).logits
        # Cross-entropy in fp32 whatever the model dtype: bf16 log-softmax over 49k classes is lossy.
        nll = nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            batch[:, 1:].reshape(-1),
            reduction="sum",
        )
        total_nll += float(nll.double())
        total_tokens += batch[:, 1:].numel()
    return math.exp(total_nll / total_tokens)


def perplexity(
    model: nn.Module,
    tokenizer,
    text: str,
    seq_len: int = 1024,
    batch_size: int = 8,
    *,
    max_chunks: int | None = None,
    progress: bool = True,
) -> float:
    """Perplexity of `text` in non-overlapping chunks of `seq_len` tokens (the tail is dropped).

    `max_chunks` caps the work (the first chunks are taken), for quick CPU runs.
    """
    chunks = pack_tokens(tokenize_text(tokenizer, text), seq_len)
    if max_chunks is not None:
        chunks = chunks[:max_chunks]
    return perplexity_of_ids(model, chunks, batch_size=batch_size, progress=progress)


@torch.inference_mode()
def generate_samples(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 32) -> list[str]:
    """Greedy continuations of a few prompts, for a human look at quality."""
    device = next(model.parameters()).device
    outputs = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        outputs.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return outputs
