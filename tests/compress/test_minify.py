"""Taylor–Ridge minification (compress.methods.minify): scores, selection, ridge healing, checkpoints."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from compress.errors import UserError
from compress.methods import get_method
from compress.methods.minify import (
    MinifyConfig,
    MinifyPlan,
    aggregate_taylor,
    find_mlps,
    layer_floor,
    local_cross,
    ridge_solve,
    score_minify,
    select_channels,
)
from compress.plan import recorded_plan_type
from tests.conftest import make_tiny_llama, requires_smollm2


def _tokens(n: int, seq: int, seed: int, vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def _score(model: nn.Module, ids: torch.Tensor, **options) -> MinifyPlan:
    return score_minify(model, ids, MinifyConfig(progress=False, **options))


@pytest.fixture(scope="module")
def tiny_and_plan():
    """A tiny Llama (hidden 32, d_ff 160) calibrated on 1024 tokens, far more than its 160 channels.

    The narrow hidden size makes the 160 channels redundant, as in trained models, where the
    kept channels can stand in for removed ones.
    """
    model = make_tiny_llama(seed=1, hidden=32)
    plan = _score(model, _tokens(16, 64, seed=2), batch_size=4)
    return model, plan


def _mlp_inputs(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inputs of every MLP on a forward pass of `model`."""
    seen: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: seen.__setitem__(n, a[0].detach())) for n in find_mlps(model)]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return seen


# ---------------------------------------------------------------------------- sensitivity
def _seq_losses(model: nn.Module, ids: torch.Tensor) -> list[float]:
    """Mean next-token NLL of each sequence."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    nll = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    return nll.view(ids.shape[0], -1).mean(1).tolist()


def test_taylor_scores_match_finite_differences(monkeypatch):
    # The scores are dL_s/dε for scaling channel j by (1+ε), checked by central differences in
    # fp64. transformers' RMSNorm computes in fp32 (a downcast here); it is made to keep fp64,
    # so the only error left is the difference's O(ε²).
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    def rms_norm_fp64(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(LlamaRMSNorm, "forward", rms_norm_fp64)
    model = make_tiny_llama(seed=3, dtype=torch.float64)
    ids = _tokens(3, 24, seed=4)
    plan = _score(model, ids, batch_size=2)  # batches of 2 and 1: per-sequence terms must not care
    eps = 1e-5
    for name in ("model.layers.0.mlp", "model.layers.1.mlp"):
        names = plan.layers[name].names
        gate, up, down = (model.get_submodule(n) for n in (names.gate, names.up, names.down))
        for j in (0, 37, 159):
            for form, params in (("act", [(down.weight, (slice(None), j))]),
                                 ("weight", [(down.weight, (slice(None), j)), (gate.weight, (j,)),
                                             (up.weight, (j,))])):
                diffs = []
                for sign in (1.0, -1.0):
                    saved = [w[idx].clone() for w, idx in params]
                    with torch.no_grad():
                        for w, idx in params:
                            w[idx] *= 1 + sign * eps
                    diffs.append(_seq_losses(model, ids))
                    with torch.no_grad():
                        for (w, idx), old in zip(params, saved, strict=True):
                            w[idx] = old
                plus, minus = torch.tensor(diffs, dtype=torch.float64)
                fd = (plus - minus) / (2 * eps)
                got = (plan.layers[name].act_seq if form == "act" else plan.layers[name].weight_seq)[:, j]
                torch.testing.assert_close(got, fd, rtol=1e-6, atol=1e-10)


def test_aggregations():
    e = torch.tensor([[1.0, -2.0], [-3.0, 2.0]])
    assert aggregate_taylor(e, "abs-sum").tolist() == [2.0, 0.0]
    assert aggregate_taylor(e, "sum-abs").tolist() == [4.0, 4.0]
    assert aggregate_taylor(e, "sq-sum").tolist() == [10.0, 8.0]
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate_taylor(e, "max")


# ---------------------------------------------------------------------------- selection
def test_global_selection_respects_floor_and_count():
    gen = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(64, generator=gen) + 1.0, "b": torch.rand(64, generator=gen) * 1e-3,
              "c": torch.rand(48, generator=gen)}
    keep = select_channels(scores, 80, floor=8, multiple=1)
    assert sum(k.numel() for k in keep.values()) == 80
    assert keep["b"].numel() == 8  # layer b ranks last everywhere: only its floor survives
    assert torch.equal(keep["b"], torch.sort(-scores["b"]).indices[:8].sort().values)  # its best 8
    # Where the floors do not bind, the choice is exactly the global top-k.
    two = {"a": scores["a"], "c": scores["c"]}
    threshold = torch.cat(list(two.values())).topk(100).values[-1]
    keep = select_channels(two, 100, floor=1, multiple=1)
    for n in two:
        assert torch.equal(keep[n], (two[n] >= threshold).nonzero().flatten())
    # Aligned widths: multiples of 16, floors rounded up to the multiple, count rounded to it.
    keep = select_channels(scores, 90, floor={"a": 1, "b": 20, "c": 1}, multiple=16)
    widths = {n: k.numel() for n, k in keep.items()}
    assert sum(widths.values()) == 96 and all(w % 16 == 0 for w in widths.values())
    assert widths["b"] == 32
    assert all(torch.all(k[1:] > k[:-1]) for k in keep.values())  # sorted, unique
    assert layer_floor(1536, 0.1, 32) == 160 and layer_floor(40, 0.1, 32) == 32
    assert layer_floor(20, 0.5, 32) == 20  # a layer narrower than the multiple is kept whole
    with pytest.raises(UserError, match="floors need at least"):
        select_channels(scores, 20, floor=8)


def test_materialize_keeps_requested_fraction(tiny_and_plan):
    model, plan = tiny_and_plan
    m = copy.deepcopy(model)
    widths = plan.with_options(width_multiple=1, min_keep=0.25).materialize_(m, 0.55)
    assert sum(widths.values()) == round(0.55 * 320)
    assert min(widths.values()) >= 40
    info = plan.describe(m)
    assert info["mlp_fraction"] == pytest.approx(sum(widths.values()) / 320)
    for n, w in widths.items():
        names = plan.layers[n].names
        assert m.get_submodule(names.gate).weight.shape == (w, 32)
        assert m.get_submodule(names.up).weight.shape == (w, 32)
        assert m.get_submodule(names.down).weight.shape == (32, w)


# ---------------------------------------------------------------------------- ridge healing
def test_ridge_all_channels_lambda0_reproduces_dense(tiny_and_plan):
    model, plan = tiny_and_plan
    ids = _tokens(2, 32, seed=9)
    for name, layer in plan.layers.items():
        w_d = model.get_submodule(layer.names.down).weight.detach()
        keep = torch.arange(layer.width)
        w, alpha = ridge_solve(layer.gram, local_cross(layer.gram, w_d, keep), 0.0, name=name)
        assert alpha == 0.0
        torch.testing.assert_close(w.float(), w_d, rtol=1e-4, atol=1e-5)
    # Through the plan: keeping everything leaves the model bitwise identical.
    m = copy.deepcopy(model)
    plan.with_options(ridge=0.0).materialize_(m, 1.0)
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids).logits, model(input_ids=ids).logits)


def test_ridge_solve_damping_and_errors():
    x = torch.randn(50, 8, dtype=torch.float64)
    x[:, 3] = x[:, 2]  # rank-deficient: plain least squares is singular
    g = x.T @ x
    w, alpha = ridge_solve(g, g @ torch.randn(8, 5, dtype=torch.float64), 0.0, name="L7")
    assert alpha > 0 and torch.isfinite(w).all()
    bad = g.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(UserError, match="L7.*NaN"):
        ridge_solve(bad, torch.zeros(8, 5), 1e-3, name="L7")
    with pytest.raises(UserError, match="L7.*never activate"):
        ridge_solve(torch.zeros(8, 8), torch.zeros(8, 5), 1e-3, name="L7")


def test_ridge_toward_the_original_columns_spans_refit_and_slicing(tiny_and_plan):
    """heal_prior="original": λ → 0 is least squares, λ large is the sliced original, and a prior that
    already solves the system is returned for any λ; through the plan, a large ridge equals heal=False."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    x = torch.randn(80, 6, generator=g, dtype=torch.float64)
    t = torch.randn(80, 4, generator=g, dtype=torch.float64)
    gram, cross = x.T @ x, x.T @ t
    least_squares = torch.linalg.lstsq(x, t).solution.T  # [out, k]
    prior = torch.randn(4, 6, generator=g, dtype=torch.float64)
    w0, _ = ridge_solve(gram, cross, 0.0, prior=prior)
    torch.testing.assert_close(w0, least_squares)
    w_big, _ = ridge_solve(gram, cross, 1e9, max_alpha=1e9, prior=prior)
    torch.testing.assert_close(w_big, prior, rtol=0, atol=1e-6)
    w_fixed, _ = ridge_solve(gram, cross, 0.3, prior=least_squares)
    torch.testing.assert_close(w_fixed, least_squares)
    with pytest.raises(ValueError, match="prior must be"):
        ridge_solve(gram, cross, 0.1, prior=prior.T)

    model, plan = tiny_and_plan
    ids = _tokens(2, 32, seed=int(torch.randint(0, 2**31, ())))
    trusting, sliced = copy.deepcopy(model), copy.deepcopy(model)
    plan.with_options(heal_prior="original", ridge=1e9).materialize_(trusting, 0.6)
    plan.with_options(heal=False).materialize_(sliced, 0.6)
    with torch.no_grad():
        torch.testing.assert_close(trusting(input_ids=ids).logits, sliced(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)
    with pytest.raises(UserError, match="heal_prior"):
        plan.with_options(heal_prior="mean")


def test_healing_beats_slicing_on_heldout_tokens(tiny_and_plan):
    model, plan = tiny_and_plan
    heldout = _mlp_inputs(model, _tokens(4, 64, seed=11))
    healed, sliced = copy.deepcopy(model), copy.deepcopy(model)
    plan.with_options(width_multiple=1).materialize_(healed, 0.6)
    plan.with_options(width_multiple=1, heal=False).materialize_(sliced, 0.6)
    with torch.no_grad():
        for name, z in heldout.items():
            ref = model.get_submodule(name)(z)
            err_healed = (healed.get_submodule(name)(z) - ref).norm()
            err_sliced = (sliced.get_submodule(name)(z) - ref).norm()
            assert err_healed < 0.95 * err_sliced, name


def test_sequential_target(tiny_and_plan):
    model, plan = tiny_and_plan
    local, seq = copy.deepcopy(model), copy.deepcopy(model)
    plan.with_options(width_multiple=1).materialize_(local, 0.6)
    plan.with_options(width_multiple=1, target="sequential").materialize_(seq, 0.6)
    first, second = "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"
    # Block 0 sees the dense inputs on both streams, so its refit is the local one.
    torch.testing.assert_close(seq.get_submodule(first).weight, local.get_submodule(first).weight,
                               rtol=1e-3, atol=1e-4)
    assert not torch.allclose(seq.get_submodule(second).weight, local.get_submodule(second).weight)
    # It matches the dense model's last hidden state better on the calibration tokens.
    ids = plan.calibration_ids
    with torch.no_grad():
        ref = model.model(input_ids=ids).last_hidden_state
        err_seq = (seq.model(input_ids=ids).last_hidden_state - ref).norm()
        err_local = (local.model(input_ids=ids).last_hidden_state - ref).norm()
    assert err_seq < err_local
    with pytest.raises(UserError, match="calibration tokens"):
        MinifyPlan(plan.layers, plan.with_options(target="sequential").options).materialize_(
            copy.deepcopy(model), 0.6)


# ---------------------------------------------------------------------------- checkpoints, composition
def test_save_reload_bitwise(tiny_and_plan, tmp_path):
    from transformers import AutoModelForCausalLM

    import lowrank
    from lowrank import size_report

    model, plan = tiny_and_plan
    m = copy.deepcopy(model)
    widths = plan.with_options(width_multiple=1).materialize_(m, 0.7)
    assert len(set(widths.values())) > 1  # per-layer widths differ
    lowrank.save_pretrained(m, tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert cfg["widths"]["model.layers.0.mlp.down_proj"] == [32, widths["model.layers.0.mlp"]]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    ids = _tokens(2, 32, seed=5)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, m(input_ids=ids).logits)
    a = size_report(m)
    b = size_report(reloaded)
    assert (a.target_params, a.target_dense_params, a.model_fraction) == (
        b.target_params, b.target_dense_params, b.model_fraction)


def test_plan_save_load_roundtrip(tiny_and_plan, tmp_path):
    model, plan = tiny_and_plan
    plan.with_options(ridge=1e-2).save(tmp_path / "plan")
    assert recorded_plan_type(tmp_path / "plan") == MinifyPlan.plan_type == "minify"
    loaded = MinifyPlan.load(tmp_path / "plan")
    assert loaded.options.ridge == 1e-2
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    plan.with_options(ridge=1e-2).materialize_(a, 0.7)
    loaded.materialize_(b, 0.7)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    with pytest.raises(UserError, match="not a minify plan"):
        MinifyPlan.load(tmp_path)


def test_minify_then_svd(tiny_and_plan, tmp_path):
    from transformers import AutoModelForCausalLM

    import lowrank
    from compress.methods.svd import SVDConfig, score_svd
    from lowrank import LowRankLinear, size_report

    model, plan = tiny_and_plan
    m = copy.deepcopy(model)
    plan.materialize_(m, 0.75)
    after_minify = size_report(m).target_fraction
    svd_plan = score_svd(m, plan.calibration_ids, SVDConfig(progress=False))
    svd_plan.materialize_(m, 0.8)
    assert any(isinstance(mod, LowRankLinear) for mod in m.modules())
    total = size_report(m).target_fraction
    assert total == pytest.approx(after_minify * 0.8, abs=0.03)
    lowrank.save_pretrained(m, tmp_path / "both")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "both", dtype=torch.float32).eval()
    ids = _tokens(2, 32, seed=6)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, m(input_ids=ids).logits)
    with pytest.raises(UserError, match="before low-rank factorization"):
        plan.materialize_(m, 0.5)


# ---------------------------------------------------------------------------- bad inputs
def test_bad_inputs(tiny_and_plan):
    from transformers import GPT2Config, GPT2LMHeadModel

    model, plan = tiny_and_plan
    for size in (0.0, 1.5, -1, True):
        with pytest.raises(UserError, match="size"):
            plan.materialize_(copy.deepcopy(model), size)
    with pytest.raises(UserError, match="floors need"):
        plan.with_options(min_keep=0.5).materialize_(copy.deepcopy(model), 0.3)
    for bad in ({"score": "magnitude"}, {"aggregation": "max"}, {"target": "global"}, {"ridge": -1.0},
                {"min_keep": 2.0}, {"width_multiple": 0}):
        with pytest.raises(UserError):
            plan.with_options(**bad)
    with pytest.raises(UserError, match="calibration token ids"):
        _score(model, None)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).eval()
    with pytest.raises(UserError, match="minify"):
        _score(gpt2, _tokens(2, 8, seed=0, vocab=64))
    narrowed = copy.deepcopy(model)
    plan.materialize_(narrowed, 0.7)
    with pytest.raises(UserError, match="already minified"):
        plan.materialize_(narrowed, 0.5)
    assert get_method("minify").config_cls is MinifyConfig


# ---------------------------------------------------------------------------- CLI
@requires_smollm2
def test_cli_minify(tmp_path, capsys):
    """End to end through the CLI, on a tiny random model with SmolLM2's tokenizer."""
    from transformers import AutoTokenizer

    import lowrank
    from compress.cli import main
    from compress.model import _resolve_source

    source, extra = _resolve_source(None)
    tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    tiny = make_tiny_llama(seed=0, vocab=len(tokenizer))
    tiny.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 97} and more text {i}" for i in range(3000)))
    base = ["--model", str(tmp_path / "tiny"), "--device", "cpu", "--data", str(text), "--seq-len", "64",
            "--calib-samples", "8", "--eval-chunks", "2", "--method", "minify"]
    # d_ff 160 × 2 layers: 75% = 240 channels, a multiple of 16 (the default multiple 32 would round).
    assert main([*base, "--size", "0.75", "--rank-multiple", "16", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "MLPs: " in out and "whole model" in out
    report = json.loads((tmp_path / "out" / "compress_report.json").read_text())
    assert report["mlp_fraction"] == pytest.approx(0.75)
    assert report["target_fraction"] < report["model_fraction"] < 1.0  # embeddings are not minified
    assert report["compressed_perplexity"] > 0
    reloaded = lowrank.load_pretrained(tmp_path / "out", dtype=torch.float32)
    assert reloaded.model.layers[0].mlp.down_proj.in_features < 160
    assert main([*base, "--size", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --size")
    assert main([*base, "--size", "0.5", "--method-opt", "score=bogus"]) == 2
    assert "unknown minify score" in capsys.readouterr().err
