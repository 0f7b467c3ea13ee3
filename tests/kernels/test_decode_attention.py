"""Tests of lowrank_kernels.decode_attention (one query token over a KV cache, split and merged).

CPU CI runs the Triton kernels under ``TRITON_INTERPRET=1`` (fp32/fp16: the interpreter has no
bf16); ``@pytest.mark.gpu`` tests need CUDA.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lowrank_kernels.decode_attention import (
    BLOCK_N,
    decode_attention,
    decode_attention_launch,
    decode_attention_ref,
    num_splits,
)

from tests.kernels.triton_env import INTERPRET, KERNEL_DTYPES, assert_within_torch_error, fresh_generator, needs_triton
from tests.kernels.triton_env import TRITON_DEVICE as DEVICE

DTYPES = KERNEL_DTYPES
# (batch, query heads, key/value heads, cache length, head size): odd lengths and head sizes, grouped
# and plain heads, a cache shorter than one block and one that is not a multiple of it
SHAPES = [(1, 9, 3, 200, 64), (3, 4, 4, 77, 48), (2, 6, 2, 1, 32), (2, 8, 1, 130, 80), (1, 2, 2, 3 * BLOCK_N, 16)]

_gen = fresh_generator


def _inputs(B: int, Hq: int, Hkv: int, L: int, D: int, dtype: torch.dtype):
    g = _gen()
    q = torch.randn(B, Hq, D, generator=g).to(dtype).to(DEVICE)
    k = torch.randn(B, Hkv, L, D, generator=g).to(dtype).to(DEVICE)
    v = torch.randn(B, Hkv, L, D, generator=g).to(dtype).to(DEVICE)
    return q, k, v


def _filled_mask(B: int, L: int, holes: bool) -> torch.Tensor:
    """A static cache's mask: each sequence filled to its own length, optionally with holes (padding)."""
    g = _gen()
    filled = torch.randint(1, L + 1, (B,), generator=g)
    mask = torch.arange(L)[None, :] < filled[:, None]
    if holes:
        mask &= torch.rand(B, L, generator=g) > 0.3
        mask[:, 0] = True  # every sequence attends something
    return mask.to(DEVICE)


def _torch_own(q, k, v, mask, lengths, scale):
    """What torch's SDPA computes in the same dtype (grouped heads repeated, boolean mask)."""
    B, Hq, D = q.shape
    L = k.shape[2]
    group = Hq // k.shape[1]
    attend = torch.ones(B, L, dtype=torch.bool, device=q.device)
    if mask is not None:
        attend = attend & mask
    if lengths is not None:
        attend = attend & (torch.arange(L, device=q.device)[None, :] < lengths.reshape(-1, 1))
    out = F.scaled_dot_product_attention(q[:, :, None], k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                         attn_mask=attend[:, None, None, :], scale=scale)
    return out[:, :, 0]


def _check_close(out, q, k, v, mask=None, lengths=None, scale=None, atol=0.0, rtol=0.0):
    """Error against the fp64 reference within 2x torch's own error in the same dtype (plus atol/rtol)."""
    ref = decode_attention_ref(q.double(), k.double(), v.double(), mask, lengths, scale=scale)
    own = _torch_own(q, k, v, mask, lengths, scale if scale is not None else q.shape[-1] ** -0.5)
    assert_within_torch_error(out, ref, own, atol, rtol)


@needs_triton
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masking", ["none", "filled", "holes", "lengths"])
def test_matches_reference(dtype, atol, rtol, shape, masking):
    B, Hq, Hkv, L, D = shape
    q, k, v = _inputs(B, Hq, Hkv, L, D, dtype)
    mask = lengths = None
    if masking in ("filled", "holes"):
        mask = _filled_mask(B, L, holes=masking == "holes")
    elif masking == "lengths":
        lengths = torch.randint(1, L + 1, (B,), generator=_gen()).to(DEVICE)
    out = torch.full_like(q, float("nan"))
    decode_attention_launch(q, k, v, mask, lengths, out=out)
    _check_close(out, q, k, v, mask, lengths, atol=atol, rtol=rtol)


@needs_triton
@pytest.mark.parametrize("splits", [1, 2, 3, 7])
def test_every_split_count_agrees(splits):
    """One split writes the output itself; more are merged by the second kernel. Both must agree
    with the reference, including splits left without any attended position."""
    q, k, v = _inputs(2, 6, 3, 5 * BLOCK_N - 11, 40, torch.float32)
    mask = _filled_mask(2, k.shape[2], holes=True)
    out = torch.full_like(q, float("nan"))
    decode_attention_launch(q, k, v, mask, splits=splits, out=out)
    _check_close(out, q, k, v, mask, atol=1e-5, rtol=1e-5)


@needs_triton
def test_skips_hidden_blocks_and_empty_sequences():
    """Blocks the mask hides entirely are skipped (their keys may hold anything, even NaN), and a
    sequence that attends nothing gets zeros, not NaN."""
    q, k, v = _inputs(3, 4, 2, 4 * BLOCK_N, 32, torch.float32)
    mask = torch.zeros(3, k.shape[2], dtype=torch.bool)
    mask[0, :10] = True
    mask[0, 2 * BLOCK_N + 5] = True  # block 1 hidden entirely between attended blocks
    mask[1, BLOCK_N:] = True
    mask = mask.to(DEVICE)
    k[0, :, BLOCK_N : 2 * BLOCK_N] = float("nan")  # hidden: must never be read into the result
    v[0, :, BLOCK_N : 2 * BLOCK_N] = float("nan")
    for splits in (1, 4):
        out = torch.full_like(q, float("nan"))
        decode_attention_launch(q, k, v, mask, splits=splits, out=out)
        assert torch.equal(out[2], torch.zeros_like(out[2]))
        k0 = k.clone()
        v0 = v.clone()
        k0[0, :, BLOCK_N : 2 * BLOCK_N] = 0
        v0[0, :, BLOCK_N : 2 * BLOCK_N] = 0
        _check_close(out[:2], q[:2], k0[:2], v0[:2], mask[:2], atol=1e-5, rtol=1e-5)


@needs_triton
def test_strided_cache_broadcast_mask_and_scale():
    """A cache laid out [B, L, H, D] (transposed view), a mask shared by the batch, a custom scale."""
    B, Hq, Hkv, L, D = 2, 6, 2, 90, 24
    g = _gen()
    q = torch.randn(B, Hq, 2 * D, generator=g)[..., ::2].to(DEVICE)  # non-unit stride along D
    k = torch.randn(B, L, Hkv, D, generator=g).to(DEVICE).transpose(1, 2)
    v = torch.randn(B, L, Hkv, D, generator=g).to(DEVICE).transpose(1, 2)
    mask = (torch.rand(1, L, generator=g) > 0.5).to(DEVICE)
    mask[0, 0] = True
    lengths = torch.tensor([L - 7], device=DEVICE)
    out = torch.full((B, Hq, D), float("nan"), device=DEVICE)
    decode_attention_launch(q, k, v, mask, lengths, scale=0.3, out=out)
    _check_close(out, q, k, v, mask, lengths, scale=0.3, atol=1e-5, rtol=1e-5)


@needs_triton
def test_custom_op_traces_and_opchecks():
    q, k, v = _inputs(2, 4, 2, 70, 16, torch.float32)
    mask = _filled_mask(2, 70, holes=False)
    torch.library.opcheck(torch.ops.lowrank.decode_attention.default, (q, k, v, mask, None, 0.25),
                          test_utils=("test_schema", "test_faketensor"))
    compiled = torch.compile(lambda *a: decode_attention(*a, scale=0.25), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, mask), decode_attention(q, k, v, mask, scale=0.25))


def test_reference_is_sdpa_in_fp64():
    """The reference itself against torch's SDPA in fp64, with grouped heads and a mask."""
    g = _gen()
    q = torch.randn(2, 6, 16, generator=g, dtype=torch.float64)
    k = torch.randn(2, 3, 33, 16, generator=g, dtype=torch.float64)
    v = torch.randn(2, 3, 33, 16, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 33, generator=g) > 0.4
    mask[:, 0] = True
    want = F.scaled_dot_product_attention(q[:, :, None], k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                          attn_mask=mask[:, None, None, :])[:, :, 0]
    torch.testing.assert_close(decode_attention_ref(q, k, v, mask), want)


def test_cpu_without_interpreter_uses_reference():
    """Off CUDA and outside the interpreter the op runs the torch reference."""
    if INTERPRET:
        pytest.skip("the interpreter runs the Triton path on the CPU")
    q = torch.randn(1, 4, 8, generator=_gen())
    k = torch.randn(1, 2, 12, 8, generator=_gen())
    v = torch.randn(1, 2, 12, 8, generator=_gen())
    torch.testing.assert_close(decode_attention(q, k, v), decode_attention_ref(q, k, v))


def test_num_splits_depends_on_shape_and_sm_count_only():
    cpu = torch.device("cpu")
    assert num_splits(1, 1, cpu) == 1
    assert num_splits(1, 10 * BLOCK_N, cpu) == num_splits(1, 10 * BLOCK_N, cpu) >= 2
    assert num_splits(10_000, 10 * BLOCK_N, cpu) == 1  # enough rows to fill the device without splitting
    for rows, L in [(1, 7), (9, 768), (72, 768), (32, 4096)]:
        assert 1 <= num_splits(rows, L, cpu) <= -(-L // BLOCK_N)


@pytest.mark.parametrize("bad,message", [
    (lambda q, k, v: (q[0], k, v, None, None), "q \\[B, Hq, D\\]"),
    (lambda q, k, v: (q, k, v[..., :-1], None, None), "one shape"),
    (lambda q, k, v: (q[:, :3], k, v, None, None), "multiple of key/value heads"),
    (lambda q, k, v: (q, k.half(), v.half(), None, None), "one dtype"),
    (lambda q, k, v: (q, k, v, torch.ones(2, 5), None), "mask must be bool"),
    (lambda q, k, v: (q, k, v, None, torch.ones(2)), "lengths must be int32/int64"),
])
def test_bad_input_names_the_problem(bad, message):
    q = torch.randn(2, 4, 8, generator=_gen())
    k = torch.randn(2, 2, 12, 8, generator=_gen())
    v = torch.randn(2, 2, 12, 8, generator=_gen())
    with pytest.raises(ValueError, match=message):
        decode_attention(*bad(q, k, v))
