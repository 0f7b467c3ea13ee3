"""pytest-benchmark entry for kernels.gram: ``python -m pytest tests/bench/test_bench_gram.py`` (CUDA only).

Wall-clock per call includes a device synchronisation; ``python -m bench.kernels.gram`` is the
device-event benchmark with the full table.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from lowrank_kernels.gram import gram_accumulate  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("d", [576, 1536, 4096])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bench_gram_accumulate(benchmark, d, backend):
    X = torch.randn(16384, d, device="cuda", dtype=torch.bfloat16)
    G = torch.zeros(d, d, device="cuda")

    def step():
        gram_accumulate(G, X, backend=backend)
        torch.cuda.synchronize()

    step()
    benchmark(step)
    assert torch.equal(G, G.T)


@pytest.mark.parametrize("d", [576, 4096])
def test_bench_torch_mm_out_fp32(benchmark, d):
    X = torch.randn(16384, d, device="cuda", dtype=torch.bfloat16)

    def step():
        torch.mm(X.T, X, out_dtype=torch.float32)
        torch.cuda.synchronize()

    step()
    benchmark(step)
