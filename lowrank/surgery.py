"""Model surgery: find target linears, swap modules by name, and account for size in one place.

Size convention (the ACIP paper's): a layer of rank r with m inputs and n outputs counts
min(r·(m+n), m·n) parameters, since a factorization that saves nothing is kept dense.
`size_report` is the only function that counts; every method and the CLI call it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from lowrank.linear import LowRankLinear

__all__ = [
    "SizeReport",
    "aligned_rank",
    "block_linear_names",
    "decoder_layers",
    "expert_structure",
    "factorize_",
    "GatedMlp",
    "gated_mlps",
    "get_module",
    "layer_param_count",
    "record_dense_shapes",
    "recorded_dense_shapes",
    "replace_module_",
    "set_dense_shapes",
    "size_report",
    "target_linears",
    "targets_restored",
    "untargeted_weights",
]

# Default rank alignment. Tensor-core GEMMs tile K and N in multiples of 64/128 and a
# rank that is not a multiple of 16 forces cuBLAS onto slow, unaligned kernels (issue #6:
# r=1492 ran at 0.5x dense). Our H100 sweep (bench/results/lowrank_*.json) is the evidence
# for the value; see docs/ranks.md.
DEFAULT_RANK_MULTIPLE = 32


def get_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise ValueError(f"model has no module named {name!r}") from exc


def replace_module_(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Replace the submodule `name` (dotted path) by `new` in place; returns the old module."""
    parent_name, _, child = name.rpartition(".")
    parent = get_module(model, parent_name) if parent_name else model
    old = getattr(parent, child, None)
    if old is None:
        raise ValueError(f"model has no module named {name!r}")
    setattr(parent, child, new)
    return old


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of decoder blocks: the largest nn.ModuleList (`model.layers` in Llama)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise ValueError("could not find the decoder blocks (no nn.ModuleList in the model)")
    return best


def target_linears(model: nn.Module, include: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """Linears (dense or already factorized) inside the decoder blocks, by full name.

    Embeddings and lm_head are never targeted: they sit outside the blocks. `include`, if
    given, keeps only names that end with one of its suffixes (e.g. ["mlp.down_proj"]).
    """
    prefix, _ = decoder_layers(model)
    suffixes = tuple(include) if include is not None else None
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not name.startswith(prefix + ".") or not isinstance(module, (nn.Linear, LowRankLinear)):
            continue
        if suffixes is not None and not name.endswith(suffixes):
            continue
        found[name] = module
    if not found:
        raise ValueError("no target linear layers found inside the decoder blocks")
    return found


@contextlib.contextmanager
def targets_restored(model: nn.Module) -> Iterator[None]:
    """Put `model`'s current targeted linears back in place on exit, whatever replaced them meanwhile.

    The modules are only swapped back by name, never copied: this serves code that builds new
    modules (materializing a plan, pruning onto new linears) and must leave the model as it was.
    """
    originals = dict(target_linears(model))
    try:
        yield
    finally:
        for name, module in originals.items():
            replace_module_(model, name, module)


def block_linear_names(model: nn.Module) -> str:
    """The targeted linears of one decoder block, as names within it ("self_attn.qkv_proj, mlp.down_proj, ...").

    For error messages that say which structure a method met.
    """
    prefix, _ = decoder_layers(model)
    names = [n[len(prefix) + 1 :].partition(".")[2] for n in target_linears(model)]
    return ", ".join(dict.fromkeys(names))


def _held_by(name: str, modules: Mapping[str, nn.Module]) -> bool:
    """Whether parameter `name` belongs to one of `modules` (or to a submodule of one)."""
    parts = name.split(".")[:-1]
    return any(".".join(parts[:i]) in modules for i in range(1, len(parts) + 1))


def untargeted_weights(model: nn.Module) -> dict[str, int]:
    """Weight tensors (parameters of 2 or more dimensions) inside the decoder blocks that no targeted linear holds.

    {parameter name: element count}. Compression leaves them dense: the fused 3-D expert weights of
    mixture-of-experts blocks (transformers 5's MixtralExperts, Qwen2MoeExperts, ...), routers that are
    not `nn.Linear`, and the like. Norm scales and biases (1-D) are not listed. `size_report` counts them.
    """
    prefix, _ = decoder_layers(model)
    targets = target_linears(model)
    return {name: p.numel() for name, p in model.named_parameters()
            if name.startswith(prefix + ".") and p.dim() >= 2 and not _held_by(name, targets)}


def expert_structure(model: nn.Module) -> str | None:
    """A description of the model's first mixture-of-experts structure inside the decoder blocks, or None.

    Found by module name (``experts``) or class (``...Experts``, ``...SparseMoeBlock``), or by a 3-D weight;
    methods that cannot prune expert MLPs (minify, surgeon) refuse a model for which this is not None.
    """
    prefix, _ = decoder_layers(model)
    blocks = [(n, m) for n, m in model.named_modules() if n.startswith(prefix + ".")]
    experts = [(n, m) for n, m in blocks if n.rpartition(".")[2] == "experts" or type(m).__name__.endswith("Experts")]
    moe = [(n, m) for n, m in blocks if type(m).__name__.endswith(("SparseMoeBlock", "MoeBlock"))]
    for name, module in experts[:1] or moe[:1]:
        fused = [f"{n} {list(p.shape)}" for n, p in module.named_parameters() if p.dim() >= 3]
        what = f"fused 3-D expert weights {', '.join(fused)}" if fused else "expert MLPs"
        return f"{name} ({type(module).__name__}: {what})"
    for name, p in model.named_parameters():
        if name.startswith(prefix + ".") and p.dim() >= 3:
            return f"{name} (a 3-D weight {list(p.shape)}, as fused expert weights are)"
    return None


@dataclass(frozen=True)
class GatedMlp:
    """Full module names of one gated MLP's linears (Llama layout): its channels are the rows of
    gate and up and the columns of down, so pruning a channel touches all three."""

    gate: str
    up: str
    down: str


def gated_mlps(linears: Mapping[str, nn.Module]) -> dict[str, GatedMlp]:
    """The gated MLPs among `linears` (e.g. `target_linears(model)`), {parent module name: GatedMlp}, in order.

    A gated MLP is a parent holding all three of ``gate_proj``, ``up_proj`` and ``down_proj``; fused
    (``gate_up_proj``) and ungated MLPs are not. ``ValueError`` names the MLP whose widths disagree
    (gate and up out-features, down in-features). Minify and the surgeon both prune by these channels.
    """
    parts: dict[str, dict[str, str]] = {}
    for name in linears:
        parent, _, leaf = name.rpartition(".")
        if leaf in ("gate_proj", "up_proj", "down_proj"):
            parts.setdefault(parent, {})[leaf] = name
    mlps: dict[str, GatedMlp] = {}
    for parent, d in parts.items():
        if len(d) < 3:
            continue
        gate, up, down = (linears[d[x]] for x in ("gate_proj", "up_proj", "down_proj"))
        if gate.out_features != up.out_features or down.in_features != gate.out_features:
            raise ValueError(f"{parent}: gate/up/down widths disagree ({gate.out_features}, {up.out_features}, "
                             f"{down.in_features})")
        mlps[parent] = GatedMlp(d["gate_proj"], d["up_proj"], d["down_proj"])
    return mlps


# The targeted linears' ORIGINAL (out, in) shapes live on the model itself, in this attribute, so
# that size accounting and checkpoints of a narrowed model compare against the dense architecture.
# Only the three functions below touch it: `record_dense_shapes` (a method, before it first narrows a
# layer), `set_dense_shapes` (the checkpoint loader) and `recorded_dense_shapes` (every reader,
# `size_report` and `compression_layout` among them).
DENSE_SHAPES_ATTRIBUTE = "lowrank_dense_shapes"


def recorded_dense_shapes(model: nn.Module) -> dict[str, tuple[int, int]] | None:
    """{target name: (out, in)} recorded on `model` before any layer was narrowed, or None if none were."""
    return getattr(model, DENSE_SHAPES_ATTRIBUTE, None) or None


def set_dense_shapes(model: nn.Module, shapes: Mapping[str, Iterable[int]]) -> None:
    """Record `shapes` ({target name: (out, in)}) as `model`'s dense shapes, e.g. from a checkpoint's layout."""
    setattr(model, DENSE_SHAPES_ATTRIBUTE, {name: tuple(shape) for name, shape in shapes.items()})


def record_dense_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """The targeted linears' ORIGINAL (out, in) shapes, recorded on the model (`recorded_dense_shapes`).

    Set once, before a method first narrows a layer, and never overwritten (a loaded
    checkpoint already carries them): the checkpoint and size accounting compare against them.
    """
    if not recorded_dense_shapes(model):
        set_dense_shapes(model, {n: (m.out_features, m.in_features) for n, m in target_linears(model).items()})
    return recorded_dense_shapes(model)


def layer_param_count(module: nn.Module) -> int:
    """Weights a linear layer holds, under the min(r·(m+n), m·n) convention (bias excluded)."""
    if isinstance(module, LowRankLinear):
        return min(module.weight_parameters, module.in_features * module.out_features)
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features
    raise ValueError(f"not a linear layer: {type(module).__name__}")


def aligned_rank(rank: int, multiple: int, limit: int) -> int:
    """Round `rank` to the nearest multiple of `multiple` (at least one multiple), capped at `limit`."""
    if multiple <= 1:
        return max(1, min(rank, limit))
    rounded = max(multiple, int(round(rank / multiple)) * multiple)
    return min(rounded, limit)


@dataclass
class SizeReport:
    """Parameter accounting of a (possibly compressed) model against its dense original."""

    target_params: int
    target_dense_params: int
    model_params: int
    model_dense_params: int
    ranks: dict[str, int] = field(default_factory=dict)
    # Weights inside the decoder blocks that no targeted linear holds (`untargeted_weights`), left dense,
    # by structure name with the block index dropped ("mlp.experts.gate_up_proj": count over all blocks).
    untargeted: dict[str, int] = field(default_factory=dict)

    @property
    def untargeted_params(self) -> int:
        return sum(self.untargeted.values())

    @property
    def target_fraction(self) -> float:
        return self.target_params / self.target_dense_params

    @property
    def model_fraction(self) -> float:
        return self.model_params / self.model_dense_params

    def summary(self) -> str:
        line = (
            f"targeted linears: {self.target_params:,} / {self.target_dense_params:,} params "
            f"({100 * self.target_fraction:.2f}%); whole model: {self.model_params:,} / "
            f"{self.model_dense_params:,} ({100 * self.model_fraction:.2f}%)"
        )
        if self.untargeted_params:
            line += (f"; left dense, not targeted: {self.untargeted_params:,} params "
                     f"({100 * self.untargeted_params / self.model_dense_params:.2f}% of the dense model) in "
                     f"{', '.join(self.untargeted)}")
        return line


def _unique_param_count(model: nn.Module) -> int:
    # Tied embeddings are one tensor: count each storage once.
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        key = id(p)
        if key not in seen:
            seen.add(key)
            total += p.numel()
    return total


def size_report(model: nn.Module, dense_shapes: Mapping[str, tuple[int, int]] | None = None) -> SizeReport:
    """Count targeted-linear and whole-model parameters.

    The dense reference of each targeted linear is its original (out, in) shape as recorded on the
    model (`recorded_dense_shapes`: by a width-pruning method, or by the checkpoint a model was loaded
    from), else its current in/out features (right for factorization, which keeps shapes).
    `dense_shapes` overrides the recorded shapes.
    """
    if dense_shapes is None:
        dense_shapes = recorded_dense_shapes(model)
    targets = target_linears(model)
    names = set(targets) | set(dense_shapes or {})
    target_params = 0
    dense_params = 0
    ranks: dict[str, int] = {}
    for name in names:
        module = targets.get(name)
        if dense_shapes is not None and name in dense_shapes:
            out_f, in_f = dense_shapes[name]
        else:
            out_f, in_f = module.out_features, module.in_features
        dense_params += out_f * in_f
        if module is not None:
            target_params += layer_param_count(module)
            if isinstance(module, LowRankLinear):
                ranks[name] = module.rank
    model_params = _unique_param_count(model)
    # The dense model differs from this one only in the targeted linears' weights.
    current_weights = sum(m.U.numel() + m.V.numel() if isinstance(m, LowRankLinear) else m.weight.numel()
                          for m in targets.values())
    model_dense = model_params - current_weights + dense_params
    prefix, _ = decoder_layers(model)
    untargeted: dict[str, int] = {}
    for name, count in untargeted_weights(model).items():
        # "model.layers.3.mlp.experts.down_proj" -> "mlp.experts.down_proj"
        structure = name[len(prefix) + 1 :].partition(".")[2]
        untargeted[structure] = untargeted.get(structure, 0) + count
    return SizeReport(target_params, dense_params, model_params, model_dense, ranks, untargeted)


RankSpec = Mapping[str, int] | Callable[[str, nn.Linear], int | None]


@torch.no_grad()
def factorize_(
    model: nn.Module,
    ranks: RankSpec,
    *,
    include: Iterable[str] | None = None,
    rank_multiple: int = 1,
    progress: bool = False,
) -> SizeReport:
    """Replace target `nn.Linear`s by `LowRankLinear` (truncated SVD of W), in place.

    `ranks` maps module names to ranks, or is a callable (name, linear) -> rank or None
    (None leaves the layer dense). Layers absent from a mapping stay dense, and so does a
    layer whose factorization would not save parameters (r·(m+n) ≥ m·n). Ranks are rounded
    to `rank_multiple` (1 = exact). Returns the size report.
    """
    targets = {n: m for n, m in target_linears(model, include).items() if isinstance(m, nn.Linear)}
    if isinstance(ranks, Mapping):
        unknown = set(ranks) - set(targets)
        if unknown:
            raise ValueError(f"ranks name modules that are not target linears: {sorted(unknown)[:5]}")
    items = targets.items()
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(list(items), desc="factorize", unit="layer")
    for name, linear in items:
        rank = ranks.get(name) if isinstance(ranks, Mapping) else ranks(name, linear)
        if rank is None:
            continue
        limit = min(linear.in_features, linear.out_features)
        rank = aligned_rank(int(rank), rank_multiple, limit)
        if rank * (linear.in_features + linear.out_features) >= linear.in_features * linear.out_features:
            continue
        replace_module_(model, name, LowRankLinear.from_linear(linear, rank))
    return size_report(model)
