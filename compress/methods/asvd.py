"""ASVD (Yuan et al. 2023, arXiv 2312.05821): activation-aware SVD with sensitivity-based ranks.
Options and deviations from the paper: docs/baselines.md.

1. Scaling. For a layer W [out, in] with calibration inputs x, S = diag(s), s_j = mean_t |x_tj|^α
   (α = 0.5 by default). Truncating the SVD of W·S = U·Σ·Qᵀ gives W' = U_k·Σ_k·Q_kᵀ·S⁻¹: input
   channels that carry large activations weigh more in the truncation. An input channel that
   never activates (s_j = 0) would make S singular; its s_j is raised to 1e-6·max(s) (the
   channel is then nearly free to truncate, which costs nothing on the calibration data), and
   the count per layer is recorded in the plan metadata as ``floored_channels``.

2. Sensitivity. For every layer and every parameter ratio p in `ratios` (the layer keeps
   rank ⌊p·out·in/(out+in)⌋, i.e. a fraction p of its parameters), that layer alone is
   truncated and the perplexity of the first `sensitivity_samples` calibration sequences is
   measured. The table is stored in the plan, so any size materializes without recomputing it.

3. Allocation (the paper's binary search). For a threshold τ, each layer takes the smallest
   tested ratio whose perplexity is ≤ τ, or stays dense if none is. The parameter count falls
   as τ grows; τ is binary-searched over the measured perplexities for the count nearest to
   `size` of the dense targeted linears. Ranks then follow, optionally aligned to a multiple.

`offload=True` (`--offload`, `compress.streaming`): weights in CPU memory, each forward
streams the blocks through the accelerator; the activation means are tiny and stay there, the
scaled SVD runs there one layer at a time, and the sensitivity table is measured with one full
streamed evaluation per (layer, ratio), which makes it the slowest part under offload.

The top of this module is pure tensor math; hooks and loops over the model follow.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from compress.calibrate import iterate_batches
from compress.errors import UserError
from compress.eval import perplexity_of_ids
from compress.methods import check_shrink, register_method
from compress.plan import FactorPlan, LayerFactors, SizesCovered, register_plan_type
from compress.streaming import execution_device, maybe_offloaded
from lowrank.linear import LowRankLinear, balanced_factors
from lowrank.surgery import aligned_rank, replace_module_, target_linears

__all__ = [
    "DEFAULT_RATIOS",
    "ASVDConfig",
    "ASVDPlan",
    "activation_scales",
    "rank_at_ratio",
    "scaled_svd_factors",
    "search_threshold",
    "threshold_ratios",
]

DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
_SCALE_FLOOR = 1e-6  # relative to the layer's largest scale


# ============================================================================ pure tensor math
def activation_scales(abs_mean: Tensor, alpha: float = 0.5) -> tuple[Tensor, int]:
    """ASVD's s = mean|x|^α per input channel (float64), dead channels floored. Returns (s, #floored)."""
    if not torch.isfinite(abs_mean).all():
        raise ValueError("activation means have NaN/Inf entries (overflowing activations?)")
    s = abs_mean.to(torch.float64).clamp_min(0).pow(alpha)
    top = float(s.max()) if s.numel() else 0.0
    floor = _SCALE_FLOOR * top if top > 0 else 1.0
    low = s < floor
    return torch.where(low, torch.full_like(s, floor), s), int(low.sum())


def shrink_scales(scales: Tensor, alpha: float) -> Tensor:
    """(1 − α)·s + α·mean(s): ASVD's counterpart of `svd`'s Gram shrinkage (α = 1: plain SVD up to a scale)."""
    if not alpha:
        return scales
    return (1.0 - alpha) * scales + alpha * scales.mean()


def scaled_svd_factors(weight: Tensor, scales: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Balanced full-rank factors (U, V) of W from the SVD of W·diag(s), sorted by Σ. Returns (U, V, Σ)."""
    s = scales.to(device=weight.device, dtype=torch.float64)
    w = weight.detach().to(torch.float64)
    u, sigma, qh = torch.linalg.svd(w * s[None, :], full_matrices=False)
    U, V = balanced_factors(u, sigma, qh / s[None, :])
    return U, V, sigma.to(torch.float32)


def rank_at_ratio(out_features: int, in_features: int, ratio: float) -> int:
    """Rank holding `ratio` of a layer's parameters (⌊p·m·n/(m+n)⌋, at least 1); ratio ≥ 1 = full rank."""
    limit = min(out_features, in_features)
    if ratio >= 1.0:
        return limit
    return max(1, min(limit, int(ratio * out_features * in_features / (out_features + in_features))))


def threshold_ratios(sensitivity: Tensor, ratios: Sequence[float], threshold: float) -> list[float]:
    """Per layer, the smallest tested ratio whose sensitivity is ≤ `threshold`; 1.0 (dense) if none.

    `sensitivity` is [layers, len(ratios)]; non-finite entries never qualify.
    """
    order = sorted(range(len(ratios)), key=lambda j: ratios[j])
    out = []
    for row in sensitivity.tolist():
        chosen = 1.0
        for j in order:
            if math.isfinite(row[j]) and row[j] <= threshold:
                chosen = float(ratios[j])
                break
        out.append(chosen)
    return out


def search_threshold(
    sensitivity: Tensor,
    ratios: Sequence[float],
    params: Callable[[list[float]], int],
    target: float,
) -> tuple[list[float], float]:
    """Binary search of ASVD's global threshold: the per-layer ratios whose `params(...)` is nearest `target`.

    Candidate thresholds are −∞ (all dense) and every finite measured sensitivity; the parameter
    count is non-increasing in the threshold, so the nearest count is one of the two around
    `target`. Returns (ratios per layer, threshold).
    """
    values = sorted({v for v in sensitivity.flatten().tolist() if math.isfinite(v)})
    candidates = [-math.inf, *values]

    def count(j: int) -> int:
        return params(threshold_ratios(sensitivity, ratios, candidates[j]))

    lo, hi = 0, len(candidates) - 1
    while lo < hi:  # largest j whose count is still ≥ target
        mid = (lo + hi + 1) // 2
        if count(mid) >= target:
            lo = mid
        else:
            hi = mid - 1
    best = lo
    if lo + 1 < len(candidates) and abs(count(lo + 1) - target) <= abs(count(lo) - target):
        best = lo + 1
    return threshold_ratios(sensitivity, ratios, candidates[best]), candidates[best]


# ============================================================================ plan
@register_plan_type("ASVDPlan")
@dataclass
class ASVDPlan(FactorPlan):
    """Activation-scaled factors plus the per-layer sensitivity table that allocates the ranks.

    metadata: "ratios" (tested parameter ratios), "sensitivity" {layer: perplexity per ratio,
    null where non-finite}, "dense_perplexity", "alpha", "floored_channels".
    """

    def _table(self) -> tuple[list[str], list[float], Tensor]:
        names = list(self.layers)
        ratios = [float(r) for r in self.metadata["ratios"]]
        table = self.metadata["sensitivity"]
        rows = [[math.inf if v is None else float(v) for v in table[n]] for n in names]
        return names, ratios, torch.tensor(rows, dtype=torch.float64).reshape(len(names), len(ratios))

    def _ranks_at(self, names: list[str], chosen: list[float], rank_multiple: int) -> dict[str, int]:
        out = {}
        for n, ratio in zip(names, chosen, strict=True):
            lf = self.layers[n]
            limit = min(*lf.shape, lf.U.shape[1])
            out[n] = aligned_rank(rank_at_ratio(*lf.shape, ratio), rank_multiple, limit)
        return out

    def _params_at(self, rank_multiple: int) -> Callable[[list[float]], int]:
        """Parameters the targeted linears hold at per-layer ratios `chosen` (in `_table`'s order)."""
        names = list(self.layers)

        def params(chosen: list[float]) -> int:
            ranks = self._ranks_at(names, chosen, rank_multiple)
            return sum(self.layers[n].params_at_rank(r) for n, r in ranks.items())

        return params

    def _coverage(self, rank_multiple: int) -> SizesCovered:
        """Down to the size every layer at its smallest tested ratio gives."""
        _, ratios, sens = self._table()
        dense_total = sum(lf.shape[0] * lf.shape[1] for lf in self.layers.values())
        smallest = self._params_at(rank_multiple)(threshold_ratios(sens, ratios, math.inf)) / dense_total
        return SizesCovered(lowest=smallest, owner="this ASVD plan",
                            limit=f"the smallest size it covers is {smallest:.3f}; rescore with smaller ratios, "
                                  "e.g. --method-opt ratios=0.05,0.1,0.2,...")

    @property
    def sizes_covered(self) -> SizesCovered:
        return self._coverage(1)

    def layer_ratios(self, size: float, rank_multiple: int = 1) -> tuple[dict[str, float], float]:
        """ASVD's per-layer parameter ratios for `size` and the threshold that gives them."""
        if isinstance(size, bool) or not isinstance(size, (int, float)) or not 0.0 < size <= 1.0:
            raise UserError(f"size must be in (0, 1], got {size}")
        names, ratios, sens = self._table()
        dense_total = sum(lf.shape[0] * lf.shape[1] for lf in self.layers.values())
        coverage = self._coverage(rank_multiple)
        if size not in coverage:
            raise UserError(coverage.refusal([size]))
        chosen, threshold = search_threshold(sens, ratios, self._params_at(rank_multiple), size * dense_total)
        return dict(zip(names, chosen, strict=True)), threshold

    def ranks(self, size: float, rank_multiple: int = 1) -> dict[str, int]:
        chosen, threshold = self.layer_ratios(size, rank_multiple)
        self.last_selection = {"threshold": threshold, "ratios": chosen}
        names = list(chosen)
        return self._ranks_at(names, [chosen[n] for n in names], rank_multiple)

    def describe(self, model: nn.Module) -> dict[str, Any]:
        selection = getattr(self, "last_selection", None)
        if not selection:
            return {}
        ratios = list(selection["ratios"].values())
        dense = sum(r >= 1.0 for r in ratios)
        summary = (f"asvd: threshold perplexity {selection['threshold']:.4g} "
                   f"(dense {self.metadata.get('dense_perplexity') or float('nan'):.4g}); layer ratios "
                   f"{min(ratios):.2f}..{max(ratios):.2f}, {dense} of {len(ratios)} layers dense")
        return {"asvd_threshold": selection["threshold"], "asvd_layer_ratios": selection["ratios"],
                "summary": summary}


# ============================================================================ scoring
@dataclass
class ASVDConfig:
    alpha: float = 0.5  # exponent of the activation scaling
    ratios: Any = DEFAULT_RATIOS  # tested parameter ratios: a sequence or "0.1,0.2,..."
    sensitivity_samples: int = 8  # calibration sequences scored for each (layer, ratio)
    batch_size: int = 4
    progress: bool = True
    offload: bool = False  # weights in CPU memory, one decoder block at a time on the accelerator
    # Shrink the scaling toward uniform, s ← (1 − a)·s + a·mean(s) (`shrink_scales`): 0 = ASVD, 1 = plain SVD.
    gram_shrink: float = 0.0

    def __post_init__(self) -> None:
        check_shrink(self.gram_shrink)
        raw = self.ratios
        if isinstance(raw, str):
            parts = [p for p in raw.replace(";", ",").split(",") if p.strip()]
        elif isinstance(raw, (int, float)):
            parts = [raw]
        else:
            parts = list(raw)
        try:
            values = sorted({float(p) for p in parts})
        except (TypeError, ValueError) as exc:
            raise UserError(f"asvd: ratios must be numbers in (0, 1), got {raw!r}") from exc
        if not values or any(not 0.0 < v < 1.0 for v in values):
            raise UserError(f"asvd: ratios must be numbers in (0, 1), got {raw!r}")
        self.ratios = tuple(values)
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha >= 0):
            raise UserError(f"asvd: alpha must be a finite number ≥ 0, got {self.alpha!r}")
        if not isinstance(self.sensitivity_samples, int) or self.sensitivity_samples < 1:
            raise UserError(f"asvd: sensitivity_samples must be a positive int, got {self.sensitivity_samples!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise UserError(f"asvd: batch_size must be a positive int, got {self.batch_size!r}")


@torch.no_grad()
def collect_abs_means(model: nn.Module, chunks: Tensor, names: Sequence[str], *, batch_size: int,
                      progress: bool) -> tuple[dict[str, Tensor], int]:
    """mean_t |x_tj| (float64) of each named linear's input channels over all calibration tokens."""
    sums: dict[str, Tensor] = {}
    tokens = 0
    last: list[Any] = [None, None]  # (input tensor, owner): layers reading the same tensor share a sum
    shared: dict[str, str] = {}

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if x is last[0]:
                shared[name] = last[1]
                return
            last[0], last[1] = x, name
            flat = x.detach().reshape(-1, x.shape[-1])
            part = flat.abs().sum(0, dtype=torch.float64)
            sums[name] = sums[name] + part if name in sums else part

        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(make_hook(n)) for n in names]
    device = execution_device(model)
    try:
        for batch in iterate_batches(chunks, batch_size, device, progress=progress, desc="asvd: activations"):
            model(input_ids=batch, use_cache=False)
            tokens += batch.numel()
            last[0] = None
    finally:
        for handle in handles:
            handle.remove()
        last[0] = None
    for follower, owner in shared.items():
        sums[follower] = sums[owner]
    missing = [n for n in names if n not in sums]
    if missing:
        raise RuntimeError(f"calibration never reached these layers: {missing[:5]}")
    return {n: s / max(tokens, 1) for n, s in sums.items()}, tokens


@torch.no_grad()
def measure_sensitivity(model: nn.Module, layers: dict[str, LayerFactors], chunks: Tensor,
                        ratios: Sequence[float], *, batch_size: int, progress: bool) -> dict[str, list[float]]:
    """Perplexity of `chunks` with each layer alone truncated to each ratio (the others dense)."""
    targets = target_linears(model)
    steps: Any = [(n, r) for n in layers for r in ratios]
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="asvd: sensitivity", unit="eval", leave=False)
    table: dict[str, list[float]] = {n: [] for n in layers}
    for name, ratio in steps:
        original = targets[name]
        lf = layers[name]
        rank = rank_at_ratio(*lf.shape, ratio)
        dtype, device = original.weight.dtype, original.weight.device
        trial = LowRankLinear.from_factors(lf.U[:, :rank].to(device=device, dtype=dtype),
                                           lf.V[:rank].to(device=device, dtype=dtype), original.bias)
        replace_module_(model, name, trial)
        try:
            ppl = perplexity_of_ids(model, chunks, batch_size=batch_size, progress=False)
        finally:
            replace_module_(model, name, original)
        table[name].append(ppl)
    return table


@register_method("asvd", ASVDConfig,
                 "ASVD: activation-scaled SVD, per-layer ranks from a perplexity-sensitivity search "
                 "(docs/baselines.md)")
def score_asvd(model: nn.Module, chunks: Tensor, config: ASVDConfig) -> ASVDPlan:
    if chunks is None or chunks.dim() != 2 or chunks.shape[0] == 0 or chunks.shape[1] < 2:
        raise UserError("asvd needs calibration token ids of shape [n ≥ 1, seq_len ≥ 2]")
    with maybe_offloaded(model, config.offload):
        return _score_asvd(model, chunks, config)


def _score_asvd(model: nn.Module, chunks: Tensor, config: ASVDConfig) -> ASVDPlan:
    targets = target_linears(model)
    factored = [n for n, m in targets.items() if isinstance(m, LowRankLinear)]
    if factored:
        raise UserError(f"asvd: {factored[0]} is already factorized; score the dense model")
    names = list(targets)
    means, tokens = collect_abs_means(model, chunks, names, batch_size=config.batch_size, progress=config.progress)
    layers: dict[str, LayerFactors] = {}
    floored: dict[str, int] = {}
    items: Any = names
    if config.progress:
        from tqdm.auto import tqdm

        items = tqdm(names, desc="asvd: scaled SVD", unit="layer", leave=False)
    device = execution_device(model)
    for name in items:
        weight = targets[name].weight
        try:
            scales, n_low = activation_scales(means[name], config.alpha)
        except ValueError as exc:
            raise UserError(f"{name}: {exc}") from exc
        scales = shrink_scales(scales, config.gram_shrink)
        # Under offload the weight is in CPU memory: this layer alone goes to the accelerator for its SVD.
        U, V, sigma = scaled_svd_factors(weight.to(device), scales)
        layers[name] = LayerFactors(U.cpu(), V.cpu(), sigma.cpu(), weight.detach().float().cpu())
        if n_low:
            floored[name] = n_low
    sample = chunks[: config.sensitivity_samples]
    dense_ppl = perplexity_of_ids(model, sample, batch_size=config.batch_size, progress=False)
    table = measure_sensitivity(model, layers, sample, config.ratios, batch_size=config.batch_size,
                                progress=config.progress)
    meta = {
        "alpha": float(config.alpha),
        "gram_shrink": float(config.gram_shrink),
        "ratios": list(config.ratios),
        "sensitivity": {n: [v if math.isfinite(v) else None for v in row] for n, row in table.items()},
        "dense_perplexity": dense_ppl if math.isfinite(dense_ppl) else None,
        "sensitivity_sequences": int(sample.shape[0]),
        "calibration_tokens": tokens,
        "floored_channels": floored,
    }
    return ASVDPlan("asvd", layers, allocation="asvd-sensitivity", metadata=meta)
