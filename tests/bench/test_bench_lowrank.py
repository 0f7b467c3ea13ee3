"""pytest-benchmark entries for lowrank_matmul (``python -m pytest tests/bench/test_bench_lowrank.py``).

Skipped without CUDA.  Host-side timing (pytest-benchmark) includes launch overhead, so each
round synchronises; ``bench/kernels/lowrank.py`` is the device-side (CUDA-graph) measurement.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CASES = [  # (n, m, r) LLaMA-7B shapes at 50 % of the dense parameters, aligned to 64
    (4096, 4096, 1024),
    (4096, 11008, 1472),
    (11008, 4096, 1472),
]


def _setup(n: int, m: int, r: int, T: int):
    g = torch.Generator(device="cuda").manual_seed(n + m + r + T)
    kw = dict(device="cuda", dtype=torch.bfloat16, generator=g)
    x = torch.randn(T, n, **kw)
    U = torch.randn(m, r, **kw) / math.sqrt(r)
    V = torch.randn(r, n, **kw) / math.sqrt(n)
    W = torch.randn(m, n, **kw) / math.sqrt(n)
    return x, U, V, W


def _sync(fn):
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


@pytest.mark.parametrize("T", [1, 16, 256, 8192])
@pytest.mark.parametrize("shape", CASES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", ["lowrank", "dense", "torch_two_gemm"])
def test_bench_lowrank(benchmark, impl, shape, T):
    from lowrank_kernels.lowrank_matmul import lowrank_matmul

    x, U, V, W = _setup(*shape, T)
    fns = {
        "lowrank": lambda: lowrank_matmul(x, U, V),
        "dense": lambda: F.linear(x, W),
        "torch_two_gemm": lambda: F.linear(F.linear(x, V), U),
    }
    fn = _sync(fns[impl])
    fn()  # compile / warm up outside the timed rounds
    benchmark.extra_info.update({"n": shape[0], "m": shape[1], "r": shape[2], "T": T})
    benchmark(fn)
