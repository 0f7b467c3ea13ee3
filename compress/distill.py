"""Distillation to the uncompressed model: the KL term that ACIP's training and the surgeon's LoRA correction share.

A compression method that trains (ACIP's masks and LoRA, the surgeon's LoRA correction) on next-token NLL
alone fits its calibration text: off that text the model degrades, and on it the model can even beat the
dense one, which says nothing about compression (docs/domains.md). Adding KL(teacher ‖ student) on every
next-token distribution, the teacher being the dense model, pulls the student toward what the model
computed before it was compressed, on any text.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["distill_loss"]


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
