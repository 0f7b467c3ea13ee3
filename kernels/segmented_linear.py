"""Several second factors in one launch: the low-rank half of a fused sibling group.

A fused group of low-rank siblings (q/k/v, gate/up; ``lowrank.fusion``) computes its first factors in
one GEMM, ``t = x·[V_q; V_k; V_v]ᵀ``, and then each member's output from its own slice of ``t``:
``y_i = t[:, off_i : off_i + r_i]·U_iᵀ``. With cuBLAS that second half is one launch per member, so a
q/k/v group costs four launches where its dense counterpart costs one, and at decode a small model
is bound by launches, not bytes (SmolLM2-135M: 120 GEMMs of 3.5–4 µs a step; README *Measured
speed*). This op computes every member's ``y_i`` in one launch and writes them side by side into one
``[T, Σ out_i]`` output, from which the members take column views.

Grid: one program per ``BLOCK_M`` output features of one member (members' tiles follow each other)
and per ``BLOCK_T`` rows. A program finds its member from the tile index, then streams its
``[BLOCK_M, r_i]`` rows of ``U_i`` against the ``[BLOCK_T, r_i]`` slice of ``t``: broadcast-and-sum
FMAs for a few rows (decode: the weight tile is read once and the rows are few), ``tl.dot`` tiles
for more. Up to ``MAX_MEMBERS`` members, of any shapes and strides; fp32 accumulation.

``segmented_linear(t, weights, bias, offsets)``: ``t [T, K]``, ``weights[i] = U_i [out_i, r_i]``,
``offsets[i]`` the column of ``t`` where member ``i``'s slice starts, ``bias [Σ out_i]`` or None;
returns ``[T, Σ out_i]`` in t's dtype. Triton on CUDA (or the CPU under ``TRITON_INTERPRET=1``), the
torch reference (one ``F.linear`` per member) elsewhere; the custom op ``lowrank::segmented_linear``
has a fake implementation, so ``torch.compile`` keeps it whole.

Importing this module never initialises CUDA, and it imports without Triton installed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lowrank_kernels.utils import HAS_TRITON, dot_precision, interpreting, next_pow2, tl, triton
from torch import Tensor

__all__ = ["DEFAULT_CONFIG", "MAX_MEMBERS", "SegmentedConfig", "config_candidates", "segmented_linear",
           "segmented_linear_launch", "segmented_linear_ref"]

MAX_MEMBERS = 4
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Rows up to which a program reads its weight tile once for all rows with FMAs; more rows use tl.dot.
FMA_MAX_ROWS = 4
# A launch config: (BLOCK_M output features per program, BLOCK_K rank per step, num_warps); None or
# DEFAULT_CONFIG picks by the row count (`_blocks`). `compress tune` times `config_candidates(T)`.
SegmentedConfig = tuple[int, int, int]
DEFAULT_CONFIG: SegmentedConfig = (0, 0, 0)


# ----------------------------------------------------------------------------- kernel
if HAS_TRITON:

    @triton.jit
    def _segmented_linear_kernel(
        t_ptr, u0_ptr, u1_ptr, u2_ptr, u3_ptr, bias_ptr, y_ptr,
        T, s_tt, s_tk, s_yt, s_ym,
        out0, out1, out2, out3,
        r0, r1, r2, r3,
        off0, off1, off2, off3,
        su0m, su0k, su1m, su1k, su2m, su2k, su3m, su3k,
        tile1, tile2, tile3,
        N_MEMBERS: tl.constexpr, HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_t = tl.program_id(1)
        # Member of this tile (tile_i: its first tile) and its scalars. tl.where keeps every scalar one
        # type, whatever Triton specialised (an argument equal to 1 becomes a constant).
        member = (pid_m >= tile1).to(tl.int32)
        if N_MEMBERS > 2:
            member += (pid_m >= tile2).to(tl.int32)
        if N_MEMBERS > 3:
            member += (pid_m >= tile3).to(tl.int32)
        n_out = tl.where(member == 0, out0, tl.where(member == 1, out1, tl.where(member == 2, out2, out3)))
        rank = tl.where(member == 0, r0, tl.where(member == 1, r1, tl.where(member == 2, r2, r3)))
        t_col = tl.where(member == 0, off0, tl.where(member == 1, off1, tl.where(member == 2, off2, off3)))
        su_m = tl.where(member == 0, su0m, tl.where(member == 1, su1m, tl.where(member == 2, su2m, su3m)))
        su_k = tl.where(member == 0, su0k, tl.where(member == 1, su1k, tl.where(member == 2, su2k, su3k)))
        first_tile = tl.where(member == 0, 0, tl.where(member == 1, tile1, tl.where(member == 2, tile2, tile3)))
        y_col = tl.where(member == 0, 0, tl.where(member == 1, out0, tl.where(member == 2, out0 + out1,
                                                                              out0 + out1 + out2)))
        u_ptr = u0_ptr
        if N_MEMBERS > 1:
            if member == 1:
                u_ptr = u1_ptr
        if N_MEMBERS > 2:
            if member == 2:
                u_ptr = u2_ptr
        if N_MEMBERS > 3:
            if member == 3:
                u_ptr = u3_ptr

        offs_m = (pid_m - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < n_out
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        t_ok = offs_t < T
        acc = tl.zeros([BLOCK_T, BLOCK_M], dtype=tl.float32)
        for k in range(0, rank, BLOCK_K):
            offs_k = k + tl.arange(0, BLOCK_K)
            k_ok = offs_k < rank
            u = tl.load(u_ptr + offs_m[:, None] * su_m + offs_k[None, :] * su_k,
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            x = tl.load(t_ptr + offs_t[:, None] * s_tt + (t_col + offs_k)[None, :] * s_tk,
                        mask=t_ok[:, None] & k_ok[None, :], other=0.0)
            if USE_DOT:
                acc = tl.dot(x, tl.trans(u), acc, input_precision=INPUT_PRECISION)
            else:
                acc += tl.sum(x.to(tl.float32)[:, None, :] * u.to(tl.float32)[None, :, :], axis=2)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + y_col + offs_m, mask=m_ok, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_t[:, None] * s_yt + (y_col + offs_m)[None, :] * s_ym
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=t_ok[:, None] & m_ok[None, :])


# ----------------------------------------------------------------------------- checks and launcher
def _check(t: Tensor, weights: list[Tensor], bias: Tensor | None, offsets: list[int],
           dtypes: tuple[torch.dtype, ...] = _DTYPES) -> int:
    """ValueError unless the inputs agree; returns Σ out_i."""
    if t.dim() != 2:
        raise ValueError(f"segmented_linear wants t [T, K], got {tuple(t.shape)}")
    if not 1 <= len(weights) <= MAX_MEMBERS:
        raise ValueError(f"segmented_linear takes 1 to {MAX_MEMBERS} weights, got {len(weights)}")
    if len(offsets) != len(weights):
        raise ValueError(f"one offset per weight: {len(weights)} weights, {len(offsets)} offsets")
    if t.dtype not in dtypes:
        raise ValueError(f"t must be one of {dtypes}, got {t.dtype}")
    for i, (U, off) in enumerate(zip(weights, offsets, strict=True)):
        if U.dim() != 2:
            raise ValueError(f"weights[{i}] must be U [out, r], got {tuple(U.shape)}")
        if U.dtype != t.dtype or U.device != t.device:
            raise ValueError(f"weights[{i}] is {U.dtype} on {U.device}, t is {t.dtype} on {t.device}")
        if off < 0 or off + U.shape[1] > t.shape[1]:
            raise ValueError(f"member {i} reads columns {off}..{off + U.shape[1]} of t, which has {t.shape[1]}")
    total = sum(U.shape[0] for U in weights)
    if bias is not None and (bias.shape != (total,) or bias.dtype != t.dtype or bias.device != t.device):
        raise ValueError(f"bias must be [{total}] {t.dtype} on {t.device}, got {tuple(bias.shape)} {bias.dtype} "
                         f"on {bias.device}")
    return total


def _blocks(T: int, config: SegmentedConfig | None = None) -> tuple[bool, int, int, int, int]:
    """(use tl.dot, BLOCK_T, BLOCK_M, BLOCK_K, num_warps): FMAs over one weight tile for a few rows, dot tiles
    above; `config` (BLOCK_M, BLOCK_K, num_warps) overrides the tile and warps, not the path."""
    if T <= FMA_MAX_ROWS:
        block_t = next_pow2(T)
        use_dot, block_m, block_k = False, 32, 128 if block_t == 1 else 64
    else:
        use_dot, block_t, block_m, block_k = True, 16 if T <= 16 else 64, 64, 64
    num_warps = 4
    if config is not None and tuple(config) != DEFAULT_CONFIG:
        block_m, block_k, num_warps = (int(v) for v in config)
        if any(v < 1 or v & (v - 1) for v in (block_m, block_k, num_warps)) or (use_dot and min(block_m, block_k) < 16):
            raise ValueError(f"segmented_linear config (BLOCK_M, BLOCK_K, num_warps) must be powers of two "
                             f"(tiles >= 16 with tl.dot), got {tuple(config)}")
    return use_dot, block_t, block_m, block_k, num_warps


def config_candidates(T: int) -> list[SegmentedConfig]:
    """Launch configs `compress tune` times at `T` rows, the default first: narrower and wider weight tiles,
    fewer and more warps (more programs per SM or more loads in flight per program)."""
    if T <= FMA_MAX_ROWS:
        return [DEFAULT_CONFIG, (16, 256, 4), (64, 64, 4), (32, 128, 2), (16, 128, 2), (64, 128, 8)]
    return [DEFAULT_CONFIG, (32, 64, 4), (128, 64, 8), (64, 128, 4)]


def segmented_linear_launch(t: Tensor, weights: list[Tensor], bias: Tensor | None, offsets: list[int], *,
                            out: Tensor | None = None, config: SegmentedConfig | None = None) -> Tensor:
    """Run the Triton kernel (CUDA, or the CPU under ``TRITON_INTERPRET=1``); ``out`` ([T, Σ out_i],
    t's dtype, any strides) receives the result; ``config`` is a `SegmentedConfig` (None: by the rows)."""
    total = _check(t, weights, bias, offsets)
    if not (HAS_TRITON and (t.is_cuda or interpreting())):
        raise RuntimeError("segmented_linear's kernel needs Triton and CUDA tensors (or TRITON_INTERPRET=1)")
    T = t.shape[0]
    if out is None:
        out = torch.empty((T, total), dtype=t.dtype, device=t.device)
    elif out.shape != (T, total) or out.dtype != t.dtype or out.device != t.device:
        raise ValueError(f"out must be [{T}, {total}] {t.dtype} on {t.device}, got {tuple(out.shape)} "
                         f"{out.dtype} on {out.device}")
    if T == 0 or total == 0:
        return out
    use_dot, block_t, block_m, block_k, num_warps = _blocks(T, config)
    n = len(weights)
    pad = MAX_MEMBERS - n
    outs = [U.shape[0] for U in weights] + [0] * pad
    ranks = [U.shape[1] for U in weights] + [0] * pad
    tiles = [triton.cdiv(o, block_m) for o in outs]
    starts = [sum(tiles[:i]) for i in range(1, MAX_MEMBERS)]
    # Absent members' tiles start past the grid, so no program picks them.
    starts = [s if i + 1 < n else sum(tiles) + 1 for i, s in enumerate(starts)]
    strides = [s for U in weights for s in U.stride()] + [0, 0] * pad
    u_ptrs = list(weights) + [weights[0]] * pad
    grid = (sum(tiles), triton.cdiv(T, block_t))
    _segmented_linear_kernel[grid](
        t, *u_ptrs, bias if bias is not None else t, out,
        T, t.stride(0), t.stride(1), out.stride(0), out.stride(1),
        *outs, *ranks, *(list(offsets) + [0] * pad), *strides, *starts,
        N_MEMBERS=n, HAS_BIAS=bias is not None, USE_DOT=use_dot,
        BLOCK_T=block_t, BLOCK_M=block_m, BLOCK_K=block_k, INPUT_PRECISION=dot_precision(t.dtype),
        num_warps=num_warps,
    )
    return out


# ----------------------------------------------------------------------------- custom op
@torch.library.custom_op("lowrank::segmented_linear", mutates_args=())
def _segmented_linear_op(t: Tensor, weights: list[Tensor], bias: Tensor | None, offsets: list[int],
                         config: list[int]) -> Tensor:
    if HAS_TRITON and (t.is_cuda or interpreting()):
        return segmented_linear_launch(t, weights, bias, offsets, config=tuple(config))
    return segmented_linear_ref(t, weights, bias, offsets)


@_segmented_linear_op.register_fake
def _segmented_linear_fake(t: Tensor, weights: list[Tensor], bias: Tensor | None, offsets: list[int],
                           config: list[int]) -> Tensor:
    total = _check(t, weights, bias, offsets)
    return t.new_empty((t.shape[0], total))


def segmented_linear(t: Tensor, weights: list[Tensor], bias: Tensor | None, offsets: list[int],
                     config: SegmentedConfig | None = None) -> Tensor:
    """``[t[:, off_i : off_i + r_i] @ U_iᵀ for each member]`` side by side (+ ``bias``), as ``[T, Σ out_i]``.

    ``weights[i] = U_i [out_i, r_i]`` (1 to ``MAX_MEMBERS`` of them), ``offsets[i]`` where member ``i``'s
    columns of ``t [T, K]`` start; ``config`` a tuned `SegmentedConfig` (None: by the row count). Inference
    only (no autograd). Triton on CUDA or under ``TRITON_INTERPRET=1``, one ``F.linear`` per member
    elsewhere; traceable by ``torch.compile``. Raises ``ValueError`` on inputs that disagree.
    """
    cfg = [int(v) for v in (config if config is not None else DEFAULT_CONFIG)]
    if len(cfg) != 3:
        raise ValueError(f"segmented_linear config is (BLOCK_M, BLOCK_K, num_warps), got {config!r}")
    return torch.ops.lowrank.segmented_linear(t, list(weights), bias, [int(o) for o in offsets], cfg)


# ----------------------------------------------------------------------------- reference
def segmented_linear_ref(t: Tensor, weights: list[Tensor], bias: Tensor | None, offsets: list[int]) -> Tensor:
    """Torch: one ``F.linear`` per member on its columns of ``t``, concatenated (in t's dtype, as cuBLAS
    computes the unfused group; fp64 inputs give the exact reference)."""
    _check(t, weights, bias, offsets, dtypes=(*_DTYPES, torch.float64))
    y = torch.cat([F.linear(t[:, off:off + U.shape[1]], U) for U, off in zip(weights, offsets, strict=True)], dim=1)
    return y if bias is None else y + bias
