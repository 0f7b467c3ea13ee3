"""Generation sanity: greedy completions of fixed prompts, scored for calibration artifacts and repetition.

A model that fits its calibration text too well starts to write like it: WikiText-2's ``<unk>`` and
``@-@`` tokens, its ``= = Heading = =`` markup, its detached clitics (``John 's``) and unit
conversions in detached brackets (``( 18 km``), or a loop of the same phrase. These metrics catch that
on a fixed set of prompts (`SANITY_PROMPTS`, greedy, `MAX_NEW_TOKENS` new tokens), so every quality
report can carry them beside perplexity:

- ``artifacts``: occurrences of each pattern in `ARTIFACTS` over all completions, and their total;
  the target is 0;
- ``repetition``: the repeated word n-gram rate of each completion, 1 − |distinct n-grams| / |n-grams|
  (n = `REPEAT_N` = 4; whitespace words), averaged over prompts, in percent; ``degenerate`` counts
  completions above 50 %. The target is at most the dense model's rate + 5 points.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from compress.eval import DEFAULT_PROMPTS

__all__ = ["ARTIFACTS", "MAX_NEW_TOKENS", "REPEAT_N", "SANITY_PROMPTS", "artifact_counts", "greedy_completions",
           "repetition_rate", "sanity_check", "sanity_metrics"]

SANITY_PROMPTS: tuple[str, ...] = tuple(DEFAULT_PROMPTS)
MAX_NEW_TOKENS = 48
REPEAT_N = 4
# WikiText-2 tokenization and markup that no ordinary text contains.
ARTIFACTS: dict[str, str] = {
    "<unk>": r"<unk>",
    "@-@ @,@ @.@": r"@[-,.]@",
    "= = heading": r"(?:^|\s)= = ",
    "detached clitic": r"\w (?:'s|'re|'ve|'ll|'d|n't)\b",
    "detached bracket": r"\( \d|\d \)",
}
_COMPILED = {name: re.compile(pattern) for name, pattern in ARTIFACTS.items()}


def artifact_counts(texts: Sequence[str]) -> dict[str, int]:
    """Occurrences of every `ARTIFACTS` pattern over `texts`, plus their ``total``."""
    counts = {name: sum(len(rx.findall(t)) for t in texts) for name, rx in _COMPILED.items()}
    counts["total"] = sum(counts.values())
    return counts


def repetition_rate(text: str, n: int = REPEAT_N) -> float:
    """1 − distinct / all word n-grams of `text` (0 for fewer than n words): 0 = no n-gram repeats."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 0.0 if not grams else 1.0 - len(set(grams)) / len(grams)


def sanity_metrics(completions: Sequence[str], n: int = REPEAT_N) -> dict[str, Any]:
    """{"artifacts": {...}, "repetition": mean rate in %, "repetition_max", "degenerate", "samples"}."""
    rates = [repetition_rate(c, n) for c in completions]
    mean = 100.0 * sum(rates) / max(1, len(rates))
    return {"artifacts": artifact_counts(completions), "repetition": round(mean, 3),
            "repetition_max": round(100.0 * max(rates, default=0.0), 3),
            "degenerate": sum(r > 0.5 for r in rates), "samples": len(completions), "repeat_n": n}


def sanity_check(metrics: dict[str, Any], dense: dict[str, Any] | None = None, *,
                 repetition_slack: float = 5.0) -> dict[str, Any]:
    """Whether `metrics` meet the targets: no artifacts, repetition ≤ dense's + `repetition_slack` points."""
    limit = (dense["repetition"] if dense is not None else 0.0) + repetition_slack
    return {"artifacts_ok": metrics["artifacts"]["total"] == 0,
            "repetition_ok": metrics["repetition"] <= limit, "repetition_limit": round(limit, 3)}


@torch.inference_mode()
def greedy_completions(model: nn.Module, tokenizer, prompts: Sequence[str] = SANITY_PROMPTS,
                       max_new_tokens: int = MAX_NEW_TOKENS, *, batch_size: int = 8) -> list[str]:
    """Greedy continuations (new text only, special tokens dropped), `batch_size` prompts per generate call.

    Prompts are left-padded, so one call decodes a whole batch; greedy decoding is forced whatever the
    checkpoint's generation config says. `compress.eval.generate_samples` does the same one prompt at a
    time (batching changes the arithmetic slightly, not the metrics' meaning).
    """
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    side = getattr(tokenizer, "padding_side", "right")
    had_pad = tokenizer.pad_token is not None
    if not had_pad:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    out: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = list(prompts[start : start + batch_size])
            encoded = tokenizer(batch, return_tensors="pt", padding=True)
            ids = encoded["input_ids"].to(device)
            mask = encoded["attention_mask"].to(device)
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 num_beams=1, temperature=None, top_p=None, top_k=None, pad_token_id=pad_id)
            out += [tokenizer.decode(row[ids.shape[1] :], skip_special_tokens=True) for row in gen]
    finally:
        tokenizer.padding_side = side
        if not had_pad:
            tokenizer.pad_token = None
    return out
