"""Plans: what a method's scoring decides, materializable into a model; the `Plan` protocol.

Every method's ``score(model, chunks, config)`` returns a `Plan`: it materializes a size into a
model (`materialize_`), says which sizes it covers (`sizes_covered`, `supports_any_size`), and
saves itself to a directory that `compress.api.load_plan` reads back. Plan classes register a
type name here (`register_plan_type`); each directory records it, and loading goes through that
one registry.

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

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from compress.errors import UserError
from lowrank.checkpoint import apply_umask_permissions
from lowrank.faults import fault_point
from lowrank.linear import LowRankLinear
from lowrank.surgery import aligned_rank, replace_module_, target_linears, targets_restored

__all__ = ["COVERAGE_SLACK", "PLAN_TYPES", "FactorPlan", "LayerFactors", "Plan", "PlanBase", "SizesCovered",
           "ranks_for_size", "read_plan_dir", "recorded_plan_type", "register_plan_type", "temporarily_materialized",
           "write_plan_dir"]

# A requested size may undershoot the lowest size a plan covers by this much (rounding of a stop
# criterion, rank alignment) before it is refused.
COVERAGE_SLACK = 0.005


@dataclass(frozen=True)
class SizesCovered:
    """The sizes (fractions of the targeted linears' dense parameters) a plan materializes.

    Every size in [`lowest`, 1] (down to `COVERAGE_SLACK` below `lowest`), or, where `only` is
    not None, exactly those sizes (none for an empty tuple). `owner` and `limit` word a refusal:
    what the plan is ("this score map") and what bounds it, with how to go further.
    """

    lowest: float = 0.0
    only: tuple[float, ...] | None = None
    owner: str = "this plan"
    limit: str = ""

    def __contains__(self, size: object) -> bool:
        if isinstance(size, bool) or not isinstance(size, (int, float)):
            return False
        if self.only is not None:
            return any(abs(float(size) - s) <= 1e-9 for s in self.only)
        return float(size) >= self.lowest - COVERAGE_SLACK

    def refusal(self, sizes: Sequence[float]) -> str:
        """One line refusing those of `sizes` that are not covered."""
        uncovered = [s for s in sizes if s not in self]
        one = len(uncovered) == 1
        shown = f"size {uncovered[0]} is" if one else f"sizes {uncovered} are"
        if self.only is not None:
            listed = ", ".join(f"{s:g}" for s in self.only) or "none"
            line = f"{shown} not among the sizes {self.owner} covers ({listed})"
        else:
            line = f"{shown} below what {self.owner} covers"
        return f"{line}: {self.limit}" if self.limit else line


@runtime_checkable
class Plan(Protocol):
    """What every method's `score` returns, and all that the API and the CLI ask of it."""

    method: str  # the registered method that scored it

    @property
    def supports_any_size(self) -> bool:
        """True where `sizes_covered` is a range (every size from its lowest to 1); False where the plan
        holds a fixed set of sizes (surgeon, which prunes while it scores; 2:4 sparsity)."""
        ...

    @property
    def sizes_covered(self) -> SizesCovered:
        """The sizes `materialize_` accepts."""
        ...

    def materialize_(self, model: nn.Module, size: float, **options: Any) -> dict[str, int]:
        """Compress `model` in place to `size`; returns a per-layer account (ranks, widths or kept weights)."""
        ...

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the plan into `directory`, recording its registered type; returns the directory."""
        ...

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Plan:
        """The plan `save` wrote into `directory`."""
        ...


class PlanBase:
    """What the registered plan classes share: the type name and JSON file `register_plan_type` sets on
    them, and coverage of every size in (0, 1], which a class that covers fewer overrides."""

    plan_type: ClassVar[str]
    plan_file: ClassVar[str]

    @property
    def supports_any_size(self) -> bool:
        # Derived, so that a class states its coverage once (in `sizes_covered`).
        return self.sizes_covered.only is None

    @property
    def sizes_covered(self) -> SizesCovered:
        return SizesCovered()


# The plan types, by the name each directory records ("plan_type" in its JSON file). A plan class
# registers itself with `register_plan_type`; `compress.api.load_plan` looks the name up here.
PLAN_TYPES: dict[str, type] = {}
# Per JSON file name, the type of a directory whose JSON records none: formats written before
# plans recorded their type (svd and svd-plain plans; score maps).
_UNTYPED: dict[str, str] = {}


def register_plan_type(name: str, *, plan_file: str = "plan.json",
                       untyped: bool = False) -> Callable[[type], type]:
    """Class decorator: register a `Plan` class as `name`, saved with its metadata in `plan_file`.

    `untyped`: a directory whose `plan_file` records no type holds this class (older formats).
    """

    def decorator(cls: type) -> type:
        if PLAN_TYPES.get(name, cls) is not cls:
            raise ValueError(f"plan type {name!r} is already registered to {PLAN_TYPES[name].__name__}")
        cls.plan_type = name
        cls.plan_file = plan_file
        PLAN_TYPES[name] = cls
        if untyped:
            _UNTYPED[plan_file] = name
        return cls

    return decorator


def recorded_plan_type(directory: str | os.PathLike) -> str:
    """The registered plan type `directory` holds, as its JSON records it; `UserError` where it holds no plan.

    Older directories are read too: svd-llm and asvd plans recorded the type inside "metadata", and
    svd / svd-plain plans and score maps none (`register_plan_type(..., untyped=True)`).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"score map / plan directory not found: {directory}")
    for plan_file in dict.fromkeys(cls.plan_file for cls in PLAN_TYPES.values()):
        path = directory / plan_file
        if not path.is_file():
            continue
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError):
            meta = None  # the class's own `load` names what is wrong with the file
        if isinstance(meta, dict):
            inner = meta.get("metadata")
            kind = meta.get("plan_type") or (inner.get("plan_type") if isinstance(inner, dict) else None)
            if kind:
                if kind not in PLAN_TYPES:
                    raise UserError(f"{directory}: unknown plan type {kind!r}")
                return kind
        if plan_file in _UNTYPED:
            return _UNTYPED[plan_file]
    raise UserError(f"{directory} is not a plan directory (needs plan.json and plan.safetensors)")


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


def read_plan_dir(directory: str | os.PathLike, plan_type: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(metadata, tensors) of a plan directory of `plan_type`; `UserError` naming what is missing."""
    directory = Path(directory)
    meta = json.loads((directory / "plan.json").read_text()) if (directory / "plan.json").is_file() else None
    tensors = directory / "plan.safetensors"
    if not isinstance(meta, dict) or meta.get("plan_type") != plan_type or not tensors.is_file():
        raise UserError(f"{directory} is not a {plan_type} plan directory (needs plan.json and plan.safetensors)")
    return meta, load_file(str(tensors))


@contextlib.contextmanager
def temporarily_materialized(model: nn.Module, plan: Plan, size: float, **kwargs: Any) -> Iterator[dict]:
    """Materialize `plan` at `size` in `model`, and put the original layers back on exit.

    The original modules are only swapped out, never modified, so evaluating many sizes from
    one loaded model costs one materialization per size and no reload.
    """
    with targets_restored(model):
        yield plan.materialize_(model, size, **kwargs)


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


@register_plan_type("FactorPlan", untyped=True)
@dataclass
class FactorPlan(PlanBase):
    """Scored factor directions for every targeted linear, plus how to allocate ranks; any size in (0, 1]."""

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
        tensors: dict[str, Tensor] = {}
        for name, lf in self.layers.items():
            tensors[f"{name}.U"] = lf.U
            tensors[f"{name}.V"] = lf.V
            tensors[f"{name}.scores"] = lf.scores
            if lf.dense_weight is not None:
                tensors[f"{name}.dense_weight"] = lf.dense_weight
        meta = {"plan_type": self.plan_type, "method": self.method, "allocation": self.allocation,
                "layers": list(self.layers), "metadata": self.metadata}
        return write_plan_dir(directory, tensors, meta)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> FactorPlan:
        """The plan in `directory`, as this class (`compress.api.load_plan` picks the class a directory records)."""
        directory = Path(directory)
        if not (directory / "plan.json").is_file() or not (directory / "plan.safetensors").is_file():
            raise UserError(f"{directory} is not a plan directory (needs plan.json and plan.safetensors)")
        meta = json.loads((directory / "plan.json").read_text())
        tensors = load_file(str(directory / "plan.safetensors"))
        layers = {
            name: LayerFactors(tensors[f"{name}.U"], tensors[f"{name}.V"], tensors[f"{name}.scores"],
                               tensors.get(f"{name}.dense_weight"))
            for name in meta["layers"]
        }
        return cls(meta["method"], layers, meta["allocation"], meta.get("metadata", {}))
