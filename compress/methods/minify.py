"""Taylor–Ridge minification: remove whole MLP intermediate channels, then refit down_proj.

A gated MLP computes y = W_d·h with h = act(W_g·x) ⊙ (W_u·x) ∈ R^{d_ff}. Channel j is row j of
W_g and W_u and column j of W_d. Minification keeps a subset K of channels per layer, so the
result is an ordinary dense model whose gate/up/down linears are narrower (widths differ per
layer), and refits W_d on the kept channels by ridge regression. Definitions, the choice of
defaults and measurements: docs/minify.md.

1. Sensitivity (one calibration pass with backward, `score_minify`). With L_s the mean NLL of
   calibration sequence s and δ = ∂L_s/∂h, the first-order change of L_s when channel j is
   removed is −e_sj with

   - weight form ("taylor", default): e_sj = Σ_{θ ∈ channel j} θ·∂L_s/∂θ
                                            = Σ_{t∈s} (g_tj·∂L/∂g_tj + u_tj·∂L/∂u_tj + h_tj·δ_tj),
   - activation form ("taylor-act"):  e_sj = Σ_{t∈s} h_tj·δ_tj (the down_proj column's share alone),

   g = W_g·x (+b), u = W_u·x (+b). The per-sequence values are kept in the plan and aggregated
   at materialization: Σ_s e_sj² ("sq-sum", default), Σ_s |e_sj| ("sum-abs") or |Σ_s e_sj|
   ("abs-sum").
   The baseline "activation" score is ‖h_j‖₂ over the calibration tokens (√G_jj).
2. Selection: one global ranking over all layers' channels, with a per-layer floor, widths
   aligned to a multiple (`select_channels`).
3. Ridge healing: W_d' = argmin ‖T − W'·H_K‖² + λ‖W'‖², with λ = ridge·mean(diag G_KK). For the
   "local" target T = W_d·h (the dense MLP output on the same tokens), T·H_Kᵀ = W_d·G[:, K], so
   the plan stores G = Σ h·hᵀ per layer and any size is materialized without recalibrating.
   The "sequential" target refits layer by layer on the already-minified model's inputs so
   that each block's output matches the dense model's, undoing error from earlier layers.

`offload=True` (`--offload`, `compress.streaming`): weights in CPU memory. The Taylor pass
streams the blocks, checkpointed, through forward and backward; the Grams of h come from a
separate block-sequential forward pass (`compress.calibrate.blockwise_input_grams`), one
block's Gram on the accelerator at a time, and are kept in CPU memory with the plan. Local
healing moves one layer's Gram and down_proj weight to the accelerator per ridge solve;
sequential healing holds one block there at a time.

The top of this module is pure tensor math (aggregation, selection, ridge solve); hooks and
loops over the model come after it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lowrank_kernels.gram import gram_accumulate, gram_accumulate_batched
from torch import Tensor, nn

from compress.calibrate import (
    activation_gradients,
    block_output,
    blockwise_input_grams,
    first_block_inputs,
    gram_rows,
    iterate_batches,
)
from compress.errors import UserError
from compress.methods import dense_mlp_linears, options_of, register_method
from compress.plan import PlanBase, read_plan_dir, register_plan_type, write_plan_dir
from compress.streaming import execution_device, held, is_offloaded, maybe_offloaded, recomputing
from lowrank.linear import LowRankLinear
from lowrank.surgery import (
    GatedMlp,
    block_linear_names,
    decoder_layers,
    layer_param_count,
    record_dense_shapes,
    recorded_dense_shapes,
    replace_module_,
)

__all__ = [
    "AGGREGATIONS",
    "SCORES",
    "HEAL_PRIORS",
    "TARGETS",
    "MinifyConfig",
    "MinifyLayer",
    "MinifyOptions",
    "MinifyPlan",
    "MlpNames",
    "aggregate_taylor",
    "find_mlps",
    "layer_floor",
    "ridge_solve",
    "score_minify",
    "select_channels",
]

SCORES = ("taylor", "taylor-act", "activation")
AGGREGATIONS = ("sq-sum", "sum-abs", "abs-sum")
TARGETS = ("local", "sequential")
# What the healing ridge shrinks down_proj's refit toward: "zero" (plain ridge) or "original" (the kept
# channels' own columns, so a larger ridge trusts the calibration tokens less).
HEAL_PRIORS = ("zero", "original")
# Widths are rounded to this multiple by default: bf16 tensor-core GEMMs want the reduction
# and output dimensions in multiples of 8 (16-byte rows) and our kernels tile by 32 or more
# (lowrank.surgery.DEFAULT_RANK_MULTIPLE, docs/ranks.md). A later `svd` pass on a narrowed
# down_proj then also sees an aligned input width. 32 channels are 2% of SmolLM2's 1536.
DEFAULT_WIDTH_MULTIPLE = 32
# A ridge system whose Cholesky pivots span more than this ratio (squared) is treated as
# ill-conditioned and damped further: fp64 keeps ~16 digits, 1e12 leaves 4 of them.
_MAX_PIVOT_RATIO_SQ = 1e12


# ============================================================================ pure tensor math
def aggregate_taylor(per_sequence: Tensor, how: str) -> Tensor:
    """Channel scores [d] from per-sequence first-order contributions e [n_seq, d].

    "abs-sum": |Σ_s e_s|, the first-order loss change over the whole calibration set (signs
    of different sequences cancel); "sum-abs": Σ_s |e_s|; "sq-sum": Σ_s e_s² (the Fisher /
    Molchanov et al. 2019 form, an expected second-order loss change). Computed in float64.
    """
    if per_sequence.dim() != 2:
        raise ValueError(f"per-sequence contributions must be [n_seq, channels], "
                         f"got {tuple(per_sequence.shape)}")
    e = per_sequence.to(torch.float64)
    if how == "abs-sum":
        return e.sum(0).abs()
    if how == "sum-abs":
        return e.abs().sum(0)
    if how == "sq-sum":
        return e.square().sum(0)
    raise ValueError(f"unknown aggregation {how!r}; choose one of {AGGREGATIONS}")


def layer_floor(width: int, min_keep: float, multiple: int) -> int:
    """Fewest channels a layer may keep: ⌈min_keep·width⌉ rounded up to `multiple`, at least one multiple."""
    if not 0.0 <= min_keep <= 1.0:
        raise ValueError(f"min_keep must be in [0, 1], got {min_keep}")
    need = max(1, math.ceil(min_keep * width - 1e-9))
    return min(width, math.ceil(need / multiple) * multiple)


def select_channels(
    scores: Mapping[str, Tensor],
    keep: int,
    *,
    floor: int | Mapping[str, int] = 1,
    multiple: int = 1,
) -> dict[str, Tensor]:
    """Channels to keep per layer: one global ranking of `scores`, `keep` channels in total.

    Every layer keeps at least `floor` channels (an int for all, or per layer; rounded up to
    `multiple`) and keeps a multiple of `multiple` channels (except a layer kept whole).
    Within a layer channels are taken best-first, in blocks of `multiple`; the blocks beyond
    the floors then compete globally by their mean score (for multiple=1 this is exactly the
    global top-`keep` ranking subject to the floors). `keep` is rounded to the nearest
    multiple. Returns sorted int64 indices per layer. Ties break towards lower layer order
    and lower channel index, so the result is deterministic.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be ≥ 1, got {multiple}")
    names = list(scores)
    if not names:
        raise ValueError("no layers to select channels from")
    widths = {n: int(scores[n].numel()) for n in names}
    for n in names:
        if scores[n].dim() != 1 or widths[n] == 0:
            raise ValueError(f"{n}: scores must be a non-empty 1-D tensor, got {tuple(scores[n].shape)}")
        if not torch.isfinite(scores[n]).all():
            raise ValueError(f"{n}: channel scores contain NaN/Inf")
    total = sum(widths.values())
    asked = {n: int(floor[n] if isinstance(floor, Mapping) else floor) for n in names}
    floors = {n: min(widths[n], max(multiple, math.ceil(max(f, 1) / multiple) * multiple))
              for n, f in asked.items()}
    keep = int(round(keep / multiple)) * multiple if multiple > 1 else int(keep)
    keep = min(keep, total)
    minimum = sum(floors.values())
    if keep < minimum:
        raise UserError(
            f"cannot keep {keep} of {total} channels: the per-layer floors need at least {minimum} "
            f"({minimum / total:.3f} of the MLP); ask for a larger size or lower the floor"
        )

    order: dict[str, Tensor] = {}
    candidates: list[tuple[float, int, int, str, int]] = []  # (−mean score, layer idx, block idx, name, size)
    for li, n in enumerate(names):
        s = scores[n].detach().to(torch.float64).cpu()
        # Stable sort on −s: equal scores keep their channel order.
        idx = torch.sort(-s, stable=True).indices
        order[n] = idx
        rest = s[idx[floors[n]:]]  # channels beyond the floor, best first
        if rest.numel() == 0:
            continue
        # Block means in one pass (a short last block averages over its own length).
        starts = torch.arange(0, rest.numel(), multiple)
        sizes = (rest.numel() - starts).clamp(max=multiple)
        means = torch.zeros(starts.numel(), dtype=torch.float64).index_add_(
            0, torch.arange(rest.numel()) // multiple, rest) / sizes
        blocks = zip(means.tolist(), sizes.tolist(), strict=True)
        candidates.extend((-m, li, bi, n, size) for bi, (m, size) in enumerate(blocks))
    candidates.sort()
    counts = dict(floors)
    closed: set[str] = set()  # a layer that skipped a block takes no later one (keeps a prefix)
    budget = keep - minimum
    for _, _, _, n, size in candidates:
        if budget <= 0:
            break
        if n in closed:
            continue
        if size > budget:
            closed.add(n)
            continue
        counts[n] += size
        budget -= size
    return {n: order[n][: counts[n]].sort().values for n in names}


def ridge_solve(gram: Tensor, cross: Tensor, alpha: float, *, name: str = "layer",
                max_alpha: float = 1.0, prior: Tensor | None = None) -> tuple[Tensor, float]:
    """W [out, k] minimising ‖T − W·H‖² + λ‖W − W₀‖² from G = H·Hᵀ [k, k] and C = H·Tᵀ [k, out].

    W₀ is `prior` ([out, k]; None: zeros, the plain ridge). With W₀ the original columns of the kept
    channels, λ moves the fit between least squares on the calibration tokens (λ → 0) and no refit
    at all (λ → ∞).

    λ = alpha·mean(diag G), so `alpha` is scale-free. Solved by Cholesky in float64. If the
    system is not positive definite, or its Cholesky pivots show it is ill-conditioned
    (ratio² > 1e12), alpha is raised tenfold (from 1e-8 when it was 0) until it is not, up to
    `max_alpha`; the alpha used is returned, so callers can report the damping. Non-finite
    input, kept channels that never activate, or failure at `max_alpha` raise `UserError`
    naming the layer: this function never returns NaN.
    """
    if alpha < 0 or not math.isfinite(alpha):
        raise ValueError(f"ridge alpha must be a finite number ≥ 0, got {alpha}")
    g = gram.to(torch.float64)
    c = cross.to(torch.float64)
    if g.dim() != 2 or g.shape[0] != g.shape[1] or c.dim() != 2 or c.shape[0] != g.shape[0]:
        raise ValueError(f"{name}: ridge needs G [k, k] and C [k, out], "
                         f"got {tuple(g.shape)}, {tuple(c.shape)}")
    if not torch.isfinite(g).all():
        raise UserError(f"{name}: the calibration Gram has NaN/Inf entries (overflowing activations? "
                        "try float32)")
    if not torch.isfinite(c).all():
        raise UserError(f"{name}: the ridge right-hand side has NaN/Inf entries (overflowing activations?)")
    p = None
    if prior is not None:
        p = prior.to(device=c.device, dtype=torch.float64).T  # [k, out], as C
        if p.shape != c.shape:
            raise ValueError(f"{name}: the ridge prior must be [out, k] = {tuple(c.T.shape)}, got {tuple(prior.shape)}")
    g = 0.5 * (g + g.T)
    scale = float(g.diagonal().mean())
    if not scale > 0.0:
        raise UserError(f"{name}: the kept channels never activate on the calibration tokens (zero Gram)")
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    max_alpha = max(max_alpha, alpha)
    a = alpha
    while a <= max_alpha:
        chol, info = torch.linalg.cholesky_ex(g + (a * scale) * eye)
        if int(info) == 0:
            pivots = chol.diagonal()
            ratio_sq = float((pivots.max() / pivots.min()) ** 2)
            if ratio_sq <= _MAX_PIVOT_RATIO_SQ:
                w = torch.cholesky_solve(c if p is None else c + (a * scale) * p, chol)
                if torch.isfinite(w).all():
                    return w.T, a
        a = 1e-8 if a == 0.0 else a * 10.0
    raise UserError(f"{name}: the ridge system stays singular or ill-conditioned even with "
                    f"λ = {max_alpha}·mean diag")


def local_cross(gram: Tensor, down_weight: Tensor, keep: Tensor) -> Tensor:
    """C = H_K·Tᵀ for the local target T = W_d·h: C = G[K, :]·W_dᵀ (float64)."""
    g = gram.to(torch.float64)
    return g[keep] @ down_weight.to(device=g.device, dtype=torch.float64).T


# ============================================================================ configuration
@dataclass
class MinifyOptions:
    """How a plan is materialized; every field can be changed without recalibrating."""

    score: str = "taylor"  # channel sensitivity: one of SCORES
    aggregation: str = "sq-sum"  # per-sequence Taylor contributions → channel score: one of AGGREGATIONS
    heal: bool = True  # ridge-refit down_proj (False: just slice its columns)
    ridge: float = 1e-4  # λ / mean(diag G_KK)
    heal_prior: str = "zero"  # what the ridge pulls the refit toward: one of HEAL_PRIORS
    target: str = "local"  # "local": match each dense MLP on dense inputs; "sequential": see docs
    min_keep: float = 0.1  # per-layer floor, as a fraction of the layer's channels
    width_multiple: int = DEFAULT_WIDTH_MULTIPLE
    batch_size: int = 4  # sequences per forward pass in the sequential healing pass

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise UserError(f"unknown minify score {self.score!r}; choose one of {SCORES}")
        if self.aggregation not in AGGREGATIONS:
            raise UserError(f"unknown minify aggregation {self.aggregation!r}; choose one of {AGGREGATIONS}")
        if self.target not in TARGETS:
            raise UserError(f"unknown minify target {self.target!r}; choose one of {TARGETS}")
        if self.heal_prior not in HEAL_PRIORS:
            raise UserError(f"unknown minify heal_prior {self.heal_prior!r}; choose one of {HEAL_PRIORS}")
        if not (isinstance(self.ridge, (int, float)) and math.isfinite(self.ridge) and self.ridge >= 0):
            raise UserError(f"minify ridge must be a finite number ≥ 0, got {self.ridge!r}")
        if not 0.0 <= self.min_keep <= 1.0:
            raise UserError(f"minify min_keep must be in [0, 1], got {self.min_keep}")
        if not isinstance(self.width_multiple, int) or self.width_multiple < 1:
            raise UserError(f"minify width_multiple must be a positive int, got {self.width_multiple!r}")
        if self.batch_size < 1:
            raise UserError(f"batch_size must be positive, got {self.batch_size}")


@dataclass
class MinifyConfig(MinifyOptions):
    """Scoring options (`batch_size`, `progress`, `offload`) plus the default materialization options."""

    progress: bool = True
    offload: bool = False  # weights in CPU memory, one decoder block at a time on the accelerator

    def options(self) -> MinifyOptions:
        return options_of(self, MinifyOptions)


# ============================================================================ model structure
# The gated MLP's three linears (lowrank.surgery.GatedMlp), under the name minify's API has used.
MlpNames = GatedMlp


def find_mlps(model: nn.Module) -> dict[str, MlpNames]:
    """Gated MLPs inside the decoder blocks, {mlp module name: linears}, in model order.

    Recognises the Llama-family layout (gate_proj, up_proj, down_proj under one parent).
    """
    linears, mlps = dense_mlp_linears(model, "minify")
    if not mlps:
        raise UserError("minify needs gated MLPs with separate gate_proj, up_proj, down_proj linears; this model's "
                        f"blocks have {block_linear_names(model)} (fused or ungated MLPs are not supported)")
    for p, names in mlps.items():
        mods = [linears[n] for n in (names.gate, names.up, names.down)]
        if any(isinstance(m, LowRankLinear) for m in mods):
            raise UserError(f"{p}: MLP is already factorized; minify must run before low-rank factorization")
    return mlps


def _weight_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    return module.weight.device, module.weight.dtype


@torch.no_grad()
def _narrow_mlp_(model: nn.Module, names: MlpNames, keep: Tensor, down_weight: Tensor) -> None:
    """Replace the MLP's three linears by narrower nn.Linear holding channels `keep`."""
    gate, up, down = (model.get_submodule(n) for n in (names.gate, names.up, names.down))
    device, dtype = _weight_device_dtype(down)
    idx = keep.to(device)
    k = idx.numel()
    for name, old in ((names.gate, gate), (names.up, up)):
        # skip_init: every value is copied in below; a random init would only cost time (much of
        # it on the CPU, where offloaded weights live).
        new = nn.utils.skip_init(nn.Linear, old.in_features, k, bias=old.bias is not None, device=device,
                                 dtype=dtype)
        new.weight.copy_(old.weight.index_select(0, idx))
        if old.bias is not None:
            new.bias.copy_(old.bias.index_select(0, idx))
        replace_module_(model, name, new)
    new_down = nn.utils.skip_init(nn.Linear, k, down.out_features, bias=down.bias is not None, device=device,
                                  dtype=dtype)
    new_down.weight.copy_(down_weight.to(device=device, dtype=dtype))
    if down.bias is not None:
        new_down.bias.copy_(down.bias)  # the intercept is not channel-specific: kept as is
    replace_module_(model, names.down, new_down)


# ============================================================================ plan
@dataclass
class MinifyLayer:
    """Calibration statistics of one MLP (float32; on the scoring device, in CPU memory under offload)."""

    names: MlpNames
    gram: Tensor  # [d_ff, d_ff] Σ_t h_t·h_tᵀ over calibration tokens (dense model)
    act_seq: Tensor  # [n_seq, d_ff] activation-form Taylor contributions e_sj
    weight_seq: Tensor  # [n_seq, d_ff] weight-form Taylor contributions

    @property
    def width(self) -> int:
        return self.gram.shape[0]


@register_plan_type("minify")
@dataclass
class MinifyPlan(PlanBase):
    """Per-MLP Grams and Taylor contributions; materializable at any MLP retention in (0, 1]."""

    layers: dict[str, MinifyLayer]
    options: MinifyOptions = field(default_factory=MinifyOptions)
    calibration_ids: Tensor | None = None  # [n, seq] token ids, for the sequential target
    metadata: dict[str, Any] = field(default_factory=dict)
    method: str = "minify"
    last_stats: dict[str, Any] = field(default_factory=dict)
    offload: bool = False  # materialize with the weights in CPU memory (not saved with the plan)

    def with_options(self, **changes: Any) -> MinifyPlan:
        """A plan sharing these statistics, materializing with other options (validated)."""
        return dataclasses.replace(self, options=dataclasses.replace(self.options, **changes), last_stats={})

    # ------------------------------------------------------------------ decisions
    def channel_scores(self, name: str) -> Tensor:
        """Score of every channel of MLP `name` under this plan's options (float64)."""
        layer = self.layers[name]
        if self.options.score == "activation":
            return layer.gram.diagonal().to(torch.float64).clamp_min(0).sqrt()
        per_seq = layer.weight_seq if self.options.score == "taylor" else layer.act_seq
        return aggregate_taylor(per_seq, self.options.aggregation)

    def selection(self, size: float, multiple: int | None = None) -> dict[str, Tensor]:
        """Kept channel indices per MLP for `size` = kept fraction of MLP channels (= parameters)."""
        if isinstance(size, bool) or not isinstance(size, (int, float)) or not 0.0 < float(size) <= 1.0:
            raise UserError(f"size must be a fraction in (0, 1], got {size}")
        multiple = multiple or self.options.width_multiple
        scores = {n: self.channel_scores(n) for n in self.layers}
        total = sum(layer.width for layer in self.layers.values())
        floors = {n: layer_floor(layer.width, self.options.min_keep, multiple)
                  for n, layer in self.layers.items()}
        return select_channels(scores, int(round(size * total)), floor=floors, multiple=multiple)

    # ------------------------------------------------------------------ materialization
    def _check_model(self, model: nn.Module) -> dict[str, MlpNames]:
        mlps = find_mlps(model)
        missing = [n for n in self.layers if n not in mlps]
        if missing:
            raise UserError(f"this plan names MLPs the model lacks: {missing[:3]} "
                            "(a plan for another model?)")
        for n, layer in self.layers.items():
            width = model.get_submodule(mlps[n].down).in_features
            if width != layer.width:
                raise UserError(f"{n}: plan was scored at width {layer.width} but the model's MLP has "
                                f"{width} channels (already minified? materialize onto the dense model)")
        return mlps

    @torch.no_grad()
    def materialize_(self, model: nn.Module, size: float, *, rank_multiple: int = 1) -> dict[str, int]:
        """Narrow every MLP in place to keep `size` of the MLP parameters; returns {mlp name: width}.

        `rank_multiple` > 1 overrides the plan's width multiple (the CLI's --rank-multiple).
        """
        multiple = rank_multiple if rank_multiple > 1 else self.options.width_multiple
        self._check_model(model)
        keep = self.selection(size, multiple)
        t0 = time.perf_counter()
        damped: dict[str, float] = {}
        with maybe_offloaded(model, self.offload):
            if self.options.heal and self.options.target == "sequential":
                record_dense_shapes(model)
                self._heal_sequential_(model, keep, damped)
            else:
                # Under offload each solve runs on the accelerator, one layer's Gram and weight there at a time.
                device = execution_device(model) if is_offloaded(model) else None
                # Every solve first, so that an error (named layer) leaves the model untouched.
                downs = {n: model.get_submodule(layer.names.down).weight for n, layer in self.layers.items()}
                weights = {n: self._local_down_weight(n, w, keep[n], damped, device) for n, w in downs.items()}
                record_dense_shapes(model)
                for n, layer in self.layers.items():
                    _narrow_mlp_(model, layer.names, keep[n], weights.pop(n))
            _sync(model)
        self.last_stats = {"heal_seconds": round(time.perf_counter() - t0, 4), "damped_layers": damped,
                           "multiple": multiple}
        return {n: int(k.numel()) for n, k in keep.items()}

    def _local_down_weight(self, name: str, down_weight: Tensor, keep: Tensor,
                           damped: dict[str, float], device: torch.device | None = None) -> Tensor:
        """The healed down_proj weight; with `device`, solved there and returned in the weight's dtype and place."""
        layer = self.layers[name]
        idx = keep.to(down_weight.device)
        if not self.options.heal or keep.numel() == layer.width:
            # A layer kept whole is already exact: refitting could only add the ridge's bias.
            return down_weight.index_select(1, idx)
        gram = layer.gram if device is None else layer.gram.to(device)
        k_dev = keep.to(gram.device)
        gram_kk = gram[k_dev][:, k_dev]
        prior = down_weight.index_select(1, idx) if self.options.heal_prior == "original" else None
        weight, alpha = ridge_solve(gram_kk, local_cross(gram, down_weight, k_dev), self.options.ridge,
                                    name=name, prior=prior)
        if alpha != self.options.ridge:
            damped[name] = alpha
        if device is not None:
            # Back to the (CPU-resident) layer at once, in its dtype: no layer's fp64 solution piles up
            # on the accelerator. The cast rounds exactly as _narrow_mlp_'s copy would.
            weight = weight.to(device=down_weight.device, dtype=down_weight.dtype)
        return weight

    def _heal_sequential_(self, model: nn.Module, keep: dict[str, Tensor], damped: dict[str, float]) -> None:
        if self.calibration_ids is None:
            raise UserError("target='sequential' needs the calibration tokens, which this plan does not hold")
        _sequential_heal_(model, self, keep, damped)

    # ------------------------------------------------------------------ reporting
    def describe(self, model: nn.Module) -> dict[str, Any]:
        """MLP accounting of a (materialized) model, for the CLI report."""
        shapes = recorded_dense_shapes(model) or {}
        dense = current = 0
        widths: dict[str, int] = {}
        for n, layer in self.layers.items():
            for lin in (layer.names.gate, layer.names.up, layer.names.down):
                module = model.get_submodule(lin)
                out_f, in_f = shapes.get(lin, (module.out_features, module.in_features))
                dense += out_f * in_f
                current += layer_param_count(module)
            widths[n] = model.get_submodule(layer.names.down).in_features
        fraction = current / dense
        return {
            "mlp_params": current,
            "mlp_dense_params": dense,
            "mlp_fraction": round(fraction, 5),
            "mlp_widths": widths,
            **{f"minify_{k}": v for k, v in self.last_stats.items()},
            "summary": (f"MLPs: {current:,} / {dense:,} params ({100 * fraction:.2f}%); widths "
                        f"{min(widths.values())}..{max(widths.values())}"),
        }

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> Path:
        tensors: dict[str, Tensor] = {}
        for n, layer in self.layers.items():
            tensors[f"{n}.gram"] = layer.gram
            tensors[f"{n}.act_seq"] = layer.act_seq
            tensors[f"{n}.weight_seq"] = layer.weight_seq
        if self.calibration_ids is not None:
            tensors["calibration_ids"] = self.calibration_ids.to(torch.int64)
        meta = {
            "method": self.method,
            "plan_type": self.plan_type,
            "layers": {n: dataclasses.asdict(layer.names) for n, layer in self.layers.items()},
            "options": dataclasses.asdict(self.options),
            "metadata": self.metadata,
        }
        return write_plan_dir(directory, tensors, meta)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> MinifyPlan:
        meta, tensors = read_plan_dir(directory, cls.plan_type)
        try:
            layers = {
                n: MinifyLayer(MlpNames(**names), tensors[f"{n}.gram"], tensors[f"{n}.act_seq"],
                               tensors[f"{n}.weight_seq"])
                for n, names in meta["layers"].items()
            }
        except KeyError as exc:
            raise UserError(f"{directory}: minify plan is incomplete (missing {exc})") from exc
        return cls(layers, MinifyOptions(**meta.get("options", {})), tensors.get("calibration_ids"),
                   meta.get("metadata", {}), meta.get("method", "minify"))


def _sync(model: nn.Module) -> None:
    device = execution_device(model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ============================================================================ scoring pass
class _Timer:
    """Wall-clock seconds per phase, synchronizing CUDA so GPU work is charged to its phase."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.seconds: dict[str, float] = {}

    def phase(self, name: str) -> _Phase:
        return _Phase(self, name)


class _Phase:
    def __init__(self, timer: _Timer, name: str) -> None:
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        if self.timer.cuda:
            torch.cuda.synchronize(self.timer.device)
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        if self.timer.cuda:
            torch.cuda.synchronize(self.timer.device)
        secs = self.timer.seconds
        secs[self.name] = secs.get(self.name, 0.0) + time.perf_counter() - self.t0


def _taylor_pass(model: nn.Module, chunks: Tensor, mlps: Mapping[str, MlpNames], *, batch_size: int,
                 progress: bool) -> tuple[dict[str, MinifyLayer], dict[str, float]]:
    """One forward + backward per batch: Grams of h (dense) and per-sequence Taylor contributions.

    Only activation gradients are needed (every term is output × ∂L/∂output of a channel), so
    parameters are frozen for the pass and the graph starts at the embedding output: no
    weight-gradient GEMMs, no .grad memory.

    Under `compress.streaming.offloaded` the blocks run checkpointed (the hooks below skip the
    re-runs), and the Grams come from a block-sequential forward pass after the Taylor pass:
    accumulated here, every layer's d_ff² Gram would be on the accelerator at once.
    """
    device = execution_device(model)
    blockwise_grams = is_offloaded(model)
    timer = _Timer(device)
    grams: dict[str, Tensor] = {}
    act_seq: dict[str, list[Tensor]] = {n: [] for n in mlps}
    weight_seq: dict[str, list[Tensor]] = {n: [] for n in mlps}
    cur_act: dict[str, Tensor] = {}
    cur_weight: dict[str, Tensor] = {}
    pending: dict[str, Tensor] = {}

    def per_sequence(out: Tensor, grad: Tensor) -> Tensor:
        # Σ over the token axis of output·gradient, per sequence, in fp32 (or fp64): [B, d_ff].
        dtype = torch.promote_types(out.dtype, torch.float32)
        prod = out.detach().to(dtype) * grad.to(dtype)
        return prod.reshape(prod.shape[0], -1, prod.shape[-1]).sum(1)

    def add_weight_term(name: str, out: Tensor) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            term = per_sequence(out, grad)
            cur_weight[name] = cur_weight[name] + term if name in cur_weight else term

        return hook

    def gate_up_hook(name: str):
        def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
            if recomputing():  # a checkpointed block re-running for the backward: already hooked
                return
            if out.requires_grad:
                # The hook keeps a detached view: capturing `out` itself would close a cycle through
                # its autograd node (node -> hook -> out -> node) that the garbage collector cannot
                # see, and every batch's activations would leak.
                out.register_hook(add_weight_term(name, out.detach()))

        return hook

    def down_pre_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if recomputing():
                return
            h = args[0]
            if not blockwise_grams:
                pending[name] = h
            if h.requires_grad:
                h_data = h.detach()  # not `h` itself: see gate_up_hook

                def grad_hook(grad: Tensor) -> None:
                    term = per_sequence(h_data, grad)
                    cur_act[name] = term
                    cur_weight[name] = cur_weight[name] + term if name in cur_weight else term

                h.register_hook(grad_hook)

        return hook

    handles = []
    for n, names in mlps.items():
        handles.append(model.get_submodule(names.gate).register_forward_hook(gate_up_hook(n)))
        handles.append(model.get_submodule(names.up).register_forward_hook(gate_up_hook(n)))
        handles.append(model.get_submodule(names.down).register_forward_pre_hook(down_pre_hook(n)))
    tokens = 0
    try:
        with activation_gradients(model):
            batches = iterate_batches(chunks, batch_size, device, progress=progress, desc="minify: taylor")
            for batch in batches:
                with timer.phase("forward"):
                    logits = model(input_ids=batch, use_cache=False).logits
                    # Sum over sequences of each sequence's mean NLL: per-sequence terms do not
                    # depend on how sequences are batched.
                    nll = nn.functional.cross_entropy(
                        logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)).flatten(0, 1),
                        batch[:, 1:].flatten(),
                        reduction="none",
                    )
                    loss = nll.view(batch.shape[0], -1).mean(1).sum()
                    del logits, nll
                with timer.phase("gram"):
                    names = list(pending)
                    for n in names:
                        if n not in grams:
                            d = pending[n].shape[-1]
                            grams[n] = torch.zeros(d, d, dtype=torch.float32, device=pending[n].device)
                    gram_accumulate_batched([grams[n] for n in names],
                                            [gram_rows(pending[n]) for n in names])
                    pending.clear()
                with timer.phase("backward"):
                    loss.backward()
                for n in mlps:
                    if n not in cur_act:
                        raise RuntimeError(f"minify: no gradient reached {n} (is the MLP on the loss path?)")
                    act_seq[n].append(cur_act.pop(n).cpu())
                    weight_seq[n].append(cur_weight.pop(n).cpu())
                tokens += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
        pending.clear()
    if blockwise_grams:
        owner = {names.down: n for n, names in mlps.items()}
        with timer.phase("gram"):
            for _, block_grams in blockwise_input_grams(model, chunks, list(owner), batch_size=batch_size,
                                                        progress=progress, desc="minify: grams"):
                for down, gram in block_grams.items():
                    grams[owner[down]] = gram.cpu()  # kept with the plan, in CPU memory
    layers: dict[str, MinifyLayer] = {}
    for n, names in mlps.items():
        a = torch.cat(act_seq[n])
        w = torch.cat(weight_seq[n])
        if not (torch.isfinite(a).all() and torch.isfinite(w).all() and torch.isfinite(grams[n]).all()):
            raise UserError(f"{n}: non-finite activations or gradients during minify scoring "
                            "(overflow? try --dtype float32)")
        layers[n] = MinifyLayer(names, grams[n], a, w)
    timing = {k: round(v, 4) for k, v in timer.seconds.items()}
    timing["tokens"] = tokens
    return layers, timing


@register_method("minify", MinifyConfig,
                 "Taylor-Ridge minification: drop MLP channels by global Taylor sensitivity, ridge-heal "
                 "down_proj (--size = kept fraction of MLP parameters)", check_model=find_mlps)
def score_minify(model: nn.Module, chunks: Tensor, config: MinifyConfig) -> MinifyPlan:
    """Calibrate once (forward + backward per batch); the plan materializes any MLP retention."""
    if chunks is None or chunks.dim() != 2 or chunks.shape[0] == 0 or chunks.shape[1] < 2:
        raise UserError("minify needs calibration token ids of shape [n ≥ 1, seq_len ≥ 2]")
    options = config.options()
    mlps = find_mlps(model)
    t0 = time.perf_counter()
    with maybe_offloaded(model, config.offload):
        layers, timing = _taylor_pass(model, chunks, mlps, batch_size=config.batch_size, progress=config.progress)
    timing["total"] = round(time.perf_counter() - t0, 4)
    meta = {"calibration_tokens": int(chunks.numel()), "calibration_sequences": int(chunks.shape[0]),
            "seq_len": int(chunks.shape[1]), "timing_seconds": timing}
    return MinifyPlan(layers, options, chunks.detach().cpu().to(torch.int64), meta, offload=config.offload)


# ============================================================================ sequential healing
class _MlpTap:
    """Captures an MLP's output and its down_proj input (h) during a block's forward."""

    def __init__(self, mlp: nn.Module, down: nn.Module) -> None:
        self.y: Tensor | None = None
        self.h: Tensor | None = None
        self.delta: Tensor | None = None
        self._handles = [mlp.register_forward_hook(self._on_mlp),
                         down.register_forward_pre_hook(self._on_down)]

    def _on_mlp(self, module: nn.Module, args: tuple, out: Tensor) -> Tensor | None:
        self.y = out
        return out + self.delta if self.delta is not None else None

    def _on_down(self, module: nn.Module, args: tuple) -> None:
        self.h = args[0]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _check_additive_mlp(block: nn.Module, tap: _MlpTap, x: Tensor, kwargs: dict, name: str) -> None:
    # The sequential target assumes block(x) = r + mlp(z): adding c to the MLP output must add
    # c to the block output. Blocks with a norm after the MLP (e.g. Gemma-2) fail this check.
    base = block_output(block(x, **kwargs)).float()
    tap.delta = torch.ones((), dtype=x.dtype, device=x.device)
    try:
        shifted = block_output(block(x, **kwargs)).float()
    finally:
        tap.delta = None
    if not torch.allclose(shifted - base, torch.ones_like(base), atol=1e-2, rtol=0):
        raise UserError(f"{name}: target='sequential' needs blocks that add the MLP output to the residual "
                        "stream unchanged; this architecture does not (use target='local')")


@torch.no_grad()
def _sequential_heal_(model: nn.Module, plan: MinifyPlan, keep: Mapping[str, Tensor],
                      damped: dict[str, float]) -> None:
    """Narrow and refit MLPs block by block on the minified model's own inputs.

    Two hidden-state streams go through the blocks: x_d (dense model) and x_c (model minified
    up to the current block). For block ℓ, still dense, with residual input r and MLP output y
    on each stream, the target is T = o_d − r_c, where o_d is the dense block output: a
    narrow MLP reproducing T on the compressed stream makes block ℓ's output equal the dense
    one, cancelling the error of earlier blocks. [h_c, T] goes through one Gram, whose blocks
    give H·Hᵀ and H·Tᵀ; then W_d' = ridge_solve on the kept channels.
    """
    _, blocks = decoder_layers(model)
    by_block: dict[int, str] = {}
    for n in plan.layers:
        for i, block in enumerate(blocks):
            if any(m is model.get_submodule(n) for m in block.modules()):
                by_block[i] = n
                break
        else:
            raise UserError(f"{n}: MLP is not inside a decoder block; target='sequential' cannot run")
    dense_x: list[Tensor] = []
    kwargs: list[dict] = []
    for x, kw in first_block_inputs(model, plan.calibration_ids, plan.options.batch_size):
        dense_x.append(x)
        kwargs.append(kw)
    comp_x = list(dense_x)

    def through(block: nn.Module, xs: list[Tensor]) -> list[Tensor]:
        return [block_output(block(x, **kw)) for x, kw in zip(xs, kwargs, strict=True)]

    checked = False
    for i, block in enumerate(blocks):
        # Under offload the block stays on the accelerator for its forwards and its ridge solve.
        with held(block):
            name = by_block.get(i)
            if name is None:  # a block with nothing to minify: both streams just pass through it
                dense_x, comp_x = through(block, dense_x), through(block, comp_x)
                continue
            names = plan.layers[name].names
            idx = keep[name]
            down = model.get_submodule(names.down)
            width, hidden = down.in_features, down.out_features
            if idx.numel() == width:  # kept whole: exact as it is
                dense_x, comp_x = through(block, dense_x), through(block, comp_x)
                continue
            tap = _MlpTap(model.get_submodule(name), down)
            try:
                if not checked:
                    _check_additive_mlp(block, tap, comp_x[0], kwargs[0], name)
                    checked = True
                # One Gram of [h_c, T] holds both H·Hᵀ (top-left) and H·Tᵀ (top-right).
                aug = torch.zeros(width + hidden, width + hidden, dtype=torch.float32, device=down.weight.device)
                for b, kw in enumerate(kwargs):
                    o_d = block_output(block(dense_x[b], **kw))
                    o_c = block_output(block(comp_x[b], **kw))  # leaves this stream's h and y in the tap
                    target = o_d.float() - (o_c.float() - tap.y.float())  # o_d − r_c
                    gram_accumulate(aug, torch.cat([gram_rows(tap.h).float(), gram_rows(target)], dim=-1))
                    dense_x[b] = o_d
            finally:
                tap.remove()
            k_dev = idx.to(aug.device)
            rows = aug[k_dev]
            prior = down.weight.index_select(1, idx.to(down.weight.device)) \
                if plan.options.heal_prior == "original" else None
            weight, alpha = ridge_solve(rows[:, k_dev], rows[:, width:], plan.options.ridge, name=name, prior=prior)
            if alpha != plan.options.ridge:
                damped[name] = alpha
            del aug
            _narrow_mlp_(model, names, idx, weight)
            comp_x = through(block, comp_x)
