"""Tests of lowrank_kernels.segmented_linear (several members' second factors in one launch).

CPU CI runs the Triton kernel under ``TRITON_INTERPRET=1`` (fp32/fp16: the interpreter has no bf16);
``@pytest.mark.gpu`` tests need CUDA.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lowrank_kernels.segmented_linear import (
    FMA_MAX_ROWS,
    MAX_MEMBERS,
    config_candidates,
    segmented_linear,
    segmented_linear_launch,
    segmented_linear_ref,
)

from tests.kernels.triton_env import (
    INTERPRET,
    KERNEL_DTYPES,
    assert_within_torch_error,
    fresh_generator,
    needs_cuda,
    needs_triton,
)
from tests.kernels.triton_env import TRITON_DEVICE as DEVICE

DTYPES = KERNEL_DTYPES
# members' (out, rank): odd sizes, a rank above one K block, a member narrower than one tile
MEMBERS = [[(37, 5)], [(19, 11), (8, 3)], [(70, 130), (9, 1), (33, 17)], [(5, 2), (64, 64), (31, 7), (3, 40)]]
ROWS = [1, 3, FMA_MAX_ROWS + 1, 17, 70]

_gen = fresh_generator


def _inputs(T: int, members: list[tuple[int, int]], dtype: torch.dtype, *, bias: bool, gap: int = 3):
    """t as a column slice of a wider matrix (as a fused group's first-factor output is read), members'
    slices separated by `gap` unused columns, one transposed (strided) weight, and a packed bias."""
    g = _gen()
    offsets, col = [], gap
    for _, r in members:
        offsets.append(col)
        col += r + gap
    wide = torch.randn(T, col + 5, generator=g).to(dtype).to(DEVICE)
    t = wide[:, 2 : col + 2]
    weights = [torch.randn(o, r, generator=g).to(dtype).to(DEVICE) for o, r in members]
    o, r = members[0]
    weights[0] = torch.randn(r, o, generator=g).to(dtype).to(DEVICE).T  # strides (1, o)
    b = torch.randn(sum(o for o, _ in members), generator=g).to(dtype).to(DEVICE) if bias else None
    return t, weights, b, offsets


def _check_close(out, t, weights, bias, offsets, atol, rtol):
    """Error against the fp64 reference within 2x torch's own error in the same dtype (plus atol/rtol)."""
    ref = segmented_linear_ref(t.double(), [u.double() for u in weights], None if bias is None else bias.double(),
                               offsets)
    own = segmented_linear_ref(t, weights, bias, offsets)  # cuBLAS' / torch's own member-by-member GEMMs
    assert_within_torch_error(out, ref, own, atol, rtol)


@needs_triton
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("members", MEMBERS, ids=lambda m: f"{len(m)}members")
@pytest.mark.parametrize("T", ROWS)
@pytest.mark.parametrize("bias", [False, True])
def test_matches_reference(dtype, atol, rtol, members, T, bias):
    t, weights, b, offsets = _inputs(T, members, dtype, bias=bias)
    out = torch.full((T, sum(o for o, _ in members)), float("nan"), dtype=dtype, device=DEVICE)
    segmented_linear_launch(t, weights, b, offsets, out=out)
    _check_close(out, t, weights, b, offsets, atol, rtol)


@needs_triton
@pytest.mark.parametrize("T", [1, 3, 6, 20])
def test_every_tuning_candidate_computes_the_same(T):
    """The launch configs compress tune may pick change tiles and warps, never the result."""
    members = MEMBERS[2]
    t, weights, b, offsets = _inputs(T, members, torch.float32, bias=True)
    for config in config_candidates(T):
        out = torch.full((T, sum(o for o, _ in members)), float("nan"), device=DEVICE)
        segmented_linear_launch(t, weights, b, offsets, out=out, config=config)
        _check_close(out, t, weights, b, offsets, 1e-5, 1e-5)
    torch.testing.assert_close(segmented_linear(t, weights, b, offsets, config=config_candidates(T)[-1]),
                               segmented_linear(t, weights, b, offsets))


@needs_triton
@pytest.mark.parametrize("config", [(24, 128, 4), (32, 128, 3), (8, 64, 4)])
def test_bad_configs_are_refused(config):
    t, weights, b, offsets = _inputs(6, MEMBERS[1], torch.float32, bias=False)
    with pytest.raises(ValueError, match="powers of two"):
        segmented_linear_launch(t, weights, b, offsets, config=config)  # (8, 64): tl.dot needs tiles >= 16


@needs_triton
def test_strided_output_and_overlapping_slices():
    """A transposed output view receives every element; two members may read the same columns of t."""
    T, members = 6, [(21, 9), (13, 9)]
    t, weights, _, _ = _inputs(T, members, torch.float32, bias=False)
    offsets = [4, 4]
    out = torch.full((34, T), float("nan"), device=DEVICE).T
    segmented_linear_launch(t, weights, None, offsets, out=out)
    _check_close(out, t, weights, None, offsets, 1e-5, 1e-5)


@needs_triton
def test_empty_rows_give_an_empty_output():
    t, weights, _, offsets = _inputs(1, [(7, 3), (5, 2)], torch.float32, bias=False)
    out = segmented_linear_launch(t[:0], weights, None, offsets)
    assert out.shape == (0, 12)


@needs_triton
def test_custom_op_traces_and_opchecks():
    t, weights, b, offsets = _inputs(3, MEMBERS[2], torch.float32, bias=True)
    torch.library.opcheck(torch.ops.lowrank.segmented_linear.default, (t, weights, b, offsets, [0, 0, 0]),
                          test_utils=("test_schema", "test_faketensor"))
    compiled = torch.compile(lambda t, b: segmented_linear(t, weights, b, offsets), backend="aot_eager",
                             fullgraph=True)
    torch.testing.assert_close(compiled(t, b), segmented_linear(t, weights, b, offsets))


def test_reference_is_one_linear_per_member():
    g = _gen()
    t = torch.randn(4, 30, generator=g, dtype=torch.float64)
    weights = [torch.randn(6, 10, generator=g, dtype=torch.float64),
               torch.randn(3, 8, generator=g, dtype=torch.float64)]
    bias = torch.randn(9, generator=g, dtype=torch.float64)
    want = torch.cat([t[:, 2:12] @ weights[0].T, t[:, 20:28] @ weights[1].T], dim=1) + bias
    torch.testing.assert_close(segmented_linear_ref(t, weights, bias, [2, 20]), want)


def test_cpu_without_interpreter_uses_reference():
    if INTERPRET:
        pytest.skip("the interpreter runs the Triton path on the CPU")
    g = _gen()
    t = torch.randn(2, 12, generator=g)
    weights = [torch.randn(5, 4, generator=g), torch.randn(3, 6, generator=g)]
    torch.testing.assert_close(segmented_linear(t, weights, None, [0, 6]),
                               torch.cat([F.linear(t[:, :4], weights[0]), F.linear(t[:, 6:], weights[1])], dim=1))


@pytest.mark.parametrize("bad,message", [
    (lambda t, w, b: (t[0], w, b, [0, 4]), "t \\[T, K\\]"),
    (lambda t, w, b: (t, [], b, []), f"1 to {MAX_MEMBERS} weights"),
    (lambda t, w, b: (t, w * 3, None, [0] * 6), f"1 to {MAX_MEMBERS} weights"),
    (lambda t, w, b: (t, w, b, [0]), "one offset per weight"),
    (lambda t, w, b: (t, w, b, [0, 9]), "reads columns 9..15 of t, which has 12"),
    (lambda t, w, b: (t, w, b, [-1, 4]), "reads columns -1"),
    (lambda t, w, b: (t, [w[0].half(), w[1]], b, [0, 4]), "weights\\[0\\] is torch.float16"),
    (lambda t, w, b: (t, [w[0][0], w[1]], b, [0, 4]), "weights\\[0\\] must be U"),
    (lambda t, w, b: (t, w, b[:-1], [0, 4]), "bias must be \\[8\\]"),
    (lambda t, w, b: (t.long(), w, b, [0, 4]), "t must be one of"),
])
def test_bad_inputs_name_the_problem(bad, message):
    g = _gen()
    t = torch.randn(3, 12, generator=g)
    weights = [torch.randn(5, 4, generator=g), torch.randn(3, 6, generator=g)]
    bias = torch.randn(8, generator=g)
    with pytest.raises(ValueError, match=message):
        segmented_linear(*bad(t, weights, bias))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("T", [1, 4, 8, 16])
def test_bf16_on_the_gpu(T):
    """The compiled kernel (not the interpreter) in bf16 at decode row counts, LLaMA-like group shapes."""
    members = [(512, 128), (128, 64), (128, 64)]
    g = _gen()
    offsets = [0, 128, 192]
    t = torch.randn(T, 256, generator=g).to("cuda", torch.bfloat16)
    weights = [torch.randn(o, r, generator=g).to("cuda", torch.bfloat16) for o, r in members]
    out = torch.full((T, 768), float("nan"), dtype=torch.bfloat16, device="cuda")
    segmented_linear_launch(t, weights, None, offsets, out=out)
    _check_close(out, t, weights, None, offsets, 1e-2, 1e-2)
