"""The Python API behind ``python -m compress``: score a model with a method, then materialize a size."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compress.data import calibration_batches, load_text
from compress.errors import UserError
from compress.methods import get_method
from lowrank.surgery import SizeReport, size_report

__all__ = ["CompressResult", "check_size", "compress", "score"]


def check_size(size: float) -> float:
    if not isinstance(size, (int, float)) or not 0.0 < float(size) <= 1.0:
        raise UserError(f"--size must be a fraction in (0, 1], got {size}")
    return float(size)


@dataclass
class CompressResult:
    plan: Any
    report: SizeReport
    ranks: dict[str, int] = field(default_factory=dict)


def score(
    model: nn.Module,
    tokenizer: Any,
    method: str,
    *,
    data: str | None = None,
    seq_len: int = 1024,
    num_samples: int = 64,
    seed: int = 0,
    **config_overrides: Any,
) -> Any:
    """Run a method's calibration/scoring and return its Plan (materializable at any size)."""
    spec = get_method(method)
    config = spec.make_config(**config_overrides)
    chunks = None
    if spec.needs_calibration:
        text = load_text(data, "calib")
        chunks = calibration_batches(tokenizer, text, seq_len=seq_len, num_samples=num_samples, seed=seed)
    torch.manual_seed(seed)
    return spec.score(model, chunks, config)


def compress(
    model: nn.Module,
    tokenizer: Any,
    method: str = "svd",
    size: float = 0.8,
    *,
    rank_multiple: int = 1,
    **score_kwargs: Any,
) -> CompressResult:
    """Score `model` with `method` and materialize it, in place, at `size` of its targeted linear parameters."""
    size = check_size(size)
    plan = score(model, tokenizer, method, **score_kwargs)
    ranks = plan.materialize_(model, size, rank_multiple=rank_multiple)
    return CompressResult(plan, size_report(model, getattr(model, "_lowrank_dense_shapes", None)), ranks)
