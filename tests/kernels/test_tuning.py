"""Device-keyed dispatch tables (``lowrank_kernels.tuning``) and ``python -m compress tune`` on the CPU.

Nothing here touches CUDA: device properties are plain objects shaped like
``torch.cuda.get_device_properties(i)``, and the tuner is only checked for refusing cleanly.
"""

from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from lowrank_kernels import dispatch, tuning
from lowrank_kernels.lowrank_matmul_config import TwoGemmConfig

from compress import cli, tune
from compress.errors import UserError

GIB, MIB = 2**30, 2**20
H100 = SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0, multi_processor_count=132,
                       total_memory=int(79.2 * GIB), L2_cache_size=50 * MIB)
H200 = SimpleNamespace(name="NVIDIA H200", major=9, minor=0, multi_processor_count=132,
                       total_memory=int(139.8 * GIB), L2_cache_size=60 * MIB)
# Same properties as the H100, another marketing name: the key must not care.
H100_RENAMED = SimpleNamespace(**{**vars(H100), "name": "GH100 engineering sample"})
A100 = SimpleNamespace(name="NVIDIA A100-SXM4-80GB", major=8, minor=0, multi_processor_count=108,
                       total_memory=int(79.1 * GIB), L2_cache_size=40 * MIB)


def _table(dev, entries=None) -> dict:
    return {"device": tuning.device_properties(dev), "entries": entries or {}, "latency_model": {}}


def test_device_key_from_properties_not_names():
    h100, h200 = tuning.device_properties(H100), tuning.device_properties(H200)
    assert tuning.device_key(h100) == "cc90_sm132_mem80g_l2_50m"
    assert tuning.device_key(h200) == "cc90_sm132_mem140g_l2_60m"
    assert tuning.device_key(tuning.device_properties(H100_RENAMED)) == tuning.device_key(h100)
    assert tuning.match(h100, tuning.device_properties(H100_RENAMED)) == "exact"
    assert tuning.match(h100, h200) == "sibling"  # same chip, other memory
    assert tuning.match(h200, h100) == "sibling"
    assert tuning.match(h100, tuning.device_properties(A100)) is None
    assert tuning.match(None, h100) is None
    assert tuning.match({"name": "NVIDIA H100 80GB HBM3"}, h100) is None  # a name alone never matches


def test_shipped_tables_are_named_by_their_device_key():
    tables = tuning.shipped_tables()
    assert tables
    for path, table in tables:
        assert path.name == f"lowrank_matmul.{tuning.device_key(table['device'])}.json"
        assert table.get("device_key", tuning.device_key(table["device"])) == tuning.device_key(table["device"])
    assert tuning.CONFIG_PATH in [p for p, _ in tables]


def test_dispatch_table_exact_sibling_none_and_cache(tmp_path, monkeypatch):
    configs, cache = tmp_path / "configs", tmp_path / "cache"
    configs.mkdir()
    shipped = _table(H100, {"576x576r128": {"1": {"backend": "triton_fused", "config": {}}}})
    (configs / "lowrank_matmul.cc90_sm132_mem80g_l2_50m.json").write_text(json.dumps(shipped))
    monkeypatch.setenv("LOWRANK_TUNING_DIR", str(cache))
    h100, h200 = tuning.device_properties(H100_RENAMED), tuning.device_properties(H200)

    table, trust = tuning.dispatch_table(h100, configs)
    assert trust == "exact" and "576x576r128" in table["entries"]
    table, trust = tuning.dispatch_table(h200, configs)
    assert trust == "sibling"
    assert tuning.dispatch_table(tuning.device_properties(A100), configs) == ({}, None)

    # a tuning run on the H200 makes its table exact there, and leaves the H100 alone
    tuned = {"entries": {"4096x4096r1024": {"1": {"backend": "two_gemm", "config": {}, "ms": 0.02}}}}
    path = tuning.save_cache(h200, tuned)
    assert path == cache / "cc90_sm132_mem140g_l2_60m.json"
    table, trust = tuning.dispatch_table(h200, configs)
    assert trust == "exact" and list(table["entries"]) == ["4096x4096r1024"]
    assert tuning.dispatch_table(h100, configs)[0]["entries"].keys() == {"576x576r128"}
    # a second run merges per shape and T bucket unless told to replace
    tuning.save_cache(h200, {"entries": {"4096x4096r1024": {"8": {"backend": "two_gemm", "config": {}}}}})
    assert set(tuning.load_cache(h200)["entries"]["4096x4096r1024"]) == {"1", "8"}
    tuning.save_cache(h200, {"entries": {"576x576r128": {"1": {"backend": "two_gemm"}}}}, replace=True)
    assert list(tuning.load_cache(h200)["entries"]) == ["576x576r128"]
    # a cache file written on another device is ignored
    (cache / "cc90_sm132_mem80g_l2_50m.json").write_text(json.dumps(_table(H200, tuned["entries"])))
    assert tuning.load_cache(h100) is None

    monkeypatch.setenv("LOWRANK_TUNING_DIR", "off")
    assert tuning.cache_dir() is None and tuning.load_cache(h200) is None
    assert tuning.dispatch_table(h200, configs)[1] == "sibling"
    with pytest.raises(OSError):
        tuning.save_cache(h200, tuned)


def test_cached_entry_overrides_shipped_one():
    base = {"entries": {"a": {"1": {"backend": "triton_fused"}, "16": {"backend": "two_gemm"}}},
            "latency_model": {"1": {}}, "sources": ["shipped"]}
    over = {"entries": {"a": {"1": {"backend": "two_gemm"}}, "b": {"4": {"backend": "two_gemm"}}},
            "latency_model": {"4": {}}, "sources": ["cache"]}
    out = tuning.merge_tables(base, over)
    assert out["entries"]["a"] == {"1": {"backend": "two_gemm"}, "16": {"backend": "two_gemm"}}
    assert "b" in out["entries"] and out["latency_model"] == {"4": {}}
    assert out["sources"] == ["shipped", "cache"]
    assert base["entries"]["a"]["1"]["backend"] == "triton_fused"  # inputs untouched


def test_untuned_device_runs_torch_two_gemms(monkeypatch):
    monkeypatch.setattr(dispatch, "_table_for", lambda device: ({}, None))
    monkeypatch.setattr(dispatch, "_CHOICE_CACHE", {})
    x, U, V = torch.randn(1, 64), torch.randn(48, 16), torch.randn(16, 64)
    assert dispatch.select_backend(x, U, V, None) == ("two_gemm", TwoGemmConfig(gemm1="cublas", gemm2="cublas"))
    assert dispatch.select_backend(x, U, V, None)[1].to_dict() == {"gemm1": "cublas", "gemm2": "cublas"}


def test_tune_refuses_without_cuda(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["tune", "--shapes", "4096x4096r1024"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "CUDA" in err[0], err
    assert tune.main(["--shapes", "4096x4096r1024"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [["--shapes", "4096x4096"], ["--shapes", "64x64r65"], ["--tokens", "0,1"],
                                  ["--budget-s", "0"], ["--shapes", "8x8r4", "--model", "x"],
                                  ["--groups", "64:64r8+x"], ["--groups", "64:32r40"], ["--groups", ","]])
def test_tune_bad_arguments_are_user_errors(argv, capsys):
    assert cli.main(["tune", *argv]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_tune_reads_shapes_from_a_checkpoint_config(tmp_path):
    quant = {"quant_method": "lowrank",
             "ranks": {"model.layers.0.mlp.up_proj": 1504, "model.layers.1.mlp.up_proj": 1504,
                       "model.layers.0.self_attn.q_proj": 1024},
             "dense_shapes": {"model.layers.0.mlp.up_proj": [11008, 4096], "model.layers.1.mlp.up_proj": [11008, 4096],
                              "model.layers.0.self_attn.q_proj": [4096, 4096]}}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": quant}))
    counts = tune.checkpoint_shapes(str(tmp_path))
    assert counts == Counter({(4096, 11008, 1504): 2, (4096, 4096, 1024): 1})
    assert tune.order_shapes(counts) == [(4096, 11008, 1504), (4096, 4096, 1024)]
    assert tune.parse_shapes("4096x11008r1504, 576x576r128") == [(4096, 11008, 1504), (576, 576, 128)]
    with pytest.raises(UserError):
        tune.parse_shapes("576by576")


def test_tune_shapes_table_drives_the_dispatch(monkeypatch, tmp_path):
    """tune_shapes with stand-in timings (no GPU): table format, budget, cache, dispatch and dense fallback."""
    import compress.tune as ct

    monkeypatch.setenv("LOWRANK_TUNING_DIR", str(tmp_path / "cache"))

    class FakeWeights:
        def __init__(self, n, m, r, dtype, l2, seed):
            self.U, self.V, self.W = [torch.zeros(m, r)], [torch.zeros(r, n)], [torch.zeros(m, n)]

    def fake_candidate(w, x, backend, cfg):
        if cfg.get("sync") == "local":
            raise RuntimeError("wrong result")
        T, (m, r) = x.shape[0], w.U[0].shape
        fused_bonus = 0.7 if backend == "triton_fused" and T == 1 and m >= 4096 else 1.0
        return 1e-3 * (5 + r * m / 1e5) * fused_bonus

    monkeypatch.setattr(ct, "_Weights", FakeWeights)
    monkeypatch.setattr(ct, "_time_candidate", fake_candidate)
    monkeypatch.setattr(ct, "_time_dense", lambda w, x: 1e-3 * (3 + w.W[0].numel() / 2e5))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: H200)
    shapes = [(4096, 4096, 1024), (576, 576, 128)]
    table = ct.tune_shapes(shapes, [1, 8, 64], budget_s=60, log=lambda s: None)
    assert table["device_key"] == "cc90_sm132_mem140g_l2_60m" and not table["skipped"]
    big, small = table["entries"]["4096x4096r1024"], table["entries"]["576x576r128"]
    assert big["1"]["backend"] == "triton_fused" and big["64"]["backend"] == "two_gemm"
    assert all(p["dense_ms"] < p["sweep_ms"] for p in small.values())
    assert not any(p["dense_ms"] < p["sweep_ms"] for p in big.values())
    dev = tuning.device_properties(H200)
    tuning.save_cache(dev, table)
    monkeypatch.setattr(dispatch, "_table_for", lambda device: tuning.dispatch_table(dev, tmp_path / "no-shipped"))
    dispatch.reload_tables()
    gpu = torch.device("cuda", 0)
    assert dispatch.dense_is_faster(1, 576, 576, 128, gpu) and dispatch.dense_is_faster(8, 576, 576, 128, gpu)
    assert not dispatch.dense_is_faster(1, 4096, 4096, 1024, gpu)
    assert not dispatch.dense_is_faster(8192, 576, 576, 128, gpu)  # far from every tuned T, no latency model
    monkeypatch.setattr(dispatch, "_CHOICE_CACHE", {})
    x, U, V = torch.empty(1, 4096), torch.empty(4096, 1024), torch.empty(1024, 4096)
    assert dispatch.select_backend(x, U, V, None)[0] == "triton_fused"
    assert dispatch.select_backend(torch.empty(64, 4096), U, V, None)[0] == "two_gemm"
    # an exhausted budget measures nothing new and says so
    none = ct.tune_shapes(shapes, [1], budget_s=1e-9, log=lambda s: None)
    assert none["entries"] == {} and len(none["skipped"]) == 2
    dispatch.reload_tables()


def test_tune_reads_fused_groups_from_a_checkpoint_config(tmp_path):
    """q/k/v and gate/up whose members are all factorized, with one input width; partial groups are left out."""
    ranks = {"model.layers.0.self_attn.q_proj": 96, "model.layers.0.self_attn.k_proj": 32,
             "model.layers.0.self_attn.v_proj": 32, "model.layers.0.mlp.gate_proj": 128,
             "model.layers.0.mlp.up_proj": 128, "model.layers.1.self_attn.q_proj": 96,
             "model.layers.1.mlp.gate_proj": 128, "model.layers.1.mlp.up_proj": 128}
    shapes = {"q_proj": [256, 256], "k_proj": [64, 256], "v_proj": [64, 256], "gate_proj": [704, 256],
              "up_proj": [704, 256]}
    quant = {"quant_method": "lowrank", "ranks": ranks,
             "dense_shapes": {name: shapes[name.rsplit(".", 1)[1]] for name in ranks}}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": quant}))
    assert tune.checkpoint_groups(str(tmp_path)) == Counter({
        (256, ((256, 96), (64, 32), (64, 32))): 1,
        (256, ((704, 128), (704, 128))): 2,
    })


def _group_table(dev, groups) -> dict:
    return {"device": tuning.device_properties(dev), "entries": {}, "groups": groups}


def test_group_kernel_follows_the_exact_table_near_its_rows(monkeypatch):
    members = ((256, 96), (64, 32), (64, 32))
    key = dispatch.group_key(256, members)
    assert key == "256:256r96+64r32+64r32"
    table = _group_table(H100, {key: {"1": {"kernel": "segmented", "config": [16, 256, 2]},
                                      "4": {"kernel": "segmented"}, "8": {"kernel": "cublas"}}})
    gpu = torch.device("cuda", 0)
    cublas = ("cublas", (0, 0, 0))
    monkeypatch.setattr(dispatch, "_table_for", lambda device: (table, "exact"))
    dispatch.reload_tables()
    assert dispatch.group_kernel(1, 256, members, gpu) == ("segmented", (16, 256, 2))
    assert dispatch.group_kernel(3, 256, members, gpu) == ("segmented", (0, 0, 0))  # nearest: 4, default config
    assert dispatch.group_kernel(8, 256, members, gpu) == cublas
    assert dispatch.group_kernel(64, 256, members, gpu) == cublas  # far from every tuned row count
    assert dispatch.group_kernel(1, 256, ((256, 64),), gpu) == cublas  # another group: nothing measured
    monkeypatch.setattr(dispatch, "_table_for", lambda device: (table, "sibling"))
    dispatch.reload_tables()
    assert dispatch.group_kernel(1, 256, members, gpu) == cublas  # another memory system: not trusted
    dispatch.reload_tables()


def test_cached_groups_overlay_shipped_ones():
    base = {"groups": {"g": {"1": {"kernel": "cublas"}, "4": {"kernel": "cublas"}}}}
    over = {"groups": {"g": {"1": {"kernel": "segmented"}}}}
    assert tuning.merge_tables(base, over)["groups"]["g"] == {"1": {"kernel": "segmented"}, "4": {"kernel": "cublas"}}


def test_tune_groups_table_drives_the_fusion(monkeypatch, tmp_path):
    """tune_groups with stand-in timings (no GPU): entries, decode rows only, budget; then 'auto' fusion follows."""
    from lowrank_kernels.segmented_linear import config_candidates
    from lowrank_kernels.segmented_linear import segmented_linear_ref as seg_ref

    import compress.tune as ct
    import lowrank.fusion as fusion
    from lowrank import factorize_
    from lowrank.fusion import fuse_sibling_projections
    from tests.conftest import make_tiny_llama

    class FakeGroupWeights:
        def __init__(self, n, members, dtype, l2, seed):
            self.members = members

    # the segmented launch wins at one row only, its last config best
    def fake_time(w, x, kernel, config=None, ref=None):
        if kernel == "cublas":
            return 2e-3
        return 1e-3 * (1.0 + x.shape[0] / 2) * (0.9 if config == config_candidates(x.shape[0])[-1] else 1.0)

    members = ((64, 12), (32, 12), (32, 12))
    key = dispatch.group_key(64, members)
    with monkeypatch.context() as m:
        m.setattr(ct, "_GroupWeights", FakeGroupWeights)
        m.setattr(ct, "_time_group", fake_time)
        references = []
        m.setattr(ct, "_group_reference", lambda w, x: references.append(x.shape[0]))
        m.setattr(torch, "randn", lambda *shape, **kw: torch.empty(*shape))  # no CUDA tensors here
        m.setattr(torch.cuda, "current_device", lambda: 0)
        m.setattr(torch.cuda, "get_device_properties", lambda i: H100)
        m.setattr(torch.cuda, "empty_cache", lambda: None)
        entries, skipped = ct.tune_groups([(64, members)], [1, 4, 64], budget_s=60, log=lambda s: None)
        assert not skipped and set(entries) == {key} and set(entries[key]) == {"1", "4"}  # 64 rows: not decode
        assert entries[key]["1"]["kernel"] == "segmented" and entries[key]["4"]["kernel"] == "cublas"
        assert entries[key]["1"]["config"] == list(config_candidates(1)[-1])
        assert len(entries[key]["1"]["candidates"]) == len(config_candidates(1))
        assert references == [1, 4]  # one reference per row count, shared by its candidate configs
        assert ct.tune_groups([(64, members)], [1], budget_s=1e-9, log=lambda s: None) == ({}, [key])

        def failing(w, x, kernel, config=None, ref=None):
            if kernel == "segmented":
                raise RuntimeError("wrong result (relative error 1)")
            return 1e-3

        m.setattr(ct, "_time_group", failing)
        logged = []
        entries, _ = ct.tune_groups([(64, members)], [1], budget_s=60, log=logged.append)
        assert entries[key]["1"] == {"kernel": "cublas", "config": None, "segmented_ms": None, "cublas_ms": 1e-3,
                                     "candidates": []}
        assert sum("skipped" in line for line in logged) == len(config_candidates(1))
        json.dumps(entries, allow_nan=False)  # strict JSON: no Infinity for a failed kernel

    calls = []
    monkeypatch.setattr(fusion, "group_kernel",
                        lambda T, n, m, device: calls.append((T, n, m)) or ("segmented", (16, 128, 2)))
    launched = []
    monkeypatch.setattr(fusion, "segmented_linear",
                        lambda t, w, b, o, config=None: launched.append(config) or seg_ref(t, w, b, o))
    model = make_tiny_llama(layers=1)
    factorize_(model, lambda name, lin: 12)
    fuse_sibling_projections(model)  # low_rank_kernel="auto"
    with torch.no_grad():
        model(torch.randint(0, 128, (1, 3)))
    mlp = model.config.intermediate_size
    assert {m for _, _, m in calls} == {members, ((mlp, 12), (mlp, 12))}  # each group asks for its shapes
    assert launched == [(16, 128, 2)] * 2  # the tuned config reaches the launch


def test_groups_spec_round_trips_the_table_key():
    groups = tune.parse_groups("4096:4096r1024+4096r1024+4096r1024, 576:1536r192+1536r192")
    assert groups == [(4096, ((4096, 1024),) * 3), (576, ((1536, 192), (1536, 192)))]
    assert [dispatch.group_key(n, m) for n, m in groups] == ["4096:4096r1024+4096r1024+4096r1024",
                                                             "576:1536r192+1536r192"]


@pytest.mark.parametrize("spec,message", [("64:64r8+x", "--groups takes IN:OUTrRANK"),
                                          ("64:32r40", "ranks <= min(in, out)"), (",", "--groups is empty")])
def test_bad_groups_are_named_before_any_gpu_work(spec, message, capsys):
    assert cli.main(["tune", "--groups", spec]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tune_groups_times_both_kernels_on_the_gpu(tmp_path, monkeypatch):
    """compress tune --groups on the GPU at hand: every decode row count gets both timings and a choice, and
    the written table reaches dispatch.group_kernel."""
    monkeypatch.setenv("LOWRANK_TUNING_DIR", str(tmp_path / "cache"))
    spec = "256:256r64+64r32+64r32"
    assert tune.main(["--groups", spec, "--tokens", "1,8,64", "--budget-s", "60",
                      "--out", str(tmp_path / "t.json")]) == 0
    table = json.loads((tmp_path / "t.json").read_text())
    points = table["groups"][spec]
    assert set(points) == {"1", "8"}  # 64 rows is no decode batch
    for p in points.values():
        assert p["kernel"] in ("segmented", "cublas") and 0 < p["cublas_ms"] < 1 and 0 < p["segmented_ms"] < 1
    dispatch.reload_tables()
    members = ((256, 64), (64, 32), (64, 32))
    assert dispatch.group_kernel(1, 256, members, torch.device("cuda"))[0] == points["1"]["kernel"]
    dispatch.reload_tables()


def test_dispatch_info_counts_tuned_shapes_and_groups(monkeypatch):
    table = {"entries": {"a": {}, "b": {}}, "groups": {"g": {}}, "sources": ["x.json"]}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: H100)
    for trust, shapes, groups in (("exact", 2, 1), ("sibling", 0, 0)):
        monkeypatch.setattr(dispatch, "_table_for", lambda device, trust=trust: (table, trust))
        info = dispatch.dispatch_info(torch.device("cuda", 0))
        assert (info["trust"], info["tuned_shapes"], info["tuned_groups"]) == (trust, shapes, groups)
        assert info["device_key"] == "cc90_sm132_mem80g_l2_50m" and info["sources"] == ["x.json"]
    assert dispatch.dispatch_info(torch.device("cpu"))["tuned_groups"] == 0
