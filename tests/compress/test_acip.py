"""ACIP and svd-magnitude: the pure math, the masked layer, scoring, score maps, materialization, CLI."""

from __future__ import annotations

import copy
import dataclasses
import json
import signal

import pytest
import torch
from torch import nn

from compress.errors import UserError
from compress.methods.acip import ACIPConfig, ScoreMap, ScoreMapMismatch, run_acip
from compress.methods.acip import functional as F
from compress.methods.acip.layer import masked_lowrank
from compress.methods.acip.train import install_masked_layers
from compress.plan import temporarily_materialized
from lowrank import LowRankLinear, size_report, target_linears
from tests.conftest import make_tiny_llama

VOCAB = 128


def fast_config(**overrides) -> ACIPConfig:
    """Settings that prune a tiny model to the stop ratio in ~15 steps (the paper's would take thousands).

    The plain basis, NLL loss and post-tuning at the stop ratio (the paper's parametrization) unless
    overridden; the whitened, distillation and any-size tests ask for theirs.
    """
    base = dict(basis="plain", distill=0.0, post_tune_size="stop", stop_ratio=0.6, lr=2e-2, reg_start=1e-2,
                reg_update_every=1, reg_update_factor=1.2, lora_rank=4, post_tune_steps=4, max_steps=80,
                checkpoint_every=3, progress=False)
    base.update(overrides)
    return ACIPConfig(**base)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one thread is faster (conftest)


@pytest.fixture(scope="module")
def calib() -> torch.Tensor:
    return torch.randint(0, VOCAB, (12, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def scored(calib):
    """(model, score map, logits of the original model on fixed ids, ids) from one scoring run."""
    model = make_tiny_llama()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits
    score_map = run_acip(model, calib, fast_config())
    return model, score_map, ref, ids


# ---------------------------------------------------------------------------- pure functions
def test_mask_forward_is_binary_with_relu_gradient():
    p = torch.tensor([0.03, -0.01, 0.0, 0.2], requires_grad=True)
    value = F.mask_forward(p, 0.02)
    assert torch.equal(value.detach(), torch.tensor([0.02, 0.0, 0.0, 0.02]))
    value.sum().backward()
    assert torch.equal(p.grad, torch.tensor([1.0, 0.0, 0.0, 1.0]))


def test_score_update_orders_pruned_entries_by_time():
    scores = None
    for p in ([0.5, 0.4, 0.3], [0.5, -0.1, 0.3], [0.5, -0.2, -0.1], [0.6, -0.2, -0.1]):
        scores = F.update_scores(scores, torch.tensor(p))
    # entry 1 was pruned at update 2 (0 → −1, −2, −3), entry 2 at update 3 (−1, −2); entry 0 alive.
    assert scores.tolist() == pytest.approx([0.6, -3.0, -2.0])


def test_reg_weight_schedule():
    assert F.reg_weight(0, 1e-3, 4, 1.01) == pytest.approx(1e-3)
    assert F.reg_weight(3, 1e-3, 4, 1.01) == pytest.approx(1e-3)
    assert F.reg_weight(8, 1e-3, 4, 1.01) == pytest.approx(1e-3 * 1.01**2)


def test_size_accounting_uses_min_convention():
    seg = F.Segments.from_shapes([(10, 30), (20, 20)])
    assert seg.lengths == (10, 20)
    # layer 0: rank 2 → 80 of 300; layer 1: rank 15 → min(600, 400) = 400 of 400.
    assert F.size_for_counts(torch.tensor([2, 15]), seg) == pytest.approx((80 + 400) / 700)
    assert F.size_for_counts(torch.tensor([0, 0]), seg, extra_rank=1) == pytest.approx((40 + 40) / 700)


def test_selection_is_monotone_and_near_target():
    torch.manual_seed(0)
    seg = F.Segments.from_shapes([(64, 48), (96, 64), (32, 64)])
    scores = torch.randn(seg.total)
    order = F.global_order(scores, torch.rand(seg.total))
    layer_of_ranked = seg.layer_index()[order]
    sizes = [F.select_for_size(layer_of_ranked, seg, s).size for s in (0.2, 0.4, 0.6, 0.8, 1.0)]
    assert sizes == sorted(sizes)
    for want, got in zip((0.2, 0.4, 0.6, 0.8, 1.0), sizes, strict=True):
        assert abs(got - want) < 0.03


def test_masked_lowrank_gradients_match_dense_reference():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    U, Vs = torch.randn(6, 4, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64)
    bias = torch.randn(6)
    d = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64, requires_grad=True)
    y = masked_lowrank(x, U, Vs, d, bias.double())
    grad = torch.randn_like(y)
    gx, gd = torch.autograd.grad(y, (x, d), grad)
    x2, d2 = x.detach().clone().requires_grad_(), d.detach().clone().requires_grad_()
    y2 = x2 @ (U @ torch.diag(d2) @ Vs).T + bias.double()
    gx2, gd2 = torch.autograd.grad(y2, (x2, d2), grad)
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(gx, gx2)
    torch.testing.assert_close(gd, gd2)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_gives_the_same_gradients(mode):
    from compress.methods.acip.train import (
        compute_svd_factors,
        disable_activation_checkpointing,
        enable_activation_checkpointing,
    )

    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    grads = {}
    for variant in ("none", mode):
        model = make_tiny_llama()
        names = list(target_linears(model))
        factors = compute_svd_factors(model, names)
        torch.manual_seed(0)
        bank, layers = install_masked_layers(model, factors, fast_config(lora_dropout=0.1), device="cpu",
                                             dtype=torch.float32)
        with torch.no_grad():
            bank.p.uniform_(-0.01, 0.03)
            for layer in layers.values():
                layer.lora_B.normal_(0, 0.1)
        model.requires_grad_(False)
        bank.p.requires_grad_(True)
        model.train()
        enable_activation_checkpointing(model, variant)
        torch.manual_seed(5)
        bank.refresh()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        disable_activation_checkpointing(model, variant)
        grads[variant] = bank.p.grad.clone()
    torch.testing.assert_close(grads[mode], grads["none"], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------- scoring and materialization
def test_scoring_produces_a_score_map_and_restores_the_model(scored):
    model, score_map, ref, ids = scored
    assert all(isinstance(m, nn.Linear) for m in target_linears(model).values())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    meta = score_map.metadata
    assert meta["stop_reached"] and meta["final_ratio"] <= 0.6
    assert meta["post_tune_steps"] == 4
    assert score_map.lora_rank == 4 and score_map.lora_scaling == pytest.approx(4.0)
    scores = torch.cat([lf.scores for lf in score_map.layers.values()])
    assert (scores <= -1).any() and (scores > 0).any()  # some pruned, some kept
    assert score_map.min_size() <= 0.6


def test_materialized_sizes_track_requests_and_are_monotone(scored):
    model, score_map, _, ids = scored
    got = []
    for size in (0.6, 0.7, 0.8, 0.9, 1.0):
        with temporarily_materialized(model, score_map, size):
            report = size_report(model)
            assert abs(report.target_fraction - size) < 0.01
            assert report.target_fraction == pytest.approx(score_map.size_at(size))
            got.append(report.target_fraction)
            with torch.no_grad():
                assert torch.isfinite(model(ids).logits).all()
    assert got == sorted(got)
    # The original layers are back after each materialization.
    assert all(isinstance(m, nn.Linear) for m in target_linears(model).values())


def test_rank_multiple_aligns_factorized_ranks(scored):
    model, score_map, _, _ = scored
    with temporarily_materialized(model, score_map, 0.7, rank_multiple=8):
        lowrank = [m for m in target_linears(model).values() if isinstance(m, LowRankLinear)]
        assert lowrank and all(m.rank % 8 == 0 for m in lowrank)
        assert abs(size_report(model).target_fraction - 0.7) < 0.03


def test_size_one_with_reset_rule_is_the_original_model(scored):
    model, score_map, ref, ids = scored
    with temporarily_materialized(model, score_map, 1.0, reset=True), torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=0)
    with temporarily_materialized(model, score_map, 1.0, reset=False), torch.no_grad():
        # Without the rule every layer is W + LoRA, so the function moved during scoring.
        assert not torch.allclose(model(ids).logits, ref, atol=1e-3)


def test_lora_is_folded_into_one_factorized_matmul(scored):
    model, score_map, _, ids = scored
    name = next(iter(score_map.layers))
    with temporarily_materialized(model, score_map, 0.6) as ranks:
        layer = target_linears(model)[name]
        assert isinstance(layer, LowRankLinear)
        lf = score_map.layers[name]
        keep = int((lf.scores > 0).sum())  # at the stop ratio exactly the unpruned entries are kept
        assert ranks[name] == layer.rank == keep + score_map.lora_rank
        idx = torch.nonzero(lf.scores > 0).squeeze(1)
        expected = (lf.U[:, idx] * lf.s[idx]) @ lf.Vh[idx] + score_map.lora_scaling * lf.lora_B @ lf.lora_A
        torch.testing.assert_close(layer.U @ layer.V, expected, rtol=1e-4, atol=1e-5)


def test_score_map_save_load_round_trip(scored, tmp_path):
    model, score_map, _, ids = scored
    score_map.save(tmp_path / "sm")
    loaded = ScoreMap.load(tmp_path / "sm")
    assert loaded.method == "acip" and loaded.names == score_map.names
    for name, lf in score_map.layers.items():
        other = loaded.layers[name]
        for key in ("U", "s", "Vh", "scores", "lora_A", "lora_B"):
            assert torch.equal(getattr(lf, key), getattr(other, key))
    assert loaded.min_size() == pytest.approx(score_map.min_size())
    assert loaded.ranks(0.75) == score_map.ranks(0.75)
    meta = json.loads((tmp_path / "sm" / "scoremap.json").read_text())
    assert meta["identity"]["architecture"] == "LlamaForCausalLM"
    with temporarily_materialized(model, score_map, 0.75), torch.no_grad():
        a = model(ids).logits
    with temporarily_materialized(model, loaded, 0.75), torch.no_grad():
        b = model(ids).logits
    assert torch.equal(a, b)


def test_bad_requests_give_clear_errors(scored):
    model, score_map, _, _ = scored
    with pytest.raises(UserError, match="below what this score map covers"):
        score_map.select(0.3)
    with pytest.raises(UserError, match=r"\(0, 1\]"):
        score_map.select(1.5)
    other = make_tiny_llama(seed=7)  # same architecture, other weights
    with pytest.raises(ScoreMapMismatch, match="different checkpoint"):
        score_map.materialize_(other, 0.8)
    wider = make_tiny_llama(hidden=96)
    with pytest.raises(ScoreMapMismatch, match="another model"):
        score_map.materialize_(wider, 0.8)
    with temporarily_materialized(model, score_map, 0.8):
        with pytest.raises(UserError, match="already compressed"):
            score_map.materialize_(model, 0.8)


# ---------------------------------------------------------------------------- checkpoints
def test_resume_after_ctrl_c_equals_uninterrupted_run(calib, tmp_path):
    config = fast_config(checkpoint_every=4)
    full = run_acip(make_tiny_llama(), calib, dataclasses.replace(config, checkpoint_dir=str(tmp_path / "a")))

    def interrupt_at_seven(info):
        if info["step"] == 7:
            signal.raise_signal(signal.SIGINT)  # what Ctrl-C does: the step finishes, then we stop

    ckpt = str(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        run_acip(make_tiny_llama(), calib, dataclasses.replace(config, checkpoint_dir=ckpt),
                 callback=interrupt_at_seven)
    state = torch.load(tmp_path / "b" / "state.pt", weights_only=True)
    assert state["step"] == 7
    resumed = run_acip(make_tiny_llama(), calib,
                       dataclasses.replace(config, checkpoint_dir=ckpt, resume=True))
    assert resumed.metadata["steps"] == full.metadata["steps"]
    for name, lf in full.layers.items():
        other = resumed.layers[name]
        assert torch.equal(lf.scores, other.scores), name
        assert torch.equal(lf.lora_A, other.lora_A) and torch.equal(lf.lora_B, other.lora_B), name


def test_a_run_that_dies_before_its_first_checkpoint_resumes_its_factors(calib, tmp_path, monkeypatch, capsys):
    """Out of memory in the first steps (after the factors were written): --resume reuses the factors and
    trains from step 0, to the uninterrupted result, without computing the SVDs again."""
    import compress.methods.acip.train as train

    config = fast_config(checkpoint_every=1000, checkpoint_dir=str(tmp_path / "d"))
    full = run_acip(make_tiny_llama(), calib, dataclasses.replace(config, checkpoint_dir=str(tmp_path / "full")))

    def out_of_memory(info):
        if info["step"] == 2:
            raise RuntimeError("CUDA out of memory (simulated)")

    with pytest.raises(RuntimeError, match="out of memory"):
        run_acip(make_tiny_llama(), calib, config, callback=out_of_memory)
    assert (tmp_path / "d" / "factors.safetensors").is_file() and not (tmp_path / "d" / "state.pt").exists()

    def no_svd_again(*args, **kwargs):
        raise AssertionError("the factors were computed again")

    monkeypatch.setattr(train, "compute_svd_factors", no_svd_again)
    capsys.readouterr()
    resumed = run_acip(make_tiny_llama(), calib, dataclasses.replace(config, resume=True))
    assert "holds the factors but no training step yet" in capsys.readouterr().out
    assert resumed.metadata["steps"] == full.metadata["steps"]
    for name, lf in full.layers.items():
        other = resumed.layers[name]
        assert torch.equal(lf.scores, other.scores) and torch.equal(lf.lora_B, other.lora_B), name
    with pytest.raises(UserError, match="other settings"):
        run_acip(make_tiny_llama(), calib, dataclasses.replace(config, lr=1e-3, resume=True))


def test_resume_refuses_other_settings(calib, tmp_path):
    config = fast_config(checkpoint_dir=str(tmp_path / "c"))

    def stop_early(info):
        return info["step"] >= 2

    run_acip(make_tiny_llama(), calib, config, callback=stop_early)
    with pytest.raises(UserError, match="other settings"):
        run_acip(make_tiny_llama(), calib, dataclasses.replace(config, lr=1e-3, resume=True))


# ---------------------------------------------------------------------------- svd-magnitude
def test_svd_magnitude_keeps_the_largest_singular_values_globally():
    from compress.methods import get_method

    model = make_tiny_llama()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(ids).logits
    spec = get_method("svd-magnitude")
    assert not spec.needs_calibration
    plan = spec.score(model, None, spec.make_config(progress=False))
    assert plan.lora_rank == 0 and plan.min_size() == 0.0
    for name, lf in plan.layers.items():
        assert torch.equal(lf.scores, lf.s)
        weight = target_linears(model)[name].weight
        torch.testing.assert_close((lf.U * lf.s) @ lf.Vh, weight, rtol=1e-4, atol=1e-5)
    with temporarily_materialized(model, plan, 0.5) as ranks:
        assert abs(size_report(model).target_fraction - 0.5) < 0.01
        # Global allocation: the smallest singular value kept beats the largest one dropped.
        kept, dropped = [], []
        for name, lf in plan.layers.items():
            r = ranks[name]
            if r < min(lf.shape):
                kept.append(lf.s[:r].min())
                dropped.append(lf.s[r:].max())
        assert min(kept) >= max(dropped) - 1e-6
    with temporarily_materialized(model, plan, 1.0), torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- CLI
class _CharTokenizer:
    def __call__(self, text, **kwargs):
        return {"input_ids": [ord(c) % VOCAB for c in text]}

    def save_pretrained(self, path):  # save_pretrained(model, out, tokenizer) calls this
        return None


@pytest.fixture
def cli_model(monkeypatch, scored):
    model = scored[0]

    def fake_load_model(source=None, *, dtype="auto", device="cpu"):
        # A copy: `materialize` compresses the model it loads in place.
        return copy.deepcopy(model), _CharTokenizer()

    monkeypatch.setattr("compress.model.load_model", fake_load_model)
    return model


def test_cli_materialize_and_errors(scored, cli_model, tmp_path, capsys):
    from compress.cli import main
    from lowrank import load_pretrained

    model, score_map, _, ids = scored
    score_map.save(tmp_path / "sm")
    args = ["materialize", "--scores", str(tmp_path / "sm"), "--out", str(tmp_path / "o")]
    assert main(args + ["--size", "0.3"]) == 2
    assert "below what this score map covers" in capsys.readouterr().err
    assert main(["materialize", "--scores", str(tmp_path / "sm"), "--size", "0.75", "--out",
                 str(tmp_path / "o")]) == 0
    assert "materialized in" in capsys.readouterr().out
    loaded = load_pretrained(tmp_path / "o")
    with temporarily_materialized(model, score_map, 0.75), torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_cli_curve_writes_csv_and_png(scored, cli_model, tmp_path):
    from compress.cli import main

    model, score_map, _, _ = scored
    score_map.save(tmp_path / "sm")
    data = tmp_path / "eval.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    code = main(["curve", "--scores", str(tmp_path / "sm"), "--sizes", "0.6:1.0:0.2", "--data", str(data),
                 "--seq-len", "32", "--out", str(tmp_path / "curve")])
    assert code == 0
    lines = (tmp_path / "curve" / "curve.csv").read_text().strip().splitlines()
    assert lines[0].startswith("requested_size,size,") and len(lines) == 1 + 1 + 3
    try:
        import matplotlib  # noqa: F401  (the `plot` extra; the CSV is written without it)
    except ImportError:
        assert not (tmp_path / "curve" / "curve.png").exists()
    else:
        assert (tmp_path / "curve" / "curve.png").stat().st_size > 1000


def test_cli_compress_with_acip_saves_a_score_map_and_resumes(cli_model, tmp_path, capsys):
    from compress.cli import main

    data = tmp_path / "calib.txt"
    data.write_text("pack my box with five dozen liquor jugs. " * 60)
    opts = ["stop_ratio=0.6", "lr=0.02", "reg_start=0.01", "reg_update_every=1", "reg_update_factor=1.2",
            "lora_rank=4", "post_tune_steps=3", "max_steps=80", "progress=false"]
    argv = ["--method", "acip", "--size", "0.8", "--data", str(data), "--seq-len", "24",
            "--calib-samples", "8", "--batch-size", "2", "--no-eval", "--save-plan", str(tmp_path / "sm"),
            "--out", str(tmp_path / "out")]
    for opt in opts:
        argv += ["--method-opt", opt]
    assert main(argv) == 0
    first = ScoreMap.load(tmp_path / "sm")
    assert first.metadata["basis"] == "whitened"  # the default
    assert first.metadata["whitening"]["samples"] == 8  # all calibration chunks (fewer than whiten_samples)
    assert (tmp_path / "sm" / "checkpoint" / "state.pt").is_file()
    report = json.loads((tmp_path / "out" / "compress_report.json").read_text())
    assert abs(report["target_fraction"] - 0.8) < 0.01
    # A finished run resumes to the same score map without training again.
    assert main(argv + ["--resume"]) == 0
    assert "resumed ACIP" in capsys.readouterr().out
    again = ScoreMap.load(tmp_path / "sm")
    for name, lf in first.layers.items():
        assert torch.equal(lf.scores, again.layers[name].scores)
    assert main(argv[:-2] + ["--out", str(tmp_path / "x"), "--method-opt", "nonsense"]) == 2


# ---------------------------------------------------------------------------- whitened basis
@pytest.fixture(scope="module")
def scored_whitened(calib):
    """(model, whitened-basis score map, logits of the original model, ids)."""
    model = make_tiny_llama()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits
    score_map = run_acip(model, calib, fast_config(basis="whitened", whiten_samples=8))
    return model, score_map, ref, ids


def _output_error(weight, factors, r, gram) -> float:
    u, sv, vh = (f.double() for f in factors)
    delta = weight.double() - (u[:, :r] * sv[:r]) @ vh[:r]
    return float(torch.trace(delta @ gram @ delta.T))


def test_whitened_factors_reproduce_the_layer_and_truncate_in_the_activation_norm(calib):
    from compress.calibrate import collect_input_grams
    from compress.methods.acip.train import compute_svd_factors, compute_whitened_factors

    model = make_tiny_llama()
    names = list(target_linears(model))
    factors, info = compute_whitened_factors(model, names, calib, samples=8)
    assert info["samples"] == 8 and info["tokens"] == 8 * calib.shape[1]
    plain = compute_svd_factors(model, names)
    grams = collect_input_grams(model, calib[torch.linspace(0, 11, 8).round().long()], names, progress=False)
    for name in names:
        U, s, Vh = factors[name]
        weight = target_linears(model)[name].weight.detach()
        torch.testing.assert_close((U * s) @ Vh, weight, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(U.T @ U, torch.eye(U.shape[1]), rtol=0, atol=1e-4)
        assert torch.all(s[:-1] >= s[1:])
        # Keeping the top half: the whitened truncation has the smaller error on the layer's outputs,
        # trace(ΔW·G·ΔWᵀ) = ‖ΔW·Xᵀ‖², and that error is the sum of the dropped whitened σ².
        r = s.numel() // 2
        gram = grams[name].double()
        err_white = _output_error(weight, (U, s, Vh), r, gram)
        assert err_white <= _output_error(weight, plain[name], r, gram) * (1 + 1e-6)
        assert err_white == pytest.approx(float((s[r:].double() ** 2).sum()), rel=1e-3)


def test_whitened_basis_at_full_rank_is_the_dense_model(calib):
    from compress.methods.acip.train import compute_whitened_factors

    model = make_tiny_llama()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = model(ids).logits
    names = list(target_linears(model))
    factors, _ = compute_whitened_factors(model, names, calib, samples=0)
    bank, layers = install_masked_layers(model, factors, fast_config(), device="cpu", dtype=torch.float32)
    assert bank.p.gt(0).all()  # every mask on; LoRA B starts at zero
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_whitened_scoring_produces_a_materializable_score_map(scored_whitened, tmp_path):
    model, score_map, ref, ids = scored_whitened
    meta = score_map.metadata
    assert meta["basis"] == "whitened" and meta["config"]["basis"] == "whitened"
    assert meta["whitening"]["samples"] == 8 and meta["stop_reached"]
    scores = torch.cat([lf.scores for lf in score_map.layers.values()])
    assert (scores <= -1).any() and (scores > 0).any()
    for name, lf in score_map.layers.items():  # W = U·diag(s)·Vh, Vh not orthonormal
        weight = target_linears(model)[name].weight
        torch.testing.assert_close((lf.U * lf.s) @ lf.Vh, weight, rtol=1e-4, atol=1e-5)
    for size in (0.6, 0.8):
        with temporarily_materialized(model, score_map, size), torch.no_grad():
            assert abs(size_report(model).target_fraction - size) < 0.01
            assert torch.isfinite(model(ids).logits).all()
    with temporarily_materialized(model, score_map, 1.0, reset=True), torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=0)
    # LoRA folding, dense layers and the svd-magnitude variant work on the same factors.
    name = next(iter(score_map.layers))
    with temporarily_materialized(model, score_map, 0.6):
        layer = target_linears(model)[name]
        lf = score_map.layers[name]
        idx = torch.nonzero(lf.scores > 0).squeeze(1)
        expected = (lf.U[:, idx] * lf.s[idx]) @ lf.Vh[idx] + score_map.lora_scaling * lf.lora_B @ lf.lora_A
        torch.testing.assert_close(layer.U @ layer.V, expected, rtol=1e-4, atol=1e-5)
    magnitude = score_map.singular_value_map()
    assert magnitude.metadata["basis"] == "whitened"
    with temporarily_materialized(model, magnitude, 1.0), torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)
    score_map.save(tmp_path / "sm")
    loaded = ScoreMap.load(tmp_path / "sm")
    assert loaded.metadata["basis"] == "whitened" and loaded.ranks(0.7) == score_map.ranks(0.7)


def test_whitened_run_pauses_and_resumes_to_the_uninterrupted_result(calib, scored_whitened, tmp_path):
    from compress.methods.acip.train import ACIPPaused

    full = scored_whitened[1]
    config = fast_config(basis="whitened", whiten_samples=8, checkpoint_dir=str(tmp_path / "w"))
    with pytest.raises(ACIPPaused, match="step 5"):
        run_acip(make_tiny_llama(), calib, config, callback=lambda info: "pause" if info["step"] == 5 else None)
    meta = json.loads((tmp_path / "w" / "meta.json").read_text())
    assert meta["config"]["basis"] == "whitened" and meta["whitening"]["samples"] == 8
    resumed = run_acip(make_tiny_llama(), calib, dataclasses.replace(config, resume=True))
    assert resumed.metadata["steps"] == full.metadata["steps"]
    assert resumed.metadata["whitening"] == full.metadata["whitening"]
    for name, lf in full.layers.items():
        other = resumed.layers[name]
        assert torch.equal(lf.Vh, other.Vh) and torch.equal(lf.scores, other.scores), name
        assert torch.equal(lf.lora_A, other.lora_A) and torch.equal(lf.lora_B, other.lora_B), name
    with pytest.raises(UserError, match="other settings"):
        run_acip(make_tiny_llama(), calib, dataclasses.replace(config, basis="plain", resume=True))
    # A checkpoint from before the basis option existed ran in the plain basis.
    meta.pop("whitening")
    del meta["config"]["basis"]
    (tmp_path / "w" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="basis"):
        run_acip(make_tiny_llama(), calib, dataclasses.replace(config, resume=True))
    with pytest.raises(UserError, match="checkpoint_dir"):
        run_acip(make_tiny_llama(), calib, fast_config(), callback=lambda info: "pause")


def test_graph_step_warmup_is_undone(calib, scored, monkeypatch):
    # The CUDA-graph path runs warm-up steps before each capture and undoes them; emulated on the
    # CPU (same code, no capture) the run must equal the eager one bit for bit, in both phases.
    monkeypatch.setattr("compress.methods.acip.train._EMULATE_GRAPHS", True)
    eager = scored[1]
    graphed = run_acip(make_tiny_llama(), calib, fast_config(cuda_graphs=True))
    assert graphed.metadata["step_mode"] == "cuda_graph" and graphed.metadata["steps"] == eager.metadata["steps"]
    for name, lf in eager.layers.items():
        other = graphed.layers[name]
        assert torch.equal(lf.scores, other.scores), name
        assert torch.equal(lf.lora_A, other.lora_A) and torch.equal(lf.lora_B, other.lora_B), name


# ---------------------------------------------------------------------------- post-tuning across sizes
def test_post_tune_masks_keep_what_materializing_at_each_size_keeps(scored):
    _, score_map, _, _ = scored
    scores = torch.cat([lf.scores for lf in score_map.layers.values()])
    singular = torch.cat([lf.s for lf in score_map.layers.values()])
    segments = score_map.segments
    low = score_map.min_size()
    position, counts, sizes = F.post_tune_masks(scores, singular, segments, low, points=7,
                                                extra_rank=score_map.lora_rank)
    assert sorted(position.tolist()) == list(range(scores.numel()))  # a permutation of the entries
    assert counts.tolist() == sorted(counts.tolist()) and counts[-1] == scores.numel()
    assert int(counts[0]) >= int((scores > 0).sum())  # never below what pruning left alive
    assert sizes[0] == pytest.approx(low) and sizes[-1] == pytest.approx(1.0)
    for count, size in zip(counts.tolist(), sizes.tolist(), strict=True):
        kept = position < count
        per_layer = torch.bincount(segments.layer_index()[kept], minlength=len(segments.lengths))
        assert torch.equal(per_layer, score_map.select(size).counts), size
        # the kept entries are the best-scored ones: none kept scores below one dropped
        if 0 < count < scores.numel():
            assert scores[kept].min() >= scores[~kept].max()


def test_post_tune_masks_refuse_bad_arguments():
    segments = F.Segments.from_shapes([(6, 4), (5, 8)])
    scores, singular = torch.randn(segments.total), torch.rand(segments.total)
    with pytest.raises(ValueError, match="points"):
        F.post_tune_masks(scores, singular, segments, 0.5, points=0)
    with pytest.raises(ValueError, match="low"):
        F.post_tune_masks(scores, singular, segments, 0.0)


def test_any_size_post_tuning_trains_under_drawn_masks(calib, monkeypatch):
    """post_tune_size=any: every post-tuning step runs under the masks of one of the score map's sizes,
    more than one size is drawn, the scores are the stop run's, and the LoRA is another."""
    import compress.methods.acip.train as train

    seen: list[tuple[str, int]] = []
    real_step = train.training_step

    def recording_step(model, bank, optimizer, batch, reg):
        seen.append(("acip" if reg is not None else "post", int((bank.p.detach() > 0).sum())))
        return real_step(model, bank, optimizer, batch, reg)

    monkeypatch.setattr(train, "training_step", recording_step)
    stop = run_acip(make_tiny_llama(), calib, fast_config(post_tune_steps=12))
    seen.clear()
    config = fast_config(post_tune_steps=12, post_tune_size="any")
    anysize = run_acip(make_tiny_llama(), calib, config)
    post = [alive for phase, alive in seen if phase == "post"]
    assert len(post) == 12
    scores = torch.cat([lf.scores for lf in anysize.layers.values()])
    singular = torch.cat([lf.s for lf in anysize.layers.values()])
    _, counts, _ = F.post_tune_masks(scores, singular, anysize.segments, anysize.metadata["final_ratio"],
                                     extra_rank=config.lora_rank)
    assert set(post) <= set(counts.tolist()) and len(set(post)) > 1
    assert anysize.metadata["config"]["post_tune_size"] == "any"
    lora_differs = False
    for name, lf in stop.layers.items():
        assert torch.equal(lf.scores, anysize.layers[name].scores), name
        lora_differs |= not torch.equal(lf.lora_B, anysize.layers[name].lora_B)
    assert lora_differs
    again = run_acip(make_tiny_llama(), calib, config)  # the draws depend on (seed, step) alone
    for name, lf in anysize.layers.items():
        assert torch.equal(lf.lora_A, again.layers[name].lora_A) and torch.equal(lf.lora_B, again.layers[name].lora_B)


def test_any_size_post_tuning_resumes_to_the_uninterrupted_result(calib, tmp_path):
    config = fast_config(post_tune_steps=8, post_tune_size="any", checkpoint_every=2, lora_dropout=0.0)
    full = run_acip(make_tiny_llama(), calib, dataclasses.replace(config, checkpoint_dir=str(tmp_path / "a")))
    stop_at = full.metadata["acip_steps"] + 3  # inside the post-tuning

    def interrupt(info):
        if info["step"] == stop_at:
            signal.raise_signal(signal.SIGINT)

    ckpt = str(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        run_acip(make_tiny_llama(), calib, dataclasses.replace(config, checkpoint_dir=ckpt), callback=interrupt)
    resumed = run_acip(make_tiny_llama(), calib, dataclasses.replace(config, checkpoint_dir=ckpt, resume=True))
    for name, lf in full.layers.items():
        other = resumed.layers[name]
        assert torch.equal(lf.scores, other.scores), name
        assert torch.equal(lf.lora_A, other.lora_A) and torch.equal(lf.lora_B, other.lora_B), name


def test_post_tuning_across_sizes_is_the_default():
    assert ACIPConfig().post_tune_size == "any"


def test_post_tune_size_options_are_checked():
    with pytest.raises(UserError, match="post_tune_size"):
        fast_config(post_tune_size="largest").validate()
    with pytest.raises(UserError, match="holdout"):
        fast_config(post_tune_size="any", holdout=2).validate()
