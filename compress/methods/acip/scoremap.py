"""The score map: one artifact from which a model of any size is materialized without data.

A score-map directory holds

- ``scoremap.safetensors``: per targeted linear ``{name}.U`` [m, k], ``{name}.s`` [k],
  ``{name}.Vh`` [k, n] with W = U·diag(s)·Vh (its SVD; in the whitened basis the SVD of W·S,
  with Vh = Q̂ᵀ·S⁻¹, whose rows are not orthonormal), ``{name}.scores`` [k] and, for ACIP,
  the LoRA branch ``{name}.lora_A`` [r, n] and ``{name}.lora_B`` [m, r];
- ``scoremap.json``: format version, method, LoRA scaling, coverage, the identity of the
  model it was computed on (architecture, layer names and shapes, a weight fingerprint) and
  the run's metadata. It is written last, so its presence marks a complete directory.

Materializing at a size ρ keeps the globally best-scored singular triplets (the number kept
is binary-searched so the targeted linears hold ρ of their dense weights, LoRA rank
included), folds the LoRA branch into each layer with `LowRankLinear.merge_lora`, and turns
layers whose factorization would save nothing back into dense ones.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from compress.errors import UserError
from compress.methods.acip.functional import Segments, Selection, global_order, select_for_size, size_for_counts
from compress.plan import PlanBase, SizesCovered, register_plan_type
from lowrank.checkpoint import apply_umask_permissions
from lowrank.faults import fault_point
from lowrank.linear import LowRankLinear
from lowrank.surgery import replace_module_, target_linears

__all__ = [
    "FORMAT_VERSION",
    "ScoreMap",
    "ScoreMapLayer",
    "ScoreMapMismatch",
    "check_identity",
    "is_score_map_dir",
    "model_identity",
]

FORMAT_VERSION = 1
JSON_NAME = "scoremap.json"
TENSORS_NAME = "scoremap.safetensors"


class ScoreMapMismatch(UserError):
    """The score map was computed on a different model than the one given."""


# ---------------------------------------------------------------------------- model identity
def _fingerprint_tensor(weight: Tensor, samples: int = 16) -> list[float]:
    w = weight.detach().float().reshape(-1)
    idx = torch.linspace(0, w.numel() - 1, samples).round().long().to(w.device)
    return [float(w.abs().mean()), float(w.std())] + [float(v) for v in w[idx].cpu()]


def model_identity(model: nn.Module, names: list[str] | None = None) -> dict[str, Any]:
    """Architecture, targeted layer names/shapes and a weight fingerprint of `model`.

    The fingerprint (mean |w|, std and 16 fixed entries of the first, middle and last target)
    tolerates a change of dtype (bf16 vs fp32 loads of the same checkpoint) but not another
    checkpoint of the same architecture.
    """
    targets = target_linears(model)
    names = list(targets) if names is None else names
    config = getattr(model, "config", None)
    picks = sorted({names[0], names[len(names) // 2], names[-1]}) if names else []
    fingerprint = {}
    for n in picks:
        weight = getattr(targets[n], "weight", None)
        if weight is not None and weight.device.type != "meta":
            fingerprint[n] = _fingerprint_tensor(weight)
    return {
        "architecture": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "name_or_path": str(getattr(config, "_name_or_path", "") or ""),
        "hidden_size": getattr(config, "hidden_size", None),
        "num_hidden_layers": getattr(config, "num_hidden_layers", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "layers": {n: [targets[n].out_features, targets[n].in_features] for n in names},
        "fingerprint": fingerprint,
    }


def check_identity(stored: dict[str, Any], model: nn.Module) -> None:
    """Raise `ScoreMapMismatch` with a precise reason if `model` is not the model `stored` describes."""
    what = stored.get("name_or_path") or stored.get("architecture")
    current = model_identity(model, names=None)
    for key in ("architecture", "model_type", "hidden_size", "num_hidden_layers", "vocab_size"):
        if stored.get(key) is not None and current.get(key) is not None and stored[key] != current[key]:
            raise ScoreMapMismatch(
                f"score map was computed on another model ({what}): {key} is {stored[key]!r} there "
                f"but {current[key]!r} here"
            )
    layers = stored.get("layers", {})
    missing = [n for n in layers if n not in current["layers"]]
    if missing:
        raise ScoreMapMismatch(f"score map was computed on another model ({what}): this model has no layer "
                               f"{missing[0]!r}")
    for name, shape in layers.items():
        if list(current["layers"][name]) != list(shape):
            raise ScoreMapMismatch(
                f"score map was computed on another model ({what}): {name} is {tuple(shape)} there but "
                f"{tuple(current['layers'][name])} here"
            )
    targets = target_linears(model)
    for name, expected in stored.get("fingerprint", {}).items():
        weight = getattr(targets.get(name), "weight", None)
        if weight is None or weight.device.type == "meta":
            continue
        got = _fingerprint_tensor(weight)
        # bf16 rounding moves each value by ≤ 0.4 %; another checkpoint moves them completely.
        scale = max(abs(v) for v in expected[:2]) or 1.0
        for a, b in zip(expected, got, strict=False):
            if abs(a - b) > 0.02 * max(abs(a), abs(b)) + 1e-3 * scale:
                raise ScoreMapMismatch(
                    f"score map was computed on another model ({what}): the weights of {name} differ "
                    "(same architecture, different checkpoint)"
                )


# ---------------------------------------------------------------------------- the artifact
@dataclass
class ScoreMapLayer:
    U: Tensor  # [m, k]
    s: Tensor  # [k] float32
    Vh: Tensor  # [k, n]; W = U·diag(s)·Vh (rows orthonormal only in the plain basis)
    scores: Tensor  # [k] float32, higher = kept longer
    lora_A: Tensor | None = None  # [r, n]
    lora_B: Tensor | None = None  # [m, r]

    @property
    def shape(self) -> tuple[int, int]:
        return self.U.shape[0], self.Vh.shape[1]


@register_plan_type("scoremap", plan_file=JSON_NAME, untyped=True)
@dataclass
class ScoreMap(PlanBase):
    """Scored SVD triplets (plus LoRA branches) of every targeted linear; materializable at any size."""


    method: str
    layers: dict[str, ScoreMapLayer]
    identity: dict[str, Any]
    lora_scaling: float = 0.0
    coverage: str = "all"  # "all": any size; "scores": only down to where pruning stopped (ACIP)
    metadata: dict[str, Any] = field(default_factory=dict)
    _ranking: tuple[Tensor, Tensor, list[Tensor]] | None = field(default=None, repr=False, compare=False)

    # ------------------------------------------------------------------ structure
    @property
    def names(self) -> list[str]:
        return list(self.layers)

    @property
    def segments(self) -> Segments:
        return Segments.from_shapes([lf.shape for lf in self.layers.values()])

    @property
    def lora_rank(self) -> int:
        first = next(iter(self.layers.values()))
        return 0 if first.lora_A is None else int(first.lora_A.shape[0])

    def to(self, device: torch.device | str) -> ScoreMap:
        """Move all tensors (in place) to `device`, e.g. to materialize repeatedly on a GPU."""
        for lf in self.layers.values():
            for key in ("U", "s", "Vh", "scores", "lora_A", "lora_B"):
                value = getattr(lf, key)
                if value is not None:
                    setattr(lf, key, value.to(device))
        return self

    def _rank(self) -> tuple[Tensor, Tensor, list[Tensor]]:
        """(layer of each ranked entry, global order, per-layer local positions best first); cached."""
        if self._ranking is None:
            scores = torch.cat([lf.scores.float().cpu() for lf in self.layers.values()])
            singular = torch.cat([lf.s.float().cpu() for lf in self.layers.values()])
            order = global_order(scores, singular)
            segments = self.segments
            layer_of_entry = segments.layer_index()
            layer_of_ranked = layer_of_entry[order]
            # Group the global order by layer, keeping rank order inside each group.
            grouped = order[torch.sort(layer_of_ranked, stable=True).indices]
            local = []
            pieces = torch.split(grouped, list(segments.lengths))
            for offset, chunk in zip(segments.offsets, pieces, strict=True):
                local.append(chunk - offset)
            self._ranking = (layer_of_ranked, order, local)
        return self._ranking

    def min_size(self) -> float:
        """Smallest size this score map covers (for ACIP: where pruning stopped)."""
        if self.coverage == "all":
            return 0.0
        scores = torch.cat([lf.scores.float().cpu() for lf in self.layers.values()])
        layer_of_ranked, _, _ = self._rank()
        alive = int((scores > 0).sum())
        counts = torch.bincount(layer_of_ranked[:alive], minlength=len(self.layers))
        return size_for_counts(counts, self.segments, extra_rank=self.lora_rank)

    @property
    def sizes_covered(self) -> SizesCovered:
        """Down to `min_size()`: for ACIP, where its pruning stopped."""
        low = self.min_size()
        stop = self.metadata.get("stop_ratio")
        hint = f"; the run's stop ratio was {stop}" if stop else ""
        return SizesCovered(lowest=low, owner="this score map",
                            limit=f"it ranks singular values only down to size {low:.3f}{hint}; rerun the scoring "
                                  "with a lower stop ratio to go smaller")

    # ------------------------------------------------------------------ selection
    def select(self, size: float, *, rank_multiple: int = 1) -> Selection:
        """Per-layer ranks whose parameter count is nearest `size` of the dense targeted linears."""
        if isinstance(size, bool) or not isinstance(size, (int, float)) or not 0.0 < float(size) <= 1.0:
            raise UserError(f"size must be a fraction in (0, 1], got {size}")
        if rank_multiple < 1:
            raise UserError(f"rank_multiple must be at least 1, got {rank_multiple}")
        coverage = self.sizes_covered
        if size not in coverage:
            raise UserError(coverage.refusal([size]))
        layer_of_ranked, _, _ = self._rank()
        min_count = 0 if self.lora_rank > 0 else 1  # a layer must keep something to compute
        return select_for_size(layer_of_ranked, self.segments, float(size), extra_rank=self.lora_rank,
                               rank_multiple=rank_multiple, min_count=min_count)

    def ranks(self, size: float, rank_multiple: int = 1) -> dict[str, int]:
        sel = self.select(size, rank_multiple=rank_multiple)
        return {n: int(r) for n, r in zip(self.layers, sel.ranks, strict=True)}

    def size_at(self, size: float, rank_multiple: int = 1) -> float:
        """Size (fraction of dense targeted weights) that materializing at `size` really gives."""
        return self.select(size, rank_multiple=rank_multiple).size

    # ------------------------------------------------------------------ materialization
    def check_model(self, model: nn.Module) -> None:
        check_identity(self.identity, model)

    @torch.no_grad()
    def materialize_(
        self,
        model: nn.Module,
        size: float,
        *,
        rank_multiple: int = 1,
        reset: bool = True,
        device: torch.device | str | None = None,
        check: bool = True,
    ) -> dict[str, int]:
        """Replace every targeted linear of the (original, dense) `model` by its size-`size` version.

        `reset` applies the paper's reset rule: a layer whose factorization would save nothing
        goes back to its original weights, without its LoRA branch, instead of to the dense
        product of its kept triplets plus LoRA. It is on by default: on SmolLM2 it was better at
        every size with the whitened basis (docs/acip.md), and size 1.0 gives back the original
        model. Returns {name: stored rank}; dense layers
        report min(m, n). `device` overrides where new layers live (default: the old layer's).
        """
        targets = target_linears(model)
        for name in self.layers:
            if name in targets and not isinstance(targets[name], nn.Linear):
                raise UserError(f"{name} is already compressed ({type(targets[name]).__name__}); materialize "
                                "needs the original dense model")
        if check:
            self.check_model(model)
        selection = self.select(size, rank_multiple=rank_multiple)
        _, _, local = self._rank()
        ranks: dict[str, int] = {}
        for i, (name, lf) in enumerate(self.layers.items()):
            module = targets[name]
            count = int(selection.counts[i])
            ranks[name] = self._materialize_layer(model, name, module, lf, local[i], count, reset, device)
            fault_point("materialize")  # fault suite (tests/compress/test_faults.py); inert otherwise
        return ranks

    def _materialize_layer(self, model: nn.Module, name: str, module: nn.Linear, lf: ScoreMapLayer,
                           local_order: Tensor, count: int, reset: bool, device) -> int:
        # Speed matters here (any size should take well under a second for a small model on a
        # CPU), so every step allocates once and nothing is cloned twice.
        out_f, in_f = lf.shape
        rank = count + self.lora_rank
        has_weight = module.weight.device.type != "meta"
        dtype = module.weight.dtype
        target_device = torch.device(device) if device is not None else module.weight.device
        work = lf.U.device  # compute where the factors are (CPU, or GPU after .to())
        bias = module.bias
        if bias is not None:
            bias = None if bias.device.type == "meta" else bias.detach().to(target_device)
        if rank * (out_f + in_f) >= out_f * in_f:
            if reset and has_weight:
                return min(out_f, in_f)  # reset rule: the original layer stays, as it is
            weight = self._dense_weight(module, lf, local_order[:count].to(work), has_weight, work)
            dense = nn.Linear(in_f, out_f, bias=bias is not None, device="meta", dtype=dtype)
            dense.weight = nn.Parameter(weight.to(device=target_device, dtype=dtype), requires_grad=False)
            if bias is not None:
                dense.bias = nn.Parameter(bias.clone(), requires_grad=False)
            replace_module_(model, name, dense)
            return min(out_f, in_f)
        kept = local_order[:count].sort().values.to(work)  # SVD order: leading directions first
        if count > 0:
            root = lf.s.index_select(0, kept).float().clamp_min_(0).sqrt_()
            U = lf.U.index_select(1, kept).float().mul_(root)
            V = lf.Vh.index_select(0, kept).float().mul_(root[:, None])
            factory = {"device": target_device, "dtype": dtype}
            layer = _lowrank_from(U.to(**factory), V.to(**factory), bias)
            if self.lora_rank > 0:
                layer.merge_lora(lf.lora_A.to(target_device), lf.lora_B.to(target_device), self.lora_scaling)
        else:  # nothing kept: the layer is its LoRA branch alone
            root = math.sqrt(abs(self.lora_scaling))
            sign = 1.0 if self.lora_scaling >= 0 else -1.0
            layer = _lowrank_from((lf.lora_B.float() * (root * sign)).to(target_device, dtype),
                                  (lf.lora_A.float() * root).to(target_device, dtype), bias)
        replace_module_(model, name, layer)
        return layer.rank

    def _dense_weight(self, module: nn.Linear, lf: ScoreMapLayer, kept: Tensor, has_weight: bool,
                      work: torch.device) -> Tensor:
        # W' = U_K·diag(s_K)·Vh_K + scaling·B·A. When few triplets are pruned, W − U_P·diag(s_P)·Vh_P
        # is the same matrix for less work (and nearer the original: the SVD's rounding cancels).
        k = lf.s.numel()
        if has_weight and k - kept.numel() < kept.numel():
            mask = torch.ones(k, dtype=torch.bool, device=work)
            mask[kept] = False
            pruned = mask.nonzero().squeeze(1)
            weight = module.weight.detach().to(device=work, dtype=torch.float32)
            if pruned.numel():
                left = lf.U.index_select(1, pruned).float().mul_(lf.s.index_select(0, pruned).float())
                weight = torch.addmm(weight, left, lf.Vh.index_select(0, pruned).float(), alpha=-1.0)
            else:
                weight = weight.clone()  # never share (or, below, update) the original's storage
        else:
            left = lf.U.index_select(1, kept).float().mul_(lf.s.index_select(0, kept).float())
            weight = left @ lf.Vh.index_select(0, kept).float()
        if self.lora_rank > 0:
            weight.addmm_(lf.lora_B.float(), lf.lora_A.float(), alpha=self.lora_scaling)
        return weight

    # ------------------------------------------------------------------ variants
    def singular_value_map(self) -> ScoreMap:
        """The svd-magnitude baseline on the same factors: scores = singular values, no LoRA.

        On a whitened-basis score map this ranks whitened singular values globally: SVD-LLM's
        truncation with a global instead of a uniform rank allocation.
        """
        layers = {n: ScoreMapLayer(lf.U, lf.s, lf.Vh, lf.s.float().clone()) for n, lf in self.layers.items()}
        return ScoreMap("svd-magnitude", layers, self.identity, 0.0, "all",
                        {"derived_from": self.method, "basis": self.metadata.get("basis", "plain")})

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, Tensor] = {}
        for name, lf in self.layers.items():
            for key in ("U", "s", "Vh", "scores", "lora_A", "lora_B"):
                value = getattr(lf, key)
                if value is not None:
                    tensors[f"{name}.{key}"] = value.detach().cpu().contiguous()
        # The JSON goes last and both files are renamed into place: a reader never sees a
        # complete-looking directory whose tensors are from another run.
        (directory / JSON_NAME).unlink(missing_ok=True)
        tmp = directory / (TENSORS_NAME + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "lowrank-scoremap", "version": str(FORMAT_VERSION)})
        apply_umask_permissions(tmp)  # safetensors writes 0o600
        os.replace(tmp, directory / TENSORS_NAME)
        meta = {
            "plan_type": self.plan_type,
            "format": "lowrank-scoremap",
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "layers": self.names,
            "lora_scaling": self.lora_scaling,
            "lora_rank": self.lora_rank,
            "coverage": self.coverage,
            "min_size": round(self.min_size(), 6),
            "identity": self.identity,
            "metadata": self.metadata,
        }
        tmp_json = directory / (JSON_NAME + ".tmp")
        tmp_json.write_text(json.dumps(meta, indent=2, default=str) + "\n")
        os.replace(tmp_json, directory / JSON_NAME)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, *, device: torch.device | str = "cpu") -> ScoreMap:
        directory = Path(directory)
        if not is_score_map_dir(directory):
            raise UserError(f"{directory} is not a score-map directory "
                            f"(needs {JSON_NAME} and {TENSORS_NAME})")
        try:
            meta = json.loads((directory / JSON_NAME).read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{directory / JSON_NAME} is not valid JSON: {exc.msg}") from exc
        if not isinstance(meta, dict) or not isinstance(meta.get("layers"), list) or "method" not in meta \
                or "identity" not in meta:
            raise UserError(f"{directory / JSON_NAME} does not describe a score map "
                            "(an object with method, layers and identity)")
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise UserError(f"score map format {meta.get('format_version')} is newer than this toolkit "
                            f"supports ({FORMAT_VERSION})")
        try:
            tensors = load_file(str(directory / TENSORS_NAME), device=str(device))
        except Exception as exc:  # truncated or foreign file: one line for the user
            raise UserError(f"cannot read {directory / TENSORS_NAME}: {exc}") from exc
        layers = {}
        for name in meta["layers"]:
            try:
                layers[name] = ScoreMapLayer(
                    tensors[f"{name}.U"], tensors[f"{name}.s"], tensors[f"{name}.Vh"],
                    tensors[f"{name}.scores"],
                    tensors.get(f"{name}.lora_A"), tensors.get(f"{name}.lora_B"),
                )
            except KeyError as exc:
                raise UserError(f"{directory / TENSORS_NAME} lacks tensor {exc.args[0]}") from exc
        return cls(meta["method"], layers, meta["identity"], float(meta.get("lora_scaling", 0.0)),
                   meta.get("coverage", "all"), meta.get("metadata", {}))


def _lowrank_from(U: Tensor, V: Tensor, bias: Tensor | None) -> LowRankLinear:
    """A frozen LowRankLinear that takes ownership of U and V (`from_factors` would copy them)."""
    layer = LowRankLinear(V.shape[1], U.shape[0], U.shape[1], bias=bias is not None, device="meta",
                          dtype=U.dtype)
    layer.U = nn.Parameter(U.contiguous(), requires_grad=False)
    layer.V = nn.Parameter(V.contiguous(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(U.dtype).clone(), requires_grad=False)
    return layer


def is_score_map_dir(directory: str | os.PathLike) -> bool:
    directory = Path(directory)
    return (directory / JSON_NAME).is_file() and (directory / TENSORS_NAME).is_file()
