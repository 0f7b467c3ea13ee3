"""The one CUDA-graph timer of ``compress/timing.py`` (``python -m pytest tests/compress/test_timing.py``; CUDA
only)."""

from __future__ import annotations

import pytest
import torch

from compress.timing import cuda_graph_median, event_median_ms

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_single_callable_and_list_time_the_same_work():
    x = torch.randn(4096, 4096, device="cuda")
    w = torch.randn(4096, 4096, device="cuda")
    one = cuda_graph_median(lambda: x @ w, iters=8, reps=5)
    many = cuda_graph_median([lambda: x @ w] * 8, reps=5)
    eager = event_median_ms(lambda: [x @ w for _ in range(8)], reps=5, per_call=8)
    # Eight 4096^3 GEMMs run ~1 ms: the three ways of timing the same work agree to a few percent,
    # since launch overhead (a few us per call) is noise at that length.
    assert abs(one / many - 1) < 0.1, (one, many)
    assert abs(one / eager - 1) < 0.1, (one, eager)


def test_time_is_per_call_and_linear_in_the_work():
    x = torch.randn(4096, 4096, device="cuda")
    w = torch.randn(4096, 4096, device="cuda")
    single = cuda_graph_median(lambda: x @ w, iters=8, reps=5)
    double = cuda_graph_median(lambda: (x @ w, x @ w), iters=8, reps=5)
    assert abs(double / single - 2) < 0.2, (single, double)  # per call, not per graph or per GEMM
    assert abs(cuda_graph_median(lambda: x @ w, iters=16, reps=5) / single - 1) < 0.1  # iters only divides


def test_capture_failure_falls_back_to_eager_only_when_asked():
    x = torch.randn(1024, device="cuda")
    syncing = lambda: x.sum().item()  # a host sync cannot be captured
    with pytest.raises(Exception):  # noqa: B017 - whatever torch raises for an illegal capture
        cuda_graph_median(syncing, iters=4, reps=3)
    torch.cuda.synchronize()
    assert cuda_graph_median(syncing, iters=4, reps=3, eager_fallback=True) > 0
