"""Sibling projections in one GEMM: q/k/v and gate/up read the same input, so one launch can serve them.

At decode time a small model is bound by kernel launches, not by bytes (SmolLM2-135M: a compiled,
graphed dense step takes 14× its weight traffic; README *Measured speed*). Attention's q, k and v
projections and a gated MLP's gate and up projections all multiply the same activations, so

    fuse_sibling_projections(model)

concatenates each such group's weights into one matrix and computes the group with one matmul:
q/k/v go from three launches to one, gate/up from two to one. For `LowRankLinear` members the
shared first factor is fused (x·[V_q; V_k; V_v]ᵀ in one GEMM) and each member keeps its own second
factor U. Dense and compressed models get the same treatment, so a benchmark compares like with like.

How: the group's first member (the one the model's forward calls first, q_proj / gate_proj in
transformers' Llama-family code) computes every member's output and leaves the others' parts in the
group; each later member returns its part when it is called with the very same input tensor, and
computes its own slice otherwise (another call order, or a call with other inputs stays correct,
just unfused). The model computes the same function. In that usual order nothing of a call is held
past the group's last member; otherwise the leftovers live until the group's next call.

Dense groups fuse only inputs of up to `DENSE_FUSE_MAX_ROWS` rows (tokens × batch); a longer input
(a prefill) runs one GEMM per member over its rows of the concatenated weight, the very GEMMs of the
unfused model. Measured on the dense SmolLM2-135M shape (H100, compiled; bench/results/
e2e_h100_compiled_smollm2_shape_*_20261207.json): fused, decode gains 1.19–1.24× at batch 1 and 8,
but a 4096-token prefill loses 5% and 15% in two runs, while the 50% low-rank model's fused first
factor gains 1.15× at that prefill, so low-rank groups always fuse. With this bound a third run
still lost at prefill (0.88×; e2e_h100_compiled_smollm2_shape_dense_fused_bound128_20261207.json),
so the loss is not the fused GEMM's strided outputs, as first guessed. A profile (bench/results/
e2e_profile_h100_smollm2_shape_{unfused,fused}_20261207.md) shows why: that eager prefill is host-bound
(8.8 ms of kernels in a 23-27 ms prefill, the same 1202 kernels fused or not), so its ratio measures
Python and varies by ±15% between runs; the member views used above the bound are made once, not per
call. The bound itself lies between the measured 8 and 4096 rows and is not tuned.

Low-rank groups compute their second factors with cuBLAS, one GEMM per member, or, for inputs of up to
`SEGMENTED_MAX_ROWS` rows (decode), in one launch (`lowrank_kernels.segmented_linear`): a q/k/v group
then costs two launches, not four. ``low_rank_kernel="auto"`` (the default) takes the segmented launch
where this GPU's tuned table says it is faster for the group's shapes (``python -m compress tune``
times both; `lowrank_kernels.dispatch.group_kernel`) and cuBLAS everywhere else, so without a tune run
nothing changes; "segmented" and "cublas" force one. The segmented kernel has not been timed on a GPU
yet (`bench.kernels.segmented_linear`), and no shipped table holds group timings.

A serving transform: the fused modules replace the originals in the module tree, so the state dict
changes. Save before fusing, or call `unfuse_sibling_projections` first. Members that are neither
all `nn.Linear` nor all `LowRankLinear` (without a dense fallback copy), or that differ in dtype or
device, are left alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from lowrank_kernels.dispatch import group_kernel
from lowrank_kernels.segmented_linear import MAX_MEMBERS, segmented_linear
from torch import Tensor, nn

from lowrank.linear import LowRankLinear
from lowrank.surgery import replace_module_

__all__ = ["DENSE_FUSE_MAX_ROWS", "LOW_RANK_KERNELS", "SEGMENTED_MAX_ROWS", "SIBLING_SETS", "FusedSibling",
           "SiblingGroup", "fuse_sibling_projections", "unfuse_sibling_projections"]

# Child names under one parent module that read the parent's input (Llama, Mistral, Qwen2/3, Gemma 2/3, ...),
# in the order the parent's forward calls them.
SIBLING_SETS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# Dense groups: inputs with more rows than this run one GEMM per member (see the module docstring).
DENSE_FUSE_MAX_ROWS = 128
# How low-rank groups compute their members' second factors: "auto" (the device's tuned choice per group
# and row count, cuBLAS where nothing was tuned), "cublas" (one GEMM per member) or "segmented" (one launch
# for all members, up to SEGMENTED_MAX_ROWS rows; cuBLAS above).
LOW_RANK_KERNELS = ("auto", "cublas", "segmented")
# Rows up to which "segmented" runs its kernel: decode batches; a prefill's GEMMs are cuBLAS' job.
SEGMENTED_MAX_ROWS = 16


def _weight_of(module: nn.Module) -> Tensor:
    return module.U if isinstance(module, LowRankLinear) else module.weight


def _split_sizes(outputs: Sequence[int]) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for size in outputs:
        bounds.append((start, start + size))
        start += size
    return bounds


class SiblingGroup(nn.Module):
    """The fused weights of one group of projections, and the parts the first member left for the others.

    Dense members: `weight` [Σ out, in] (+ `bias`). Low-rank members: `V` [Σ rank, in] (+ one `U_i`
    [out_i, rank_i] per member, in `factors`) and the biases.
    """

    def __init__(self, members: Sequence[nn.Module], *, dense_max_rows: int | None = DENSE_FUSE_MAX_ROWS,
                 low_rank_kernel: str = "auto") -> None:
        super().__init__()
        if dense_max_rows is not None and (isinstance(dense_max_rows, bool) or not isinstance(dense_max_rows, int)
                                           or dense_max_rows < 1):
            raise ValueError(f"dense_max_rows must be a positive integer or None, got {dense_max_rows!r}")
        if low_rank_kernel not in LOW_RANK_KERNELS:
            raise ValueError(f"low_rank_kernel must be one of {LOW_RANK_KERNELS}, got {low_rank_kernel!r}")
        first = members[0]
        self.low_rank = isinstance(first, LowRankLinear)
        self.in_features = first.in_features
        self.out_features = [m.out_features for m in members]
        self.out_bounds = _split_sizes(self.out_features)
        # Longest input (in rows) that a dense group computes in one GEMM; None: every input.
        self.dense_max_rows = None if self.low_rank else dense_max_rows
        # Low-rank second factors in one launch: always ("segmented"), where tuned faster ("auto") or never;
        # only for groups the kernel takes.
        self.low_rank_kernel = low_rank_kernel if self.low_rank and len(members) <= MAX_MEMBERS else "cublas"
        with torch.no_grad():
            if self.low_rank:
                self.ranks = [m.rank for m in members]
                self.rank_bounds = _split_sizes(self.ranks)
                self.rank_offsets = [lo for lo, _ in self.rank_bounds]
                self.V = nn.Parameter(torch.cat([m.V for m in members]), requires_grad=False)
                # U is shared with the member it came from, which the fused module then replaces
                self.factors = nn.ParameterList([nn.Parameter(m.U.detach(), requires_grad=False) for m in members])
            else:
                self.weight = nn.Parameter(torch.cat([m.weight for m in members]), requires_grad=False)
            biases = [m.bias for m in members]
            self.has_bias = [b is not None for b in biases]
            self.bias = None
            if any(self.has_bias):  # members without one get zeros in the fused bias, and None alone
                like = _weight_of(first)
                self.bias = nn.Parameter(torch.cat([
                    b if b is not None else like.new_zeros(n) for b, n in zip(biases, self.out_features, strict=True)
                ]), requires_grad=False)
        # Set by the first member's call, read by the others: (input, [part per member]).
        self._pending_input: Tensor | None = None
        self._pending: list[Tensor | None] = [None] * len(members)
        # Dense members' (weight rows, bias) as views of the fused tensors, made once: a long input runs
        # member by member, and that path is host-bound (an eager prefill), so it should not slice per call.
        self._member_views: list[tuple[Tensor, Tensor | None]] | None = None
        self._views_of: Tensor | None = None

    def _apply(self, fn, recurse: bool = True):  # .to(), .half(), ...: the views would point at old storage
        self._member_views = self._views_of = None
        return super()._apply(fn, recurse)

    def _dense_member(self, index: int) -> tuple[Tensor, Tensor | None]:
        if self._member_views is None or self._views_of is not self.weight:  # (load_state_dict(assign=True))
            self._member_views = [(self.weight[lo:hi], self._bias_of(i)) for i, (lo, hi) in enumerate(self.out_bounds)]
            self._views_of = self.weight
        return self._member_views[index]

    def _bias_of(self, index: int) -> Tensor | None:
        if self.bias is None or not self.has_bias[index]:
            return None
        lo, hi = self.out_bounds[index]
        return self.bias[lo:hi]

    def compute_all(self, x: Tensor) -> list[Tensor]:
        """Every member's output for input `x`, from one matmul over the concatenated weights."""
        if not self.low_rank:
            y = F.linear(x, self.weight, self.bias)
            return [y[..., lo:hi] for lo, hi in self.out_bounds]
        # In 2D: each member's slice of t is then a plain strided matrix, which mm reads in place. Sliced
        # in 3D ([batch, 1, Σ rank] at decode), the slice cannot be flattened by a view under
        # torch.compile, and `linear` lowers to a bmm that reads the member's U once per batch row
        # (8× the second factor's bytes at batch 8; the LLaMA-7B-shape b8 regression of issue #17).
        lead = x.shape[:-1]
        t = F.linear(x.reshape(-1, self.in_features), self.V)
        config = self._segmented_config(t)
        if config is not None:
            y = segmented_linear(t, list(self.factors), self.bias, self.rank_offsets, config=config)
            return [y[:, lo:hi].view(*lead, hi - lo) for lo, hi in self.out_bounds]
        return [F.linear(t[:, lo:hi], U, self._bias_of(i)).view(*lead, U.shape[0])
                for i, ((lo, hi), U) in enumerate(zip(self.rank_bounds, self.factors, strict=True))]

    def _segmented_config(self, t: Tensor) -> tuple[int, int, int] | None:
        """The segmented launch's config if the second factors of first-factor output `t` run as one launch,
        else None (cuBLAS per member)."""
        rows = t.shape[0]
        if self.low_rank_kernel == "cublas" or rows > SEGMENTED_MAX_ROWS:
            return None
        members = tuple(zip(self.out_features, self.ranks, strict=True))
        kernel, config = group_kernel(rows, self.in_features, members, t.device)
        if self.low_rank_kernel == "segmented":
            return config  # forced: the tuned config where there is one, else the default (0, 0, 0)
        return config if kernel == "segmented" else None

    def compute_one(self, x: Tensor, index: int) -> Tensor:
        """Member `index`'s output alone (its slice of the fused weights)."""
        if not self.low_rank:
            weight, bias = self._dense_member(index)
            return F.linear(x, weight, bias)
        lo, hi = self.rank_bounds[index]
        return F.linear(F.linear(x, self.V[lo:hi]), self.factors[index], self._bias_of(index))

    def member_forward(self, x: Tensor, index: int) -> Tensor:
        if self.dense_max_rows is not None and x.numel() > self.dense_max_rows * self.in_features:
            return self.compute_one(x, index)  # a long dense input: the unfused model's GEMM
        last = len(self.out_features) - 1
        if index == 0:
            parts = self.compute_all(x)
            self._pending_input, self._pending = x, [None, *parts[1:]]
            return parts[0]
        part = self._pending[index]
        if part is None or self._pending_input is not x:
            return self.compute_one(x, index)
        self._pending[index] = None
        if index == last:  # nothing of this call is held past the group's last member
            self._pending_input = None
        return part

    def unfused(self, index: int) -> nn.Module:
        """Member `index` as the module it replaced (a copy of its weights)."""
        bias = self._bias_of(index)
        lo, hi = self.out_bounds[index]
        if self.low_rank:
            rlo, rhi = self.rank_bounds[index]
            return LowRankLinear.from_factors(self.factors[index], self.V[rlo:rhi], bias)
        weight = self.weight[lo:hi]
        linear = nn.Linear(self.in_features, hi - lo, bias=bias is not None, device="meta", dtype=weight.dtype)
        linear.weight = nn.Parameter(weight.detach().clone())
        if bias is not None:
            linear.bias = nn.Parameter(bias.detach().clone())
        return linear


class FusedSibling(nn.Module):
    """Stands where one member of a `SiblingGroup` was; the group's first member owns the group."""

    def __init__(self, group: SiblingGroup, index: int) -> None:
        super().__init__()
        self.index = index
        self.in_features = group.in_features
        self.out_features = group.out_features[index]
        if index == 0:
            self.group = group  # registered once, so the fused weights count once
        else:
            object.__setattr__(self, "_group_ref", group)  # a plain reference, not a submodule

    @property
    def sibling_group(self) -> SiblingGroup:
        return self.group if self.index == 0 else self._group_ref

    def forward(self, x: Tensor) -> Tensor:
        return self.sibling_group.member_forward(x, self.index)

    def extra_repr(self) -> str:
        return f"index={self.index}, in_features={self.in_features}, out_features={self.out_features}"


def _fusable(members: Sequence[nn.Module]) -> bool:
    kinds = {type(m) for m in members}
    if kinds == {nn.Linear}:
        pass
    elif kinds == {LowRankLinear}:
        if any(m.dense_weight is not None for m in members):
            return False  # the dense copy is picked per call; fusing the factors would bypass it
    else:
        return False
    params = [_weight_of(m) for m in members]
    return (len({m.in_features for m in members}) == 1 and len({p.dtype for p in params}) == 1
            and len({p.device for p in params}) == 1 and all(p.device.type != "meta" for p in params))


@torch.no_grad()
def fuse_sibling_projections(model: nn.Module, sets: Sequence[Sequence[str]] = SIBLING_SETS, *,
                             dense_max_rows: int | None = DENSE_FUSE_MAX_ROWS,
                             low_rank_kernel: str = "auto") -> list[str]:
    """Fuse every group of sibling projections of `model` in place; returns the fused groups' names.

    A name is ``parent.{q_proj,k_proj,v_proj}``. A group whose members are not all `nn.Linear` or all
    `LowRankLinear` without a dense copy, or that differ in input width, dtype or device, is skipped.
    Dense groups compute inputs of more than `dense_max_rows` rows member by member (None: always fused).
    `low_rank_kernel` ("auto", "cublas" or "segmented", `LOW_RANK_KERNELS`) picks how low-rank groups compute
    their second factors (module docstring).
    """
    if low_rank_kernel not in LOW_RANK_KERNELS:
        raise ValueError(f"low_rank_kernel must be one of {LOW_RANK_KERNELS}, got {low_rank_kernel!r}")
    fused = []
    for parent_name, parent in list(model.named_modules()):
        for names in sets:
            members = [getattr(parent, n, None) for n in names]
            if any(m is None for m in members) or not _fusable(members):
                continue
            group = SiblingGroup(members, dense_max_rows=dense_max_rows, low_rank_kernel=low_rank_kernel)
            for index, name in enumerate(names):
                replace_module_(model, f"{parent_name}.{name}" if parent_name else name, FusedSibling(group, index))
            prefix = f"{parent_name}." if parent_name else ""
            fused.append(prefix + "{" + ",".join(names) + "}")
    return fused


@torch.no_grad()
def unfuse_sibling_projections(model: nn.Module) -> int:
    """Put back the modules `fuse_sibling_projections` replaced (same names and weights); returns how many."""
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, FusedSibling):
            replace_module_(model, name, module.sibling_group.unfused(module.index))
            count += 1
    return count
