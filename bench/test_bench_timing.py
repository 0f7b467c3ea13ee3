"""The one CUDA-graph timer of ``bench/common.py`` (``python -m pytest bench/test_bench_timing.py``; CUDA only)."""

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
    assert one > 0 and many > 0
    assert 0.5 < one / many < 2.0
    eager = event_median_ms(lambda: [x @ w for _ in range(8)], reps=5, per_call=8)
    assert 0.5 < one / eager < 2.0  # a long GEMM: launch overhead is noise either way


def test_capture_failure_falls_back_to_eager_only_when_asked():
    x = torch.randn(1024, device="cuda")
    syncing = lambda: x.sum().item()  # a host sync cannot be captured
    with pytest.raises(Exception):  # noqa: B017 - whatever torch raises for an illegal capture
        cuda_graph_median(syncing, iters=4, reps=3)
    torch.cuda.synchronize()
    assert cuda_graph_median(syncing, iters=4, reps=3, eager_fallback=True) > 0
