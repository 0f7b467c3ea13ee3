"""Tests of lowrank_kernels.lowrank_matmul: y = x V^T U^T + b.

CPU CI runs ``TRITON_INTERPRET=1 python -m pytest -q``: the Triton kernels then execute in
Triton's interpreter on CPU tensors (fp32 and fp16; the interpreter has no bf16).  Without
the interpreter and without CUDA those tests are skipped with a reason.  ``@pytest.mark.gpu``
tests need CUDA (bf16/fp16, LLaMA shapes, CUDA graphs).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import lowrank_kernels.lowrank_matmul as _lm  # noqa: E402
import pytest
import torch
import torch.nn.functional as F
from lowrank_kernels import occupancy
from lowrank_kernels.dispatch import T_BUCKETS, _bucket, fused_candidates
from lowrank_kernels.lowrank_matmul import (
    BACKENDS,
    lowrank_matmul,
    lowrank_matmul_launch,
    lowrank_matmul_ref,
    pad_rank,
)
from lowrank_kernels.lowrank_matmul_config import FusedConfig
from lowrank_kernels.tuning import CONFIG_PATH
from lowrank_kernels.utils import HAS_TRITON, interpreting

INTERPRET = interpreting()
HAS_CUDA = torch.cuda.is_available()

# Where the Triton kernels can run here: the interpreter on CPU, else a GPU.
TRITON_DEVICE = "cpu" if INTERPRET else ("cuda" if HAS_CUDA else None)
needs_triton = pytest.mark.skipif(
    not HAS_TRITON or TRITON_DEVICE is None,
    reason="Triton kernels need CUDA, or TRITON_INTERPRET=1 to run on CPU "
    "(CI: TRITON_INTERPRET=1 python -m pytest -q)",
)
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

# (dtype, atol, rtol) for elementwise closeness to the fp64 reference; the main criterion is
# the norm-wise error relative to torch's own error in the same dtype (see _assert_close).
TOLS = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-2, 1e-2),
    torch.bfloat16: (1e-1, 5e-2),
}
# The interpreter does not do bf16; on a GPU we test the 16-bit types models actually use.
TRITON_DTYPES = (
    [torch.float32, torch.float16] if INTERPRET or not HAS_CUDA else [torch.bfloat16, torch.float16]
)
SEED = 1234


def _inputs(lead, n, m, r, dtype, device, bias=True, seed=0):
    g = torch.Generator().manual_seed(SEED + seed)
    x = torch.randn(*lead, n, generator=g, dtype=torch.float64)
    U = torch.randn(m, r, generator=g, dtype=torch.float64) / math.sqrt(r)
    V = torch.randn(r, n, generator=g, dtype=torch.float64) / math.sqrt(n)
    b = torch.randn(m, generator=g, dtype=torch.float64) if bias else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)
    return cast(x), cast(U), cast(V), cast(b)


def _rel(a, ref):
    return ((a.double().cpu() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _assert_close(y, x, U, V, b):
    """Error vs an fp64 reference must be <= 2x torch's own error in the same dtype (+ eps)."""
    assert torch.isfinite(y).all(), "non-finite output (unwritten NaN-poisoned element?)"
    d = lambda t: None if t is None else t.double().cpu()
    ref = lowrank_matmul_ref(d(x), d(U), d(V), d(b))
    torch_y = F.linear(F.linear(x, V), U, b)
    eps = 1e-6 if x.dtype == torch.float32 else 1e-4
    err, terr = _rel(y, ref), _rel(torch_y, ref)
    assert err <= 2 * terr + eps, f"rel err {err:.3e} vs torch {terr:.3e} ({x.dtype})"
    atol, rtol = TOLS[x.dtype]
    torch.testing.assert_close(y.double().cpu(), ref, atol=atol, rtol=rtol)


def _run(backend, x, U, V, b, config=None):
    out = torch.full((*x.shape[:-1], U.shape[0]), float("nan"), dtype=x.dtype, device=x.device)
    y = lowrank_matmul_launch(x, U, V, b, backend=backend, config=config, out=out)
    assert y is out
    return y


# ------------------------------------------------------------------ Triton paths (CPU interp)
SHAPES = [  # (n=in, m=out, r)
    (77, 45, 13),  # nothing a multiple of 16
    (40, 24, 1),  # rank 1
    (24, 40, 24),  # rank = min(m, n)
    (64, 96, 32),
]


@needs_triton
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 3, 17])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fused_matches_reference(shape, T, dtype):
    n, m, r = shape
    x, U, V, b = _inputs((T,), n, m, r, dtype, TRITON_DEVICE, bias=(T != 3), seed=T + n)
    _assert_close(_run("triton_fused", x, U, V, b), x, U, V, b)


FUSED_VARIANTS = {
    "gemv": {"use_dot": False},
    "dot": {"use_dot": True, "block_t": 16, "block_r1": 16, "block_k1": 32, "block_m2": 16, "block_r2": 16},
    "two_launch_multi_item": {"sync": "two_launch", "max_programs": 3, "block_r1": 2, "block_k1": 16,
                              "block_m2": 8, "block_r2": 16, "ksplit": 2},
    "barrier_ksplit3": {"ksplit": 3, "block_k1": 16, "block_r2": 16},
    "local": {"sync": "local", "max_programs": 2, "block_m2": 16},
    "early_u": {"early_u": True, "block_r2": 16},
    "fma_rows4": {"use_dot": False, "block_t_fma": 4, "block_r1": 8, "block_k1": 32, "block_m2": 16,
                  "block_r2": 16},
    "fma_rows4_two_launch": {"use_dot": False, "block_t_fma": 4, "sync": "two_launch", "max_programs": 3,
                             "block_r1": 4, "block_k1": 16, "block_m2": 8, "block_r2": 16},
    "dot_two_launch": {"use_dot": True, "sync": "two_launch", "max_programs": 2, "block_t": 16,
                       "block_r1": 16, "block_k1": 16, "block_m2": 16, "block_r2": 16, "ksplit": 2},
    # Several programs per SM: the interpreter runs the barrier grid as one program, so this
    # checks that the option parses and the launch path (cooperative flag included) works.
    "programs_per_sm4": {"use_dot": False, "programs_per_sm": 4, "block_r1": 2, "block_k1": 16,
                         "block_m2": 8, "block_r2": 16},
    "programs_per_sm3_no_coop": {"programs_per_sm": 3, "cooperative": False, "block_r2": 16},
    # Prefetch 2 (three tile buffers, loop unrolled by three): step counts that are not
    # multiples of three leave dead steps, which must load nothing and store nothing.
    "prefetch2": {"use_dot": False, "prefetch": 2, "block_r1": 2, "block_k1": 16, "block_m2": 2,
                  "block_r2": 16},
    "prefetch2_early_u": {"use_dot": False, "prefetch": 2, "early_u": True, "block_r1": 4, "block_k1": 32,
                          "block_m2": 2, "block_r2": 8},
    "prefetch2_two_launch_multi_item": {"use_dot": False, "prefetch": 2, "sync": "two_launch", "max_programs": 3,
                                        "block_r1": 2, "block_k1": 16, "block_m2": 8, "block_r2": 16, "ksplit": 2},
    "prefetch2_rows4_two_launch": {"use_dot": False, "prefetch": 2, "block_t_fma": 4, "sync": "two_launch",
                                   "max_programs": 2, "block_r1": 4, "block_k1": 16, "block_m2": 8, "block_r2": 8},
    "prefetch2_local": {"use_dot": False, "prefetch": 2, "sync": "local", "max_programs": 2, "block_m2": 8,
                        "block_r1": 2, "block_k1": 32, "block_r2": 8},
}


@needs_triton
@pytest.mark.parametrize("variant", list(FUSED_VARIANTS))
@pytest.mark.parametrize("T", [1, 5, 33])
def test_fused_variants(variant, T):
    dtype = TRITON_DTYPES[0]
    x, U, V, b = _inputs((T,), 77, 45, 13, dtype, TRITON_DEVICE, seed=7 * T + len(variant))
    _assert_close(_run("triton_fused", x, U, V, b, FUSED_VARIANTS[variant]), x, U, V, b)


@needs_triton
@pytest.mark.parametrize("cfg", [c for c in fused_candidates(1)
                                 if c.get("programs_per_sm", 1) > 1 or c.get("prefetch", 1) > 1],
                         ids=lambda c: f"pps{c.get('programs_per_sm', 1)}-pf{c.get('prefetch', 1)}")
def test_fused_t1_candidates_small_layer(cfg):
    """The shipped multi-program / prefetch-2 T=1 candidates on a small layer (tiles clipped)."""
    dtype = TRITON_DTYPES[0]
    x, U, V, b = _inputs((1,), 77, 45, 13, dtype, TRITON_DEVICE, seed=5)
    _assert_close(_run("triton_fused", x, U, V, b, cfg), x, U, V, b)


# ------------------------------------------------------------------ barrier occupancy (pure Python)
@pytest.mark.parametrize("regs,shared,warps,expected", [
    (80, 1024, 8, 3),  # 2560 regs/warp: 6 warps per sub-partition -> 24 warps -> 3 programs
    (128, 4096, 4, 4),
    (72, 2048, 4, 7),
    (64, 4096, 8, 4),
    (126, 1024, 8, 2),
    (128, 0, 2, 8),  # cuda_occupancy.h's register limit: 4 warps per sub-partition -> 16 warps
    (40, 0, 1, 32),  # 48 warps by registers, capped at 32 blocks per SM
    (32, 0, 32, 2),  # 2048 threads per SM
    (32, 100_000, 4, 2),  # (100000 + 1024 reserved) rounded to 128 B: 2 per 228 KB
    (255, 0, 8, 1),
    (255, 0, 16, 0),  # 255 regs x 512 threads > 64 K registers: cannot launch at all
    (256, 0, 1, 0),  # over the 255 registers per thread limit
])
def test_blocks_per_sm_h100(regs, shared, warps, expected):
    assert occupancy.blocks_per_sm(regs, shared, warps) == expected


def _fake_props(**kw):
    base = dict(regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048,
                shared_memory_per_multiprocessor=233472, major=9, minor=0, warp_size=32)
    return SimpleNamespace(**{**base, **kw})


def _fake_kernel(n_regs, shared=1024, num_warps=8):
    k = SimpleNamespace(metadata=SimpleNamespace(shared=shared, num_warps=num_warps), function=None)
    k._init_handles = lambda: setattr(k, "n_regs", n_regs)  # triton sets n_regs when loading the binary
    return k


def test_kernel_blocks_per_sm_reads_metadata_and_falls_back():
    assert occupancy.kernel_blocks_per_sm(_fake_kernel(80), _fake_props()) == 3
    # Device limits come from the properties: half the registers, half the programs (rounded).
    assert occupancy.kernel_blocks_per_sm(_fake_kernel(80), _fake_props(regs_per_multiprocessor=32768)) == 1
    # An unknown part is assumed to allow only 16 blocks per SM.
    assert occupancy.kernel_blocks_per_sm(_fake_kernel(16, 0, 1), _fake_props(major=8, minor=6)) == 16
    # Unreadable metadata -> None (the launcher then uses one program per SM).
    assert occupancy.kernel_blocks_per_sm(SimpleNamespace(metadata=None), _fake_props()) is None
    broken = _fake_kernel(80)
    broken._init_handles = lambda: (_ for _ in ()).throw(RuntimeError("no driver"))
    assert occupancy.kernel_blocks_per_sm(broken, _fake_props()) is None
    assert occupancy.kernel_blocks_per_sm(_fake_kernel(0), _fake_props()) is None


def test_resident_programs_caches_and_falls_back_to_one(monkeypatch):
    monkeypatch.setattr(occupancy, "_RESIDENT", {})
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda idx: _fake_props())
    dev = torch.device("cuda", 0)
    calls = []

    def warm(n_regs):
        calls.append(n_regs)
        return _fake_kernel(n_regs)

    assert occupancy.resident_programs(dev, ("a",), lambda: warm(80)) == 3
    assert occupancy.resident_programs(dev, ("a",), lambda: warm(255)) == 3  # cached per (device, spec)
    assert occupancy.resident_programs(dev, ("b",), lambda: warm(126)) == 2
    assert calls == [80, 126]

    def fail():
        raise RuntimeError("compile error")

    assert occupancy.resident_programs(dev, ("c",), fail) == 1
    assert occupancy.resident_programs(dev, ("d",), lambda: SimpleNamespace()) == 1
    assert occupancy.resident_programs(dev, ("e",), lambda: _fake_kernel(255, 0, 16)) == 1  # 0 -> 1


def test_barrier_programs_never_exceed_residency():
    never = lambda: pytest.fail("occupancy read although one program per SM was asked for")  # noqa: E731
    assert occupancy.barrier_programs(1000, 132, 1, never) == 132
    assert occupancy.barrier_programs(100, 132, 4, never) == 100  # fewer items than SMs
    assert occupancy.barrier_programs(256, 132, 2, lambda: 3) == 256
    assert occupancy.barrier_programs(1000, 132, 4, lambda: 3) == 396  # clamped to the occupancy
    assert occupancy.barrier_programs(1000, 132, 2, lambda: 7) == 264
    assert occupancy.barrier_programs(1000, 132, 4, lambda: 0) == 132  # unknown / nonsense -> 1 per SM


def test_fused_params_programs_per_sm_options():
    fp = _lm._fused_params
    p = fp(1, 4096, 4096, 1024, {"programs_per_sm": 3}, 132)
    assert p.programs_per_sm == 3 and p.cooperative is True and p.prefetch == 1
    p = fp(1, 4096, 4096, 1024, {}, 132)
    assert p.programs_per_sm == 1 and p.cooperative is False
    p = fp(1, 4096, 4096, 1024, {"programs_per_sm": 2, "cooperative": False}, 132)
    assert p.cooperative is False
    # Other sync modes size their grid by work items: the per-SM options are normalised away.
    p = fp(1, 4096, 4096, 1024, {"programs_per_sm": 4, "cooperative": True, "sync": "two_launch"}, 132)
    assert p.programs_per_sm == 1 and p.cooperative is False
    # The automatic K split aims at one phase-1 item per requested program.
    assert fp(1, 4096, 4096, 1024, {"block_r1": 8}, 132).ksplit == 1
    assert fp(1, 4096, 4096, 1024, {"block_r1": 8, "programs_per_sm": 2}, 132).ksplit == 2
    # Prefetch depth applies to the GEMV path only.
    assert fp(1, 4096, 4096, 1024, {"prefetch": 2}, 132).prefetch == 2
    assert fp(32, 4096, 4096, 1024, {"prefetch": 2}, 132).prefetch == 1  # tl.dot path
    for bad in ({"programs_per_sm": 0}, {"prefetch": 3}):
        with pytest.raises(ValueError):
            fp(1, 64, 64, 16, bad, 132)
    for cfg in fused_candidates(1):
        assert set(cfg) <= {f.name for f in dataclasses.fields(FusedConfig)}, cfg
        for n, m, r in LLAMA:
            fp(1, n, m, r, cfg, 132)


GEMM_VARIANTS = {
    "triton_both": {"gemm1": {"block_m": 16, "block_n": 16, "block_k": 16},
                    "gemm2": {"block_m": 16, "block_n": 32, "block_k": 16}},
    "splitk_gemm1": {"gemm1": {"block_m": 16, "block_n": 16, "block_k": 16, "split_k": 3},
                     "gemm2": {"block_m": 32, "block_n": 16, "block_k": 16}},
    "cublas_then_triton": {"gemm1": "cublas", "gemm2": {"block_m": 16, "block_n": 16, "block_k": 32}},
    "triton_then_cublas": {"gemm1": {"block_m": 16, "block_n": 16, "block_k": 16}, "gemm2": "cublas"},
}


@needs_triton
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("variant", list(GEMM_VARIANTS))
@pytest.mark.parametrize("T", [1, 40])
def test_two_gemm_variants(variant, T, dtype):
    x, U, V, b = _inputs((T,), 77, 45, 13, dtype, TRITON_DEVICE, seed=T + len(variant))
    _assert_close(_run("two_gemm", x, U, V, b, GEMM_VARIANTS[variant]), x, U, V, b)


@needs_triton
@pytest.mark.parametrize("backend", ["triton_fused", "triton_gemm"])
@pytest.mark.parametrize("lead", [(2, 3), (1, 1, 2), ()], ids=str)
def test_leading_batch_dims(backend, lead):
    dtype = TRITON_DTYPES[0]
    x, U, V, b = _inputs(lead, 48, 20, 8, dtype, TRITON_DEVICE, seed=len(lead))
    y = _run(backend, x, U, V, b)
    assert y.shape == (*lead, 20)
    _assert_close(y, x, U, V, b)


@needs_triton
def test_misaligned_strides_and_views():
    """Row strides that are not multiples of 16 elements (and weights that are views)."""
    dtype = TRITON_DTYPES[0]
    x, U, V, b = _inputs((5,), 70, 30, 12, dtype, TRITON_DEVICE, seed=3)
    U_big = torch.randn(30, 14, dtype=dtype, device=TRITON_DEVICE)
    U_big[:, :12] = U  # U is a view with row stride 14
    for backend in ("triton_fused", "triton_gemm"):
        _assert_close(_run(backend, x, U_big[:, :12], V, b), x, U, V, b)


# ------------------------------------------------------------------ all backends, any device
ALL_CPU_BACKENDS = ["torch", "cublas"] + (["triton_fused", "triton_gemm"] if INTERPRET and HAS_TRITON else [])


@pytest.mark.parametrize("backend", ALL_CPU_BACKENDS)
@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)], ids=str)
def test_zero_rows(backend, lead):
    x, U, V, b = _inputs(lead, 16, 8, 4, torch.float32, "cpu")
    y = lowrank_matmul_launch(x, U, V, b, backend=backend)
    assert y.shape == (*lead, 8) and y.dtype == x.dtype
    assert lowrank_matmul(x, U, V, b).shape == (*lead, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_auto_on_cpu_is_torch_path(dtype):
    x, U, V, b = _inputs((2, 7), 33, 21, 5, dtype, "cpu")
    y = lowrank_matmul(x, U, V, b)
    assert y.dtype == dtype and y.shape == (2, 7, 21)
    torch.testing.assert_close(y, F.linear(F.linear(x, V), U, b))


@pytest.mark.parametrize("bias", [True, False])
def test_padded_u_two_gemm_path(bias):
    """The misaligned-rank path that pads U per call (cuBLAS on CUDA, torch.mm on CPU)."""
    x, U, V, b = _inputs((2, 5), 33, 20, 13, torch.float32, "cpu", bias=bias)
    y = _run("two_gemm", x, U, V, b, {"gemm1": "cublas", "gemm2": "cublas", "pad_u": True})
    _assert_close(y, x, U, V, b)


def test_pad_rank_is_exact_and_aligned():
    x, U, V, b = _inputs((4,), 30, 20, 13, torch.float64, "cpu")
    U2, V2 = pad_rank(U, V)
    assert U2.shape == (20, 16) and V2.shape == (16, 30) and U2.stride(0) % 8 == 0
    torch.testing.assert_close(lowrank_matmul(x, U2, V2, b), lowrank_matmul_ref(x, U, V, b))
    U3, V3 = pad_rank(U2, V2)
    assert U3 is U2 and V3 is V2
    with pytest.raises(ValueError, match="rank mismatch"):
        pad_rank(U, V[:5])


def test_ref_is_unfused_torch():
    x, U, V, b = _inputs((4,), 10, 6, 3, torch.float64, "cpu")
    torch.testing.assert_close(lowrank_matmul_ref(x, U, V, b), x @ V.T @ U.T + b)


def _error_cases():
    x, U, V, b = _inputs((3,), 16, 8, 4, torch.float32, "cpu")
    return {
        "in_features": ((torch.randn(3, 15), U, V, b), "last dim of x"),
        "rank": ((x, torch.randn(8, 5), V, b), "rank mismatch"),
        "bias_shape": ((x, U, V, torch.randn(7)), "bias must have shape"),
        "dtype_x": ((x.double(), U, V, b), "dtype mismatch"),
        "dtype_bias": ((x, U, V, b.half()), "dtype mismatch"),
        "dtype_U": ((x, U.to(torch.bfloat16), V, b), "dtype mismatch"),
        "U_1d": ((x, U[:, 0], V, b), "must be 2-D"),
        "int": ((x.int(), U.int(), V.int(), None), "floating-point"),
        "device": ((x, U, V.to("meta"), b), "device mismatch"),
    }


@pytest.mark.parametrize("case", list(_error_cases()))
def test_value_errors(case):
    args, msg = _error_cases()[case]
    with pytest.raises(ValueError, match=msg):
        lowrank_matmul(*args)
    with pytest.raises(ValueError, match=msg):
        lowrank_matmul_launch(*args)


def test_bad_backend_and_out():
    x, U, V, b = _inputs((3,), 16, 8, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="backend"):
        lowrank_matmul(x, U, V, b, backend="nope")
    with pytest.raises(ValueError, match="out must be"):
        lowrank_matmul(x, U, V, b, out=torch.empty(3, 9))
    with pytest.raises(ValueError, match="out must be"):
        lowrank_matmul(x, U, V, b, out=torch.empty(3, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="inference-only"):
        lowrank_matmul(x.requires_grad_(), U, V, b, out=torch.empty(3, 8))


@pytest.mark.skipif(INTERPRET or not HAS_TRITON, reason="checks the no-interpreter CPU behaviour")
def test_forced_triton_on_cpu_without_interpreter_raises():
    x, U, V, b = _inputs((3,), 16, 8, 4, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        lowrank_matmul_launch(x, U, V, b, backend="triton_fused")


# ------------------------------------------------------------------ autograd / compile / op
GRAD_BACKENDS = ["torch"] + (["triton_fused"] if INTERPRET and HAS_TRITON else [])


@pytest.mark.parametrize("backend", GRAD_BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_backward_matches_autograd(backend, bias):
    x, U, V, b = _inputs((2, 5), 24, 18, 6, torch.float32, "cpu", bias=bias, seed=11)
    leaves = [t.clone().requires_grad_() for t in (x, U, V) + ((b,) if bias else ())]
    refs = [t.clone().requires_grad_() for t in leaves]
    g = torch.randn(2, 5, 18, generator=torch.Generator().manual_seed(5))
    y = lowrank_matmul(*leaves[:3], leaves[3] if bias else None, backend=backend)
    y_ref = lowrank_matmul_ref(*refs[:3], refs[3] if bias else None)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(y, leaves, g)
    grads_ref = torch.autograd.grad(y_ref, refs, g)
    for name, a, e in zip("x U V b".split(), grads, grads_ref, strict=False):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5, msg=f"grad {name}")


def test_backward_partial_requires_grad():
    x, U, V, b = _inputs((3,), 12, 10, 4, torch.float64, "cpu")
    U = U.clone().requires_grad_()
    y = lowrank_matmul(x, U, V, b, backend="torch")
    (gU,) = torch.autograd.grad(y.sum(), [U])
    U2 = U.detach().clone().requires_grad_()
    (gU2,) = torch.autograd.grad(lowrank_matmul_ref(x, U2, V, b).sum(), [U2])
    torch.testing.assert_close(gU, gU2)


def test_opcheck():
    x, U, V, b = _inputs((2, 3), 12, 10, 4, torch.float32, "cpu")
    x, U, V, b = (t.requires_grad_() for t in (x, U, V, b))
    torch.library.opcheck(torch.ops.lowrank.lowrank_matmul.default, (x, U, V, b, "torch"))
    torch.library.opcheck(torch.ops.lowrank.lowrank_matmul.default, (x.detach(), U.detach(), V.detach(), None,
                                                                     "auto"))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    if backend == "inductor" and os.environ.get("LOWRANK_TEST_INDUCTOR", "0") != "1":
        pytest.skip("inductor on CPU needs a C++ toolchain and ~20 s; set LOWRANK_TEST_INDUCTOR=1")
    torch._dynamo.reset()
    x, U, V, b = _inputs((2, 4), 20, 12, 5, torch.float32, "cpu")

    def layer(x, U, V, b):
        return torch.relu(lowrank_matmul(x, U, V, b)) * 2.0

    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    torch.testing.assert_close(compiled(x, U, V, b), layer(x, U, V, b))
    # and through autograd
    xg = x.clone().requires_grad_()
    compiled(xg, U, V, b).sum().backward()
    xr = x.clone().requires_grad_()
    torch.relu(lowrank_matmul_ref(xr, U, V, b)).mul(2.0).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad)


def test_import_does_not_initialise_cuda():
    code = (
        "import torch, lowrank_kernels.lowrank_matmul as m; "
        "assert not torch.cuda.is_initialized(), 'CUDA initialised at import'; print('ok')"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_bucket_nearest_in_log_space():
    assert _bucket(1, list(T_BUCKETS)) == 1
    assert _bucket(3, list(T_BUCKETS)) == 4
    assert _bucket(200, list(T_BUCKETS)) == 256
    assert _bucket(100000, list(T_BUCKETS)) == 8192


def test_shipped_dispatch_table_is_valid():
    if not CONFIG_PATH.exists():
        pytest.skip("no tuned table shipped")
    table = json.loads(CONFIG_PATH.read_text())
    assert table["entries"], "empty table"
    for key, per_t in table["entries"].items():
        n, rest = key.split("x")
        m, r = rest.split("r")
        assert int(n) > 0 and int(m) > 0 and int(r) > 0
        for t, choice in per_t.items():
            assert int(t) >= 1
            assert choice["backend"] in BACKENDS
            assert isinstance(choice.get("config", {}), dict)


# ------------------------------------------------------------------ GPU
LLAMA = [(4096, 4096, 1024), (4096, 11008, 1492), (11008, 4096, 1472)]


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("T", [1, 4, 16, 300])
@pytest.mark.parametrize("shape", LLAMA, ids=lambda s: "x".join(map(str, s)))
def test_gpu_llama_shapes_auto(shape, T, dtype):
    n, m, r = shape
    x, U, V, b = _inputs((T,), n, m, r, dtype, "cuda", bias=(T == 4), seed=T)
    _assert_close(_run("auto", x, U, V, b), x, U, V, b)


@gpu
@needs_cuda
@pytest.mark.parametrize("backend,config", [
    ("triton_fused", {"sync": "barrier"}),
    ("triton_fused", {"sync": "two_launch"}),
    ("triton_fused", {"early_u": True, "block_r2": 1024, "num_warps": 16}),
    ("triton_fused", {"use_dot": True}),
    # Several programs per SM (T=17: tl.dot tiles with ~100 KB of shared memory, so the
    # occupancy clamp comes from shared memory rather than registers).
    ("triton_fused", {"programs_per_sm": 4, "block_r1": 2, "block_k1": 2048, "block_m2": 8, "block_r2": 512,
                      "num_warps": 4}),
    ("triton_fused", {"programs_per_sm": 4, "prefetch": 2, "block_r1": 2, "block_k1": 2048, "block_m2": 8,
                      "block_r2": 512, "num_warps": 4}),
    ("triton_fused", {"programs_per_sm": 3, "cooperative": False}),
    ("triton_gemm", None),
    ("two_gemm", {"gemm1": {"block_m": 64, "block_n": 64, "block_k": 64, "split_k": 4}, "gemm2": "cublas"}),
])
@pytest.mark.parametrize("T", [1, 17])
def test_gpu_backends_bf16(backend, config, T):
    x, U, V, b = _inputs((T,), 4096, 11008, 1492, torch.bfloat16, "cuda", seed=T)
    _assert_close(_run(backend, x, U, V, b, config), x, U, V, b)


@gpu
@needs_cuda
def test_gpu_barrier_reuse_across_grid_sizes_and_streams():
    """The self-resetting barrier must survive launches of different grid sizes and streams."""
    cases = [_inputs((1,), n, m, r, torch.bfloat16, "cuda", seed=i)
             for i, (n, m, r) in enumerate([(4096, 4096, 1024), (576, 576, 144), (77, 45, 13)])]
    s2 = torch.cuda.Stream()
    for _ in range(20):
        for i, (x, U, V, b) in enumerate(cases):
            stream = s2 if i % 2 else torch.cuda.current_stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                y = lowrank_matmul_launch(x, U, V, b, backend="triton_fused", config={"sync": "barrier"})
            torch.cuda.current_stream().wait_stream(stream)
            torch.cuda.synchronize()
            _assert_close(y, x, U, V, b)


@gpu
@needs_cuda
@pytest.mark.parametrize("T", [1, 16, 512])
def test_gpu_cuda_graph_capture(T):
    x, U, V, b = _inputs((T,), 4096, 4096, 1024, torch.bfloat16, "cuda", seed=T)
    static_x = x.clone()
    lowrank_matmul(static_x, U, V, b)  # compile + cache the dispatch outside capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_y = lowrank_matmul(static_x, U, V, b)
    for seed in range(3):
        new_x = torch.randn(x.shape, generator=torch.Generator(device="cuda").manual_seed(seed),
                            device="cuda", dtype=x.dtype)
        static_x.copy_(new_x)
        static_y.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        _assert_close(static_y.clone(), new_x, U, V, b)


@gpu
@needs_cuda
@pytest.mark.parametrize("cooperative", [True, False])
def test_gpu_multi_program_barrier_in_cuda_graph(cooperative):
    """programs_per_sm > 1: the grid stays within the driver's occupancy and survives graph replay."""
    cfg = {"programs_per_sm": 4, "cooperative": cooperative, "block_r1": 2, "block_k1": 2048, "block_m2": 8,
           "block_r2": 512, "num_warps": 4}
    x, U, V, b = _inputs((1,), 4096, 11008, 1472, torch.bfloat16, "cuda", seed=3)
    occupancy._RESIDENT.clear()
    y = _run("triton_fused", x, U, V, b, cfg)
    torch.cuda.synchronize()
    _assert_close(y, x, U, V, b)
    (resident,) = occupancy._RESIDENT.values()
    assert 1 <= resident <= 32
    static_x = x.clone()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_y = lowrank_matmul_launch(static_x, U, V, b, backend="triton_fused", config=cfg)
    for seed in range(3):
        static_x.copy_(torch.randn(x.shape, generator=torch.Generator(device="cuda").manual_seed(seed),
                                   device="cuda", dtype=x.dtype))
        static_y.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        _assert_close(static_y.clone(), static_x, U, V, b)


@gpu
@needs_cuda
def test_gpu_compile_fullgraph_and_backward():
    x, U, V, b = _inputs((3, 5), 576, 1536, 192, torch.bfloat16, "cuda")
    f = torch.compile(lambda x, U, V, b: lowrank_matmul(x, U, V, b), fullgraph=True)
    _assert_close(f(x, U, V, b), x, U, V, b)
    U = U.clone().requires_grad_()
    lowrank_matmul(x, U, V, b).float().sum().backward()
    U2 = U.detach().clone().requires_grad_()
    lowrank_matmul_ref(x, U2, V, b).float().sum().backward()
    torch.testing.assert_close(U.grad, U2.grad, atol=5e-2, rtol=2e-2)
