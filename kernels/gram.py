"""Gram-matrix accumulation ``G += Xᵀ·X`` for Hessian, K-FAC and ridge statistics.

Every calibration pass of the toolkit streams activations ``X`` ([..., d], bf16 or fp16,
fp32 accepted) into an fp32 accumulator ``G`` ([d, d]).  ``XᵀX`` is symmetric, so only
half of it needs computing (a SYRK rather than a GEMM):

* **Tiles.**  ``G`` is cut into BLOCK_M × BLOCK_N tiles and only tiles that hold an element
  on or above the diagonal are launched.  The launch grid's first axis walks a small
  int32 table of ``(row_block, col_block)`` pairs (``_tile_table``), ordered by
  super-tiles of ``group × group`` blocks so that the programs resident at one time read
  a compact set of X's columns and share them through L2.
* **Loads.**  X tiles come through plain pointer loads or, for single-layer launches with
  16-byte rows (``GramConfig.tma``), TMA tensor descriptors (Triton >= 3.4), which zero-fill
  the ragged edges.  Both kernels share the epilogue.
* **Tokens.**  Each program loops over the token axis in BLOCK_K steps, so memory stays
  bounded whatever N (the Triton path allocates nothing; the torch path upcasts one
  chunk at a time).  When the triangle has too few tiles to fill the GPU, the token axis
  is also split across programs (split-K) and the partial sums land in ``G`` through fp32
  atomics.
* **Symmetry.**  Only the upper triangle of ``G`` is read.  Each tile adds its product to
  its upper-triangle elements and writes the same fp32 values to the mirrored lower
  elements (in its epilogue, or in a second small pass after split-K atomics), so the
  result is bit-for-bit symmetric: ``G_out = sym(triu(G_in) + triu(XᵀX))``.
* **Batched.**  ``gram_accumulate_batched`` groups the (G, X) pairs by (device, d, X dtype)
  and runs each group as ONE launch over a 3-D grid ``(tile, split, layer)``: the layers'
  base addresses are passed as int64 element offsets from the lowest-addressed tensor,
  read by each program from a small device table.  (Building that table is a tiny
  host-to-device copy, so the batched form is not CUDA-graph capturable; the single form
  is.)  A G that appears twice is put in a later launch so no two programs of one launch
  read-modify-write the same element.

Both entry points run under ``torch.no_grad`` and are safe inside forward hooks: inputs
are detached, nothing is recorded by autograd, and G is updated in place.

Backends: ``"triton"`` (CUDA, or the CPU under ``TRITON_INTERPRET=1``), ``"torch"``
(chunked ``addmm_`` then a mirror of the upper triangle) and ``"auto"`` (Triton for
bf16/fp16 on CUDA, torch otherwise).  Importing this module never initialises CUDA, and it
imports without Triton installed.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from lowrank_kernels.utils import (
    HAS_TRITON,
    LaunchConfig,
    TensorDescriptor,
    dot_precision,
    interpreting,
    pow2_divisor,
    sm_count,
    tl,
    triton,
)
from torch import Tensor

_X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_BACKENDS = ("auto", "triton", "torch")

__all__ = [
    "GramConfig",
    "gram_accumulate",
    "gram_accumulate_batched",
    "gram_accumulate_ref",
    "default_config",
]


# ----------------------------------------------------------------------------- kernels
if HAS_TRITON:

    @triton.jit
    def _gram_accumulate_kernel(
        G,  # fp32 [D, D] (batched: the lowest-addressed G of the group)
        X,  # [N, D]     (batched: the lowest-addressed X of the group)
        TILES,  # int32 [n_tiles, 2]: (row block, col block), upper triangle only
        G_OFF,  # int64 [L]: element offset of each layer's G from G (batched only)
        X_OFF,  # int64 [L]: element offset of each layer's X from X (batched only)
        N_TOK,  # int32 [L]: token count of each layer (batched only)
        D,
        N,
        stride_xn,
        stride_gm,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BATCHED: tl.constexpr,
        ATOMIC: tl.constexpr,  # split-K: partial sums go to G with fp32 atomics
        MIRROR: tl.constexpr,  # write the mirrored lower elements in this epilogue
        EVEN_K: tl.constexpr,  # every token chunk is a whole number of BLOCK_K steps
        EVEN_D: tl.constexpr,  # D is a multiple of BLOCK_M and BLOCK_N: no column masks
        X_ALIGN: tl.constexpr,  # proven divisibility (elements) of the batched offsets
        G_ALIGN: tl.constexpr,
        PRECISION: tl.constexpr,  # tl.dot input precision; "ieee" keeps fp32 inputs exact
    ):
        pid_t = tl.program_id(0)
        pid_s = tl.program_id(1)
        n_split = tl.num_programs(1)
        bi = tl.load(TILES + 2 * pid_t)
        bj = tl.load(TILES + 2 * pid_t + 1)
        if BATCHED:
            layer = tl.program_id(2)
            # Hints restore the 16-byte alignment that Triton proves for plain pointer
            # arguments but cannot see through a loaded offset; without them the loads
            # fall back to narrow accesses.
            X += tl.multiple_of(tl.load(X_OFF + layer), X_ALIGN)
            G += tl.multiple_of(tl.load(G_OFF + layer), G_ALIGN)
            n_tok = tl.load(N_TOK + layer)
        else:
            n_tok = N

        # This program's slice of the token axis: whole BLOCK_K steps except the last.
        k_per = tl.cdiv(tl.cdiv(n_tok, n_split), BLOCK_K) * BLOCK_K
        k_start = pid_s * k_per
        k_end = tl.minimum(k_start + k_per, n_tok)

        rm = bi * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = bj * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        # 64-bit base so N·D beyond 2³¹ elements stays addressable; the in-tile offsets
        # (BLOCK_K rows) fit in 32 bits.
        x_base = X + k_start.to(tl.int64) * stride_xn
        a_ptrs = x_base + rk[:, None] * stride_xn + rm[None, :]  # [BK, BM] = (Xᵀ tile)ᵀ
        b_ptrs = x_base + rk[:, None] * stride_xn + rn[None, :]  # [BK, BN]
        col_ok_a = rm[None, :] < D
        col_ok_b = rn[None, :] < D

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(k_start, k_end, BLOCK_K):
            if EVEN_K:
                if EVEN_D:
                    a = tl.load(a_ptrs)
                    b = tl.load(b_ptrs)
                else:
                    a = tl.load(a_ptrs, mask=col_ok_a, other=0.0)
                    b = tl.load(b_ptrs, mask=col_ok_b, other=0.0)
            else:
                row_ok = (k + rk)[:, None] < k_end
                a = tl.load(a_ptrs, mask=row_ok & col_ok_a, other=0.0)
                b = tl.load(b_ptrs, mask=row_ok & col_ok_b, other=0.0)
            acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_xn
            b_ptrs += BLOCK_K * stride_xn

        _gram_epilogue(G, acc, rm, rn, D, stride_gm, ATOMIC, MIRROR)

    @triton.jit
    def _gram_accumulate_tma_kernel(
        G,  # fp32 [D, D]
        A_DESC,  # tensor descriptor of X [N, D], box [BLOCK_K, BLOCK_M]
        B_DESC,  # tensor descriptor of X [N, D], box [BLOCK_K, BLOCK_N] (A_DESC when square)
        TILES,
        n_tiles,
        D,
        N,
        stride_gm,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        ATOMIC: tl.constexpr,
        MIRROR: tl.constexpr,
        PERSISTENT: tl.constexpr,  # programs loop over tiles (grid = a few per SM)
        WARP_SPEC: tl.constexpr,  # Triton's warp-specialised K loop, where the version has it
    ):
        # Same tiles and epilogue as _gram_accumulate_kernel, but X arrives through the TMA
        # copy engine: no address arithmetic or masks in the loop (out-of-range rows and
        # columns read as zeros), which leaves the warps free for the MMAs.
        if PERSISTENT:
            for t in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
                _gram_tile_tma(G, A_DESC, B_DESC, TILES, t, 0, 1, D, N, stride_gm,
                               BLOCK_M, BLOCK_N, BLOCK_K, ATOMIC, MIRROR, WARP_SPEC)  # fmt: skip
        else:
            _gram_tile_tma(G, A_DESC, B_DESC, TILES, tl.program_id(0), tl.program_id(1), tl.num_programs(1),
                           D, N, stride_gm, BLOCK_M, BLOCK_N, BLOCK_K, ATOMIC, MIRROR, WARP_SPEC)  # fmt: skip

    @triton.jit
    def _gram_tile_tma(
        G, A_DESC, B_DESC, TILES, t, pid_s, n_split, D, N, stride_gm,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        ATOMIC: tl.constexpr, MIRROR: tl.constexpr, WARP_SPEC: tl.constexpr,
    ):  # fmt: skip
        bi = tl.load(TILES + 2 * t)
        bj = tl.load(TILES + 2 * t + 1)
        k_per = tl.cdiv(tl.cdiv(N, n_split), BLOCK_K) * BLOCK_K
        k_start = pid_s * k_per
        k_end = tl.minimum(k_start + k_per, N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if WARP_SPEC:
            for k in tl.range(k_start, k_end, BLOCK_K, warp_specialize=True):
                a = A_DESC.load([k, bi * BLOCK_M])
                b = B_DESC.load([k, bj * BLOCK_N])
                acc = tl.dot(tl.trans(a), b, acc)
        else:
            for k in range(k_start, k_end, BLOCK_K):
                a = A_DESC.load([k, bi * BLOCK_M])
                b = B_DESC.load([k, bj * BLOCK_N])
                acc = tl.dot(tl.trans(a), b, acc)
        rm = bi * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = bj * BLOCK_N + tl.arange(0, BLOCK_N)
        _gram_epilogue(G, acc, rm, rn, D, stride_gm, ATOMIC, MIRROR)

    @triton.jit
    def _gram_epilogue(G, acc, rm, rn, D, stride_gm, ATOMIC: tl.constexpr, MIRROR: tl.constexpr):
        # Element-level triangle masks on global indices: correct for square and
        # rectangular tiles alike, and they keep the strict-lower half of a diagonal tile
        # (computed, but unused) out of G.
        in_bounds = (rm[:, None] < D) & (rn[None, :] < D)
        upper = (rm[:, None] <= rn[None, :]) & in_bounds
        rm64 = rm.to(tl.int64)
        rn64 = rn.to(tl.int64)
        g_ptrs = G + rm64[:, None] * stride_gm + rn[None, :]
        if ATOMIC:
            tl.atomic_add(g_ptrs, acc, mask=upper, sem="relaxed")
        else:
            acc += tl.load(g_ptrs, mask=upper, other=0.0)
            tl.store(g_ptrs, acc, mask=upper)
            if MIRROR:
                # Same fp32 values, transposed addresses: exact symmetry by construction.
                strict = (rm[:, None] < rn[None, :]) & in_bounds
                tl.store(G + rn64[None, :] * stride_gm + rm[:, None], acc, mask=strict)

    @triton.jit
    def _gram_mirror_kernel(
        G,
        G_OFF,
        D,
        stride_gm,
        BLOCK: tl.constexpr,
        BATCHED: tl.constexpr,
        G_ALIGN: tl.constexpr,
    ):
        # Copies the strict upper triangle onto the strict lower one (G[r, c] = G[c, r] for
        # r > c).  Blocks above the diagonal have an all-false mask and touch no memory.
        bi = tl.program_id(0)
        bj = tl.program_id(1)
        if BATCHED:
            G += tl.multiple_of(tl.load(G_OFF + tl.program_id(2)), G_ALIGN)
        r = bi * BLOCK + tl.arange(0, BLOCK)
        c = bj * BLOCK + tl.arange(0, BLOCK)
        lower = (r[:, None] > c[None, :]) & (r[:, None] < D) & (c[None, :] < D)
        v = tl.load(G + c.to(tl.int64)[None, :] * stride_gm + r[:, None], mask=lower, other=0.0)
        tl.store(G + r.to(tl.int64)[:, None] * stride_gm + c[None, :], v, mask=lower)


# ----------------------------------------------------------------------------- launcher
@dataclass(frozen=True)
class GramConfig(LaunchConfig):
    """Launch parameters of the Triton path (see ``default_config``); JSON form via ``to_dict`` / ``from_dict``."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3
    group: int = 8  # super-tile edge, in blocks of max(block_m, block_n)
    split_k: int | None = None  # None: pick from the tile count and the SM count
    mirror: str = "fused"  # "fused": in the GEMM epilogue; "separate": second pass
    tma: bool = False  # load X through TMA descriptors (single-layer launches, 16-byte rows)
    persistent: int = 0  # TMA path: programs per SM looping over tiles (0: one tile each)
    warp_specialize: bool = False  # TMA path: Triton's warp-specialised K loop

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"GramConfig.{name} must be a power of two >= 16, got {v}")
        if self.group < 1:
            raise ValueError(f"GramConfig.group must be >= 1, got {self.group}")
        if self.split_k is not None and self.split_k < 1:
            raise ValueError(f"GramConfig.split_k must be >= 1, got {self.split_k}")
        if self.mirror not in ("fused", "separate"):
            raise ValueError(f"GramConfig.mirror must be 'fused' or 'separate', got {self.mirror!r}")
        if self.persistent < 0:
            raise ValueError(f"GramConfig.persistent must be >= 0, got {self.persistent}")


def _env_configs() -> dict[str, dict]:
    """``LOWRANK_GRAM_CONFIG``: JSON ``{"<d>" or "*": {GramConfig fields}}``, for tuning runs."""
    raw = os.environ.get("LOWRANK_GRAM_CONFIG")
    if not raw:
        return {}
    try:
        table = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"LOWRANK_GRAM_CONFIG is not valid JSON: {exc}") from exc
    if not isinstance(table, dict):
        raise ValueError("LOWRANK_GRAM_CONFIG must be a JSON object mapping d (or '*') to GramConfig fields")
    return table


def default_config(d: int, dtype: torch.dtype) -> GramConfig:
    """Launch parameters used when the caller passes none.

    128×128 tiles up to d=8192: at d=4096 the upper triangle is 528 tiles, exactly four
    waves on a 132-SM H100, where 128×256 tiles would give 2.06 waves (three, a third
    idle).  fp32 inputs take the exact "ieee" dot with smaller tiles.  Chosen from the
    sweeps of ``python -m bench.kernels.gram --tune`` on an H100 (bench/results/gram_tune_*.json);
    ``LOWRANK_GRAM_CONFIG`` (JSON ``{"<d>" or "*": {GramConfig fields}}``) overrides them
    for 16-bit inputs.
    """
    if dtype == torch.float32:
        return GramConfig(block_m=64, block_n=64, block_k=32, num_warps=4, num_stages=2)
    env = _env_configs()
    if str(d) in env or "*" in env:
        return GramConfig.from_dict(env.get(str(d), env.get("*")))
    if d <= 1024:
        # Few tiles (15 at d=576): split-K over tokens fills the GPU.
        return GramConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)
    if d < 2048:
        # 300 tiles of 64×64 at d=1536 fill the GPU without split-K atomics.
        return GramConfig(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=4)
    if d < 8192:
        # One warpgroup per 128×128 tile; at d=4096 the pointer and TMA kernels and 4 or 8
        # warps all landed within 2% of each other (0.52 ms on an H100).
        return GramConfig(block_m=128, block_n=128, block_k=64, num_warps=4, num_stages=3)
    # Enough tiles (1892 at d=11008) that the wave tail of 128×256 tiles costs little, and
    # the wider tile reads X from L2 a third less often: 3.3 ms vs 3.9 ms for 128×128.
    return GramConfig(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3, tma=True)


_TILE_TABLES: dict[tuple, Tensor] = {}


def _tile_order(d: int, bm: int, bn: int, group: int) -> list[tuple[int, int]]:
    """Upper-triangle tiles in super-tile order.

    A tile is needed when it holds some element with row <= col.  Tiles are visited by
    super-tiles of ``span × span`` elements (I <= J, row-major), then row-major inside, so
    programs that run together share row and column blocks of X in L2.  Every needed tile
    appears exactly once: a tile in super-tile (I, J) with I > J lies wholly below the
    diagonal.
    """
    span = group * max(bm, bn)
    gr, gc = span // bm, span // bn
    nbr, nbc, nsup = -(-d // bm), -(-d // bn), -(-d // span)
    order = []
    for si in range(nsup):
        for sj in range(si, nsup):
            for bi in range(si * gr, min((si + 1) * gr, nbr)):
                for bj in range(sj * gc, min((sj + 1) * gc, nbc)):
                    if bi * bm <= bj * bn + bn - 1:
                        order.append((bi, bj))
    return order


def _tile_table(d: int, cfg: GramConfig, device: torch.device) -> Tensor:
    key = (str(device), d, cfg.block_m, cfg.block_n, cfg.group)
    table = _TILE_TABLES.get(key)
    if table is None:
        order = _tile_order(d, cfg.block_m, cfg.block_n, cfg.group)
        table = torch.tensor(order, dtype=torch.int32).reshape(-1).to(device)
        _TILE_TABLES[key] = table
    return table


def _choose_split(n_programs: int, n_tok: int, block_k: int, sms: int) -> int:
    """Token splits that minimise (waves × steps per program) plus a split-K surcharge.

    The surcharge stands for the atomic epilogue (about two extra K steps a wave) and the
    separate mirror pass (a few steps once).  Each split keeps at least four K steps.
    """
    if 2 * n_programs >= sms:
        return 1  # the triangle already fills half the GPU: atomics would cost more than they give
    steps = max(1, -(-n_tok // block_k))
    best_cost, best = math.inf, 1
    for s in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32):
        if s > 1 and steps < 4 * s:
            break
        waves = -(-n_programs * s // sms)
        cost = waves * (-(-steps // s) + (4 if s > 1 else 2)) + (6 if s > 1 else 0)
        if cost < best_cost:
            best_cost, best = cost, s
    return best


def _tma_ok(x: Tensor) -> bool:
    """TMA needs a 16-bit [N, d] view with unit column stride and 16-byte aligned rows."""
    return (
        TensorDescriptor is not None
        and x.dtype in (torch.bfloat16, torch.float16)
        and x.stride(1) == 1
        and (x.stride(0) * x.element_size()) % 16 == 0
        and x.data_ptr() % 16 == 0
    )


def _launch_group(
    pairs: Sequence[tuple[Tensor, Tensor]], cfg: GramConfig, batched: bool
) -> None:
    """One Triton launch for pairs of (G [d, d] fp32 contiguous, X [n, d] unit column stride).

    All pairs share device, d and X dtype, and no G appears twice.
    """
    g0, x0 = pairs[0]
    d = g0.shape[0]
    dev = g0.device
    table = _tile_table(d, cfg, dev)
    n_tiles = table.numel() // 2
    ns = [x.shape[0] for _, x in pairs]
    split = cfg.split_k or _choose_split(n_tiles * len(pairs), max(ns), cfg.block_k, sm_count(dev))
    # With split-K, a program's chunk starts at a multiple of BLOCK_K; only the total
    # token count decides whether the final step is partial.
    even_k = all(n % cfg.block_k == 0 for n in ns)
    even_d = d % cfg.block_m == 0 and d % cfg.block_n == 0
    atomic = split > 1
    mirror_fused = not atomic and cfg.mirror == "fused"
    precision = dot_precision(x0.dtype)

    if batched:
        x_base = min((x for _, x in pairs), key=lambda t: t.data_ptr())
        g_base = min((g for g, _ in pairs), key=lambda t: t.data_ptr())
        xe, ge = x0.element_size(), 4
        x_off = [(x.data_ptr() - x_base.data_ptr()) // xe for _, x in pairs]
        g_off = [(g.data_ptr() - g_base.data_ptr()) // ge for g, _ in pairs]
        meta = torch.tensor(x_off + g_off + ns, dtype=torch.int64)
        if dev.type == "cuda":
            # Pinned + non_blocking: a pageable copy would make the host wait for all work
            # queued before this call, leaving the GPU idle until the launch.
            meta = meta.pin_memory().to(dev, non_blocking=True)
        else:
            meta = meta.to(dev)
        x_off_t, g_off_t = meta[: len(pairs)], meta[len(pairs) : 2 * len(pairs)]
        n_t = meta[2 * len(pairs) :].to(torch.int32)
        x_align = pow2_divisor(*x_off, cap=16 // xe)
        g_align = pow2_divisor(*g_off, cap=4)
        g_arg, x_arg, n_arg = g_base, x_base, max(ns)
        stride_x = d
    else:
        x_off_t = g_off_t = n_t = table  # unused placeholders (never read when not BATCHED)
        x_align = g_align = 1
        g_arg, x_arg, n_arg = g0, x0, ns[0]
        stride_x = x0.stride(0)

    if cfg.tma and not batched and _tma_ok(x0):
        a_desc = TensorDescriptor.from_tensor(x0, [cfg.block_k, cfg.block_m])
        b_desc = a_desc
        if cfg.block_n != cfg.block_m:
            b_desc = TensorDescriptor.from_tensor(x0, [cfg.block_k, cfg.block_n])
        if cfg.persistent and not atomic:
            grid = (min(n_tiles, cfg.persistent * sm_count(dev)), 1)
        else:
            grid = (n_tiles, split)
        _gram_accumulate_tma_kernel[grid](
            g0, a_desc, b_desc, table, n_tiles, d, ns[0], d,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            ATOMIC=atomic, MIRROR=mirror_fused, PERSISTENT=bool(cfg.persistent) and not atomic,
            WARP_SPEC=cfg.warp_specialize,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    else:
        grid = (n_tiles, split, len(pairs))
        _gram_accumulate_kernel[grid](
            g_arg, x_arg, table, g_off_t, x_off_t, n_t,
            d, n_arg, stride_x, d,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            BATCHED=batched, ATOMIC=atomic, MIRROR=mirror_fused,
            EVEN_K=even_k, EVEN_D=even_d, X_ALIGN=x_align, G_ALIGN=g_align,
            PRECISION=precision,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    if not mirror_fused:
        blk = 64
        nb = -(-d // blk)
        _gram_mirror_kernel[(nb, nb, len(pairs))](
            g_arg, g_off_t, d, d, BLOCK=blk, BATCHED=batched, G_ALIGN=g_align, num_warps=4
        )


# ----------------------------------------------------------------------------- validation
def _check_pair(G: Tensor, X: Tensor, where: str = "") -> None:
    if not isinstance(G, Tensor) or not isinstance(X, Tensor):
        raise ValueError(f"gram_accumulate{where}: G and X must be tensors")
    if G.dtype != torch.float32:
        raise ValueError(f"gram_accumulate{where}: G must be float32, got {G.dtype}")
    if G.dim() != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"gram_accumulate{where}: G must be square [d, d], got {tuple(G.shape)}")
    if not G.is_contiguous():
        raise ValueError(f"gram_accumulate{where}: G must be contiguous (it is updated in place)")
    if G.requires_grad:
        raise ValueError(f"gram_accumulate{where}: G must not require grad (it is updated in place)")
    if X.dim() < 1:
        raise ValueError(f"gram_accumulate{where}: X must have at least one dimension [..., d]")
    if X.dtype not in _X_DTYPES:
        raise ValueError(f"gram_accumulate{where}: X must be bfloat16, float16 or float32, got {X.dtype}")
    if X.shape[-1] != G.shape[0]:
        raise ValueError(
            f"gram_accumulate{where}: X's last dimension ({X.shape[-1]}) must equal G's size ({G.shape[0]})"
        )
    if X.device != G.device:
        raise ValueError(f"gram_accumulate{where}: X is on {X.device} but G is on {G.device}")


def _check_options(chunk_tokens: int | None, backend: str) -> None:
    if chunk_tokens is not None and (not isinstance(chunk_tokens, int) or chunk_tokens < 1):
        raise ValueError(f"chunk_tokens must be a positive int or None, got {chunk_tokens!r}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")


def _resolve_backend(backend: str, X: Tensor) -> str:
    if backend == "torch":
        return "torch"
    triton_ok = HAS_TRITON and (X.is_cuda or interpreting())
    if backend == "triton":
        if not triton_ok:
            why = "Triton is not installed" if not HAS_TRITON else "X is not on a CUDA device"
            raise RuntimeError(
                f"gram_accumulate(backend='triton'): {why}; run on CUDA or set TRITON_INTERPRET=1"
            )
        return "triton"
    # auto: the kernel pays off for 16-bit inputs on a GPU; fp32 goes to cuBLAS/CPU BLAS.
    return "triton" if (triton_ok and X.is_cuda and X.dtype != torch.float32) else "torch"


def _flatten(X: Tensor, d: int, batched: bool) -> Tensor:
    x2 = X.detach().reshape(-1, d)
    # The kernel needs unit column stride; the batched launch also shares one row stride.
    if x2.stride(1) != 1 or (batched and x2.stride(0) != d):
        x2 = x2.contiguous()
    return x2


def _torch_chunk_tokens(d: int) -> int:
    # About 256 MiB of fp32 upcast per chunk.
    return max(1, (1 << 26) // max(d, 1))


def _mirror_upper_(G: Tensor) -> Tensor:
    strict_upper = torch.triu(G, diagonal=1)
    G.triu_()
    G.add_(strict_upper.mT)  # 0 + v == v exactly: the lower half is a bitwise copy
    return G


def _torch_accumulate(G: Tensor, x2: Tensor, chunk: int) -> None:
    # On CUDA, a 16-bit product with fp32 output (torch >= 2.8) avoids two fp32 copies of
    # each chunk; elsewhere (CPU, older torch) the chunk is upcast.
    fused_out = x2.is_cuda and x2.dtype in (torch.bfloat16, torch.float16)
    for xc in x2.split(chunk):
        if fused_out:
            try:
                G.add_(torch.mm(xc.mT, xc, out_dtype=torch.float32))
                continue
            except (TypeError, RuntimeError):
                fused_out = False
        xf = xc.float()
        G.addmm_(xf.mT, xf)


# ----------------------------------------------------------------------------- public API
@torch.no_grad()
def gram_accumulate(
    G: Tensor,
    X: Tensor,
    *,
    chunk_tokens: int | None = None,
    backend: str = "auto",
    config: GramConfig | None = None,
) -> Tensor:
    """In place ``G += Xᵀ·X`` in fp32; returns ``G``, exactly symmetric.

    Args:
        G: fp32 ``[d, d]``, contiguous.  Only its upper triangle (diagonal included) is
            read; the lower triangle is overwritten with the mirror of the result.
        X: ``[..., d]`` bf16/fp16/fp32, flattened to ``[N, d]`` tokens.
        chunk_tokens: tokens per launch / per upcast chunk.  The Triton path streams over
            tokens inside the kernel and needs no chunking (default: one launch); the torch
            path defaults to ~256 MiB of fp32 per chunk.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.
        config: Triton launch parameters (default: ``default_config(d, X.dtype)``).

    Raises:
        ValueError: G not fp32 / not square / not contiguous / requires grad, X dtype not
            supported, d mismatch, device mismatch, bad ``chunk_tokens`` or ``backend``.
        RuntimeError: ``backend="triton"`` where Triton cannot run.
    """
    _check_options(chunk_tokens, backend)
    _check_pair(G, X)
    d = G.shape[0]
    x2 = _flatten(X, d, batched=False)
    if x2.shape[0] == 0:
        return G  # nothing to add; G is returned as given
    if _resolve_backend(backend, x2) == "torch":
        _torch_accumulate(G, x2, chunk_tokens or _torch_chunk_tokens(d))
        return _mirror_upper_(G)
    cfg = config or default_config(d, x2.dtype)
    chunk = chunk_tokens or x2.shape[0]
    for xc in x2.split(chunk):
        _launch_group([(G, xc)], cfg, batched=False)
    return G


@torch.no_grad()
def gram_accumulate_batched(
    Gs: Sequence[Tensor],
    Xs: Sequence[Tensor],
    *,
    chunk_tokens: int | None = None,
    backend: str = "auto",
    config: GramConfig | None = None,
) -> list[Tensor]:
    """``Gs[i] += Xs[i]ᵀ·Xs[i]`` for several layers; returns ``list(Gs)``.

    On the Triton path, pairs with the same device, d and X dtype run as one launch over
    a ``(tile, split, layer)`` grid (see the module docstring); token counts may differ
    between layers.  A G listed twice is accumulated in a later launch, so the result is
    the same as calling ``gram_accumulate`` on each pair in order.  The torch path loops.
    """
    _check_options(chunk_tokens, backend)
    Gs, Xs = list(Gs), list(Xs)
    if len(Gs) != len(Xs):
        raise ValueError(f"gram_accumulate_batched: {len(Gs)} G matrices but {len(Xs)} X tensors")
    for i, (g, x) in enumerate(zip(Gs, Xs, strict=True)):
        _check_pair(g, x, where=f"_batched[{i}]")
    flat = [_flatten(x, g.shape[0], batched=True) for g, x in zip(Gs, Xs, strict=True)]
    backends = [_resolve_backend(backend, x) for x in flat]

    groups: dict[tuple, list[list[tuple[Tensor, Tensor]]]] = {}
    for g, x, be in zip(Gs, flat, backends, strict=True):
        if x.shape[0] == 0:
            continue
        if be == "torch":
            _torch_accumulate(g, x, chunk_tokens or _torch_chunk_tokens(g.shape[0]))
            _mirror_upper_(g)
            continue
        key = (str(g.device), g.shape[0], x.dtype)
        launches = groups.setdefault(key, [[]])
        # First launch of this group that does not already hold this G.
        for launch in launches:
            if all(other.data_ptr() != g.data_ptr() for other, _ in launch):
                launch.append((g, x))
                break
        else:
            launches.append([(g, x)])

    for (_, d, dtype), launches in groups.items():
        cfg = config or default_config(d, dtype)
        for launch in launches:
            if chunk_tokens is None:
                _launch_group(launch, cfg, batched=len(launch) > 1)
                continue
            n_chunks = max(-(-x.shape[0] // chunk_tokens) for _, x in launch)
            for c in range(n_chunks):
                lo = c * chunk_tokens
                part = [(g, x[lo : lo + chunk_tokens]) for g, x in launch if x.shape[0] > lo]
                _launch_group(part, cfg, batched=len(part) > 1)
    return Gs


# ----------------------------------------------------------------------------- reference
def gram_accumulate_ref(G: Tensor, X: Tensor, *, dtype: torch.dtype = torch.float64) -> Tensor:
    """Out-of-place reference: ``sym(triu(G)) + Xᵀ·X`` computed in ``dtype`` (fp64 default).

    Reads only G's upper triangle, like the kernels, and returns a new tensor.
    """
    d = G.shape[0]
    g = G.detach().to(dtype)
    g = torch.triu(g) + torch.triu(g, diagonal=1).mT
    x = X.detach().reshape(-1, d).to(dtype)
    return g + x.mT @ x


def _with_split(cfg: GramConfig, split: int) -> GramConfig:
    """Copy of ``cfg`` with a fixed split (used by tests and the tuner)."""
    return replace(cfg, split_k=split)
