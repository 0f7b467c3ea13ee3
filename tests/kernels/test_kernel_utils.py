"""The helpers every kernel module shares (``lowrank_kernels.utils``) and the launch configs' JSON form.

Pure Python and CPU only: nothing here launches a kernel.
"""

from __future__ import annotations

import json

import pytest
import torch
from lowrank_kernels import tuning, utils
from lowrank_kernels.gram import GramConfig
from lowrank_kernels.lowrank_matmul import _fused_params
from lowrank_kernels.lowrank_matmul_config import (
    CUBLAS_TWO_GEMM,
    FusedConfig,
    GemmConfig,
    TwoGemmConfig,
    config_for,
)


# ---------------------------------------------------------------------------- interpreter switch
@pytest.mark.skipif(not utils.HAS_TRITON, reason="without Triton nothing is interpreted")
def test_interpreting_reads_the_environment_at_every_call(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert utils.interpreting()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not utils.interpreting()
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not utils.interpreting()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert utils.interpreting()


@pytest.mark.skipif(not utils.HAS_TRITON, reason="without Triton nothing is interpreted")
@pytest.mark.parametrize("value", ["", "0", "2", "off", "no"])
def test_interpreting_is_off_for_what_triton_reads_as_off(monkeypatch, value):
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert not utils.interpreting()


def test_interpreting_is_off_without_triton(monkeypatch):
    monkeypatch.setattr(utils, "HAS_TRITON", False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not utils.interpreting()


# ---------------------------------------------------------------------------- devices
def test_sm_count_off_the_gpu_is_the_documented_fallback():
    assert utils.NO_GPU_SM_COUNT == 8
    assert utils.sm_count(torch.device("cpu")) == 8
    assert utils.sm_count(torch.device("meta")) == 8


def test_sm_count_is_read_once_per_cuda_index(monkeypatch):
    calls = []

    def props(idx):
        calls.append(idx)
        return type("Props", (), {"multi_processor_count": 100 + idx})()

    monkeypatch.setattr(utils, "_SM_COUNTS", {})
    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert utils.sm_count(torch.device("cuda", 0)) == 100
    assert utils.sm_count(torch.device("cuda")) == 101  # no index: the current device
    assert utils.sm_count(torch.device("cuda", 0)) == 100
    assert calls == [0, 1]


# ---------------------------------------------------------------------------- powers of two
@pytest.mark.parametrize("values,cap,expected", [
    ((1492,), 8, 4),  # a raw rank's row stride: 4-element (8-byte bf16) rows
    ((1472,), 8, 8),
    ((4096,), 8, 8),  # capped
    ((4096,), 16, 16),
    ((77,), 8, 1),
    ((0,), 8, 8),  # zero is divisible by anything
    ((), 4, 4),
    ((24, 40, 0), 16, 8),  # every value: the batched offsets of several layers
    ((24, 36), 16, 4),
    ((6,), 1, 1),
])
def test_pow2_divisor(values, cap, expected):
    assert utils.pow2_divisor(*values, cap=cap) == expected


@pytest.mark.parametrize("cap", [0, 3, 12, -4])
def test_pow2_divisor_needs_a_power_of_two_cap(cap):
    with pytest.raises(ValueError, match="power of two"):
        utils.pow2_divisor(8, cap=cap)


@pytest.mark.parametrize("n,expected", [(-3, 1), (0, 1), (1, 1), (2, 2), (3, 4), (16, 16), (17, 32), (1492, 2048)])
def test_next_pow2(n, expected):
    assert utils.next_pow2(n) == expected


def test_dot_precision_keeps_fp32_exact():
    assert utils.dot_precision(torch.float32) == "ieee"
    assert utils.dot_precision(torch.bfloat16) == utils.dot_precision(torch.float16) == "tf32"


# ---------------------------------------------------------------------------- launch configs
def test_config_json_form_is_sparse_and_round_trips():
    cfg = FusedConfig(use_dot=False, block_r1=8, sync="two_launch", programs_per_sm=2)
    assert cfg.to_dict() == {"use_dot": False, "block_r1": 8, "sync": "two_launch", "programs_per_sm": 2}
    assert FusedConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    two = TwoGemmConfig(gemm1=GemmConfig(block_m=16, split_k=4), gemm2="cublas", pad_u=True)
    assert two.to_dict() == {"gemm1": {"block_m": 16, "split_k": 4}, "gemm2": "cublas", "pad_u": True}
    assert TwoGemmConfig.from_dict(json.loads(json.dumps(two.to_dict()))) == two
    assert CUBLAS_TWO_GEMM.to_dict() == {"gemm1": "cublas", "gemm2": "cublas"}
    gram = GramConfig(block_m=64, tma=True, split_k=3)
    assert GramConfig.from_dict(json.loads(json.dumps(gram.to_dict()))) == gram
    assert GramConfig.from_dict({}) == GramConfig() and GramConfig().to_dict() == {}
    assert hash(cfg) == hash(FusedConfig.from_dict(cfg.to_dict()))  # frozen: usable as cache keys


def test_config_from_dict_refuses_unknown_and_invalid_fields():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['block_x'\]"):
        FusedConfig.from_dict({"block_x": 4})
    with pytest.raises(ValueError, match="unknown field"):
        TwoGemmConfig.from_dict({"gemm1": {"block_q": 16}})
    with pytest.raises(ValueError, match="sync mode"):
        FusedConfig.from_dict({"sync": "spin"})
    with pytest.raises(ValueError, match="cublas"):
        TwoGemmConfig.from_dict({"gemm1": "cutlass"})
    with pytest.raises(ValueError, match="power of two"):
        GramConfig.from_dict({"block_m": 48})
    with pytest.raises(ValueError, match="expected a dict"):
        FusedConfig.from_dict([("block_r1", 4)])


def test_config_for_backends():
    assert config_for("triton_fused", None) == FusedConfig()
    assert config_for("triton_fused", None) is config_for("triton_fused", None)  # shared default
    assert config_for("two_gemm", {"gemm1": "cublas", "gemm2": "cublas"}) == CUBLAS_TWO_GEMM
    assert config_for("triton_gemm", {}) == TwoGemmConfig()
    cfg = FusedConfig(block_r1=2)
    assert config_for("triton_fused", cfg) is cfg
    for backend in ("cublas", "torch", "ext_gemv"):
        assert config_for(backend, {"anything": 1}) is None  # backends without options ignore it


def test_shipped_tables_load_into_configs_and_round_trip():
    tables = tuning.shipped_tables()
    assert tables, "no dispatch table shipped"
    seen = 0
    for path, table in tables:
        for key, per_t in table["entries"].items():
            n, m, r = (int(v) for v in key.replace("x", " ").replace("r", " ").split())
            for t, choice in per_t.items():
                raw = choice.get("config", {})
                cfg = config_for(choice["backend"], raw)
                if cfg is None:
                    continue
                seen += 1
                back = json.loads(json.dumps(cfg.to_dict()))
                assert config_for(choice["backend"], back) == cfg, (path.name, key, t)
                if choice["backend"] == "triton_fused":
                    # The parsed config launches exactly as the stored dict does.
                    assert _fused_params(int(t), n, m, r, raw, 132) == _fused_params(int(t), n, m, r, cfg, 132)
                else:
                    for name in ("gemm1", "gemm2"):
                        stored = raw.get(name)
                        parsed = getattr(cfg, name)
                        assert parsed == (GemmConfig.from_dict(stored) if isinstance(stored, dict) else stored)
    assert seen > 100
