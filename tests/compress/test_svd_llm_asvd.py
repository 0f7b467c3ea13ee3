"""SVD-LLM and ASVD baselines: their math, their plans, and `python -m compress --method svd-llm|asvd`."""

from __future__ import annotations

import json

import pytest
import torch

from compress.api import load_plan
from compress.cli import main
from compress.errors import UserError
from compress.methods.asvd import (
    ASVDConfig,
    ASVDPlan,
    rank_at_ratio,
    score_asvd,
    search_threshold,
    threshold_ratios,
)
from compress.methods.svd_llm import SVDLLMConfig, SVDLLMPlan, score_svd_llm, update_factors
from compress.whitening import whitened_svd_factors
from lowrank import load_pretrained, save_pretrained, size_report
from lowrank.linear import LowRankLinear
from lowrank.surgery import target_linears
from tests.conftest import make_tiny_llama


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _layer_inputs(model, ids, name):
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    try:
        _logits(model, ids)
    finally:
        handle.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in seen]).double()


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, 128, (12, 32), generator=torch.Generator().manual_seed(1234))


@pytest.fixture(scope="module")
def svd_llm_plan(calib):
    return score_svd_llm(make_tiny_llama(), calib, SVDLLMConfig(progress=False))


@pytest.fixture(scope="module")
def asvd_plan(calib):
    return score_asvd(make_tiny_llama(), calib, ASVDConfig(progress=False, sensitivity_samples=4,
                                                           ratios=(0.2, 0.4, 0.6, 0.8)))


# ----------------------------------------------------------------------------- both
@pytest.mark.parametrize("which", ["svd-llm", "asvd"])
def test_full_rank_is_exact(which, svd_llm_plan, asvd_plan, random_tokens):
    plan = svd_llm_plan if which == "svd-llm" else asvd_plan
    model = make_tiny_llama()
    for name, module in target_linears(model).items():
        lf = plan.layers[name]
        torch.testing.assert_close(lf.U @ lf.V, module.weight, rtol=1e-4, atol=1e-5)
        assert torch.all(lf.scores[:-1] >= lf.scores[1:])
    x = random_tokens(batch=2, seq=16)
    before = _logits(model, x)
    plan.materialize_(model, 1.0)
    assert torch.equal(_logits(model, x), before)


@pytest.mark.parametrize("which", ["svd-llm", "asvd"])
def test_plan_and_checkpoint_round_trip(which, svd_llm_plan, asvd_plan, tmp_path, random_tokens):
    plan = svd_llm_plan if which == "svd-llm" else asvd_plan
    x = random_tokens(batch=2, seq=24)
    model = make_tiny_llama()
    plan.materialize_(model, 0.6)
    expected = _logits(model, x)
    assert any(isinstance(m, LowRankLinear) for m in target_linears(model).values())

    plan.save(tmp_path / "plan")
    loaded = load_plan(tmp_path / "plan")  # by the type the directory records
    assert type(loaded) is type(plan)
    again = make_tiny_llama()
    loaded.materialize_(again, 0.6)
    assert torch.equal(_logits(again, x), expected)

    save_pretrained(model, tmp_path / "ckpt")
    assert torch.equal(_logits(load_pretrained(tmp_path / "ckpt"), x), expected)


# ----------------------------------------------------------------------------- svd-llm
def test_whitened_truncation_beats_plain_svd(svd_llm_plan, calib):
    model = make_tiny_llama()
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        X = _layer_inputs(model, calib, name)
        W = model.get_submodule(name).weight.double()
        lf = svd_llm_plan.layers[name]
        u, s, vh = torch.linalg.svd(W, full_matrices=False)
        for rank in (4, 16, 32):
            whitened = lf.U[:, :rank].double() @ lf.V[:rank].double()
            plain = (u[:, :rank] * s[:rank]) @ vh[:rank]
            err_w = torch.linalg.norm((W - whitened) @ X.T)
            err_p = torch.linalg.norm((W - plain) @ X.T)
            assert err_w < err_p


def _update_problem(seed: int, rank: int):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(24, 40, generator=gen, dtype=torch.float64)
    mix = torch.randn(40, 40, generator=gen, dtype=torch.float64) * torch.logspace(0, -1.5, 40, dtype=torch.float64)
    X_d = torch.randn(400, 40, generator=gen, dtype=torch.float64) @ mix
    X_c = X_d + 0.3 * torch.randn(400, 40, generator=gen, dtype=torch.float64) @ mix  # compressed-stream inputs
    U, V, _, _ = whitened_svd_factors(W, X_d.T @ X_d)
    T = X_d @ W.T
    return U[:, :rank], V[:rank], X_c, T, W


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("rank", [2, 8, 20])
def test_update_factors_is_least_squares_and_never_worse(seed, rank):
    U0, V0, X_c, T, _ = _update_problem(seed, rank)
    gram, cross, target_sq = X_c.T @ X_c, X_c.T @ T, float(T.pow(2).sum())

    def err(U, V):
        return float((X_c @ (U.double() @ V.double()).T - T).pow(2).sum())

    Uu, Vu, rec_u = update_factors(U0, V0, gram, cross, target_sq, steps="u")
    Uv, Vv, rec_uv = update_factors(U0, V0, gram, cross, target_sq, steps="uv")
    assert rec_u["damping"] == 0.0 and not rec_u["kept_truncation"]
    # U-step = the least-squares fit of T on X_c·V0ᵀ (V fixed)
    Z = X_c @ V0.double().T
    U_ls = torch.linalg.lstsq(Z, T).solution.T
    torch.testing.assert_close(Uu.double() @ Vu.double(), U_ls @ V0.double(), rtol=1e-4, atol=1e-5)
    # never worse than the truncation, and V-step after U-step never worse than U alone
    assert err(Uu, Vu) <= err(U0, V0) * (1 + 1e-9)
    assert err(Uv, Vv) <= err(Uu, Vu) * (1 + 1e-6)
    assert rec_uv["after"] == pytest.approx(err(Uv, Vv), rel=1e-6)
    assert rec_uv["before"] == pytest.approx(err(U0, V0), rel=1e-6)


def test_sequential_update_lowers_every_next_layer_error(svd_llm_plan, calib):
    dense = make_tiny_llama()
    with torch.no_grad():
        ref = dense(calib, output_hidden_states=True).hidden_states[1:]
    errors = {}
    for update in ("none", "uv"):
        model = make_tiny_llama()
        plan = svd_llm_plan.with_options(update=update)
        plan.materialize_(model, 0.5)
        with torch.no_grad():
            hidden = model(calib, output_hidden_states=True).hidden_states[1:]
        errors[update] = [float((h - r).pow(2).sum()) for h, r in zip(hidden, ref, strict=True)]
        if update == "uv":
            records = plan.last_stats["layers"]
            assert len(records) == 14
            assert all(r["after"] <= r["before"] * (1 + 1e-9) for r in records.values())
            assert plan.describe(model)["svd_llm_mean_rel_error_after"] < plan.describe(model)[
                "svd_llm_mean_rel_error_before"]
    # each block's output, fed by already-updated blocks, is closer to the dense model's
    for with_update, without in zip(errors["uv"], errors["none"], strict=True):
        assert with_update <= without


def test_non_pd_gram_triggers_damping_fallback(calib):
    model = make_tiny_llama()
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[5] = 0.0  # a dead input channel for layer 0's q/k/v
    plan = score_svd_llm(model, calib, SVDLLMConfig(progress=False))
    damped = plan.metadata["damped_layers"]
    assert {f"model.layers.0.self_attn.{p}_proj" for p in "qkv"} <= set(damped)
    assert all(0.0 < d <= 0.1 for d in damped.values())
    assert "model.layers.0.self_attn.o_proj" not in damped
    plan.materialize_(model, 0.5)
    stats = plan.last_stats
    assert "model.layers.0.self_attn.q_proj" in stats["update_damped_layers"]
    assert torch.isfinite(_logits(model, calib[:2])).all()
    # ASVD: the dead channel's scale is floored so that S stays invertible
    asvd = score_asvd(make_tiny_llama(), calib, ASVDConfig(progress=False, sensitivity_samples=1, ratios="0.5"))
    assert asvd.metadata["floored_channels"] == {}
    model2 = make_tiny_llama()
    with torch.no_grad():
        model2.model.layers[0].input_layernorm.weight[5] = 0.0
    asvd = score_asvd(model2, calib, ASVDConfig(progress=False, sensitivity_samples=1, ratios="0.5"))
    assert asvd.metadata["floored_channels"]["model.layers.0.self_attn.q_proj"] == 1
    assert all(torch.isfinite(lf.V).all() for lf in asvd.layers.values())


def test_bad_options_are_user_errors():
    for bad in ({"update": "w"}, {"update_target": "x"}, {"update_samples": 0}, {"update_ridge": -1.0}):
        with pytest.raises(UserError):
            SVDLLMConfig(**bad)
    for bad in ({"ratios": "0.5,1.5"}, {"ratios": "a,b"}, {"alpha": float("nan")}, {"sensitivity_samples": 0}):
        with pytest.raises(UserError):
            ASVDConfig(**bad)
    assert ASVDConfig(ratios="0.5, 0.25").ratios == (0.25, 0.5)


# ----------------------------------------------------------------------------- asvd
def test_threshold_rule_and_search():
    ratios = [0.25, 0.5, 0.75]
    sens = torch.tensor([[9.0, 5.0, 4.0], [3.0, 2.0, 1.0], [float("inf"), 8.0, 6.0]], dtype=torch.float64)
    assert threshold_ratios(sens, ratios, 5.0) == [0.5, 0.25, 1.0]
    assert threshold_ratios(sens, ratios, -float("inf")) == [1.0, 1.0, 1.0]
    gen = torch.Generator().manual_seed(0)
    sens = torch.rand(20, 4, generator=gen, dtype=torch.float64) + torch.arange(4, 0, -1) * 0.5
    sizes = torch.randint(100, 1000, (20,), generator=gen).tolist()
    total = sum(sizes)

    def params(chosen):
        return int(sum(r * n for r, n in zip(chosen, sizes, strict=True)))

    # One threshold step moves one layer, at most from dense to the smallest ratio (0.25); the
    # nearest of the two counts around the target is within half of that.
    step = max(sizes) * 0.75
    previous = None
    for target in torch.linspace(0.3, 1.0, 30).tolist():
        chosen, _ = search_threshold(sens, [0.25, 0.5, 0.75, 0.9], params, target * total)
        assert abs(params(chosen) - target * total) <= step / 2 + 1
        if previous is not None:
            assert all(a >= b for a, b in zip(chosen, previous, strict=True))
        previous = chosen


def test_asvd_sizes_meet_target_and_are_monotonic(asvd_plan):
    model = make_tiny_llama()
    layers = asvd_plan.layers
    dense_total = sum(lf.shape[0] * lf.shape[1] for lf in layers.values())
    # One threshold step moves one layer, at most from dense to its smallest tested ratio (0.2);
    # the nearest achievable size is within half of the largest such jump.
    jumps = [lf.shape[0] * lf.shape[1] - lf.params_at_rank(rank_at_ratio(*lf.shape, 0.2)) for lf in layers.values()]
    granularity = max(jumps) / 2 / dense_total + 1e-9
    previous = None
    for size in torch.linspace(0.25, 1.0, 12).tolist():
        ranks = asvd_plan.ranks(size)
        params = sum(layers[n].params_at_rank(r) for n, r in ranks.items())
        assert abs(params / dense_total - size) <= granularity
        if previous is not None:
            assert all(ranks[n] >= previous[n] for n in ranks)
        previous = ranks
    asvd_plan.materialize_(model, 0.5)
    report = size_report(model)
    assert abs(report.target_fraction - 0.5) <= granularity
    assert "asvd_threshold" in asvd_plan.describe(model)
    with pytest.raises(UserError, match="smallest size"):
        asvd_plan.ranks(0.05)


# ----------------------------------------------------------------------------- CLI
def _run(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("method,opts,tolerance", [
    ("svd-llm", [], 0.03),
    ("asvd", ["--method-opt", "sensitivity_samples=2", "--method-opt", "ratios=0.3,0.6,0.9"], 0.05),
])
def test_cli_end_to_end(method, opts, tolerance, tiny_model_dir, tmp_path, capsys):
    out, plan_dir = tmp_path / "out", tmp_path / "plan"
    code, stdout, err = _run(["--model", tiny_model_dir, "--method", method, "--size", "0.8", "--out", out,
                              "--seq-len", "32", "--calib-samples", "8", "--no-eval", "--save-plan", plan_dir,
                              *opts], capsys)
    assert code == 0, err
    report = json.loads((out / "compress_report.json").read_text())
    assert abs(report["target_fraction"] - 0.8) < tolerance
    assert ("svd_llm_update_layers" in report) == (method == "svd-llm")
    # the saved plan materializes the same model again, without calibration
    code, _, err = _run(["materialize", "--model", tiny_model_dir, "--scores", plan_dir, "--size", "0.8",
                         "--out", tmp_path / "again"], capsys)
    assert code == 0, err
    ids = torch.randint(0, 100, (2, 20), generator=torch.Generator().manual_seed(5))
    first, second = load_pretrained(out), load_pretrained(tmp_path / "again")
    assert any(isinstance(m, LowRankLinear) for m in target_linears(first).values())
    assert torch.equal(_logits(first, ids), _logits(second, ids))
    assert isinstance(load_plan(plan_dir), SVDLLMPlan if method == "svd-llm" else ASVDPlan)
