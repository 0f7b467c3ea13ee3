"""SVD-LLM (Wang et al. 2024, arXiv 2403.07378): truncation-aware whitening, then a sequential
closed-form update of the truncated factors. Options, deviations from the paper: docs/baselines.md.

1. Whitening (scoring, shared with the `svd` method: `compress.whitening`). With G = XᵀX = S·Sᵀ
   the Cholesky factorization of a layer's calibration Gram (dense model), truncating the SVD of
   W·S gives W' = U_k·Σ_k·V_kᵀ·S⁻¹, whose error on the layer's outputs is exactly the tail of
   the spectrum. A Gram that is not positive definite is damped by δ·mean(diag G)·I,
   δ = 1e-6, 1e-5, ..., 1e-1 (first that works); the δ of each damped layer is recorded in the
   plan metadata as ``damped_layers``. Ranks are uniform, as in the paper.

2. Sequential update (materialization: it depends on the ranks). Layer by layer in model order,
   with X_c the layer's inputs in the model compressed up to that layer and T its target outputs
   on the same tokens, refit the truncated factors by least squares:

   - ``update_target="dense"`` (default): T = X_d·Wᵀ, the dense model's outputs, so a layer also
     undoes the error that earlier compressed layers put into its inputs;
   - ``update_target="local"``: T = X_c·Wᵀ, the dense layer on the compressed inputs (what the
     authors' code does).

   With G = X_cᵀX_c (+ `update_ridge`·mean(diag)·I, default 0; + δ·mean(diag)·I with the
   same escalation as the whitening, only if still not positive definite) and P = X_cᵀ·T:

   - U-step (V fixed):  U = Pᵀ·Vᵀ·(V·G·Vᵀ)⁻¹
   - V-step (U fixed):  V = (UᵀU)⁻¹·Uᵀ·Pᵀ·G⁻¹            (``update="uv"``; ``"u"`` stops after U)

   Each step minimises J(W') = ‖X_c·W'ᵀ − T‖² + (ridge + δ)·mean(diag)·‖W'‖² over its factor, starting
   from the truncation, so J never rises; a result that is not finite or not better is
   discarded (the truncated factors are kept and the layer is reported). Only Grams are
   accumulated: one Gram of [X_c, X_d] per group of layers that read the same input
   (q/k/v, gate/up) gives G, X_cᵀX_d (so P = X_cᵀX_d·Wᵀ) and ‖T‖² = tr(W·X_dᵀX_d·Wᵀ).

`offload=True` (`--offload`): weights in CPU memory (`compress.streaming`). The whitening
calibrates block by block like `svd`; the update already runs block by block, and each block is
`held` on the accelerator while its layers are refit (its Grams and solves live there too).

The top of this module is pure tensor math; hooks and loops over the model follow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lowrank_kernels.gram import gram_accumulate
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from compress.calibrate import block_output, first_block_inputs, gram_rows
from compress.errors import UserError
from compress.methods import options_of, register_method
from compress.methods.svd import SVDConfig, score_svd
from compress.plan import FactorPlan, register_plan_type
from compress.streaming import execution_device, held, maybe_offloaded
from compress.whitening import cholesky_with_damping
from lowrank.checkpoint import apply_umask_permissions
from lowrank.linear import LowRankLinear, balanced_factors
from lowrank.surgery import decoder_layers, replace_module_, target_linears

__all__ = [
    "UPDATES",
    "UPDATE_TARGETS",
    "SVDLLMConfig",
    "SVDLLMOptions",
    "SVDLLMPlan",
    "factor_error",
    "rebalance_factors",
    "score_svd_llm",
    "update_factors",
]

UPDATES = ("uv", "u", "none")
UPDATE_TARGETS = ("dense", "local")


# ============================================================================ pure tensor math
def factor_error(U: Tensor, V: Tensor, gram: Tensor, cross: Tensor, target_sq: float) -> float:
    """‖X·(U·V)ᵀ − T‖² from G = XᵀX [in, in], P = XᵀT [in, out] and ‖T‖² (float64)."""
    w = U.to(torch.float64) @ V.to(torch.float64)
    value = ((w @ gram.to(torch.float64)) * w).sum() - 2.0 * (w * cross.to(torch.float64).T).sum() + target_sq
    return float(value)


def rebalance_factors(U: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    """Balanced factors (float32, sorted by singular value) of the product U·V, same rank."""
    qu, ru = torch.linalg.qr(U.to(torch.float64))
    qv, rv = torch.linalg.qr(V.to(torch.float64).T)
    u, s, vh = torch.linalg.svd(ru @ rv.T)
    return balanced_factors(qu @ u, s, vh @ qv.T)


def _spd_solve(a: Tensor, b: Tensor, name: str) -> Tensor:
    chol, _ = cholesky_with_damping(a, name)
    return torch.cholesky_solve(b, chol)


def update_factors(
    U: Tensor,
    V: Tensor,
    gram: Tensor,
    cross: Tensor,
    target_sq: float,
    *,
    steps: str = "uv",
    ridge: float = 0.0,
    name: str = "layer",
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """SVD-LLM's closed-form update of truncated factors U [out, k], V [k, in].

    `gram` = X_cᵀX_c, `cross` = X_cᵀT, `target_sq` = ‖T‖². `steps`: "u" (U with V fixed) or
    "uv" (then V with U fixed). `ridge` adds ridge·mean(diag G)·I to G; a further damping δ
    is added only if that is not positive definite (see module docstring). Returns balanced
    float32 factors of the result and a record {"before", "after": errors without ridge or
    damping, "damping": δ, "kept_truncation": bool}.
    """
    if steps not in ("u", "uv"):
        raise ValueError(f"steps must be 'u' or 'uv', got {steps!r}")
    g = gram.to(torch.float64)
    g = 0.5 * (g + g.T)
    p = cross.to(torch.float64)
    if ridge:
        g_ridge = g + ridge * g.diagonal().mean() * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    else:
        g_ridge = g
    chol, delta = cholesky_with_damping(g_ridge, name)
    g_reg = chol @ chol.T  # G + δ·mean(diag G)·I
    u0, v0 = U.to(device=g.device, dtype=torch.float64), V.to(device=g.device, dtype=torch.float64)
    u, v = u0, v0
    # U-step: U·(V·G·Vᵀ) = Pᵀ·Vᵀ, solved as (V·G·Vᵀ)·Uᵀ = V·P.
    vl = v @ chol
    u = _spd_solve(vl @ vl.T, v @ p, name).T
    if steps == "uv":
        # V-step: (UᵀU)·V·G = Uᵀ·Pᵀ  →  V = Y·G⁻¹ with Y = (UᵀU)⁻¹·Uᵀ·Pᵀ.
        y = _spd_solve(u.T @ u, u.T @ p.T, name)
        v = torch.cholesky_solve(y.T, chol).T
    before_reg = factor_error(u0, v0, g_reg, p, target_sq)
    after_reg = factor_error(u, v, g_reg, p, target_sq)
    kept = not (torch.isfinite(u).all() and torch.isfinite(v).all() and after_reg <= before_reg)
    if kept:
        u, v = u0, v0
    record = {
        "before": factor_error(u0, v0, g, p, target_sq),
        "after": factor_error(u, v, g, p, target_sq),
        "damping": delta,
        "kept_truncation": kept,
    }
    U_new, V_new = rebalance_factors(u, v)
    return U_new, V_new, record


# ============================================================================ configuration
@dataclass
class SVDLLMOptions:
    """How the plan materializes; changeable without recalibrating (`SVDLLMPlan.with_options`)."""

    update: str = "uv"  # one of UPDATES: U then V, U only, or no update (whitening only)
    update_target: str = "dense"  # one of UPDATE_TARGETS
    update_samples: int | None = None  # calibration sequences kept for the update (None: all)
    update_ridge: float = 0.0  # λ/mean(diag G) added to every update Gram (0: only the PD fallback)
    batch_size: int = 4  # sequences per block forward in the update

    def __post_init__(self) -> None:
        if self.update not in UPDATES:
            raise UserError(f"svd-llm: unknown update {self.update!r}; choose one of {UPDATES}")
        if self.update_target not in UPDATE_TARGETS:
            raise UserError(f"svd-llm: unknown update_target {self.update_target!r}; "
                            f"choose one of {UPDATE_TARGETS}")
        if self.update_samples is not None and (not isinstance(self.update_samples, int)
                                                or self.update_samples < 1):
            raise UserError(f"svd-llm: update_samples must be a positive int or None, got {self.update_samples!r}")
        if not (isinstance(self.update_ridge, (int, float)) and math.isfinite(self.update_ridge)
                and self.update_ridge >= 0):
            raise UserError(f"svd-llm: update_ridge must be a finite number ≥ 0, got {self.update_ridge!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise UserError(f"svd-llm: batch_size must be a positive int, got {self.batch_size!r}")


@dataclass
class SVDLLMConfig(SVDLLMOptions):
    """Scoring options (`batch_size` is also the calibration batch) plus materialization defaults."""

    progress: bool = True
    offload: bool = False  # weights in CPU memory, one decoder block at a time on the accelerator
    gram_shrink: float = 0.0  # the whitening's Gram shrinkage toward the plain SVD (as `svd`; 0 = off)

    def options(self) -> SVDLLMOptions:
        return options_of(self, SVDLLMOptions)


# ============================================================================ plan
_IDS_FILE = "calibration_ids.safetensors"


@register_plan_type("SVDLLMPlan")
@dataclass
class SVDLLMPlan(FactorPlan):
    """Whitened full-rank factors (as `svd`) plus the calibration ids the sequential update replays."""

    calibration_ids: Tensor | None = None
    options: SVDLLMOptions = field(default_factory=SVDLLMOptions)
    progress: bool = True
    last_stats: dict[str, Any] = field(default_factory=dict)
    offload: bool = False  # run the update with the weights in CPU memory (not saved with the plan)

    def with_options(self, **changes: Any) -> SVDLLMPlan:
        """A plan sharing these factors that materializes with other options (validated)."""
        return dataclasses.replace(self, options=dataclasses.replace(self.options, **changes), last_stats={})

    @torch.no_grad()
    def materialize_(self, model: nn.Module, size: float, *, rank_multiple: int = 1) -> dict[str, int]:
        """Truncate every layer to its uniform rank, then (unless update="none") refit it sequentially."""
        if self.options.update == "none":
            self.last_stats = {}
            return super().materialize_(model, size, rank_multiple=rank_multiple)
        ranks = self.ranks(size, rank_multiple)
        if self.calibration_ids is None or self.calibration_ids.numel() == 0:
            raise UserError("svd-llm: this plan holds no calibration ids for the update; "
                            "materialize with update='none' or rescore")
        t0 = time.perf_counter()
        with maybe_offloaded(model, self.offload):
            records = _sequential_update_(model, self, ranks)
            _sync(model)
        rel = [(r["before"] / r["target"], r["after"] / r["target"]) for r in records.values() if r["target"] > 0]
        self.last_stats = {
            "update": self.options.update,
            "update_target": self.options.update_target,
            "update_layers": len(records),
            "update_seconds": round(time.perf_counter() - t0, 4),
            "mean_rel_error_before": round(sum(b for b, _ in rel) / max(len(rel), 1), 6),
            "mean_rel_error_after": round(sum(a for _, a in rel) / max(len(rel), 1), 6),
            "update_damped_layers": {n: r["damping"] for n, r in records.items() if r["damping"]},
            "update_rejected_layers": [n for n, r in records.items() if r["kept_truncation"]],
            "layers": records,
        }
        return ranks

    def describe(self, model: nn.Module) -> dict[str, Any]:
        """The update's accounting, for the CLI report (per-layer records stay in `last_stats`)."""
        stats = {k: v for k, v in self.last_stats.items() if k != "layers"}
        if not stats:
            return {"svd_llm_update": "none"}
        summary = (f"svd-llm update ({stats['update']}, target {stats['update_target']}): "
                   f"{stats['update_layers']} layers, mean relative output error "
                   f"{stats['mean_rel_error_before']:.4g} -> {stats['mean_rel_error_after']:.4g} "
                   f"in {stats['update_seconds']:.1f} s")
        return {**{f"svd_llm_{k}": v for k, v in stats.items()}, "summary": summary}

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> Path:
        self.metadata["options"] = dataclasses.asdict(self.options)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # The ids first: plan.json, written last, marks a complete directory.
        ids = self.calibration_ids if self.calibration_ids is not None else torch.zeros(0, 0, dtype=torch.int64)
        tmp = directory / (_IDS_FILE + ".tmp")
        save_file({"ids": ids.detach().cpu().to(torch.int64).contiguous()}, str(tmp))
        apply_umask_permissions(tmp)  # safetensors writes 0o600
        os.replace(tmp, directory / _IDS_FILE)
        return super().save(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> SVDLLMPlan:
        plan = super().load(directory)
        path = Path(directory) / _IDS_FILE
        if not path.is_file():
            raise UserError(f"{directory}: svd-llm plan is incomplete (missing {_IDS_FILE})")
        plan.calibration_ids = load_file(str(path))["ids"]
        plan.options = SVDLLMOptions(**plan.metadata.get("options", {}))
        return plan


def _sync(model: nn.Module) -> None:
    device = execution_device(model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ============================================================================ scoring
@register_method("svd-llm", SVDLLMConfig,
                 "SVD-LLM: whitened truncated SVD with uniform ranks, then a sequential closed-form "
                 "update of U and V (docs/baselines.md)")
def score_svd_llm(model: nn.Module, chunks: Tensor, config: SVDLLMConfig) -> SVDLLMPlan:
    """Whitening as `svd` (one calibration pass); keeps the first `update_samples` sequences for the update."""
    if chunks is None or chunks.dim() != 2 or chunks.shape[0] == 0:
        raise UserError("svd-llm needs calibration token ids of shape [n ≥ 1, seq_len]")
    options = config.options()
    base = score_svd(model, chunks, SVDConfig(batch_size=config.batch_size, progress=config.progress,
                                              offload=config.offload, gram_shrink=config.gram_shrink))
    ids = chunks if options.update_samples is None else chunks[: options.update_samples]
    meta = {**base.metadata, "options": dataclasses.asdict(options),
            "update_sequences": int(ids.shape[0])}
    return SVDLLMPlan("svd-llm", base.layers, "uniform", meta, calibration_ids=ids.detach().cpu().to(torch.int64),
                      options=options, progress=config.progress, offload=config.offload)


# ============================================================================ sequential update
class _Captured(Exception):
    """Raised by a pre-hook to end a block's forward once the wanted input is seen."""


def _capture_input(block: nn.Module, x: Tensor, kwargs: dict, module: nn.Module) -> Tensor:
    """The input `module` receives when `block` runs on `x` (the forward stops there)."""
    seen: list[Tensor] = []

    def hook(mod: nn.Module, args: tuple) -> None:
        seen.append(args[0])
        raise _Captured

    handle = module.register_forward_pre_hook(hook)
    try:
        block(x, **kwargs)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError("svd-llm: a decoder block finished without calling one of its linears")
    return seen[0]


def _input_groups(block: nn.Module, x: Tensor, kwargs: dict, modules: dict[str, nn.Module]) -> list[list[str]]:
    """`modules` in execution order, grouped where consecutive layers read the very same input tensor."""
    calls: list[tuple[str, Tensor]] = []
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: calls.append((n, args[0])))
               for n, m in modules.items()]
    try:
        block(x, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    seen: set[str] = set()
    previous: Tensor | None = None
    for name, tensor in calls:
        if name in seen:
            continue
        seen.add(name)
        if groups and tensor is previous:
            groups[-1].append(name)
        else:
            groups.append([name])
        previous = tensor
    missing = [n for n in modules if n not in seen]
    if missing:
        raise RuntimeError(f"svd-llm: these layers never ran in their decoder block: {missing[:3]}")
    return groups


@contextlib.contextmanager
def _swapped(model: nn.Module, modules: dict[str, nn.Module]) -> Iterator[None]:
    old = {n: replace_module_(model, n, m) for n, m in modules.items()}
    try:
        yield
    finally:
        for n, m in old.items():
            replace_module_(model, n, m)


def _block_index(name: str, prefix: str) -> int:
    return int(name[len(prefix) + 1:].split(".", 1)[0])


def _sequential_update_(model: nn.Module, plan: SVDLLMPlan, ranks: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Replace every factorized layer block by block, refitting it on the compressed model's own inputs.

    Two hidden-state streams run through the blocks: x_d (dense model) and x_c (model compressed
    up to the current block). In block ℓ, the layers are processed in execution order, one
    group of same-input layers at a time: the group's inputs are captured on both streams (the
    dense stream with the block's original layers swapped back in), then each layer of the
    group is refit (`update_factors`) and replaced. Layers whose rank saves nothing stay dense.
    """
    opts = plan.options
    targets = target_linears(model)
    missing = [n for n in plan.layers if n not in targets]
    if missing:
        raise UserError(f"this plan names layers the model lacks: {missing[:3]} (a plan for another model?)")
    factored = [n for n in plan.layers if isinstance(targets[n], LowRankLinear)]
    if factored:
        raise UserError(f"svd-llm: {factored[0]} is already factorized; materialize onto the dense model")
    for n, lf in plan.layers.items():
        if (targets[n].out_features, targets[n].in_features) != lf.shape:
            raise UserError(f"{n}: plan shape {lf.shape} does not match the model's layer "
                            f"{(targets[n].out_features, targets[n].in_features)}")
    prefix, blocks = decoder_layers(model)
    todo: dict[int, dict[str, nn.Module]] = {}
    for n, rank in ranks.items():
        out_f, in_f = plan.layers[n].shape
        if rank * (out_f + in_f) < out_f * in_f:
            todo.setdefault(_block_index(n, prefix), {})[n] = targets[n]
    dense_x: list[Tensor] = []
    kwargs: list[dict] = []
    for x, kw in first_block_inputs(model, plan.calibration_ids, opts.batch_size):
        dense_x.append(x)
        kwargs.append(kw)
    comp_x = list(dense_x)
    records: dict[str, dict[str, Any]] = {}

    def through(block: nn.Module, xs: list[Tensor]) -> list[Tensor]:
        return [block_output(block(x, **kw)) for x, kw in zip(xs, kwargs, strict=True)]

    indices: Any = range(len(blocks))
    if plan.progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc="svd-llm update", unit="block", leave=False)
    for i in indices:
        # Under offload the block stays on the accelerator for all of its forwards and refits
        # (one transfer per block); `module.weight` below is then the accelerator copy.
        with held(blocks[i]):
            dense_x, comp_x = _update_block_(model, plan, ranks, blocks[i], todo.get(i, {}), dense_x, comp_x,
                                             kwargs, through, records)
    return records


def _update_block_(model: nn.Module, plan: SVDLLMPlan, ranks: dict[str, int], block: nn.Module,
                   originals: dict[str, nn.Module], dense_x: list[Tensor], comp_x: list[Tensor], kwargs: list[dict],
                   through: Any, records: dict[str, dict[str, Any]]) -> tuple[list[Tensor], list[Tensor]]:
    """Refit block `block`'s factorized layers; returns both streams' outputs of the block."""
    opts = plan.options
    if not originals:
        return through(block, dense_x), through(block, comp_x)
    next_dense = through(block, dense_x)  # the block is still dense here
    replaced: dict[str, nn.Module] = {}
    for group in _input_groups(block, comp_x[0], kwargs[0], originals):
        first = originals[group[0]]
        width = first.in_features
        use_dense = opts.update_target == "dense"
        size = 2 * width if use_dense else width
        gram = torch.zeros(size, size, dtype=torch.float32, device=first.weight.device)
        for b, kw in enumerate(kwargs):
            x_c = gram_rows(_capture_input(block, comp_x[b], kw, first))
            if use_dense:
                with _swapped(model, {n: originals[n] for n in replaced}):
                    x_d = gram_rows(_capture_input(block, dense_x[b], kw, first))
                x_c = torch.cat([x_c, x_d.to(x_c.dtype)], dim=-1)
            gram_accumulate(gram, x_c)
        g64 = gram.to(torch.float64)
        g_cc = g64[:width, :width]
        g_cd = g64[:width, width:] if use_dense else g_cc
        g_dd = g64[width:, width:] if use_dense else g_cc
        del gram
        for n in group:
            module = originals[n]
            w = module.weight.detach().to(device=g64.device, dtype=torch.float64)
            cross = g_cd @ w.T
            target_sq = float(((w @ g_dd) * w).sum())
            lf = plan.layers[n]
            keep = torch.topk(lf.scores.float(), k=min(ranks[n], lf.scores.numel())).indices.sort().values
            try:
                U, V, record = update_factors(lf.U[:, keep], lf.V[keep], g_cc, cross, target_sq,
                                              steps=opts.update, ridge=opts.update_ridge, name=n)
            except ValueError as exc:
                raise UserError(f"svd-llm update: {exc}") from exc
            record["target"] = target_sq
            records[n] = record
            dtype, device = module.weight.dtype, module.weight.device
            layer = LowRankLinear.from_factors(U.to(device=device, dtype=dtype), V.to(device=device, dtype=dtype),
                                               module.bias)
            replace_module_(model, n, layer)
            replaced[n] = layer
    return next_dense, through(block, comp_x)
