"""Plans: a method's per-layer decisions, materializable at any size.

A `FactorPlan` holds, for every targeted linear, an ordered set of rank-1 directions
(columns of U, rows of V) and a score for each. Materializing at a size keeps, per layer,
the highest-scored directions:

- ``allocation="uniform"``: every layer keeps the same fraction of its own parameters
  (the `svd` baseline's uniform ranks);
- ``allocation="global"``: one global threshold over all scores, binary-searched so that the
  targeted linears hold `size` of their dense parameters (ACIP, SVD-magnitude).

Layers where a factorization would not save parameters go back to dense, so the size
convention min(r·(m+n), m·n) always describes what is really stored.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from compress.errors import UserError
from lowrank.checkpoint import apply_umask_permissions
from lowrank.faults import fault_point
from lowrank.linear import LowRankLinear
from lowrank.surgery import aligned_rank, replace_module_, target_linears

__all__ = ["PLAN_TYPES", "FactorPlan", "LayerFactors", "plan_dir_type", "ranks_for_size", "read_plan_dir",
           "register_plan_type", "write_plan_dir"]

# FactorPlan subclasses that carry more than factors (e.g. svd-llm's calibration ids, asvd's
# allocation), by class name. A subclass records its name as metadata["plan_type"], and
# `FactorPlan.load` hands such a directory to the subclass's own `load`.
PLAN_TYPES: dict[str, type] = {}


def register_plan_type(cls: type) -> type:
    PLAN_TYPES[cls.__name__] = cls
    return cls


def write_plan_dir(directory: str | os.PathLike, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Path:
    """Write `plan.safetensors` and `plan.json` into `directory`, each atomically (temp file + rename).

    The tensors go first, so a reader that finds plan.json also finds the tensors it describes.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "plan.safetensors.tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    apply_umask_permissions(tmp)  # safetensors writes 0o600
    os.replace(tmp, directory / "plan.safetensors")
    (directory / "plan.json.tmp").write_text(json.dumps(meta, indent=2))
    os.replace(directory / "plan.json.tmp", directory / "plan.json")
    return directory


def plan_dir_type(directory: str | os.PathLike) -> str | None:
    """The `plan_type` recorded in `directory`/plan.json, or None where there is none (or no plan)."""
    path = Path(directory) / "plan.json"
    try:
        return json.loads(path.read_text()).get("plan_type") if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def read_plan_dir(directory: str | os.PathLike, plan_type: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(metadata, tensors) of a plan directory of `plan_type`; `UserError` naming what is missing."""
    directory = Path(directory)
    if plan_dir_type(directory) != plan_type or not (directory / "plan.safetensors").is_file():
        raise UserError(f"{directory} is not a {plan_type} plan directory (needs plan.json and plan.safetensors)")
    return json.loads((directory / "plan.json").read_text()), load_file(str(directory / "plan.safetensors"))


@dataclass
class LayerFactors:
    """Directions of one layer: W ≈ U[:, idx] @ V[idx] for the kept indices idx."""

    U: Tensor  # [out, k] float32
    V: Tensor  # [k, in]  float32
    scores: Tensor  # [k] float32, higher = keep first
    dense_weight: Tensor | None = None  # exact W to fall back to when factorizing saves nothing

    @property
    def shape(self) -> tuple[int, int]:
        return self.U.shape[0], self.V.shape[1]

    def params_at_rank(self, rank: int) -> int:
        out_f, in_f = self.shape
        return min(rank * (out_f + in_f), out_f * in_f)


def ranks_for_size(
    layers: dict[str, LayerFactors], size: float, allocation: str, rank_multiple: int = 1
) -> dict[str, int]:
    """Per-layer ranks whose parameter count is `size` of the dense targeted linears (nearest achievable)."""
    if not 0.0 < size <= 1.0:
        raise UserError(f"size must be in (0, 1], got {size}")
    if allocation == "uniform":
        ranks = {}
        for name, lf in layers.items():
            out_f, in_f = lf.shape
            limit = min(out_f, in_f, lf.U.shape[1])
            if size >= 1.0:
                # The whole budget of the layer: keep it exact (materialize_ stores it dense).
                ranks[name] = limit
                continue
            raw = int(size * out_f * in_f / (out_f + in_f))
            ranks[name] = aligned_rank(max(raw, 1), rank_multiple, limit)
        return ranks
    if allocation != "global":
        raise ValueError(f"unknown allocation {allocation!r}")
    dense_total = sum(lf.shape[0] * lf.shape[1] for lf in layers.values())
    target = size * dense_total
    # All scores, sorted once; the rank of a layer at threshold t = its scores ≥ t.
    names = list(layers)
    sorted_scores = {n: torch.sort(layers[n].scores.float(), descending=True).values for n in names}
    pool = torch.cat([sorted_scores[n] for n in names]).sort(descending=True).values

    def ranks_at(count: int) -> dict[str, int]:
        if count <= 0:
            return {n: 0 for n in names}
        threshold = pool[min(count, pool.numel()) - 1]
        out = {}
        for n in names:
            r = int((sorted_scores[n] >= threshold).sum())
            limit = min(layers[n].shape)
            out[n] = aligned_rank(r, rank_multiple, min(limit, layers[n].U.shape[1])) if r > 0 else 0
        return out

    def params(ranks: dict[str, int]) -> int:
        return sum(layers[n].params_at_rank(r) if r > 0 else 0 for n, r in ranks.items())

    lo, hi = 0, pool.numel()
    while lo < hi:  # largest count whose size stays ≤ target
        mid = (lo + hi + 1) // 2
        if params(ranks_at(mid)) <= target:
            lo = mid
        else:
            hi = mid - 1
    below, above = ranks_at(lo), ranks_at(min(lo + 1, pool.numel()))
    best = below if abs(params(below) - target) <= abs(params(above) - target) else above
    # A layer must keep at least one direction (rank 0 would delete the layer's function).
    return {n: max(r, 1) for n, r in best.items()}


@dataclass
class FactorPlan:
    """Scored factor directions for every targeted linear, plus how to allocate ranks."""

    method: str
    layers: dict[str, LayerFactors]
    allocation: str = "uniform"
    metadata: dict[str, Any] = field(default_factory=dict)

    def ranks(self, size: float, rank_multiple: int = 1) -> dict[str, int]:
        return ranks_for_size(self.layers, size, self.allocation, rank_multiple)

    @torch.no_grad()
    def materialize_(self, model: nn.Module, size: float, *, rank_multiple: int = 1) -> dict[str, int]:
        """Replace each planned layer by its top-scored directions; returns the ranks used."""
        ranks = self.ranks(size, rank_multiple)
        targets = target_linears(model)
        for name, rank in ranks.items():
            module = targets[name]
            lf = self.layers[name]
            out_f, in_f = lf.shape
            dtype = module.U.dtype if isinstance(module, LowRankLinear) else module.weight.dtype
            device = module.U.device if isinstance(module, LowRankLinear) else module.weight.device
            bias = module.bias
            keep = torch.topk(lf.scores.float(), k=min(rank, lf.scores.numel())).indices.sort().values
            U, V = lf.U[:, keep], lf.V[keep]
            if rank * (out_f + in_f) >= out_f * in_f:
                weight = lf.dense_weight if lf.dense_weight is not None else U @ V
                dense = nn.Linear(in_f, out_f, bias=bias is not None, device=device, dtype=dtype)
                dense.weight.copy_(weight.to(device=device, dtype=dtype))
                if bias is not None:
                    dense.bias.copy_(bias)
                replace_module_(model, name, dense)
            else:
                layer = LowRankLinear.from_factors(U.to(device=device, dtype=dtype), V.to(device=device, dtype=dtype),
                                                   bias)
                replace_module_(model, name, layer)
            fault_point("materialize")  # fault suite (tests/compress/test_faults.py); inert otherwise
        return ranks

    # ---------------------------------------------------------------- persistence
    def save(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, Tensor] = {}
        for name, lf in self.layers.items():
            tensors[f"{name}.U"] = lf.U.contiguous()
            tensors[f"{name}.V"] = lf.V.contiguous()
            tensors[f"{name}.scores"] = lf.scores.contiguous()
            if lf.dense_weight is not None:
                tensors[f"{name}.dense_weight"] = lf.dense_weight.contiguous()
        tmp = directory / "plan.safetensors.tmp"
        save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp))
        apply_umask_permissions(tmp)  # safetensors writes 0o600
        os.replace(tmp, directory / "plan.safetensors")
        meta = {"method": self.method, "allocation": self.allocation, "layers": list(self.layers),
                "metadata": self.metadata}
        (directory / "plan.json.tmp").write_text(json.dumps(meta, indent=2))
        os.replace(directory / "plan.json.tmp", directory / "plan.json")
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> FactorPlan:
        directory = Path(directory)
        if not (directory / "plan.json").is_file() or not (directory / "plan.safetensors").is_file():
            raise UserError(f"{directory} is not a plan directory (needs plan.json and plan.safetensors)")
        meta = json.loads((directory / "plan.json").read_text())
        kind = meta.get("metadata", {}).get("plan_type")
        if kind and cls is FactorPlan:
            if kind not in PLAN_TYPES:
                from compress.methods import available_methods

                available_methods()  # method modules register their plan types on import
            if kind not in PLAN_TYPES:
                raise UserError(f"{directory}: unknown plan type {kind!r}")
            return PLAN_TYPES[kind].load(directory)
        tensors = load_file(str(directory / "plan.safetensors"))
        layers = {
            name: LayerFactors(tensors[f"{name}.U"], tensors[f"{name}.V"], tensors[f"{name}.scores"],
                               tensors.get(f"{name}.dense_weight"))
            for name in meta["layers"]
        }
        return cls(meta["method"], layers, meta["allocation"], meta.get("metadata", {}))
