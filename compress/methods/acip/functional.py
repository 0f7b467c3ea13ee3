"""ACIP math as pure tensor functions: no modules, no I/O, no training loop.

All masks of all layers live in one flat vector (``p``), with ``segments`` telling which
entries belong to which layer. Keeping them flat makes the per-step work (straight-through
mask, L1 penalty, score update, size ratio) a handful of kernels instead of a few per layer.

Conventions (Genzel et al. 2025, and their reference implementation's defaults):

- mask value: ``1[p > 0]·scale`` in the forward pass; the gradient goes straight through
  ``relu(p)``. The SVD layer divides by ``scale`` again (the reference scales its factors
  by 1/√scale each), so the layer sees a binary mask while ``p`` moves at the optimiser's
  natural step size;
- penalty: ``λ·Σ relu(p)``, with ``λ_t = λ_0·factor^⌊t/every⌋`` after ``t`` completed steps;
- score map: an unpruned entry scores its mask value, a pruned one loses 1 per step, so
  entries pruned earlier rank lower;
- size: a layer of shape (m, n) keeping r directions holds ``min(r·(m+n), m·n)`` weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Segments",
    "Selection",
    "global_order",
    "kept_counts_from_order",
    "l1_penalty",
    "layer_params",
    "mask_forward",
    "post_tune_masks",
    "reg_weight",
    "select_for_size",
    "size_for_counts",
    "update_scores",
]


@dataclass(frozen=True)
class Segments:
    """Layout of the flat mask/score vector: layer i owns entries [offsets[i], offsets[i] + lengths[i])."""

    lengths: tuple[int, ...]
    shapes: tuple[tuple[int, int], ...]  # (out_features, in_features) per layer

    @classmethod
    def from_shapes(cls, shapes: Sequence[tuple[int, int]]) -> Segments:
        shapes = tuple((int(m), int(n)) for m, n in shapes)
        return cls(tuple(min(m, n) for m, n in shapes), shapes)

    @property
    def offsets(self) -> tuple[int, ...]:
        out, acc = [], 0
        for length in self.lengths:
            out.append(acc)
            acc += length
        return tuple(out)

    @property
    def total(self) -> int:
        return sum(self.lengths)

    def layer_index(self, device: torch.device | str | None = None) -> Tensor:
        """[total] int64: the layer each flat entry belongs to."""
        lengths = torch.tensor(self.lengths, dtype=torch.int64, device=device)
        return torch.repeat_interleave(torch.arange(len(self.lengths), device=device), lengths)

    def split(self, flat: Tensor) -> list[Tensor]:
        return list(torch.split(flat, list(self.lengths)))


# ---------------------------------------------------------------------------- training-time math
def mask_forward(p: Tensor, scale: float) -> Tensor:
    """Straight-through mask: value ``1[p > 0]·scale``, gradient that of ``relu(p)``."""
    r = torch.relu(p)
    return (p > 0).to(p.dtype) * scale + (r - r.detach())


def l1_penalty(p: Tensor) -> Tensor:
    """One-sided L1 norm Σ relu(p) in float32 (relu keeps pruned entries from being pushed further)."""
    return torch.relu(p.float()).sum()


def reg_weight(completed_steps: int, start: float, every: int, factor: float) -> float:
    """λ after `completed_steps` ACIP steps: multiplied by `factor` once every `every` steps."""
    if every <= 0:
        return float(start)
    return float(start) * float(factor) ** (completed_steps // every)


@torch.no_grad()
def update_scores(scores: Tensor | None, p: Tensor) -> Tensor:
    """One score-map update after an optimiser step (returns a new float32 tensor).

    Unpruned entries (p > 0) score their value; an entry pruned just now gets 0 and every
    pruned entry then loses 1, so an entry pruned t steps before the end scores −t.
    The first call starts from the mask values themselves.
    """
    p = p.detach().float()
    new = p.clone() if scores is None else scores.detach().float().clone()
    alive = p > 0
    new = torch.where(alive, p, new)
    new = torch.where(~alive & (new >= 0), torch.zeros_like(new), new)
    return torch.where(new <= 0, new - 1.0, new)


# ---------------------------------------------------------------------------- size accounting
def layer_params(rank: Tensor | int, out_features: Tensor | int, in_features: Tensor | int) -> Tensor | int:
    """Weights of a rank-`rank` layer under the min(r·(m+n), m·n) convention (works on tensors too)."""
    if isinstance(rank, Tensor):
        m = torch.as_tensor(out_features, device=rank.device)
        n = torch.as_tensor(in_features, device=rank.device)
        return torch.minimum(rank * (m + n), m * n)
    return min(rank * (out_features + in_features), out_features * in_features)


def _aligned(ranks: Tensor, multiple: int, limits: Tensor) -> Tensor:
    # Vectorised `lowrank.surgery.aligned_rank`: nearest multiple (at least one), capped at the limit.
    if multiple <= 1:
        return torch.minimum(ranks.clamp_min(1), limits)
    rounded = torch.round(ranks.double() / multiple).long() * multiple
    return torch.minimum(rounded.clamp_min(multiple), limits)


def effective_counts(counts: Tensor, segments: Segments, *, extra_rank: int = 0, rank_multiple: int = 1,
                     min_count: int = 0) -> tuple[Tensor, Tensor]:
    """(kept directions, stored rank) per layer after alignment.

    `extra_rank` is the rank added on top of the kept directions (the folded LoRA branch).
    With `rank_multiple` > 1 the stored rank kept+extra is rounded to a multiple, and the
    kept count follows it. `min_count` keeps at least that many directions in every layer.
    """
    lengths = torch.tensor(segments.lengths, dtype=torch.int64)
    counts = counts.to(torch.int64).clamp(min=min_count).minimum(lengths)
    if rank_multiple > 1:
        total = _aligned(counts + extra_rank, rank_multiple, lengths + extra_rank)
        counts = (total - extra_rank).clamp(min=min_count).minimum(lengths)
    return counts, counts + extra_rank


def size_for_counts(counts: Tensor, segments: Segments, *, extra_rank: int = 0) -> float:
    """Fraction of the dense parameters held when layer i keeps counts[i] directions (+ extra_rank)."""
    shapes = torch.tensor(segments.shapes, dtype=torch.int64)
    ranks = counts.to(torch.int64) + extra_rank
    kept = layer_params(ranks, shapes[:, 0], shapes[:, 1])
    return float(kept.sum()) / float((shapes[:, 0] * shapes[:, 1]).sum())


def alive_counts(p: Tensor, layer_index: Tensor, num_layers: int) -> Tensor:
    """Per-layer number of unpruned entries (p > 0) of the flat mask vector."""
    counts = torch.zeros(num_layers, dtype=torch.int64, device=p.device)
    return counts.index_add_(0, layer_index, (p > 0).to(torch.int64))


# ---------------------------------------------------------------------------- any-size selection
def global_order(scores: Tensor, tiebreak: Tensor) -> Tensor:
    """Flat indices sorted best first: by score, ties broken by `tiebreak` (e.g. singular value), then index.

    Entries pruned at the same step share a score; breaking those ties by singular value
    (and finally by position) makes every selection deterministic.
    """
    by_tiebreak = torch.sort(tiebreak.float(), descending=True, stable=True).indices
    by_score = torch.sort(scores.float()[by_tiebreak], descending=True, stable=True).indices
    return by_tiebreak[by_score]


def kept_counts_from_order(layer_of_ranked: Tensor, count: int, num_layers: int) -> Tensor:
    """Per-layer counts when the `count` best-ranked entries are kept."""
    return torch.bincount(layer_of_ranked[:count], minlength=num_layers)


@dataclass
class Selection:
    """Result of `select_for_size`: how many top entries globally, per layer, and the size reached."""

    global_count: int
    counts: Tensor  # [layers] kept directions
    ranks: Tensor  # [layers] stored rank (kept + extra)
    size: float


def select_for_size(
    layer_of_ranked: Tensor,
    segments: Segments,
    size: float,
    *,
    extra_rank: int = 0,
    rank_multiple: int = 1,
    min_count: int = 0,
) -> Selection:
    """Binary-search the number of globally best entries to keep so the size is nearest `size`.

    The size is monotone in that number (alignment rounds monotonically too). It is flat
    where the next entries belong to layers already at their dense size (a layer that keeps
    r ≥ m·n/(m+n) directions costs m·n whatever r is): such entries are free, so among counts
    of equal size the largest is taken. Of the best count at or below the target and the best
    one above it, the one nearer the target wins.
    """
    num_layers = len(segments.lengths)
    total = layer_of_ranked.numel()

    def evaluate(count: int) -> Selection:
        raw = kept_counts_from_order(layer_of_ranked, count, num_layers)
        counts, ranks = effective_counts(raw, segments, extra_rank=extra_rank, rank_multiple=rank_multiple,
                                         min_count=min_count)
        return Selection(count, counts, ranks, size_for_counts(counts, segments, extra_rank=extra_rank))

    def largest_count_not_above(limit: float) -> int:
        lo, hi = 0, total  # invariant: the answer lies in [lo, hi]; -1 if even count 0 exceeds it
        if evaluate(0).size > limit:
            return -1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if evaluate(mid).size <= limit:
                lo = mid
            else:
                hi = mid - 1
        return lo

    below = largest_count_not_above(size)
    if below == total:
        return evaluate(total)
    above_first = evaluate(below + 1)
    above = evaluate(largest_count_not_above(above_first.size))
    if below < 0:
        return above
    low = evaluate(below)
    return low if abs(low.size - size) <= abs(above.size - size) else above


def post_tune_masks(scores: Tensor, singular: Tensor, segments: Segments, low: float, *, points: int = 16,
                    extra_rank: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Masks for post-tuning one LoRA across the sizes a score map serves (`post_tune_size="any"`).

    Returns (position, counts, sizes): `position[i]` is entry i's place in the global order the
    score map materializes by (score, ties by singular value), and `counts[j]` how many best-placed
    entries materializing at `sizes[j]` keeps, for `points` sizes evenly spaced from `low` to 1.
    The mask at size j is then `position < counts[j]`, exactly what `ScoreMap.select` keeps
    (rank_multiple 1). Counts never go below the entries alive at the end of pruning (score > 0):
    smaller sizes are outside what the score map covers.
    """
    if points < 1:
        raise ValueError(f"points must be at least 1, got {points}")
    if not 0.0 < low <= 1.0:
        raise ValueError(f"low must be a size in (0, 1], got {low}")
    scores, singular = scores.detach().float().cpu(), singular.detach().float().cpu()
    order = global_order(scores, singular)
    layer_of_ranked = segments.layer_index()[order]
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), dtype=order.dtype)
    alive = int((scores > 0).sum())
    sizes = torch.linspace(low, 1.0, points, dtype=torch.float64) if points > 1 else torch.ones(1, dtype=torch.float64)
    min_count = 0 if extra_rank > 0 else 1
    counts = torch.tensor([max(alive, select_for_size(layer_of_ranked, segments, float(size), extra_rank=extra_rank,
                                                      min_count=min_count).global_count) for size in sizes])
    return position, counts, sizes.float()
