"""Distillation to the uncompressed model: the KL term that ACIP's training and the surgeon's LoRA correction share.

A compression method that trains (ACIP's masks and LoRA, the surgeon's LoRA correction) on next-token NLL
alone fits its calibration text: off that text the model degrades, and on it the model can even beat the
dense one, which says nothing about compression (docs/domains.md). Adding KL(teacher ‖ student) on every
next-token distribution, the teacher being the dense model, pulls the student toward what the model
computed before it was compressed, on any text.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from compress.errors import UserError

__all__ = ["check_distill", "distill_loss", "training_loss"]


def check_distill(distill: object, distill_only: object, *, owner: str = "") -> None:
    """Refuse a distillation weight that is not a finite number ≥ 0, or `distill_only` without a weight.

    `owner` prefixes the message ("surgeon " → "surgeon distill must be ...") so that a method's options
    name themselves in the one-line CLI error.
    """
    if isinstance(distill, bool) or not isinstance(distill, (int, float)) or not (
            math.isfinite(distill) and distill >= 0):
        raise UserError(f"{owner}distill must be a finite number ≥ 0, got {distill!r}")
    if distill_only and not distill > 0:
        raise UserError(f"{owner}distill_only needs distill > 0")


def training_loss(nll: Tensor, kl: Tensor | None, distill: float, distill_only: bool) -> Tensor:
    """NLL + distill·KL, or distill·KL alone with `distill_only`; the NLL when there is no KL term."""
    if kl is None or not distill:
        return nll
    weighted = distill * kl
    return weighted if distill_only else nll + weighted


def distill_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Mean over positions of KL(teacher ‖ student) between next-token distributions, in float32.

    Written as Σ p_t·log p_t − Σ p_t·s + logsumexp(s) (s: the student's logits, Σ p_t = 1) so that,
    besides the logits themselves, autograd holds one vocabulary-sized tensor (p_t) instead of the
    four of log_softmax(s), exp, difference and product: with a 262k vocabulary (Gemma) each is
    1 GiB per 1024-token sequence.
    """
    s = student_logits.float()
    with torch.no_grad():
        log_t = torch.log_softmax(teacher_logits.float(), dim=-1)
        p_t = log_t.exp()
        neg_entropy = torch.matmul(p_t.unsqueeze(-2), log_t.unsqueeze(-1))[..., 0, 0]
        del log_t
    cross = torch.matmul(p_t.unsqueeze(-2), s.unsqueeze(-1))[..., 0, 0]  # a batched dot: no product tensor
    return (neg_entropy - cross + torch.logsumexp(s, dim=-1)).mean()
