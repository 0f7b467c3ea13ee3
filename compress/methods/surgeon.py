"""LLM Surgeon: structured pruning with Kronecker-factored curvature and correlated weight updates.

Method of van der Ouderaa et al., "The LLM Surgeon" (ICLR 2024). Definitions, defaults and
measurements: docs/surgeon.md.

For a linear layer y = W·a (W: [out, in]), K-FAC approximates the Fisher of the loss with
respect to vec(W) by A ⊗ G, with A = E[a·aᵀ] over the layer's inputs and G = E[g·gᵀ] over the
gradients at its output (`compress.calibrate.collect_kfac`, through `lowrank_kernels.gram.gram_accumulate`).
A change ΔW then costs ½·tr(ΔWᵀ·G·ΔW·A). With damped factors Ã = A + δ_a·mean(diag A)·I and
G̃ likewise:

- removing a set Q of rows (ΔW_Q = −W_Q) at least cost moves the other rows by
  ΔW = −G̃⁻¹·E_Q·([G̃⁻¹]_QQ)⁻¹·W_Q and costs ½·tr(([G̃⁻¹]_QQ)⁻¹·W_Q·A·W_Qᵀ);
  a single row r costs ½·W_r·A·W_rᵀ / [G̃⁻¹]_rr;
- removing a set C of columns moves the other columns by ΔW = −W_C·([Ã⁻¹]_CC)⁻¹·E_Cᵀ·Ã⁻¹ and
  costs ½·tr(W_Cᵀ·G·W_C·([Ã⁻¹]_CC)⁻¹); a single column c costs ½·W_cᵀ·G·W_c / [Ã⁻¹]_cc.

Physical structures. Rows and columns of a decoder's matrices only shrink a model when they
line up across matrices, so the default `structure="physical"` prunes units that do:

- an MLP channel j: row j of gate_proj and up_proj and column j of down_proj;
- an attention KV group: one key/value head and the query heads that share it (rows of
  q/k/v, columns of o_proj), so grouped-query attention keeps its group size and the model
  still loads with its own config.

A unit's cost is the sum of its parts' costs (each a row or column set of one matrix). Units
across all layers are ranked by cost per parameter removed and cut at one global threshold.
Input columns of q/k/v/gate/up and output rows of o/down live in the residual stream, which
every block, norm and the embeddings share; they cannot shrink one layer at a time and are not
pruned in physical mode. `structure="rows-cols"` prunes any row or column of any matrix as the
reference implementation does: they are zeroed in place, counted as zeroed, never as saved.
`"unstructured"` and `"2:4"` zero single weights by their K-FAC cost ½·w²/([G̃⁻¹]_rr·[Ã⁻¹]_cc)
without a weight update; neither gives a run-time speedup in this toolkit (no sparse kernels).

Multi-shot: the target is reached in `shots` steps of a linear schedule, recomputing the
curvature on the pruned model before every shot. An optional short LoRA fit after each shot
(a first-order correction) is merged into the weights, masked so pruned structures stay pruned.

`offload=True` (`--offload`, `compress.streaming`): weights in CPU memory. Each shot's K-FAC
pass (and the LoRA steps) streams the blocks through the accelerator with activation
checkpointing; the K-FAC factors and their inverses stay on the accelerator (they are about
(in² + out²)·4 bytes per layer, for every layer: the part of surgeon's memory that offload does
not bound). Costs and updates move one layer's weight to the accelerator at a time and write
the result back to the CPU-resident model; zeroed-mode masks stay with the weights.

The top of this module is pure tensor math; structure discovery, hooks and the shot loop
follow it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from compress.calibrate import FISHER_LABELS, KfacFactors, collect_kfac, iterate_batches
from compress.distill import check_distill, distill_loss, training_loss
from compress.errors import UserError
from compress.methods import dense_mlp_linears, options_of, register_method
from compress.plan import PlanBase, SizesCovered, read_plan_dir, register_plan_type, write_plan_dir
from compress.streaming import execution_device, maybe_offloaded
from lowrank.linear import LowRankLinear
from lowrank.surgery import (
    GatedMlp,
    block_linear_names,
    record_dense_shapes,
    recorded_dense_shapes,
    replace_module_,
    target_linears,
    targets_restored,
)

__all__ = [
    "STRUCTURES",
    "UPDATES",
    "AttentionGroups",
    "MlpChannels",
    "SurgeonConfig",
    "SurgeonOptions",
    "SurgeonPlan",
    "PrunedSize",
    "column_costs",
    "column_set_cost",
    "damped",
    "element_costs",
    "find_units",
    "remove_columns",
    "remove_rows",
    "row_costs",
    "row_set_cost",
    "select_rows_columns",
    "select_units",
    "spd_inverse",
    "surgeon_prune_",
    "two_four_mask",
]

STRUCTURES = ("physical", "rows-cols", "unstructured", "2:4")
UPDATES = ("both", "columns", "rows", "none")
NORMALIZATIONS = ("params", "none")


# ============================================================================ pure tensor math
# What the math says when it fails; `damped_inverse` adds what the user can do about it.
NON_FINITE_FACTOR = "a curvature factor has NaN/Inf entries"
NOT_POSITIVE_DEFINITE = "the damped curvature factor is not positive definite"


def damped(matrix: Tensor, delta: float) -> Tensor:
    """M + δ·mean(diag M)·I in float64 (scale-free damping, the paper's form)."""
    m = matrix.to(torch.float64)
    m = 0.5 * (m + m.T)
    scale = float(m.diagonal().mean())
    if not math.isfinite(scale):
        raise ValueError(NON_FINITE_FACTOR)
    if scale <= 0.0:
        scale = 1.0  # an all-zero factor (a dead layer): plain δ·I keeps it invertible
    return m + (delta * scale) * torch.eye(m.shape[0], dtype=m.dtype, device=m.device)


def spd_inverse(matrix: Tensor, *, name: str = "layer") -> Tensor:
    """Inverse of a symmetric positive definite matrix through Cholesky, in float64."""
    m = matrix.to(torch.float64)
    chol, info = torch.linalg.cholesky_ex(m)
    if int(info) != 0:
        raise ValueError(f"{name}: {NOT_POSITIVE_DEFINITE}")
    return torch.cholesky_inverse(chol)


def row_costs(weight: Tensor, a: Tensor, g_inv_diag: Tensor) -> Tensor:
    """½·W_r·A·W_rᵀ / [G̃⁻¹]_rr for every row r (float64)."""
    w = weight.to(torch.float64)
    return 0.5 * ((w @ a.to(torch.float64)) * w).sum(1) / g_inv_diag.to(torch.float64)


def column_costs(weight: Tensor, g: Tensor, a_inv_diag: Tensor) -> Tensor:
    """½·W_cᵀ·G·W_c / [Ã⁻¹]_cc for every column c (float64)."""
    w = weight.to(torch.float64)
    return 0.5 * ((g.to(torch.float64) @ w) * w).sum(0) / a_inv_diag.to(torch.float64)


def row_set_cost(weight: Tensor, a: Tensor, g_inv: Tensor, rows: Tensor) -> float:
    """½·tr(([G̃⁻¹]_QQ)⁻¹·W_Q·A·W_Qᵀ): the least loss increase of removing rows Q together."""
    w_q = weight.to(torch.float64)[rows]
    inner = torch.linalg.solve(g_inv[rows][:, rows], w_q @ a.to(torch.float64) @ w_q.T)
    return float(0.5 * inner.diagonal().sum())


def column_set_cost(weight: Tensor, g: Tensor, a_inv: Tensor, cols: Tensor) -> float:
    """½·tr(W_Cᵀ·G·W_C·([Ã⁻¹]_CC)⁻¹): the least loss increase of removing columns C together."""
    w_c = weight.to(torch.float64)[:, cols]
    inner = torch.linalg.solve(a_inv[cols][:, cols], w_c.T @ g.to(torch.float64) @ w_c)
    return float(0.5 * inner.diagonal().sum())


def remove_rows(weight: Tensor, g_inv: Tensor, rows: Tensor, bias: Tensor | None = None,
                *, update: bool = True) -> tuple[Tensor, Tensor | None]:
    """Weights (and bias) of the kept rows after removing `rows` with the correlated update.

    W_K ← W_K − [G̃⁻¹]_KQ·([G̃⁻¹]_QQ)⁻¹·W_Q (float64). The bias is an input that is always 1,
    so it takes the same row update. `update=False` only drops the rows.
    """
    out = weight.shape[0]
    removed = torch.zeros(out, dtype=torch.bool, device=weight.device)
    removed[rows] = True
    keep = (~removed).nonzero().squeeze(1)
    w = weight.to(torch.float64)
    b = bias.to(torch.float64) if bias is not None else None
    if not update or rows.numel() == 0:
        return w[keep], (b[keep] if b is not None else None)
    coupling = torch.linalg.solve(g_inv[rows][:, rows], g_inv[rows][:, keep]).T  # [K, Q]
    new_w = w[keep] - coupling @ w[rows]
    new_b = b[keep] - coupling @ b[rows] if b is not None else None
    return new_w, new_b


def remove_columns(weight: Tensor, a_inv: Tensor, cols: Tensor, *, update: bool = True) -> Tensor:
    """Weights of the kept columns after removing `cols`: W_K ← W_K − W_C·([Ã⁻¹]_CC)⁻¹·[Ã⁻¹]_CK."""
    removed = torch.zeros(weight.shape[1], dtype=torch.bool, device=weight.device)
    removed[cols] = True
    keep = (~removed).nonzero().squeeze(1)
    w = weight.to(torch.float64)
    if not update or cols.numel() == 0:
        return w[:, keep]
    coupling = torch.linalg.solve(a_inv[cols][:, cols], a_inv[cols][:, keep])  # [C, K]
    return w[:, keep] - w[:, cols] @ coupling


def element_costs(weight: Tensor, g_inv_diag: Tensor, a_inv_diag: Tensor) -> Tensor:
    """½·w_rc² / ([G̃⁻¹]_rr·[Ã⁻¹]_cc): the K-FAC OBS cost of zeroing each single weight."""
    w = weight.to(torch.float64)
    return 0.5 * w.square() / torch.outer(g_inv_diag.to(torch.float64), a_inv_diag.to(torch.float64))


def two_four_mask(costs: Tensor) -> Tensor:
    """Keep-mask with the 2 costliest of every 4 consecutive weights of a row (2:4 sparsity)."""
    out, cols = costs.shape
    if cols % 4:
        raise UserError(f"2:4 sparsity needs in_features divisible by 4, got {cols}")
    groups = costs.reshape(out, cols // 4, 4)
    top = groups.topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return mask.reshape(out, cols)


def select_units(costs: Tensor, sizes: Tensor, request: int, *, removable: Tensor | None = None,
                 normalize: str = "params") -> Tensor:
    """Boolean mask of units to remove: the cheapest first, as many as fit in `request` parameters.

    Units are ordered by cost per parameter (`normalize="params"`) or by raw cost ("none", the
    paper's rule for equal-sized rows); ties break towards the lower index. The chosen set is
    the longest prefix of that order whose sizes sum to at most `request`, then every later unit
    that still fits in what is left (walking on in the same order), so it removes exactly
    `request` parameters whenever a prefix does and never stops at one oversized unit. Units where `removable` is False
    (floors) are never chosen.
    """
    if costs.shape != sizes.shape or costs.dim() != 1:
        raise ValueError(f"costs and sizes must be 1-D and alike, got {tuple(costs.shape)}, {tuple(sizes.shape)}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if not torch.isfinite(costs).all():
        raise UserError("pruning costs contain NaN/Inf (overflowing activations or gradients?)")
    key = costs.to(torch.float64).cpu()
    sizes = sizes.to(torch.int64).cpu()
    if normalize == "params":
        key = key / sizes.clamp_min(1)
    allowed = torch.ones_like(sizes, dtype=torch.bool) if removable is None else removable.cpu().bool()
    key = torch.where(allowed, key, torch.full_like(key, math.inf))
    order = torch.sort(key, stable=True).indices
    order = order[allowed[order]]
    ordered_sizes = sizes[order]
    cumulative = ordered_sizes.cumsum(0)
    count = int((cumulative <= request).sum())
    chosen = torch.zeros_like(allowed)
    chosen[order[:count]] = True
    # Past the longest prefix, a unit larger than what is left (a whole KV group, say) is
    # skipped rather than ending the walk: the cheaper-per-parameter smaller units behind it
    # still fit, so the request is met instead of stalling short of it.
    left = request - (int(cumulative[count - 1]) if count else 0)
    for index, size in zip(order[count:].tolist(), ordered_sizes[count:].tolist(), strict=True):
        if left <= 0:
            break
        if size <= left:
            chosen[index] = True
            left -= size
    return chosen


def select_rows_columns(row_costs_per_layer: Sequence[Tensor], col_costs_per_layer: Sequence[Tensor],
                        request: int) -> tuple[list[Tensor], list[Tensor], int]:
    """Rows and columns to zero across layers under one global cost threshold.

    A row of an [n, m] matrix removes m − (columns already removed) parameters and a column
    n − (rows already removed): a row and a column removed together share one element. The
    cheapest rows and columns are taken in order of cost (the paper's global threshold) while
    the parameters actually removed stay within `request`. Returns row masks, column masks and
    the number of parameters removed.
    """
    entries: list[tuple[float, int, int, int]] = []  # (cost, layer, kind 0=row 1=col, index)
    for li, (rc, cc) in enumerate(zip(row_costs_per_layer, col_costs_per_layer, strict=True)):
        entries.extend((c, li, 0, i) for i, c in enumerate(rc.tolist()))
        entries.extend((c, li, 1, i) for i, c in enumerate(cc.tolist()))
    if any(not math.isfinite(e[0]) for e in entries):
        raise UserError("pruning costs contain NaN/Inf (overflowing activations or gradients?)")
    entries.sort()
    rows = [torch.zeros(rc.numel(), dtype=torch.bool) for rc in row_costs_per_layer]
    cols = [torch.zeros(cc.numel(), dtype=torch.bool) for cc in col_costs_per_layer]
    n_rows = [0] * len(rows)
    n_cols = [0] * len(cols)
    removed = 0
    for _, li, kind, idx in entries:
        n, m = rows[li].numel(), cols[li].numel()
        gain = (m - n_cols[li]) if kind == 0 else (n - n_rows[li])
        if removed + gain > request:
            break
        removed += gain
        if kind == 0:
            rows[li][idx] = True
            n_rows[li] += 1
        else:
            cols[li][idx] = True
            n_cols[li] += 1
    return rows, cols, removed


# ============================================================================ configuration
@dataclass
class SurgeonOptions:
    """How the shots prune; every field is stored with the plan."""

    structure: str = "physical"  # one of STRUCTURES
    shots: int = 8  # linear schedule toward the target; curvature recomputed before each
    damp_a: float = 0.1  # Ã = A + damp_a·mean(diag A)·I
    damp_g: float = 0.1  # G̃ = G + damp_g·mean(diag G)·I
    fisher: str = "model"  # "model": labels sampled from the model (true Fisher); "data": empirical
    # Correlated OBS update: "both" is the paper's; row updates lean on G, which hurt on
    # SmolLM2 (docs/surgeon.md: held-out perplexity 49.0 with both, 33.0 with columns only).
    update: str = "columns"
    normalize: str = "params"  # unit ranking: cost per removed parameter, or raw cost ("none")
    prune_heads: bool = True  # physical: prune attention KV groups
    prune_mlp: bool = True  # physical: prune MLP channels
    min_keep: float = 0.1  # physical: per-layer floor of MLP channels kept (fraction)
    min_groups: int = 1  # physical: KV groups every attention layer keeps
    width_multiple: int = 1  # physical: final MLP widths rounded down to a multiple of this
    curvature_samples: int | None = None  # calibration sequences per curvature pass (None: all)
    batch_size: int = 4
    # First-order correction after each shot (0: off). 20 steps/shot took SmolLM2 at 80% from
    # 33.0 to 25.0 held-out perplexity (docs/surgeon.md), for 2.6× the pruning time.
    lora_steps: int = 20
    lora_rank: int = 8
    lora_lr: float = 1e-4
    # LoRA objective: NLL + distill·KL(dense ‖ pruned) on every next-token distribution (compress.distill).
    # The teacher is the model being pruned with its original linears swapped back for one no-grad
    # forward per step, so no copy is held. 0: NLL alone, which fits the calibration text (on SmolLM2
    # and Gemma 3 the pruned model then beats dense on WikiText-2; docs/domains.md).
    distill: float = 0.0
    distill_only: bool = False  # with distill > 0: drop the NLL term
    seed: int = 0

    def __post_init__(self) -> None:
        if self.structure not in STRUCTURES:
            raise UserError(f"unknown surgeon structure {self.structure!r}; choose one of {STRUCTURES}")
        if self.fisher not in FISHER_LABELS:
            raise UserError(f"unknown surgeon fisher {self.fisher!r}; choose one of {FISHER_LABELS}")
        if self.update not in UPDATES:
            raise UserError(f"unknown surgeon update {self.update!r}; choose one of {UPDATES}")
        if self.normalize not in NORMALIZATIONS:
            raise UserError(f"unknown surgeon normalize {self.normalize!r}; choose one of {NORMALIZATIONS}")
        for name in ("damp_a", "damp_g"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise UserError(f"surgeon {name} must be a finite number > 0, got {value!r}")
        for name in ("shots", "batch_size", "width_multiple", "min_groups", "lora_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"surgeon {name} must be a positive integer, got {value!r}")
        if not isinstance(self.lora_steps, int) or self.lora_steps < 0:
            raise UserError(f"surgeon lora_steps must be an integer ≥ 0, got {self.lora_steps!r}")
        check_distill(self.distill, self.distill_only, owner="surgeon ")
        if not 0.0 <= self.min_keep <= 1.0:
            raise UserError(f"surgeon min_keep must be in [0, 1], got {self.min_keep}")
        if self.curvature_samples is not None and self.curvature_samples < 1:
            raise UserError(f"surgeon curvature_samples must be positive, got {self.curvature_samples}")
        if self.structure == "physical" and not (self.prune_heads or self.prune_mlp):
            raise UserError("surgeon: prune_heads and prune_mlp are both off; nothing to prune")


@dataclass
class SurgeonConfig(SurgeonOptions):
    """Pruning options plus run-time options (progress bar, checkpoints for resuming)."""

    progress: bool = True
    checkpoint_dir: str | None = None  # after every shot, the pruned weights are saved here
    resume: bool | None = None  # continue from checkpoint_dir's last shot
    offload: bool = False  # weights in CPU memory, one decoder block at a time on the accelerator
    # The sizes to prune to while scoring (`compress.api.compress` passes its size; the CLI's --size).
    sizes: tuple[float, ...] = ()
    rank_multiple: int = 1  # > 1: the MLP width multiple instead of width_multiple (the CLI's --rank-multiple)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.sizes, (int, float)):
            self.sizes = (self.sizes,)
        self.sizes = tuple(self.sizes)
        for size in self.sizes:
            if isinstance(size, bool) or not isinstance(size, (int, float)) or not 0.0 < float(size) <= 1.0:
                raise UserError(f"size must be a fraction in (0, 1], got {size}")
        self.sizes = tuple(float(size) for size in self.sizes)
        if self.structure == "2:4" and any(abs(float(size) - 0.5) > 1e-9 for size in self.sizes):
            raise UserError("surgeon structure '2:4' keeps exactly half of every targeted matrix; use --size 0.5")
        if not isinstance(self.rank_multiple, int) or isinstance(self.rank_multiple, bool) or self.rank_multiple < 1:
            raise UserError(f"rank_multiple must be a positive integer, got {self.rank_multiple!r}")

    def options(self) -> SurgeonOptions:
        return options_of(self, SurgeonOptions)


# ============================================================================ model structure
# A gated MLP: channels are rows of gate/up and columns of down (lowrank.surgery.GatedMlp).
MlpChannels = GatedMlp


@dataclass(frozen=True)
class AttentionGroups:
    """An attention block's projections; a unit is one KV head with its `group` query heads."""

    q: str
    k: str
    v: str
    o: str
    head_dim: int
    group: int  # query heads per KV head (num_key_value_groups)


def find_units(model: nn.Module) -> tuple[dict[str, AttentionGroups], dict[str, MlpChannels]]:
    """Attention blocks and gated MLPs inside the decoder blocks, by module name, in model order.

    Recognises the Llama-family layout (q/k/v/o_proj under an attention module that knows its
    head_dim, gate/up/down_proj under one parent): Llama, Qwen2/3, Mistral, Gemma, ...
    """
    linears, mlps = dense_mlp_linears(model, "surgeon")
    factorized = [n for n, m in linears.items() if isinstance(m, LowRankLinear)]
    if factorized:
        raise UserError(f"surgeon prunes dense linears; {factorized[0]} is already factorized "
                        "(run surgeon before any low-rank method)")
    parts: dict[str, dict[str, str]] = {}
    for name in linears:
        parent, _, leaf = name.rpartition(".")
        parts.setdefault(parent, {})[leaf] = name
    attentions: dict[str, AttentionGroups] = {}
    for parent, d in parts.items():
        if all(k in d for k in ("q_proj", "k_proj", "v_proj", "o_proj")):
            module = model.get_submodule(parent)
            head_dim = getattr(module, "head_dim", None)
            group = getattr(module, "num_key_value_groups", None)
            q, k, v, o = (linears[d[x]] for x in ("q_proj", "k_proj", "v_proj", "o_proj"))
            if not head_dim or not group:
                raise UserError(f"{parent}: attention module has no head_dim / num_key_value_groups; "
                                "surgeon cannot map its heads")
            kv_heads = k.out_features // head_dim
            if (k.out_features % head_dim or v.out_features != k.out_features
                    or q.out_features != kv_heads * group * head_dim or o.in_features != q.out_features):
                raise UserError(f"{parent}: q/k/v/o shapes ({q.out_features}, {k.out_features}, {v.out_features}, "
                                f"{o.in_features}) do not match head_dim {head_dim} and group size {group}")
            attentions[parent] = AttentionGroups(d["q_proj"], d["k_proj"], d["v_proj"], d["o_proj"],
                                                 int(head_dim), int(group))
    if not attentions and not mlps:
        raise UserError("surgeon needs separate q/k/v/o_proj attention or gate/up/down_proj MLP linears; this "
                        f"model's blocks have {block_linear_names(model)} (fused projections are not supported)")
    return attentions, mlps


def _new_linear(old: nn.Linear, weight: Tensor, bias: Tensor | None) -> nn.Linear:
    # skip_init: the values are copied in below; a random init would only cost time (on the CPU
    # under offload, where it dominated the update of a 7B-shaped layer).
    new = nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=old.bias is not None,
                             device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if old.bias is not None:
            new.bias.copy_(bias if bias is not None else old.bias)
    return new


def _index_mask(n: int, idx: Tensor, device: torch.device) -> Tensor:
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    mask[idx.to(device)] = True
    return mask


# ============================================================================ curvature per shot
def damped_inverse(factor: Tensor, delta: float, name: str) -> Tensor:
    """`spd_inverse(damped(factor, delta))`; where the math fails, a `UserError` that says what to try."""
    try:
        matrix = damped(factor, delta)
    except ValueError as exc:
        raise UserError(f"{exc} (overflowing activations? try --dtype float32)") from None
    try:
        return spd_inverse(matrix, name=name)
    except ValueError as exc:
        raise UserError(f"{exc}; raise the damping (--method-opt damp_a=... / damp_g=...)") from None


class _Curvature:
    """A shot's K-FAC factors and lazily computed, cached damped inverses (float64)."""

    def __init__(self, factors: KfacFactors, damp_a: float, damp_g: float) -> None:
        self.factors = factors
        self.damp_a, self.damp_g = damp_a, damp_g
        self._a_inv: dict[int, Tensor] = {}
        self._g_inv: dict[str, Tensor] = {}
        self.inverse_seconds = 0.0

    def a(self, name: str) -> Tensor:
        return self.factors.input_grams[name]

    def g(self, name: str) -> Tensor:
        return self.factors.output_grams[name]

    def a_inv(self, name: str) -> Tensor:
        a = self.a(name)
        key = id(a)  # layers that share an input share its inverse
        if key not in self._a_inv:
            t0 = time.perf_counter()
            self._a_inv[key] = damped_inverse(a, self.damp_a, f"{name} (A)")
            self.inverse_seconds += time.perf_counter() - t0
        return self._a_inv[key]

    def g_inv(self, name: str) -> Tensor:
        if name not in self._g_inv:
            t0 = time.perf_counter()
            self._g_inv[name] = damped_inverse(self.g(name), self.damp_g, f"{name} (G)")
            self.inverse_seconds += time.perf_counter() - t0
        return self._g_inv[name]

    def release(self, name: str) -> None:
        self._g_inv.pop(name, None)


# ============================================================================ physical pruning
def _group_rows(group: int, head_dim: int, unit: int) -> tuple[Tensor, Tensor]:
    """(q rows, k/v rows) of KV group `unit`: query heads unit·group … (unit+1)·group − 1."""
    q = torch.arange(unit * group * head_dim, (unit + 1) * group * head_dim)
    kv = torch.arange(unit * head_dim, (unit + 1) * head_dim)
    return q, kv


@torch.no_grad()
def _physical_units(model: nn.Module, attentions: Mapping[str, AttentionGroups], mlps: Mapping[str, MlpChannels],
                    curv: _Curvature, options: SurgeonOptions) -> list[dict[str, Any]]:
    """Every prunable unit of the current model with its cost, size and whether a floor protects it."""
    units: list[dict[str, Any]] = []
    device = execution_device(model)
    if options.prune_heads:
        for name, att in attentions.items():
            q, k, v, o = (model.get_submodule(n) for n in (att.q, att.k, att.v, att.o))
            # Under offload the weights are in CPU memory: this block's four go to the accelerator.
            qw, kw, vw, ow = (m.weight.to(device) for m in (q, k, v, o))
            kv_heads = k.out_features // att.head_dim
            size = (q.out_features // kv_heads) * (q.in_features + o.out_features) + \
                (k.out_features // kv_heads) * (k.in_features + v.in_features)
            for unit in range(kv_heads):
                q_rows, kv_rows = _group_rows(att.group, att.head_dim, unit)
                q_rows, kv_rows = q_rows.to(device), kv_rows.to(device)
                cost = (row_set_cost(qw, curv.a(att.q), curv.g_inv(att.q), q_rows)
                        + row_set_cost(kw, curv.a(att.k), curv.g_inv(att.k), kv_rows)
                        + row_set_cost(vw, curv.a(att.v), curv.g_inv(att.v), kv_rows)
                        + column_set_cost(ow, curv.g(att.o), curv.a_inv(att.o), q_rows))
                units.append({"kind": "group", "block": name, "index": unit, "cost": cost, "size": size,
                              "count": kv_heads})
    if options.prune_mlp:
        for name, mlp in mlps.items():
            gate, up, down = (model.get_submodule(n) for n in (mlp.gate, mlp.up, mlp.down))
            cost = (row_costs(gate.weight.to(device), curv.a(mlp.gate), curv.g_inv(mlp.gate).diagonal())
                    + row_costs(up.weight.to(device), curv.a(mlp.up), curv.g_inv(mlp.up).diagonal())
                    + column_costs(down.weight.to(device), curv.g(mlp.down), curv.a_inv(mlp.down).diagonal()))
            size = gate.in_features + up.in_features + down.out_features
            for j, c in enumerate(cost.tolist()):
                units.append({"kind": "channel", "block": name, "index": j, "cost": c, "size": size,
                              "count": down.in_features})
    return units


def _floors(units: Sequence[dict[str, Any]], options: SurgeonOptions, dense_widths: Mapping[str, int]) -> Tensor:
    """Which units may go: each layer keeps its `min_keep` channels / `min_groups` groups, cheapest go first."""
    removable = torch.ones(len(units), dtype=torch.bool)
    by_layer: dict[tuple[str, str], list[int]] = {}
    for i, u in enumerate(units):
        by_layer.setdefault((u["kind"], u["block"]), []).append(i)
    for (kind, block), idx in by_layer.items():
        count = units[idx[0]]["count"]
        if kind == "group":
            floor = min(options.min_groups, count)
        else:
            floor = min(count, max(1, math.ceil(options.min_keep * dense_widths[block] - 1e-9)))
        spare = max(0, count - floor)
        # The layer's `floor` costliest units are protected; its cheapest `spare` may compete.
        costs = torch.tensor([units[i]["cost"] / units[i]["size"] for i in idx], dtype=torch.float64)
        order = torch.sort(costs, stable=True).indices
        for pos in order[spare:].tolist():
            removable[idx[pos]] = False
    return removable


def _align_widths(units: Sequence[dict[str, Any]], chosen: Tensor, multiple: int,
                  floors: Tensor) -> Tensor:
    """Final shot: round each MLP's kept width down to a multiple by removing its next cheapest channels."""
    if multiple <= 1:
        return chosen
    chosen = chosen.clone()
    by_block: dict[str, list[int]] = {}
    for i, u in enumerate(units):
        if u["kind"] == "channel":
            by_block.setdefault(u["block"], []).append(i)
    for idx in by_block.values():
        count = units[idx[0]]["count"]
        kept = count - int(chosen[idx].sum())
        extra = kept - (kept // multiple) * multiple
        if extra == 0 or kept // multiple == 0:
            continue
        candidates = [i for i in sorted(idx, key=lambda i: units[i]["cost"]) if not chosen[i] and floors[i]]
        for i in candidates[:extra]:
            chosen[i] = True
    return chosen


@torch.no_grad()
def _apply_physical_(model: nn.Module, attentions: Mapping[str, AttentionGroups], mlps: Mapping[str, MlpChannels],
                     units: Sequence[dict[str, Any]], chosen: Tensor, curv: _Curvature, update: str) -> int:
    """Remove the chosen units with the correlated update; replace each touched linear by a narrower one."""
    removed_rows: dict[str, list[Tensor]] = {}
    removed_cols: dict[str, list[Tensor]] = {}
    for u, take in zip(units, chosen.tolist(), strict=True):
        if not take:
            continue
        if u["kind"] == "group":
            att = attentions[u["block"]]
            q_rows, kv_rows = _group_rows(att.group, att.head_dim, u["index"])
            removed_rows.setdefault(att.q, []).append(q_rows)
            removed_rows.setdefault(att.k, []).append(kv_rows)
            removed_rows.setdefault(att.v, []).append(kv_rows)
            removed_cols.setdefault(att.o, []).append(q_rows)
        else:
            mlp = mlps[u["block"]]
            j = torch.tensor([u["index"]])
            removed_rows.setdefault(mlp.gate, []).append(j)
            removed_rows.setdefault(mlp.up, []).append(j)
            removed_cols.setdefault(mlp.down, []).append(j)
    removed = 0
    # The update runs where the curvature is (the accelerator under offload), one layer at a time;
    # _new_linear copies the result into a new layer beside the old one (in CPU memory under offload).
    for name, parts in removed_rows.items():
        old = model.get_submodule(name)
        g_inv = curv.g_inv(name)
        rows = torch.cat(parts).unique().to(g_inv.device)
        bias = old.bias.to(g_inv.device) if old.bias is not None else None
        w, b = remove_rows(old.weight.to(g_inv.device), g_inv, rows, bias, update=update in ("both", "rows"))
        removed += old.weight.numel() - w.numel()
        replace_module_(model, name, _new_linear(old, w, b))
        curv.release(name)
    for name, parts in removed_cols.items():
        old = model.get_submodule(name)
        a_inv = curv.a_inv(name)
        cols = torch.cat(parts).unique().to(a_inv.device)
        w = remove_columns(old.weight.to(a_inv.device), a_inv, cols, update=update in ("both", "columns"))
        removed += old.weight.numel() - w.numel()
        replace_module_(model, name, _new_linear(old, w, old.bias))
    return removed


# ============================================================================ zeroed pruning
class _Masks:
    """Zeroed structures of the non-physical modes: a keep-mask per targeted linear."""

    def __init__(self, model: nn.Module, names: Iterable[str]) -> None:
        self.masks = {n: torch.ones_like(model.get_submodule(n).weight, dtype=torch.bool) for n in names}

    def kept(self) -> int:
        return sum(int(m.sum()) for m in self.masks.values())


@torch.no_grad()
def _zeroed_shot_(model: nn.Module, masks: _Masks, curv: _Curvature, request: int, options: SurgeonOptions) -> int:
    """One shot of the zeroed modes; returns the weights newly zeroed.

    The math runs where the layer's curvature is (the accelerator under offload), one layer's
    weight and mask there at a time; weights are updated in place where they live, and masks
    stay beside them.
    """
    names = list(masks.masks)
    if options.structure == "rows-cols":
        active_rows, active_cols, row_c, col_c = [], [], [], []
        for n in names:
            dev = curv.a(n).device
            mask = masks.masks[n].to(dev)
            rows_alive = mask.any(1).nonzero().squeeze(1)
            cols_alive = mask.any(0).nonzero().squeeze(1)
            if rows_alive.numel() == 0 or cols_alive.numel() == 0:  # a matrix already zeroed whole
                empty = torch.zeros(0, dtype=torch.float64)
                row_c.append(empty)
                col_c.append(empty)
                active_rows.append((rows_alive, None))
                active_cols.append((cols_alive, None))
                continue
            w = model.get_submodule(n).weight.to(dev)[rows_alive][:, cols_alive]
            g_inv = damped_inverse(curv.g(n)[rows_alive][:, rows_alive], options.damp_g, f"{n} (G)")
            a_inv = damped_inverse(curv.a(n)[cols_alive][:, cols_alive], options.damp_a, f"{n} (A)")
            row_c.append(row_costs(w, curv.a(n)[cols_alive][:, cols_alive], g_inv.diagonal()).cpu())
            col_c.append(column_costs(w, curv.g(n)[rows_alive][:, rows_alive], a_inv.diagonal()).cpu())
            active_rows.append((rows_alive, g_inv))
            active_cols.append((cols_alive, a_inv))
        rows, cols, removed = select_rows_columns(row_c, col_c, request)
        for n, (rows_alive, g_inv), (cols_alive, a_inv), r, c in zip(names, active_rows, active_cols, rows, cols,
                                                                     strict=True):
            if not (r.any() or c.any()):
                continue
            module = model.get_submodule(n)
            dev = rows_alive.device
            w = module.weight.to(dev)[rows_alive][:, cols_alive].to(torch.float64)
            r_idx = r.nonzero().squeeze(1).to(w.device)
            c_idx = c.nonzero().squeeze(1).to(w.device)
            bias = module.bias.to(dev)[rows_alive] if module.bias is not None else None
            # Rows first (their update spans all live columns), then columns on what is left.
            w_rows, b_rows = remove_rows(w, g_inv, r_idx, bias, update=options.update in ("both", "rows"))
            keep_r = (~_index_mask(w.shape[0], r_idx, w.device)).nonzero().squeeze(1)
            w_both = remove_columns(w_rows, a_inv, c_idx, update=options.update in ("both", "columns"))
            keep_c = (~_index_mask(w.shape[1], c_idx, w.device)).nonzero().squeeze(1)
            new = torch.zeros_like(module.weight, dtype=torch.float64, device=dev)
            new[rows_alive[keep_r][:, None], cols_alive[keep_c][None, :]] = w_both
            module.weight.copy_(new)
            if bias is not None:
                new_bias = torch.zeros_like(module.bias, device=dev)
                new_bias[rows_alive[keep_r]] = b_rows.to(new_bias.dtype)
                module.bias.copy_(new_bias)
            old_mask = masks.masks[n]
            mask = torch.zeros_like(old_mask, device=dev)
            mask[rows_alive[keep_r][:, None], cols_alive[keep_c][None, :]] = True
            masks.masks[n] = (mask & old_mask.to(dev)).to(old_mask.device)
        return removed
    # Single weights: one global threshold over K-FAC element costs (unstructured), or 2:4.
    costs = {}
    for n in names:
        g_inv_diag = curv.g_inv(n).diagonal()
        w = model.get_submodule(n).weight.to(g_inv_diag.device)
        c = element_costs(w, g_inv_diag, curv.a_inv(n).diagonal())
        # fp64 costs of every weight: kept beside the mask (in CPU memory under offload).
        mask = masks.masks[n]
        costs[n] = c.to(mask.device).masked_fill(~mask, math.inf)
        curv.release(n)
    removed = 0
    if options.structure == "2:4":
        for n in names:
            keep = two_four_mask(costs[n])
            removed += int((masks.masks[n] & ~keep).sum())
            masks.masks[n] &= keep
    else:
        flat = torch.cat([c.flatten().cpu() for c in costs.values()])
        alive = torch.isfinite(flat)
        if request > 0:
            threshold = torch.kthvalue(flat[alive], min(request, int(alive.sum()))).values
            for n in names:
                new = masks.masks[n] & (costs[n] > threshold.to(costs[n].device))
                removed += int((masks.masks[n] & ~new).sum())
                masks.masks[n] = new
    for n in names:
        module = model.get_submodule(n)
        module.weight.mul_(masks.masks[n])
    return removed


# ============================================================================ LoRA correction
@torch.no_grad()
def _teacher_logits(model: nn.Module, batch: Tensor, dense_modules: Mapping[str, nn.Module]) -> Tensor:
    """The dense model's logits: `model` with its original linears swapped back in for one forward."""
    with targets_restored(model):  # the pruned modules (and their LoRA hooks) come back on exit
        for name, module in dense_modules.items():
            replace_module_(model, name, module)
        return model(input_ids=batch, use_cache=False).logits


@torch.enable_grad()
def _lora_correction_(model: nn.Module, chunks: Tensor, names: Sequence[str], options: SurgeonOptions,
                      masks: _Masks | None, progress: bool,
                      dense_modules: Mapping[str, nn.Module] | None = None) -> float:
    """Fit a rank-r LoRA per targeted linear for a few steps, then merge it into the weights.

    In the zeroed modes the merged update is multiplied by the keep-mask, so pruned weights
    stay zero; in physical mode pruned structures no longer exist. Returns the last loss.
    Under offload the adapters live on the accelerator and each merge goes to the CPU-resident weight.
    With `options.distill` > 0 the loss adds KL to the dense model, whose linears `dense_modules` holds.
    """
    if options.distill and dense_modules is None:
        raise ValueError("distill needs the dense model's linears (dense_modules)")
    device = execution_device(model)
    gen = torch.Generator(device="cpu").manual_seed(options.seed)
    adapters: dict[str, tuple[Tensor, Tensor]] = {}
    handles = []
    for n in names:
        module = model.get_submodule(n)
        a = (torch.randn(options.lora_rank, module.in_features, generator=gen) / math.sqrt(module.in_features))
        a = a.to(device=device, dtype=torch.float32).requires_grad_(True)
        b = torch.zeros(module.out_features, options.lora_rank, device=device, dtype=torch.float32,
                        requires_grad=True)
        adapters[n] = (a, b)

        def hook(mod: nn.Module, args: tuple, out: Tensor, a=a, b=b) -> Tensor:
            x = args[0]
            return out + ((x.to(torch.float32) @ a.T) @ b.T).to(out.dtype)

        handles.append(module.register_forward_hook(hook))
    params = [t for pair in adapters.values() for t in pair]
    opt = torch.optim.AdamW(params, lr=options.lora_lr, weight_decay=0.0)
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    last = float("nan")
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        step = 0
        while step < options.lora_steps:
            for batch in iterate_batches(chunks, options.batch_size, device, progress=False):
                teacher = _teacher_logits(model, batch, dense_modules) if options.distill else None
                logits = model(input_ids=batch, use_cache=False).logits
                loss = nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), batch[:, 1:].flatten())
                if teacher is not None:
                    loss = training_loss(loss, distill_loss(logits, teacher), options.distill, options.distill_only)
                    del teacher
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                last = float(loss.detach())
                step += 1
                if step >= options.lora_steps:
                    break
    finally:
        for h in handles:
            h.remove()
        for p, flag in frozen:
            p.requires_grad_(flag)
    with torch.no_grad():
        for n, (a, b) in adapters.items():
            module = model.get_submodule(n)
            delta = (b @ a).to(device=module.weight.device, dtype=module.weight.dtype)
            if masks is not None:
                delta = delta * masks.masks[n]
            module.weight.add_(delta)
    return last


# ============================================================================ the shot loop
def _current_params(model: nn.Module, names: Iterable[str]) -> int:
    return sum(model.get_submodule(n).weight.numel() for n in names)


def _save_shot(directory: Path, model: nn.Module, shot: int, masks: _Masks | None, meta: dict[str, Any]) -> None:
    """Atomically write the state after `shot`: every targeted linear's weights (and masks)."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    for n, m in target_linears(model).items():
        tensors[f"{n}.weight"] = m.weight.detach().contiguous().cpu()
        if m.bias is not None:
            tensors[f"{n}.bias"] = m.bias.detach().contiguous().cpu()
    if masks is not None:
        tensors.update({f"{n}.mask": m.to(torch.uint8).contiguous().cpu() for n, m in masks.masks.items()})
    tmp = directory / "state.safetensors.tmp"
    save_file(tensors, str(tmp))
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, directory / "state.safetensors")
    (directory / "state.json.tmp").write_text(json.dumps({"shot": shot, **meta}, indent=2))
    os.replace(directory / "state.json.tmp", directory / "state.json")


def _load_shot(directory: Path, model: nn.Module, masks: _Masks | None, meta: dict[str, Any]) -> int:
    """Restore the state `_save_shot` wrote; returns the last completed shot (0 when there is none)."""
    if not (directory / "state.json").is_file():
        return 0
    state = json.loads((directory / "state.json").read_text())
    for key, value in meta.items():
        if state.get(key) != value:
            raise UserError(f"{directory}: the surgeon checkpoint was written with {key}={state.get(key)!r}, "
                            f"this run asks for {value!r}; use another --checkpoint-dir")
    tensors = load_file(str(directory / "state.safetensors"))
    with torch.no_grad():
        for n, old in target_linears(model).items():
            if f"{n}.weight" not in tensors:
                raise UserError(f"{directory}: surgeon checkpoint lacks {n}")
            w = tensors[f"{n}.weight"].to(old.weight.device, old.weight.dtype)
            b = tensors.get(f"{n}.bias")
            replace_module_(model, n, _new_linear(old, w, b.to(w.device, w.dtype) if b is not None else None))
            if masks is not None:
                masks.masks[n] = tensors[f"{n}.mask"].to(w.device).bool()
    return int(state["shot"])


def surgeon_prune_(model: nn.Module, chunks: Tensor, size: float, options: SurgeonOptions, *,
                   progress: bool = True, checkpoint_dir: str | os.PathLike | None = None,
                   resume: bool = False) -> dict[str, Any]:
    """Prune `model` in place to `size` of its targeted linear weights in `options.shots` shots.

    Physical mode shrinks the matrices (new, narrower nn.Linear modules; the originals are
    never modified), the other modes zero weights in place. Returns per-shot statistics.
    """
    if chunks is None or chunks.dim() != 2 or chunks.shape[0] == 0 or chunks.shape[1] < 2:
        raise UserError("surgeon needs calibration token ids of shape [n ≥ 1, seq_len ≥ 2]")
    attentions, mlps = find_units(model)
    dense_shapes = record_dense_shapes(model)
    dense_modules = dict(target_linears(model))  # never modified: pruning and LoRA work on new modules
    names = list(dense_modules)
    dense_total = sum(dense_shapes[n][0] * dense_shapes[n][1] for n in names)
    dense_widths = {b: dense_shapes[m.down][1] for b, m in mlps.items()}
    physical = options.structure == "physical"
    masks = None if physical else _Masks(model, names)
    # Zeroing and the LoRA merge change weights in place: work on copies, so the caller's
    # modules stay untouched (`temporarily_materialized` puts them back afterwards).
    if not physical or options.lora_steps:
        for n in names:
            old = model.get_submodule(n)
            replace_module_(model, n, _new_linear(old, old.weight.detach().clone(), old.bias))
    device = execution_device(model)
    calib = chunks if options.curvature_samples is None else chunks[: options.curvature_samples]
    shots = 1 if options.structure == "2:4" else options.shots
    meta = {"size": size, "options": dataclasses.asdict(options), "tokens": int(chunks.numel())}
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    start = _load_shot(ckpt, model, masks, meta) + 1 if (ckpt is not None and resume) else 1
    stats: list[dict[str, Any]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=shots, initial=start - 1, desc="surgeon", unit="shot")
    for shot in range(start, shots + 1):
        target_kept = round(dense_total * (1.0 - (1.0 - size) * shot / shots))
        kept_now = _current_params(model, names) if physical else masks.kept()
        request = kept_now - target_kept
        if request <= 0 and options.structure != "2:4":
            if bar is not None:
                bar.update(1)
            continue
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        factors = collect_kfac(model, calib, target_linears(model), labels=options.fisher,
                               batch_size=options.batch_size, seed=options.seed + shot, progress=False)
        curv = _Curvature(factors, options.damp_a, options.damp_g)
        t1 = time.perf_counter()
        if physical:
            units = _physical_units(model, attentions, mlps, curv, options)
            removable = _floors(units, options, dense_widths)
            costs = torch.tensor([u["cost"] for u in units], dtype=torch.float64)
            sizes = torch.tensor([u["size"] for u in units], dtype=torch.int64)
            chosen = select_units(costs, sizes, request, removable=removable, normalize=options.normalize)
            if shot == shots:
                chosen = _align_widths(units, chosen, options.width_multiple, removable)
            t2 = time.perf_counter()
            removed = _apply_physical_(model, attentions, mlps, units, chosen, curv, options.update)
            detail = {"groups": int(sum(c for c, u in zip(chosen.tolist(), units, strict=True)
                                        if u["kind"] == "group")),
                      "channels": int(sum(c for c, u in zip(chosen.tolist(), units, strict=True)
                                          if u["kind"] == "channel"))}
        else:
            t2 = t1  # the zeroed modes interleave costs and updates per layer
            removed = _zeroed_shot_(model, masks, curv, request, options)
            detail = {}
        _sync(device)
        t3 = time.perf_counter()
        lora_loss = None
        if options.lora_steps:
            lora_loss = _lora_correction_(model, calib, list(target_linears(model)), options, masks, progress,
                                          dense_modules)
        _sync(device)
        t4 = time.perf_counter()
        factor_bytes = sum(t.numel() * t.element_size() for t in
                           {id(t): t for t in [*factors.input_grams.values(),
                                               *factors.output_grams.values()]}.values())
        stats.append({
            "shot": shot, "target_kept": target_kept, "removed": removed, **detail,
            "curvature_seconds": round(factors.seconds, 4),
            "inverse_seconds": round(curv.inverse_seconds, 4),
            "cost_select_seconds": round(t2 - t1, 4),  # includes the inverses computed for costs
            "update_seconds": round(t3 - t2, 4),
            "lora_seconds": round(t4 - t3, 4), "lora_loss": lora_loss,
            "shot_seconds": round(t4 - t0, 4), "factor_bytes": factor_bytes,
            "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        })
        del factors, curv
        if ckpt is not None:
            _save_shot(ckpt, model, shot, masks, meta)
        if bar is not None:
            kept = _current_params(model, names) if physical else masks.kept()
            bar.set_postfix(size=f"{kept / dense_total:.3f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    kept = _current_params(model, names) if physical else masks.kept()
    if size <= 0.99 and kept >= dense_total:
        # Never hand back (and let the CLI save) an unpruned model as a compressed one.
        raise UserError(f"surgeon removed nothing at size {size} (no {'unit' if physical else 'weight'} of "
                        f"{block_linear_names(model)} could be pruned within the options' floors); nothing written")
    zeroed = 0 if physical else _current_params(model, names) - kept
    return {"shots": stats, "kept_fraction": kept / dense_total, "zeroed_params": zeroed,
            "structure": options.structure}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ============================================================================ plan
@dataclass
class PrunedSize:
    """One size's pruning: every targeted linear's weight (and bias) after the last shot, and the shots' stats."""

    weights: dict[str, Tensor]
    biases: dict[str, Tensor]  # the linears that have one
    stats: dict[str, Any]


@register_plan_type("surgeon")
@dataclass
class SurgeonPlan(PlanBase):
    """Surgeon's plan: the pruned weights at each size it was scored for, and the options that pruned them.

    Each shot's curvature depends on the model pruned so far, so the pruning of a size runs in
    `score_surgeon`, from the dense model, for the sizes asked; `materialize_` puts one in place.
    """

    pruned: dict[float, PrunedSize]
    options: SurgeonOptions = field(default_factory=SurgeonOptions)
    metadata: dict[str, Any] = field(default_factory=dict)
    method: str = "surgeon"
    last_stats: dict[str, Any] = field(default_factory=dict)

    @property
    def sizes_covered(self) -> SizesCovered:
        """The sizes `score_surgeon` pruned to."""
        return SizesCovered(only=tuple(sorted(self.pruned)), owner="this surgeon plan",
                            limit="surgeon prunes while it scores (each shot's curvature depends on the model pruned "
                                  "so far), so its plan holds the sizes it was scored for; score again at this size")

    def materialize_(self, model: nn.Module, size: float, *, rank_multiple: int = 1) -> dict[str, int]:
        """Put the pruned weights of `size` into the dense `model`; returns {linear name: kept weights}.

        `rank_multiple` > 1 (the CLI's --rank-multiple) must be the MLP width multiple the plan was pruned with.
        """
        if isinstance(size, bool) or not isinstance(size, (int, float)) or not 0.0 < float(size) <= 1.0:
            raise UserError(f"size must be a fraction in (0, 1], got {size}")
        if size not in self.sizes_covered:
            raise UserError(self.sizes_covered.refusal([size]))
        if rank_multiple > 1 and rank_multiple != self.options.width_multiple:
            raise UserError(f"this surgeon plan was pruned with MLP width multiple {self.options.width_multiple}, "
                            f"not {rank_multiple}; score again with that multiple")
        result = next(p for s, p in self.pruned.items() if abs(s - float(size)) <= 1e-9)
        targets = target_linears(model)
        missing = [n for n in result.weights if n not in targets]
        if missing:
            raise UserError(f"this plan names layers the model lacks: {missing[:3]} (a plan for another model?)")
        factorized = [n for n in result.weights if not isinstance(targets[n], nn.Linear)]
        if factorized:
            raise UserError(f"{factorized[0]} is already factorized; materialize onto the dense model")
        record_dense_shapes(model)
        with torch.no_grad():
            for name, weight in result.weights.items():
                replace_module_(model, name, _new_linear(targets[name], weight, result.biases.get(name)))
        self.last_stats = result.stats
        return {n: int(m.weight.count_nonzero()) for n, m in target_linears(model).items()}

    def describe(self, model: nn.Module) -> dict[str, Any]:
        """Physical and zeroed accounting of a pruned model, for the CLI report."""
        shapes = recorded_dense_shapes(model) or {}
        attentions, mlps = find_units(model)
        heads = {b: model.get_submodule(a.q).out_features // a.head_dim for b, a in attentions.items()}
        widths = {b: model.get_submodule(m.down).in_features for b, m in mlps.items()}
        linears = target_linears(model)
        stored = sum(m.weight.numel() for m in linears.values())
        nonzero = sum(int(m.weight.count_nonzero()) for m in linears.values())
        dense = sum(o * i for o, i in (shapes.get(n, (m.out_features, m.in_features)) for n, m in linears.items()))
        stats = {k: v for k, v in self.last_stats.items() if k != "shots"}
        shots = self.last_stats.get("shots", [])
        return {
            "surgeon_structure": self.options.structure,
            "surgeon_heads": heads,
            "surgeon_mlp_widths": widths,
            "surgeon_physical_fraction": round(stored / dense, 5),
            "surgeon_zeroed_params": stored - nonzero,
            "surgeon_stats": stats,
            "surgeon_shots": shots,
            "summary": (f"surgeon ({self.options.structure}): stored {stored:,} / {dense:,} targeted weights "
                        f"({100 * stored / dense:.2f}%), of which {stored - nonzero:,} zeroed (not saved); "
                        f"heads {min(heads.values(), default=0)}..{max(heads.values(), default=0)}, "
                        f"MLP widths {min(widths.values(), default=0)}..{max(widths.values(), default=0)}"),
        }

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> Path:
        tensors: dict[str, Tensor] = {}
        sizes = []
        for index, (size, result) in enumerate(self.pruned.items()):
            tensors.update({f"{index}/{n}.weight": w for n, w in result.weights.items()})
            tensors.update({f"{index}/{n}.bias": b for n, b in result.biases.items()})
            sizes.append({"size": size, "layers": list(result.weights), "biases": list(result.biases),
                          "stats": result.stats})
        meta = {"method": self.method, "plan_type": self.plan_type, "options": dataclasses.asdict(self.options),
                "metadata": self.metadata, "pruned": sizes}
        return write_plan_dir(directory, tensors, meta)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> SurgeonPlan:
        """The saved plan; one saved before surgeon pruned while scoring holds no size (`sizes_covered`)."""
        meta, tensors = read_plan_dir(directory, cls.plan_type)
        pruned = {}
        try:
            for index, entry in enumerate(meta.get("pruned", [])):
                pruned[float(entry["size"])] = PrunedSize({n: tensors[f"{index}/{n}.weight"] for n in entry["layers"]},
                                                          {n: tensors[f"{index}/{n}.bias"] for n in entry["biases"]},
                                                          entry.get("stats", {}))
        except KeyError as exc:
            raise UserError(f"{directory}: surgeon plan is incomplete (missing {exc})") from exc
        return cls(pruned, SurgeonOptions(**meta.get("options", {})), meta.get("metadata", {}),
                   meta.get("method", "surgeon"))


def _pruned_copy(model: nn.Module, chunks: Tensor, size: float, options: SurgeonOptions, config: SurgeonConfig,
                 checkpoint_dir: str | None) -> PrunedSize:
    """`surgeon_prune_` at `size`, its weights kept aside (in CPU memory) and `model`'s own layers put back."""
    t0 = time.perf_counter()
    with targets_restored(model):  # the originals are never modified: pruning works on new modules
        stats = surgeon_prune_(model, chunks, size, options, progress=config.progress, checkpoint_dir=checkpoint_dir,
                               resume=bool(config.resume))
        stats["seconds"] = round(time.perf_counter() - t0, 3)
        # Copies: a layer the shots left alone is still the model's own, whose tensors the plan must not share.
        pruned = target_linears(model)
        weights = {n: m.weight.detach().to("cpu", copy=True) for n, m in pruned.items()}
        biases = {n: m.bias.detach().to("cpu", copy=True) for n, m in pruned.items() if m.bias is not None}
    return PrunedSize(weights, biases, stats)


@register_method("surgeon", SurgeonConfig,
                 "LLM Surgeon: K-FAC structured pruning of MLP channels and attention KV groups with correlated "
                 "updates over several shots (--size = kept fraction of targeted linear parameters)",
                 check_model=find_units)
def score_surgeon(model: nn.Module, chunks: Tensor, config: SurgeonConfig) -> SurgeonPlan:
    """Prune a copy of `model`'s targeted linears to each of `config.sizes`; the model itself stays as it is."""
    if chunks is None or chunks.dim() != 2 or chunks.shape[0] == 0 or chunks.shape[1] < 2:
        raise UserError("surgeon needs calibration token ids of shape [n ≥ 1, seq_len ≥ 2]")
    find_units(model)  # fail before any heavy work on a model surgeon cannot handle
    if config.resume and not config.checkpoint_dir:
        raise UserError("--resume needs --checkpoint-dir (or --save-plan) naming the surgeon checkpoint")
    if not config.sizes:
        raise UserError("surgeon prunes while it scores: give the sizes to prune to (sizes=...; "
                        "compress.api.compress passes its size)")
    options = config.options()
    if config.rank_multiple > 1:
        options = dataclasses.replace(options, width_multiple=config.rank_multiple)
    pruned = {}
    with maybe_offloaded(model, config.offload):
        for size in config.sizes:
            where = config.checkpoint_dir
            if where and len(config.sizes) > 1:  # one checkpoint per size: a checkpoint records its size
                where = str(Path(where) / f"size-{size:g}")
            pruned[size] = _pruned_copy(model, chunks, size, options, config, where)
    meta = {"calibration_tokens": int(chunks.numel()), "calibration_sequences": int(chunks.shape[0]),
            "seq_len": int(chunks.shape[1])}
    return SurgeonPlan(pruned, options, meta)
