"""Tests of the CUDA extension (csrc/ through lowrank_kernels._ext).

The GPU tests need a Hopper GPU (clusters and programmatic dependent launch) and build the
extension just in time if ``lowrank_kernels._C`` is not installed.  The argument checks run
anywhere: they fail before any device work.
"""

from __future__ import annotations

import pytest
import torch
from lowrank_kernels import _ext

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)
gpu = pytest.mark.gpu
needs_hopper = pytest.mark.skipif(not HOPPER, reason="needs a CUDA GPU of compute capability >= 9.0")

# (T, in_features, rank, out_features): aligned LLaMA/SmolLM shapes, K tails (136, 40:
# multiples of 8 but not of 32), rows not a multiple of 16, and ragged ones (77, 19) that
# take the scalar-load path; T > 8 runs in chunks of 8.
SHAPES = [
    (1, 4096, 1024, 4096),
    (8, 576, 144, 576),
    (4, 11008, 1408, 4096),
    (5, 136, 40, 200),
    (3, 77, 19, 45),
    (2, 1000, 24, 4100),
    (13, 64, 16, 33),
]
TOL = {torch.bfloat16: 5e-3, torch.float16: 1e-3}  # output rounding dominates


@pytest.fixture(scope="module")
def ext():
    return _ext.load()  # a build error on a Hopper machine is a test failure, not a skip


def _make(T, n, r, m, dtype, bias=True, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(T, n, device="cuda", generator=g).to(dtype)
    V = (torch.randn(r, n, device="cuda", generator=g) / n**0.5).to(dtype)
    U = (torch.randn(m, r, device="cuda", generator=g) / r**0.5).to(dtype)
    b = torch.randn(m, device="cuda", generator=g).to(dtype) if bias else None
    return x, U, V, b


def _ref(x, U, V, b):
    y = (x.double() @ V.double().T) @ U.double().T
    return y if b is None else y + b.double()


def _rel(a, ref):
    return ((a.double() - ref).norm() / ref.norm()).item()


@gpu
@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [True, False])
def test_matches_fp64(ext, dtype, shape, bias):
    x, U, V, b = _make(*shape, dtype, bias)
    y = _ext.lowrank_gemv(x, U, V, b)
    torch.cuda.synchronize()
    ref = _ref(x, U, V, b)
    assert y.shape == ref.shape and y.dtype == dtype
    assert torch.isfinite(y).all()
    err = _rel(y, ref)
    torch_err = _rel(torch.nn.functional.linear(torch.nn.functional.linear(x, V), U, b), ref)
    assert err <= TOL[dtype], err
    assert err <= 1.5 * torch_err + 1e-4, (err, torch_err)  # the fp32 intermediate never hurts


@gpu
@needs_hopper
@pytest.mark.parametrize("cd,cu", [(1, 1), (2, 1), (4, 2), (8, 8), (0, 0)])
@pytest.mark.parametrize("pdl", [True, False])
def test_cluster_and_pdl_variants_agree(ext, cd, cu, pdl):
    x, U, V, b = _make(6, 4096, 512, 1536, torch.bfloat16, seed=1)
    y = _ext.lowrank_gemv(x, U, V, b, pdl=pdl, cluster_down=cd, cluster_up=cu)
    assert _rel(y, _ref(x, U, V, b)) <= TOL[torch.bfloat16]


@gpu
@needs_hopper
def test_every_output_written_nan_poison(ext):
    T, n, r, m = 7, 520, 72, 1000
    x, U, V, b = _make(T, n, r, m, torch.float16, seed=2)
    for _ in range(3):
        # Freed NaN blocks of y's and t's exact sizes are what the caching allocator hands
        # out next, so an element the kernels skip would read back as NaN.
        poison_y = torch.full((T, m), float("nan"), dtype=torch.float16, device="cuda")
        poison_t = torch.full((T, r), float("nan"), dtype=torch.float32, device="cuda")
        del poison_y, poison_t
        y = _ext.lowrank_gemv(x, U, V, b)
        assert torch.isfinite(y).all()
        assert _rel(y, _ref(x, U, V, b)) <= TOL[torch.float16]


@gpu
@needs_hopper
def test_deterministic_and_leading_dims(ext):
    x, U, V, b = _make(6, 768, 96, 640, torch.bfloat16, seed=3)
    y1 = _ext.lowrank_gemv(x, U, V, b)
    y2 = _ext.lowrank_gemv(x, U, V, b)
    assert torch.equal(y1, y2)  # no atomics: bit-for-bit repeatable
    y3 = _ext.lowrank_gemv(x.reshape(2, 3, 768), U, V, b)
    assert y3.shape == (2, 3, 640) and torch.equal(y3.reshape(6, 640), y1)
    xs = torch.randn(6, 2 * 768, device="cuda").to(torch.bfloat16)[:, ::2]  # non-unit stride: copied
    assert torch.equal(_ext.lowrank_gemv(xs, U, V, b), _ext.lowrank_gemv(xs.contiguous(), U, V, b))


@gpu
@needs_hopper
def test_cuda_graph_capture(ext):
    x, U, V, b = _make(2, 1024, 128, 2048, torch.bfloat16, seed=4)
    _ext.lowrank_gemv(x, U, V, b)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = _ext.lowrank_gemv(x, U, V, b)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert _rel(y, _ref(x, U, V, b)) <= TOL[torch.bfloat16]


def test_argument_errors_match_lowrank_matmul():
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    U = torch.randn(6, 4, dtype=torch.bfloat16)
    V = torch.randn(4, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="last dim of x"):
        _ext.lowrank_gemv(torch.randn(2, 9, dtype=torch.bfloat16), U, V)
    with pytest.raises(ValueError, match="rank mismatch"):
        _ext.lowrank_gemv(x, torch.randn(6, 5, dtype=torch.bfloat16), V)
    with pytest.raises(ValueError, match="bias must have shape"):
        _ext.lowrank_gemv(x, U, V, torch.randn(5, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="dtype mismatch"):
        _ext.lowrank_gemv(x.half(), U, V)
    with pytest.raises(ValueError, match="bfloat16 and float16 only"):
        _ext.lowrank_gemv(x.float(), U.float(), V.float())
    with pytest.raises(ValueError, match="CUDA tensors"):
        _ext.lowrank_gemv(x, U, V)
    with pytest.raises(ValueError, match="cluster"):
        _ext.lowrank_gemv(x, U, V, cluster_down=3)


def test_import_is_lazy():
    # Importing lowrank_kernels._ext must not build or load anything.
    assert _ext._MODULE is None or HOPPER
