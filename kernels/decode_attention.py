"""Attention of one new token over a KV cache (decode), split over the cache and skipping its empty part.

At decode each sequence brings one query per head, and the keys and values are the whole cache. Two
things make the general attention kernels slow there, and this op avoids both:

* **The unfilled cache.** A static cache (the kind a CUDA graph needs) is allocated at its final
  length and a mask hides the positions not written yet; a generic kernel still reads every one of
  them. Here each block of ``BLOCK_N`` positions first reads its mask bytes (or compares with the
  sequence's length) and loads no key or value when none of them is attended. So the traffic
  follows the filled length while the launch keeps one shape for every step.
* **Grouped-query heads.** A query head reads the key/value head of its group in place (head
  ``h`` uses ``h // (Hq / Hkv)``); nothing is repeated into a copy of the cache.

The work is split along the cache (flash-decoding): the grid is (sequence × query head, split),
each program keeps an online softmax over its slice in fp32 and writes its running maximum, sum and
unnormalised output; a second small kernel merges the splits. With one split the first kernel
writes the output itself. The split count depends on the cache length and the device's SM count
(``sm_count``), never on a GPU name, and is fixed per shape so a captured graph replays it.

``decode_attention(q, k, v, mask=..., lengths=..., scale=...)`` takes ``q [B, Hq, D]`` and caches
``k, v [B, Hkv, L, D]`` (any strides), and returns ``[B, Hq, D]`` in q's dtype. Positions attended:
``mask[b, l]`` (bool, True = attend; broadcastable over the batch) and ``l < lengths[b]``, both
optional. A sequence with no attended position gets zeros. Backends: Triton on CUDA (or the CPU
under ``TRITON_INTERPRET=1``), and ``decode_attention_ref`` (torch, fp32 inside) elsewhere. The op
is ``torch.ops.lowrank.decode_attention`` with a fake implementation, so ``torch.compile`` keeps it
whole; ``lowrank.attention.use_decode_attention`` plugs it into Hugging Face models.

Importing this module never initialises CUDA, and it imports without Triton installed.
"""

from __future__ import annotations

import math

import torch
from lowrank_kernels.utils import HAS_TRITON, interpreting, next_pow2, sm_count, tl, triton
from torch import Tensor

__all__ = ["decode_attention", "decode_attention_ref", "num_splits"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Positions per block: one mask check and one [BLOCK_N, D] key and value tile per step of the loop.
BLOCK_N = 64
# Programs to aim for, per SM, when choosing the split count: enough to hide load latency at batch 1.
PROGRAMS_PER_SM = 2
_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------- kernels
if HAS_TRITON:

    @triton.jit
    def _decode_attention_kernel(
        q_ptr, k_ptr, v_ptr, mask_ptr, len_ptr, out_ptr, acc_ptr, ml_ptr,
        Hq, L, D, group, chunk, qk_scale,
        s_qb, s_qh, s_qd,
        s_kb, s_kh, s_kl, s_kd,
        s_vb, s_vh, s_vl, s_vd,
        s_mb, s_ml, s_lb,
        s_ob, s_oh, s_od,
        HAS_MASK: tl.constexpr, HAS_LEN: tl.constexpr, SINGLE: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        row = tl.program_id(0)  # b * Hq + h
        split = tl.program_id(1)
        n_splits = tl.num_programs(1)
        b = row // Hq
        h = row % Hq
        kvh = h // group
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        # qk_scale folds log2(e) in, so the softmax runs on exp2
        q = tl.load(q_ptr + b * s_qb + h * s_qh + offs_d * s_qd, mask=d_ok, other=0.0).to(tl.float32) * qk_scale
        end = L
        if HAS_LEN:
            end = tl.minimum(tl.load(len_ptr + b * s_lb).to(tl.int32), L)
        lo = split * chunk
        hi = tl.minimum(lo + chunk, end)
        m_i = -float("inf")
        l_i = 0.0
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        k_row = k_ptr + b * s_kb + kvh * s_kh
        v_row = v_ptr + b * s_vb + kvh * s_vh
        for start in range(lo, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            valid = offs_n < hi
            if HAS_MASK:
                attend = tl.load(mask_ptr + b * s_mb + offs_n * s_ml, mask=valid, other=0)
                valid = valid & (attend != 0)
            # a block the mask hides entirely (the unfilled cache) costs its mask bytes only
            if tl.max(valid.to(tl.int32), axis=0) > 0:
                kv_ok = valid[:, None] & d_ok[None, :]
                k = tl.load(k_row + offs_n[:, None] * s_kl + offs_d[None, :] * s_kd, mask=kv_ok, other=0.0)
                # V is issued beside K, before the scores need K: one memory round trip per block, not two
                v = tl.load(v_row + offs_n[:, None] * s_vl + offs_d[None, :] * s_vd, mask=kv_ok, other=0.0)
                s = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
                s = tl.where(valid, s, -float("inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=0))
                p = tl.exp2(s - m_new)
                alpha = tl.exp2(m_i - m_new)
                acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
                l_i = l_i * alpha + tl.sum(p, axis=0)
                m_i = m_new
        if SINGLE:
            out = tl.where(l_i > 0, acc / l_i, 0.0)
            tl.store(out_ptr + b * s_ob + h * s_oh + offs_d * s_od, out.to(out_ptr.dtype.element_ty), mask=d_ok)
        else:
            part = row * n_splits + split
            tl.store(acc_ptr + part * BLOCK_D + offs_d, acc)
            tl.store(ml_ptr + part * 2, m_i)
            tl.store(ml_ptr + part * 2 + 1, l_i)

    @triton.jit
    def _decode_attention_combine_kernel(
        acc_ptr, ml_ptr, out_ptr, Hq, D, n_splits,
        s_ob, s_oh, s_od,
        BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        row = tl.program_id(0)
        b = row // Hq
        h = row % Hq
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        s_ok = offs_s < n_splits
        parts = row * n_splits + offs_s
        m = tl.load(ml_ptr + parts * 2, mask=s_ok, other=-float("inf"))
        l_s = tl.load(ml_ptr + parts * 2 + 1, mask=s_ok, other=0.0)
        m_max = tl.max(m, axis=0)
        # splits that attended nothing carry m = -inf and l = 0 (all of them, for an empty sequence): weight 0
        w = tl.where(s_ok & (l_s > 0), tl.exp2(m - m_max), 0.0)
        acc = tl.load(acc_ptr + parts[:, None] * BLOCK_D + offs_d[None, :], mask=s_ok[:, None], other=0.0)
        total = tl.sum(l_s * w, axis=0)
        out = tl.sum(acc * w[:, None], axis=0)
        out = tl.where(total > 0, out / total, 0.0)
        tl.store(out_ptr + b * s_ob + h * s_oh + offs_d * s_od, out.to(out_ptr.dtype.element_ty), mask=offs_d < D)


# ----------------------------------------------------------------------------- launcher
def num_splits(rows: int, cache_len: int, device: torch.device) -> int:
    """Splits of the cache per (sequence, head): enough programs for ``PROGRAMS_PER_SM`` per SM, never
    a split shorter than one block. Depends on shapes and the SM count only, so one shape always
    launches the same grid (a captured graph's)."""
    blocks = max(1, math.ceil(cache_len / BLOCK_N))
    want = math.ceil(PROGRAMS_PER_SM * sm_count(device) / max(1, rows))
    return max(1, min(blocks, want))


def _check(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, lengths: Tensor | None,
           dtypes: tuple[torch.dtype, ...] = _DTYPES) -> None:
    if q.dim() != 3 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"decode_attention wants q [B, Hq, D] and k, v [B, Hkv, L, D]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    B, Hq, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"q {tuple(q.shape)} and the cache {tuple(k.shape)} disagree in batch or head size")
    if k.shape[1] == 0 or Hq % k.shape[1]:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({k.shape[1]})")
    if q.dtype not in dtypes or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype of {dtypes}; got {q.dtype}, {k.dtype}, {v.dtype}")
    if len({q.device, k.device, v.device}) != 1:
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if mask is not None:
        if mask.dtype != torch.bool or mask.dim() != 2 or mask.shape[1] != k.shape[2] or mask.shape[0] not in (1, B):
            raise ValueError(f"mask must be bool [B or 1, L={k.shape[2]}], got {mask.dtype} {tuple(mask.shape)}")
        if mask.device != q.device:
            raise ValueError(f"mask is on {mask.device}, q on {q.device}")
    if lengths is not None:
        if lengths.dim() != 1 or lengths.shape[0] not in (1, B) or lengths.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"lengths must be int32/int64 [B or 1], got {lengths.dtype} {tuple(lengths.shape)}")
        if lengths.device != q.device:
            raise ValueError(f"lengths is on {lengths.device}, q on {q.device}")


def decode_attention_launch(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None,
                            lengths: Tensor | None = None, *, scale: float | None = None,
                            splits: int | None = None, out: Tensor | None = None) -> Tensor:
    """Run the Triton kernels (CUDA, or the CPU under ``TRITON_INTERPRET=1``); see the module docstring.
    ``splits`` overrides ``num_splits``; ``out`` ([B, Hq, D], q's dtype, any strides) receives the result."""
    _check(q, k, v, mask, lengths)
    if not (HAS_TRITON and (q.is_cuda or interpreting())):
        raise RuntimeError("decode_attention's kernels need Triton and CUDA tensors (or TRITON_INTERPRET=1)")
    B, Hq, D = q.shape
    L = k.shape[2]
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    rows = B * Hq
    if rows == 0:
        return out
    scale = D ** -0.5 if scale is None else float(scale)
    n_split = splits if splits is not None else num_splits(rows, L, q.device)
    if n_split < 1:
        raise ValueError(f"splits must be >= 1, got {n_split}")
    chunk = math.ceil(max(L, 1) / n_split / BLOCK_N) * BLOCK_N
    n_split = max(1, math.ceil(max(L, 1) / chunk))  # no split left without positions
    block_d = next_pow2(D)
    single = n_split == 1
    acc = ml = out  # placeholders the kernel never touches when SINGLE
    if not single:
        acc = torch.empty((rows * n_split, block_d), dtype=torch.float32, device=q.device)
        ml = torch.empty((rows * n_split, 2), dtype=torch.float32, device=q.device)
    mask_arg = mask if mask is not None else q
    len_arg = lengths if lengths is not None else q
    s_mb = (mask.stride(0) if mask.shape[0] > 1 else 0) if mask is not None else 0
    s_lb = (lengths.stride(0) if lengths.shape[0] > 1 else 0) if lengths is not None else 0
    _decode_attention_kernel[(rows, n_split)](
        q, k, v, mask_arg, len_arg, out, acc, ml,
        Hq, L, D, Hq // k.shape[1], chunk, scale * _LOG2E,
        *q.stride(), *k.stride(), *v.stride(),
        s_mb, mask.stride(1) if mask is not None else 0, s_lb,
        *out.stride(),
        HAS_MASK=mask is not None, HAS_LEN=lengths is not None, SINGLE=single,
        BLOCK_N=BLOCK_N, BLOCK_D=block_d, num_warps=4,
    )
    if not single:
        _decode_attention_combine_kernel[(rows,)](
            acc, ml, out, Hq, D, n_split, *out.stride(),
            BLOCK_S=next_pow2(n_split), BLOCK_D=block_d, num_warps=4,
        )
    return out


# ----------------------------------------------------------------------------- custom op
@torch.library.custom_op("lowrank::decode_attention", mutates_args=())
def _decode_attention_op(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, lengths: Tensor | None,
                         scale: float) -> Tensor:
    if HAS_TRITON and (q.is_cuda or interpreting()):
        return decode_attention_launch(q, k, v, mask, lengths, scale=scale)
    return decode_attention_ref(q, k, v, mask, lengths, scale=scale)


@_decode_attention_op.register_fake
def _decode_attention_fake(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, lengths: Tensor | None,
                           scale: float) -> Tensor:
    _check(q, k, v, mask, lengths)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, lengths: Tensor | None = None,
                     *, scale: float | None = None) -> Tensor:
    """Softmax attention of ``q [B, Hq, D]`` (one token per sequence) over ``k, v [B, Hkv, L, D]``.

    Attends the positions ``l`` with ``mask[b, l]`` (bool ``[B or 1, L]``) and ``l < lengths[b]``
    (int ``[B or 1]``), each optional; ``scale`` defaults to ``D ** -0.5``. Inference only (no
    autograd). Triton on CUDA or under ``TRITON_INTERPRET=1``, the torch reference elsewhere;
    traceable by ``torch.compile(fullgraph=True)``. Raises ``ValueError`` on bad shapes or dtypes (the op's
    every implementation checks its inputs).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return torch.ops.lowrank.decode_attention(q, k, v, mask, lengths, scale)


# ----------------------------------------------------------------------------- reference
def decode_attention_ref(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None,
                         lengths: Tensor | None = None, *, scale: float | None = None) -> Tensor:
    """Torch reference in fp32 (fp64 stays fp64): grouped heads expanded, masked softmax, zeros where
    a sequence attends nothing."""
    _check(q, k, v, mask, lengths, dtypes=(*_DTYPES, torch.float64))
    B, Hq, D = q.shape
    L = k.shape[2]
    scale = D ** -0.5 if scale is None else float(scale)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = Hq // k.shape[1]
    kf = k.to(work).repeat_interleave(group, dim=1)  # [B, Hq, L, D]
    vf = v.to(work).repeat_interleave(group, dim=1)
    scores = torch.einsum("bhd,bhld->bhl", q.to(work), kf) * scale
    attend = torch.ones(B, L, dtype=torch.bool, device=q.device)
    if mask is not None:
        attend = attend & mask
    if lengths is not None:
        attend = attend & (torch.arange(L, device=q.device)[None, :] < lengths.reshape(-1, 1))
    scores = scores.masked_fill(~attend[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with nothing attended is all NaN
    return torch.einsum("bhl,bhld->bhd", probs, vf).to(q.dtype)
