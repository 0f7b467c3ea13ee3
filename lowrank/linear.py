"""`LowRankLinear`: a drop-in replacement for `nn.Linear` that stores W ≈ U·V.

Where the singular values live: they are split evenly between the two factors,
U = U_svd·diag(√s) and V = diag(√s)·V_svdᵀ ("balanced" factors). Balanced factors
keep both matrices at the same scale, which matters in bf16/fp16 where a factor
holding all of Σ would span a much wider range than the other. The columns of U
and rows of V stay sorted by decreasing singular value, so keeping a prefix of
them is the optimal truncation; `truncate` re-orthogonalises first, so it stays
optimal even after `merge_lora` has appended non-orthogonal directions.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import torch
from lowrank_kernels.dispatch import dense_is_faster
from lowrank_kernels.lowrank_matmul import lowrank_matmul
from torch import Tensor, nn

__all__ = ["DECODE_TOKENS", "LowRankLinear", "balanced_factors", "svd_factors"]

# Row counts a decode server sees (batch sizes); the default for `enable_dense_fallback`.
DECODE_TOKENS: tuple[int, ...] = (1, 4, 16)


def svd_factors(weight: Tensor, rank: int | None = None) -> tuple[Tensor, Tensor]:
    """Balanced rank-`rank` factors (U [out, r], V [r, in]) of `weight`, optimal in Frobenius norm.

    The SVD runs in float64 on the weight's device (float32 is not enough to resolve the
    tail of the spectrum of large layers); the factors come back in float32.
    """
    out_features, in_features = weight.shape
    full = min(out_features, in_features)
    rank = full if rank is None else rank
    u, s, vh = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
    return balanced_factors(u[:, :rank], s[:rank], vh[:rank])


def balanced_factors(u: Tensor, s: Tensor, vh: Tensor) -> tuple[Tensor, Tensor]:
    """Split singular values as √s into both sides: returns (u·diag(√s), diag(√s)·vh) in float32."""
    root = s.clamp_min(0).sqrt()
    return (u * root).to(torch.float32), (root[:, None] * vh).to(torch.float32)


def _check_rank(rank: int, in_features: int, out_features: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise ValueError(f"rank must be an int, got {type(rank).__name__}")
    limit = min(in_features, out_features)
    if rank <= 0 or rank > limit:
        raise ValueError(
            f"rank must be in [1, min(in_features, out_features)] = [1, {limit}], got {rank}"
        )


class LowRankLinear(nn.Module):
    """y = x·Vᵀ·Uᵀ + b, with U of shape [out_features, rank] and V of shape [rank, in_features].

    Holds rank·(in_features + out_features) weights instead of in_features·out_features.
    The matmul runs through `lowrank_kernels.lowrank_matmul.lowrank_matmul` (fused Triton kernel on GPU at small
    token counts, two tensor-core GEMMs at large ones, torch on CPU).
    """

    __constants__ = ["in_features", "out_features", "rank"]

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}")
        _check_rank(rank, in_features, out_features)
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        factory = {"device": device, "dtype": dtype}
        self.U = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.V = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        # Optional dense copy U·V for the shapes where one dense GEMM is faster (see
        # enable_dense_fallback); non-persistent, so checkpoints never carry it.
        self.register_buffer("dense_weight", None, persistent=False)
        self._dense_versions: tuple[int, int] | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise so that U·V has the variance of nn.Linear's default init."""
        if self.U.device.type == "meta":
            return
        # nn.Linear draws W ~ U(-1/√in, 1/√in) (variance 1/(3·in)); matching that for the product:
        # Var(UV) = rank·σ_U²·σ_V², with σ_V² = 1/in and σ_U² = 1/(3·rank).
        nn.init.normal_(self.V, std=1.0 / math.sqrt(self.in_features))
        nn.init.normal_(self.U, std=1.0 / math.sqrt(3.0 * self.rank))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_factors(cls, U: Tensor, V: Tensor, bias: Tensor | None = None) -> LowRankLinear:
        """Wrap given factors (copied) into a layer; dtype and device follow U."""
        if U.dim() != 2 or V.dim() != 2 or U.shape[1] != V.shape[0]:
            raise ValueError(f"factors must be U [out, r] and V [r, in], got {tuple(U.shape)} and {tuple(V.shape)}")
        out_features, rank = U.shape
        in_features = V.shape[1]
        layer = cls(in_features, out_features, rank, bias=bias is not None, device="meta", dtype=U.dtype)
        layer.U = nn.Parameter(U.detach().clone().contiguous())
        layer.V = nn.Parameter(V.detach().to(U.dtype).clone().contiguous())
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().to(U.dtype).clone())
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int | None = None) -> LowRankLinear:
        """Optimal rank-`rank` approximation of `linear` (truncated SVD in float64); `None` = full rank."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        rank = min(linear.in_features, linear.out_features) if rank is None else rank
        _check_rank(rank, linear.in_features, linear.out_features)
        U, V = svd_factors(linear.weight, rank)
        dtype = linear.weight.dtype
        return cls.from_factors(U.to(dtype), V.to(dtype), linear.bias)

    def to_linear(self) -> nn.Linear:
        """A dense nn.Linear computing the same function (product formed in float32)."""
        dense = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device="meta", dtype=self.U.dtype
        )
        weight = (self.U.detach().float() @ self.V.detach().float()).to(self.U.dtype)
        dense.weight = nn.Parameter(weight)
        if self.bias is not None:
            dense.bias = nn.Parameter(self.bias.detach().clone())
        return dense

    # ------------------------------------------------------------------ editing
    @torch.no_grad()
    def merge_lora(self, A: Tensor, B: Tensor, scaling: float) -> LowRankLinear:
        """Fold a LoRA branch scaling·B·A into the factors by concatenation (ACIP, Remark 2.3).

        A: [r_lora, in_features], B: [out_features, r_lora]. The layer stays one factorized
        matmul, of rank r + r_lora, and computes base + LoRA exactly. If that rank would exceed
        min(in, out), the sum is refactorised exactly at full rank instead. Returns self.
        """
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != self.in_features or B.shape[0] != self.out_features:
            raise ValueError(
                f"LoRA factors must be A [r, {self.in_features}] and B [{self.out_features}, r], "
                f"got {tuple(A.shape)} and {tuple(B.shape)}"
            )
        if A.shape[0] != B.shape[1]:
            raise ValueError(f"LoRA ranks disagree: A has {A.shape[0]} rows, B has {B.shape[1]} columns")
        # Split the scaling like the singular values, so neither half blows up in low precision.
        root = math.sqrt(abs(scaling))
        sign = 1.0 if scaling >= 0 else -1.0
        U = torch.cat([self.U.float(), B.float().to(self.U.device) * (root * sign)], dim=1)
        V = torch.cat([self.V.float(), A.float().to(self.V.device) * root], dim=0)
        full = min(self.in_features, self.out_features)
        if U.shape[1] > full:
            U, V = _reorthogonalize(U, V, full)
        self._set_factors(U, V)
        return self

    @torch.no_grad()
    def truncate(self, rank: int) -> LowRankLinear:
        """Keep the `rank` leading singular directions of U·V (optimal in Frobenius norm). Returns self."""
        _check_rank(rank, self.in_features, self.out_features)
        if rank > self.rank:
            raise ValueError(f"cannot truncate a rank-{self.rank} layer to a larger rank {rank}")
        U, V = _reorthogonalize(self.U.float(), self.V.float(), rank)
        self._set_factors(U, V)
        return self

    def _set_factors(self, U: Tensor, V: Tensor) -> None:
        dtype = self.U.dtype
        self.U = nn.Parameter(U.to(dtype).contiguous(), requires_grad=self.U.requires_grad)
        self.V = nn.Parameter(V.to(dtype).contiguous(), requires_grad=self.V.requires_grad)
        self.rank = U.shape[1]
        self.disable_dense_fallback()  # the old dense copy no longer equals U·V

    # ------------------------------------------------------------------ dense fallback
    @torch.no_grad()
    def enable_dense_fallback(self, tokens: Iterable[int] = DECODE_TOKENS, *, force: bool = False) -> bool:
        """Keep a dense copy W = U·V if one dense GEMM beats the factorized kernels at any of `tokens`.

        Small layers (SmolLM2's 576-wide projections) are bound by launch latency, so
        a rank-50% factorization saves bytes but not time; `lowrank_kernels.dispatch.dense_is_faster` decides per
        row count from the shipped measurements, and the forward pass then picks per call. The
        copy costs out·in extra weights, so call this only where speed matters more than memory.
        `force=True` keeps the copy regardless (the dispatch still picks per call). Returns whether
        a copy is held. Changing U or V afterwards (in place or via `truncate`/`merge_lora`) drops it.
        """
        tokens = [int(t) for t in tokens]
        if not tokens or any(t <= 0 for t in tokens):
            raise ValueError(f"tokens must be positive row counts, got {tokens}")
        device = self.U.device
        wanted = force or any(
            dense_is_faster(t, self.in_features, self.out_features, self.rank, device) for t in tokens
        )
        if not wanted:
            self.disable_dense_fallback()
            return False
        self.dense_weight = (self.U.float() @ self.V.float()).to(self.U.dtype)
        self._dense_versions = (self.U._version, self.V._version)
        return True

    def disable_dense_fallback(self) -> None:
        """Drop the dense copy (if any); the layer goes back to factors only."""
        self.dense_weight = None
        self._dense_versions = None

    def _fresh_dense_weight(self) -> Tensor | None:
        if self.dense_weight is None:
            return None
        # In-place updates of U or V (an optimizer step, load_state_dict) bump their version
        # counters; the copy would then silently compute an old function. Not checked under
        # torch.compile, where version counters are not traceable.
        if not torch.compiler.is_compiling() and self._dense_versions != (self.U._version, self.V._version):
            warnings.warn(f"{type(self).__name__}: U or V changed after enable_dense_fallback; dropping the dense "
                          "copy (call enable_dense_fallback again)", stacklevel=3)
            self.disable_dense_fallback()
            return None
        return self.dense_weight

    # ------------------------------------------------------------------ compute
    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input's last dimension is {x.shape[-1]}, expected in_features={self.in_features}")
        if x.dtype != self.U.dtype:
            raise ValueError(f"input dtype {x.dtype} differs from the weights' dtype {self.U.dtype}; cast explicitly")
        if x.device != self.U.device:
            raise ValueError(f"input is on device {x.device} but the weights are on device {self.U.device}")
        return lowrank_matmul(x, self.U, self.V, self.bias, dense_weight=self._fresh_dense_weight())

    @property
    def weight_parameters(self) -> int:
        """Weights held (bias excluded): rank·(in + out)."""
        return self.rank * (self.in_features + self.out_features)

    def extra_repr(self) -> str:
        dense = self.in_features * self.out_features
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}, params={self.weight_parameters}/{dense} "
            f"({100.0 * self.weight_parameters / dense:.1f}% of dense)"
            + (", dense fallback" if self.dense_weight is not None else "")
        )


def _reorthogonalize(U: Tensor, V: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Balanced SVD factors of the top-`rank` part of U·V, without forming the product.

    QR of both factors reduces the problem to the SVD of a small r×r core, so this costs
    O((m+n)·r²) rather than O(m·n·r).
    """
    q_u, r_u = torch.linalg.qr(U.double())
    q_v, r_v = torch.linalg.qr(V.double().T)
    u_core, s, vh_core = torch.linalg.svd(r_u @ r_v.T)
    return balanced_factors(q_u @ u_core[:, :rank], s[:rank], vh_core[:rank] @ q_v.T)
