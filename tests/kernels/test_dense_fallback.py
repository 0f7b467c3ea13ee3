"""Dense fallback of the low-rank dispatch: ``lowrank_matmul(..., dense_weight=W)`` and
``LowRankLinear.enable_dense_fallback``.

On the CPU nothing was measured, so ``dense_is_faster`` is False there; the tests reach the
dense branch by patching the decision, and test the decision itself against hand-made tables.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from lowrank_kernels import dispatch
from lowrank_kernels.lowrank_matmul import lowrank_matmul

from bench.tools.tune_lowrank import _fit_relative, merge_dense
from lowrank import LowRankLinear
from lowrank.serving import enable_dense_fallback


def _factors(n: int, m: int, r: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(torch.seed() % (1 << 31))
    U = torch.randn(m, r, generator=g, dtype=dtype) / r ** 0.5
    V = torch.randn(r, n, generator=g, dtype=dtype) / n ** 0.5
    return U, V


@pytest.fixture
def always_dense(monkeypatch):
    import lowrank.linear

    monkeypatch.setattr(dispatch, "dense_is_faster", lambda *args: True)
    monkeypatch.setattr(lowrank.linear, "dense_is_faster", lambda *args: True)


def test_cpu_never_falls_back():
    U, V = _factors(20, 12, 5)
    x = torch.randn(3, 20)
    W = torch.randn(12, 20)  # deliberately NOT U @ V: the output shows which path ran
    assert not dispatch.dense_is_faster(3, 20, 12, 5, x.device)
    torch.testing.assert_close(lowrank_matmul(x, U, V, dense_weight=W), F.linear(F.linear(x, V), U),
                               rtol=0, atol=0)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("lead", [(1,), (2, 3)])
def test_dense_branch_runs_f_linear(always_dense, bias, lead):
    U, V = _factors(20, 12, 5)
    W = torch.randn(12, 20)
    b = torch.randn(12) if bias else None
    x = torch.randn(*lead, 20)
    torch.testing.assert_close(lowrank_matmul(x, U, V, b, dense_weight=W), F.linear(x, W, b), rtol=0, atol=0)
    out = torch.full((*lead, 12), float("nan"))
    lowrank_matmul(x, U, V, b, dense_weight=W, out=out)
    assert not out.isnan().any()
    torch.testing.assert_close(out, F.linear(x, W, b), rtol=1e-6, atol=1e-6)


def test_dense_branch_never_under_autograd_or_forced_backend(always_dense):
    U, V = _factors(20, 12, 5)
    W = torch.randn(12, 20)
    x = torch.randn(4, 20, requires_grad=True)
    factored = F.linear(F.linear(x, V), U)
    y = lowrank_matmul(x, U, V, dense_weight=W)
    torch.testing.assert_close(y, factored)  # gradients belong to U and V: factorized path
    y.sum().backward()
    assert x.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(lowrank_matmul(x, U, V, backend="torch", dense_weight=W), factored)


def test_dense_weight_validation():
    U, V = _factors(20, 12, 5)
    x = torch.randn(2, 20)
    with pytest.raises(ValueError, match="dense_weight must be"):
        lowrank_matmul(x, U, V, dense_weight=torch.randn(20, 12))
    with pytest.raises(ValueError, match="dense_weight must be"):
        lowrank_matmul(x, U, V, dense_weight=torch.randn(12, 20, dtype=torch.float64))


def _table(entries: dict, model: dict | None = None) -> dict:
    return {"entries": entries, "latency_model": model or {}}


def _use_table(monkeypatch, table: dict, trust: str | None = "exact") -> None:
    monkeypatch.setattr(dispatch, "_table_for", lambda device: (table, trust))
    monkeypatch.setattr(dispatch, "_DENSE_CACHE", {})


def test_decision_from_measured_entries(monkeypatch):
    entries = {"576x576r128": {"1": {"backend": "triton_fused", "dense_ms": 0.0036, "sweep_ms": 0.0043},
                               "8192": {"backend": "two_gemm", "dense_ms": 0.012, "sweep_ms": 0.010}}}
    _use_table(monkeypatch, _table(entries))
    dev = torch.device("cuda", 0)  # constructing a device object does not touch CUDA
    assert dispatch.dense_is_faster(1, 576, 576, 128, dev)
    assert dispatch.dense_is_faster(2, 576, 576, 128, dev)  # nearest bucket in log2
    assert not dispatch.dense_is_faster(8192, 576, 576, 128, dev)
    assert not dispatch.dense_is_faster(4000, 576, 576, 128, dev)
    # far from both measured T (1 and 8192) and no latency model: no evidence, no fallback
    assert not dispatch.dense_is_faster(64, 576, 576, 128, dev)
    # untuned shape without a latency model: no evidence, no fallback
    assert not dispatch.dense_is_faster(1, 576, 1536, 192, dev)


def test_decision_from_latency_model(monkeypatch):
    # dense: 3 us + 0.4 us/MB; factorized: 4.5 us + 0.4 us/MB (launch-bound small layers lose)
    model = {"1": {"dense": [3e-3, 4e-10, 0.0], "lowrank": [4.5e-3, 4e-10, 0.0],
                   "lowrank_ragged": [5e-3, 8e-10, 0.0]}}
    _use_table(monkeypatch, _table({}, model))
    dev = torch.device("cuda", 0)
    small, big = (576, 576, 128), (4096, 4096, 1024)
    for n, m, r in (small, big):
        dense = dispatch.predicted_ms(1, n, m, None, model)
        factored = dispatch.predicted_ms(1, n, m, r, model)
        assert dense == pytest.approx(3e-3 + 4e-10 * 2 * (m * n + (m + n)))
        assert factored == pytest.approx(4.5e-3 + 4e-10 * 2 * (r * (m + n) + (m + n)))
        assert dispatch.dense_is_faster(1, n, m, r, dev) == (dense < factored)
    assert dispatch.dense_is_faster(1, 576, 576, 128, dev)
    assert not dispatch.dense_is_faster(1, 4096, 4096, 1024, dev)
    # a ragged rank uses its own (slower) fit
    assert dispatch.predicted_ms(1, 4096, 4096, 1023, model) > dispatch.predicted_ms(1, 4096, 4096, 1024, model)


def test_measured_point_only_decides_near_its_t(monkeypatch):
    # tuned at T=1 and 4 only (dense faster there); the model says factorized wins at 8192
    entries = {"1536x576r192": {"1": {"backend": "triton_fused", "dense_ms": 0.004, "sweep_ms": 0.005},
                                "4": {"backend": "two_gemm", "dense_ms": 0.004, "sweep_ms": 0.007}}}
    model = {"1": {"dense": [1e-3, 0.0, 0.0], "lowrank": [2e-3, 0.0, 0.0], "lowrank_ragged": [2e-3, 0.0, 0.0]},
             "8192": {"dense": [2e-2, 0.0, 0.0], "lowrank": [1e-2, 0.0, 0.0], "lowrank_ragged": [1e-2, 0.0, 0.0]}}
    _use_table(monkeypatch, _table(entries, model))
    dev = torch.device("cuda", 0)
    assert dispatch.dense_is_faster(1, 1536, 576, 192, dev)
    assert dispatch.dense_is_faster(8, 1536, 576, 192, dev)  # within 2x of the T=4 point
    assert not dispatch.dense_is_faster(8192, 1536, 576, 192, dev)  # the latency model decides


def test_sibling_table_counts_only_clear_dense_wins(monkeypatch):
    # same chip, other memory class: dense must have won by the margin, measured or modelled
    entries = {"576x576r128": {"1": {"backend": "triton_fused", "dense_ms": 0.0036, "sweep_ms": 0.0043},
                               "16": {"backend": "two_gemm", "dense_ms": 0.0030, "sweep_ms": 0.0060}}}
    model = {"1024": {"dense": [1e-2, 0.0, 0.0], "lowrank": [1.1e-2, 0.0, 0.0], "lowrank_ragged": [2e-2, 0.0, 0.0]}}
    dev = torch.device("cuda", 0)
    _use_table(monkeypatch, _table(entries, model), trust="exact")
    assert dispatch.dense_is_faster(1, 576, 576, 128, dev)
    assert dispatch.dense_is_faster(1024, 4096, 4096, 1024, dev)  # the model: 10 us < 11 us
    _use_table(monkeypatch, _table(entries, model), trust="sibling")
    assert not dispatch.dense_is_faster(1, 576, 576, 128, dev)  # 3.6 vs 4.3 us: not clear enough
    assert dispatch.dense_is_faster(16, 576, 576, 128, dev)  # 3.0 vs 6.0 us: clear
    assert not dispatch.dense_is_faster(1024, 4096, 4096, 1024, dev)
    _use_table(monkeypatch, _table(entries, model), trust=None)
    assert not any(dispatch.dense_is_faster(t, 576, 576, 128, dev) for t in (1, 16))


def test_fit_relative_recovers_exact_model():
    g = torch.Generator().manual_seed(torch.seed() % (1 << 31))
    c = [3e-3, 4e-10, 2e-12]
    rows = []
    for _ in range(12):
        nbytes = float(torch.randint(10**5, 10**8, (1,), generator=g))
        flops = float(torch.randint(10**6, 10**11, (1,), generator=g))
        rows.append((c[0] + c[1] * nbytes + c[2] * flops, nbytes, flops))
    fit = _fit_relative(rows)
    for got, want in zip(fit, c, strict=True):
        assert got == pytest.approx(want, rel=1e-6)
    # a term that would come out negative is dropped, never kept negative
    rows = [(1e-3 + 1e-9 * b, b, f) for (_, b, f) in rows]
    assert min(_fit_relative(rows)) >= 0.0


def test_merge_dense_annotates_and_fits():
    table = {"entries": {"576x576r128": {"1": {"backend": "triton_fused", "ms": 0.004}}}}
    records = []
    for n, m in [(576, 576), (576, 1536), (1536, 576), (4096, 4096)]:
        for r, aligned in [(128, True), (192, True), (256, True), (209, False), (314, False), (77, False)]:
            io = 2.0 * (m + n)
            records.append({"n": n, "m": m, "r": r, "T": 1, "aligned": aligned,
                            "dense_ms": 3e-3 + 4e-10 * (2.0 * m * n + io),
                            "lowrank_ms": (4.5e-3 if r % 8 == 0 else 6e-3) + 4e-10 * (2.0 * r * (m + n) + io)})
    lines: list[str] = []
    merge_dense(table, records, lines.append)
    point = table["entries"]["576x576r128"]["1"]
    assert point["dense_ms"] == pytest.approx(3e-3 + 4e-10 * (2.0 * 576 * 576 + 2.0 * 1152))
    assert point["sweep_ms"] == pytest.approx(4.5e-3 + 4e-10 * (2.0 * 128 * 1152 + 2.0 * 1152))
    fit = table["latency_model"]["1"]
    assert fit["dense"][0] == pytest.approx(3e-3, rel=1e-6)
    assert fit["lowrank"][0] == pytest.approx(4.5e-3, rel=1e-6)
    assert fit["lowrank_ragged"][0] == pytest.approx(6e-3, rel=1e-6)
    assert "24/24" in lines[-1]


def test_shipped_tables_have_dense_timings():
    from lowrank_kernels.tuning import shipped_tables

    tables = shipped_tables()
    assert tables, "no dispatch table shipped"
    for path, table in tables:
        assert table.get("latency_model"), f"{path.name}: run bench.tools.tune_lowrank --merge-dense"
        with_dense = [p for e in table["entries"].values() for p in e.values() if "dense_ms" in p]
        assert with_dense and all(p["dense_ms"] > 0 and p["sweep_ms"] > 0 for p in with_dense), path.name


def test_linear_enable_dense_fallback_cpu():
    layer = LowRankLinear(24, 16, 4)
    x = torch.randn(3, 24)
    factored = layer(x)
    assert layer.enable_dense_fallback() is False  # CPU: not measured faster
    assert layer.dense_weight is None
    assert layer.enable_dense_fallback(force=True) is True
    torch.testing.assert_close(layer.dense_weight, layer.U.detach() @ layer.V.detach(), rtol=1e-6, atol=1e-6)
    assert "dense_weight" not in layer.state_dict()
    assert "dense fallback" in repr(layer)
    torch.testing.assert_close(layer(x), factored, rtol=0, atol=0)  # CPU dispatch still factorized
    with pytest.raises(ValueError, match="positive"):
        layer.enable_dense_fallback([0])


def test_linear_dense_copy_dropped_when_factors_change(always_dense):
    layer = LowRankLinear(24, 16, 6)
    x = torch.randn(2, 24)
    layer.enable_dense_fallback(force=True)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.dense_weight, layer.bias), rtol=0, atol=0)
        layer.U.mul_(2.0)  # in-place edit: the copy is stale now
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = layer(x)
        assert any("dropping the dense copy" in str(w.message) for w in caught)
        assert layer.dense_weight is None
        torch.testing.assert_close(y, F.linear(F.linear(x, layer.V), layer.U, layer.bias))
    layer.enable_dense_fallback(force=True)
    layer.truncate(3)
    assert layer.dense_weight is None


def test_model_level_helper(always_dense):
    model = torch.nn.Sequential(LowRankLinear(16, 16, 4), torch.nn.ReLU(), LowRankLinear(16, 8, 2))
    held = enable_dense_fallback(model, tokens=[1, 8])
    assert held == {"0": True, "2": True}
    x = torch.randn(5, 16)
    with torch.no_grad():
        ref = F.linear(F.relu(F.linear(x, model[0].U @ model[0].V, model[0].bias)),
                       model[2].U @ model[2].V, model[2].bias)
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_compile_fullgraph_with_dense_copy():
    torch._dynamo.reset()
    layer = LowRankLinear(32, 24, 6)
    layer.enable_dense_fallback(force=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_smollm2_shape_falls_back():
    if dispatch._table_for(torch.device("cuda", torch.cuda.current_device()))[1] != "exact":
        pytest.skip("no shipped table or tuning cache for this device (python -m compress tune)")
    layer = LowRankLinear(576, 576, 128, device="cuda", dtype=torch.bfloat16)
    assert layer.enable_dense_fallback([1]) is True
    x = torch.randn(1, 576, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.dense_weight, layer.bias), rtol=0, atol=0)
    big = LowRankLinear(4096, 4096, 1024, device="cuda", dtype=torch.bfloat16)
    assert big.enable_dense_fallback([1]) is False
