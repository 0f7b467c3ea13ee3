"""LLM Surgeon: K-FAC OBS math against the exact solution, global thresholds, physical pruning,
checkpoints, resume and the CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from compress.calibrate import collect_input_grams, collect_kfac
from compress.errors import UserError
from compress.methods import get_method
from compress.methods.surgeon import (
    SurgeonConfig,
    SurgeonOptions,
    SurgeonPlan,
    column_costs,
    column_set_cost,
    element_costs,
    find_units,
    remove_columns,
    remove_rows,
    row_costs,
    row_set_cost,
    select_rows_columns,
    select_units,
    surgeon_prune_,
    two_four_mask,
)
from lowrank.surgery import size_report, target_linears
from tests.conftest import make_tiny_llama, requires_smollm2


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()))


def _spd(n: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(3 * n, n, dtype=torch.float64, generator=gen)
    return x.T @ x / (3 * n) + 0.1 * torch.eye(n, dtype=torch.float64)


def _tokens(n: int, seq: int, vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(_seed()))


def _exact_obs(w: torch.Tensor, hessian: torch.Tensor, removed: torch.Tensor) -> tuple[torch.Tensor, float]:
    """OBS with the full Hessian over vec(W) (column-major): zero the entries `removed` (a mask)."""
    vec = w.T.reshape(-1)
    idx = removed.T.reshape(-1).nonzero().squeeze(1)
    h_inv = torch.linalg.inv(hessian)
    block = h_inv[idx][:, idx]
    lagrange = torch.linalg.solve(block, vec[idx])
    delta = -h_inv[:, idx] @ lagrange
    cost = 0.5 * float(vec[idx] @ lagrange)
    return (vec + delta).reshape(w.shape[1], w.shape[0]).T, cost


# ---------------------------------------------------------------------------- OBS math
@pytest.mark.parametrize("rows", [[2], [0, 3, 5]])
def test_row_removal_matches_exact_obs_for_kronecker_curvature(rows):
    gen = torch.Generator().manual_seed(_seed())
    n, m = 7, 5
    a, g = _spd(m, gen), _spd(n, gen)
    w = torch.randn(n, m, dtype=torch.float64, generator=gen)
    q = torch.tensor(rows)
    removed = torch.zeros(n, m, dtype=torch.bool)
    removed[q] = True
    exact_w, exact_cost = _exact_obs(w, torch.kron(a, g), removed)
    g_inv = torch.linalg.inv(g)
    new_w, _ = remove_rows(w, g_inv, q)
    keep = torch.tensor([i for i in range(n) if i not in rows])
    torch.testing.assert_close(new_w, exact_w[keep], rtol=1e-9, atol=1e-10)
    assert exact_w[q].abs().max() < 1e-10
    assert row_set_cost(w, a, g_inv, q) == pytest.approx(exact_cost, rel=1e-9)
    if len(rows) == 1:
        assert float(row_costs(w, a, g_inv.diagonal())[rows[0]]) == pytest.approx(exact_cost, rel=1e-9)


@pytest.mark.parametrize("cols", [[1], [0, 2, 6]])
def test_column_removal_matches_exact_obs_for_kronecker_curvature(cols):
    gen = torch.Generator().manual_seed(_seed())
    n, m = 5, 8
    a, g = _spd(m, gen), _spd(n, gen)
    w = torch.randn(n, m, dtype=torch.float64, generator=gen)
    c = torch.tensor(cols)
    removed = torch.zeros(n, m, dtype=torch.bool)
    removed[:, c] = True
    exact_w, exact_cost = _exact_obs(w, torch.kron(a, g), removed)
    a_inv = torch.linalg.inv(a)
    keep = torch.tensor([i for i in range(m) if i not in cols])
    torch.testing.assert_close(remove_columns(w, a_inv, c), exact_w[:, keep], rtol=1e-9, atol=1e-10)
    assert column_set_cost(w, g, a_inv, c) == pytest.approx(exact_cost, rel=1e-9)
    if len(cols) == 1:
        assert float(column_costs(w, g, a_inv.diagonal())[cols[0]]) == pytest.approx(exact_cost, rel=1e-9)


def test_single_weight_cost_matches_exact_obs():
    gen = torch.Generator().manual_seed(_seed())
    a, g = _spd(4, gen), _spd(3, gen)
    w = torch.randn(3, 4, dtype=torch.float64, generator=gen)
    costs = element_costs(w, torch.linalg.inv(g).diagonal(), torch.linalg.inv(a).diagonal())
    for r, c in [(0, 0), (2, 3), (1, 2)]:
        removed = torch.zeros(3, 4, dtype=torch.bool)
        removed[r, c] = True
        _, exact = _exact_obs(w, torch.kron(a, g), removed)
        assert float(costs[r, c]) == pytest.approx(exact, rel=1e-9)


def test_column_update_is_least_squares_refit():
    """With A = XᵀX (no damping), removing inputs and updating is the least-squares refit on the rest."""
    gen = torch.Generator().manual_seed(_seed())
    x = torch.randn(300, 9, dtype=torch.float64, generator=gen) @ torch.randn(9, 9, dtype=torch.float64,
                                                                              generator=gen)
    w = torch.randn(4, 9, dtype=torch.float64, generator=gen)
    cols = torch.tensor([1, 4, 5])
    keep = torch.tensor([0, 2, 3, 6, 7, 8])
    updated = remove_columns(w, torch.linalg.inv(x.T @ x), cols)
    lstsq = torch.linalg.lstsq(x[:, keep], x @ w.T).solution.T
    torch.testing.assert_close(updated, lstsq, rtol=1e-8, atol=1e-9)
    plain = remove_columns(w, torch.linalg.inv(x.T @ x), cols, update=False)
    assert torch.equal(plain, w[:, keep])
    assert torch.linalg.norm(x @ w.T - x[:, keep] @ updated.T) < torch.linalg.norm(x @ w.T - x[:, keep] @ plain.T)


def test_row_update_moves_bias_like_a_weight_column():
    gen = torch.Generator().manual_seed(_seed())
    g_inv = torch.linalg.inv(_spd(6, gen))
    w = torch.randn(6, 3, dtype=torch.float64, generator=gen)
    b = torch.randn(6, dtype=torch.float64, generator=gen)
    rows = torch.tensor([1, 4])
    new_w, new_b = remove_rows(w, g_inv, rows, b)
    augmented, _ = remove_rows(torch.cat([w, b[:, None]], 1), g_inv, rows)
    torch.testing.assert_close(torch.cat([new_w, new_b[:, None]], 1), augmented)


def test_two_four_mask():
    costs = torch.rand(5, 12, generator=torch.Generator().manual_seed(_seed()))
    mask = two_four_mask(costs)
    assert torch.equal(mask.reshape(5, 3, 4).sum(-1), torch.full((5, 3), 2))
    kept = costs.reshape(5, 3, 4)[mask.reshape(5, 3, 4)].reshape(5, 3, 2)
    dropped = costs.reshape(5, 3, 4)[~mask.reshape(5, 3, 4)].reshape(5, 3, 2)
    assert (kept.min(-1).values >= dropped.max(-1).values).all()
    with pytest.raises(UserError, match="divisible by 4"):
        two_four_mask(torch.rand(2, 6))


# ---------------------------------------------------------------------------- global thresholds
def test_select_units_removes_exactly_the_requested_count():
    gen = torch.Generator().manual_seed(_seed())
    costs = torch.rand(40, generator=gen, dtype=torch.float64)
    sizes = torch.randint(1, 50, (40,), generator=gen)
    order = torch.argsort(costs / sizes)
    for k in (0, 1, 7, 40):
        request = int(sizes[order[:k]].sum())
        chosen = select_units(costs, sizes, request)
        assert int(sizes[chosen].sum()) == request
        assert set(chosen.nonzero().squeeze(1).tolist()) == set(order[:k].tolist())
    # Between two boundaries: the longest prefix that fits, then each later unit that still fits
    # (a unit too large for what is left is skipped, not the end of the walk); never more than asked.
    request = int(sizes[order[:10]].sum()) + int(sizes[order[10]]) - 1
    chosen = select_units(costs, sizes, request)
    assert chosen[order[:10]].all() and not chosen[order[10]]
    assert int(sizes[chosen].sum()) <= request
    left = request - int(sizes[order[:10]].sum())
    for index in order[11:].tolist():
        assert bool(chosen[index]) == (int(sizes[index]) <= left)
        left -= int(sizes[index]) if chosen[index] else 0
    # One oversized cheapest unit does not stop the rest from being chosen.
    big = torch.tensor([1.0, 5.0, 5.0, 5.0], dtype=torch.float64)
    big_sizes = torch.tensor([100, 10, 10, 10])
    assert select_units(big, big_sizes, 30).tolist() == [False, True, True, True]
    # Raw costs (the paper's rule) and floors.
    raw = select_units(costs, sizes, int(sizes.sum()), normalize="none")
    assert raw.all()
    protected = torch.ones(40, dtype=torch.bool)
    protected[order[0]] = False
    assert not select_units(costs, sizes, request, removable=protected)[order[0]]


def test_select_rows_columns_counts_shared_elements():
    gen = torch.Generator().manual_seed(_seed())
    shapes = [(6, 4), (3, 9), (5, 5)]
    row_c = [torch.rand(n, generator=gen, dtype=torch.float64) for n, _ in shapes]
    col_c = [torch.rand(m, generator=gen, dtype=torch.float64) for _, m in shapes]

    def zeroed(rows, cols):
        return sum(int(r.sum()) * m + int(c.sum()) * n - int(r.sum()) * int(c.sum())
                   for (n, m), r, c in zip(shapes, rows, cols, strict=True))

    total = sum(n * m for n, m in shapes)
    rows, cols, removed = select_rows_columns(row_c, col_c, total // 2)
    assert removed == zeroed(rows, cols) <= total // 2
    # The threshold property: everything removed is cheaper than everything kept.
    removed_costs = torch.cat([c[r] for c, r in zip(row_c + col_c, rows + cols, strict=True)])
    kept_costs = torch.cat([c[~r] for c, r in zip(row_c + col_c, rows + cols, strict=True)])
    assert removed_costs.max() <= kept_costs.min()
    # Asking for exactly what a threshold reaches removes exactly that many.
    rows2, cols2, removed2 = select_rows_columns(row_c, col_c, removed)
    assert removed2 == removed == zeroed(rows2, cols2)
    # Everything: the shared elements are not counted twice.
    _, _, everything = select_rows_columns(row_c, col_c, total)
    assert everything == total


# ---------------------------------------------------------------------------- curvature pass
def test_kfac_factors():
    model = make_tiny_llama(seed=_seed() % 1000)
    ids = _tokens(4, 12)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"]
    factors = collect_kfac(model, ids, names, batch_size=2, progress=False)
    grams = collect_input_grams(model, ids, names, batch_size=2, progress=False)
    for n in names:
        torch.testing.assert_close(factors.input_grams[n], grams[n] / ids.numel(), rtol=1e-5, atol=1e-7)
        g = factors.output_grams[n].double()
        assert torch.linalg.eigvalsh(g).min() > -1e-6 * g.diagonal().max()
    assert factors.input_grams[names[0]] is factors.input_grams[names[1]]  # q and k read one input
    empirical = collect_kfac(model, ids, names, labels="data", batch_size=2, progress=False)
    assert not torch.allclose(empirical.output_grams[names[2]], factors.output_grams[names[2]])
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------------- pruning models
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_physical_prune_removes_heads_and_channels_and_reloads_bitwise(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    import lowrank

    model = make_tiny_llama(seed=_seed() % 1000, arch=arch, heads=4, kv_heads=4, intermediate=96)
    ids = _tokens(8, 24)
    old_q = model.model.layers[0].self_attn.q_proj
    old_q_weight = old_q.weight.detach().clone()
    # A high MLP floor leaves most of the cut to attention, so both kinds of unit go.
    options = SurgeonOptions(shots=3, batch_size=4, min_keep=0.9)
    stats = surgeon_prune_(model, ids, 0.6, options, progress=False)
    report = size_report(model)
    largest_unit = 4 * 64 * 16 + 3 * 64  # one (q, k, v, o) head of 16 dims, or one MLP channel
    assert 0.6 - 1e-9 <= report.target_fraction <= 0.6 + largest_unit / report.target_dense_params
    assert stats["zeroed_params"] == 0
    attn = [model.model.layers[i].self_attn for i in range(2)]
    mlp = [model.model.layers[i].mlp for i in range(2)]
    assert any(a.q_proj.out_features < 64 for a in attn), "no head was pruned"
    assert any(m.down_proj.in_features < 96 for m in mlp), "no MLP channel was pruned"
    for a in attn:
        assert a.q_proj.out_features == a.k_proj.out_features == a.v_proj.out_features == a.o_proj.in_features
        assert a.q_proj.out_features % 16 == 0
    for m in mlp:
        assert m.down_proj.in_features >= 0.9 * 96
    # The original modules are untouched (pruning swaps in new ones), so they can be put back.
    assert torch.equal(old_q.weight, old_q_weight)
    probe = _tokens(2, 16)
    with torch.no_grad():
        logits = model(probe).logits
    assert torch.isfinite(logits).all()
    lowrank.save_pretrained(model, tmp_path / "ckpt")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(probe).logits, logits)
    assert size_report(reloaded).target_params == report.target_params


def test_correlated_update_beats_plain_removal():
    """The column update keeps the pruned model closer to the dense one (KL on the calibration tokens).

    Row updates lean on the output-gradient factor G, which 512 tokens of a random model estimate
    poorly; the GPU ablation (docs/surgeon.md) measures them on real data.
    """
    model = make_tiny_llama(seed=_seed() % 1000, intermediate=128)
    ids = _tokens(16, 32)
    with torch.no_grad():
        dense = torch.log_softmax(model(ids).logits, -1)

    def kl(m: nn.Module) -> float:
        with torch.no_grad():
            pruned = torch.log_softmax(m(ids).logits, -1)
        return float((dense.exp() * (dense - pruned)).sum(-1).mean())

    results = {}
    for update in ("columns", "none"):
        pruned = copy.deepcopy(model)
        surgeon_prune_(pruned, ids, 0.7, SurgeonOptions(shots=2, update=update, lora_steps=0), progress=False)
        results[update] = kl(pruned)
    assert 0 < results["columns"] < results["none"]


@pytest.mark.parametrize("structure", ["rows-cols", "unstructured", "2:4"])
def test_zeroed_structures_keep_shapes_and_report_zeroed(structure):
    model = make_tiny_llama(seed=_seed() % 1000)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    size = 0.5 if structure == "2:4" else 0.75
    stats = surgeon_prune_(model, _tokens(4, 16), size, SurgeonOptions(structure=structure, shots=2),
                           progress=False)
    assert {n: p.shape for n, p in model.named_parameters()} == shapes
    assert size_report(model).target_fraction == 1.0  # nothing physically saved
    total = size_report(model).target_params
    assert stats["zeroed_params"] == pytest.approx((1 - size) * total, abs=0.002 * total)
    assert stats["kept_fraction"] == pytest.approx(size, abs=0.002)


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    import compress.methods.surgeon as surgeon

    model = make_tiny_llama(seed=_seed() % 1000)
    ids = _tokens(6, 16)
    options = SurgeonOptions(shots=3, batch_size=3)
    whole = copy.deepcopy(model)
    surgeon_prune_(whole, ids, 0.6, options, progress=False)

    calls = {"n": 0}
    real = surgeon.collect_kfac

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    first = copy.deepcopy(model)
    monkeypatch.setattr(surgeon, "collect_kfac", interrupted)
    with pytest.raises(KeyboardInterrupt):
        surgeon_prune_(first, ids, 0.6, options, progress=False, checkpoint_dir=tmp_path / "ck")
    monkeypatch.setattr(surgeon, "collect_kfac", real)
    assert json.loads((tmp_path / "ck" / "state.json").read_text())["shot"] == 2
    resumed = copy.deepcopy(model)
    surgeon_prune_(resumed, ids, 0.6, options, progress=False, checkpoint_dir=tmp_path / "ck", resume=True)
    for (n, p), (_, q) in zip(whole.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    with pytest.raises(UserError, match="checkpoint was written with size"):
        surgeon_prune_(copy.deepcopy(model), ids, 0.5, options, progress=False, checkpoint_dir=tmp_path / "ck",
                       resume=True)


def test_lora_correction_keeps_pruned_weights_zero():
    model = make_tiny_llama(seed=_seed() % 1000)
    ids = _tokens(4, 16)
    surgeon_prune_(model, ids, 0.7, SurgeonOptions(structure="unstructured", shots=1, lora_steps=3,
                                                   lora_lr=1e-2), progress=False)
    total = size_report(model).target_params
    zeros = sum(int((m.weight == 0).sum()) for n, m in model.named_modules()
                if isinstance(m, nn.Linear) and ".layers." in n)
    assert zeros == pytest.approx(0.3 * total, abs=0.002 * total)


def test_score_prunes_and_materialize_applies():
    """score runs the shots (the model stays as it was); materialize_ puts exactly their result in place."""
    model = make_tiny_llama(seed=_seed() % 1000)
    ids = _tokens(4, 16)
    options = dict(shots=2, batch_size=2, lora_steps=2)
    direct = copy.deepcopy(model)
    torch.manual_seed(3)
    stats = surgeon_prune_(direct, ids, 0.75, SurgeonOptions(**options), progress=False)
    spec = get_method("surgeon")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    layers = dict(target_linears(model))
    torch.manual_seed(3)
    plan = spec.score(model, ids, spec.make_config(progress=False, sizes=(0.75,), **options))
    assert all(target_linears(model)[n] is m for n, m in layers.items())
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())
    assert not plan.supports_any_size and 0.75 in plan.sizes_covered and 0.7 not in plan.sizes_covered
    kept = plan.materialize_(model, 0.75)
    assert kept == {n: int(m.weight.count_nonzero()) for n, m in target_linears(direct).items()}
    for (n, p), (_, q) in zip(direct.named_parameters(), model.named_parameters(), strict=True):
        assert p.shape == q.shape and torch.equal(p, q), n
    def untimed(shots: list[dict]) -> list[dict]:
        return [{k: v for k, v in shot.items() if not k.endswith("seconds")} for shot in shots]

    assert untimed(plan.last_stats["shots"]) == untimed(stats["shots"]) and len(stats["shots"]) == 2
    assert plan.last_stats["kept_fraction"] == stats["kept_fraction"]


def test_plan_save_load_and_errors(tmp_path):
    model = make_tiny_llama(seed=_seed() % 1000)
    spec = get_method("surgeon")
    assert spec.config_cls is SurgeonConfig
    ids = _tokens(4, 16)
    plan = spec.score(model, ids, spec.make_config(shots=2, progress=False, lora_steps=0, sizes=(0.8, 0.9)))
    plan.save(tmp_path / "plan")
    loaded = SurgeonPlan.load(tmp_path / "plan")
    assert loaded.options == plan.options and loaded.sizes_covered == plan.sizes_covered
    assert loaded.sizes_covered.only == (0.8, 0.9)
    for size in (0.8, 0.9):
        a, b = copy.deepcopy(model), copy.deepcopy(model)
        assert plan.materialize_(a, size) == loaded.materialize_(b, size)
        for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
            assert torch.equal(p, q), n
    from compress.api import load_plan

    assert isinstance(load_plan(tmp_path / "plan"), SurgeonPlan)
    for bad in ({"structure": "3:4"}, {"fisher": "bogus"}, {"update": "yes"}, {"damp_a": 0.0}, {"shots": 0},
                {"min_keep": 2.0}):
        with pytest.raises(UserError):
            SurgeonOptions(**bad)
    with pytest.raises(UserError, match="2:4"):
        spec.make_config(structure="2:4", sizes=(0.8,))
    with pytest.raises(UserError, match="not among the sizes this surgeon plan covers"):
        plan.materialize_(copy.deepcopy(model), 0.7)
    with pytest.raises(UserError, match="calibration token ids"):
        spec.score(model, None, spec.make_config())
    with pytest.raises(UserError, match="sizes to prune to"):
        spec.score(model, ids, spec.make_config())
    from lowrank.surgery import factorize_

    factorized = copy.deepcopy(model)
    factorize_(factorized, lambda n, lin: 4)
    with pytest.raises(UserError, match="already factorized"):
        find_units(factorized)
    with pytest.raises(UserError, match="already factorized"):
        plan.materialize_(factorized, 0.8)


# ---------------------------------------------------------------------------- CLI
def test_cli_surgeon(tiny_model_dir, cli_text, tmp_path, capsys):
    """End to end through the CLI, on a tiny random model with a small trained tokenizer."""
    import lowrank
    from compress.cli import main

    base = ["--model", str(tiny_model_dir), "--device", "cpu", "--data", str(cli_text), "--seq-len", "64",
            "--calib-samples", "8", "--eval-chunks", "2", "--method", "surgeon", "--method-opt", "shots=2"]
    assert main([*base, "--size", "0.8", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "surgeon (physical)" in out and "whole model" in out
    report = json.loads((tmp_path / "out" / "compress_report.json").read_text())
    assert 0.8 <= report["target_fraction"] < 0.81
    assert report["surgeon_zeroed_params"] == 0
    assert report["compressed_perplexity"] > 0
    reloaded = lowrank.load_pretrained(tmp_path / "out", dtype=torch.float32)
    assert size_report(reloaded).target_fraction == pytest.approx(
        report["target_fraction"], abs=1e-5)
    assert main([*base, "--size", "0.8", "--method-opt", "structure=bogus"]) == 2
    assert "unknown surgeon structure" in capsys.readouterr().err


@requires_smollm2
@pytest.mark.slow
def test_smollm2_surgeon_quality(smollm2):
    """Real weights: 95% of the targeted linears in 2 shots stays within 1.5× the dense perplexity."""
    from compress.data import calibration_batches, load_text, pack_tokens, tokenize_text
    from compress.eval import perplexity_of_ids

    model, tokenizer = smollm2
    model = copy.deepcopy(model)
    calib = calibration_batches(tokenizer, load_text(None, "calib"), seq_len=128, num_samples=16, seed=0)
    held = pack_tokens(tokenize_text(tokenizer, load_text(None, "eval")), 128)[:16]
    dense = perplexity_of_ids(model, held, batch_size=8, progress=False)
    surgeon_prune_(model, calib, 0.95, SurgeonOptions(shots=2, batch_size=8, lora_steps=4), progress=False)
    pruned = perplexity_of_ids(model, held, batch_size=8, progress=False)
    assert pruned < 1.5 * dense


def test_distillation_teacher_is_the_dense_model_and_changes_the_correction(monkeypatch):
    """With distill > 0 every LoRA step sees the dense model's logits (its original linears swapped back for one
    forward, the pruned ones and their LoRA hooks restored after), and the correction differs from NLL alone."""
    import compress.methods.surgeon as surgeon

    model = make_tiny_llama(seed=_seed() % 1000)
    ids = _tokens(4, 16)
    with torch.no_grad():
        dense_logits = copy.deepcopy(model)(ids[:2]).logits
    seen = []
    real = surgeon._teacher_logits

    def checking(m, batch, dense_modules):
        pruned = dict(target_linears(m))
        out = real(m, batch, dense_modules)
        assert all(target_linears(m)[n] is mod for n, mod in pruned.items())  # the pruned model is back
        seen.append((batch, out))
        return out

    monkeypatch.setattr(surgeon, "_teacher_logits", checking)
    results = {}
    for distill in (0.0, 1.0):
        pruned = copy.deepcopy(model)
        torch.manual_seed(5)
        surgeon_prune_(pruned, ids, 0.7, SurgeonOptions(shots=1, batch_size=2, lora_steps=3, lora_lr=1e-2,
                                                         distill=distill), progress=False)
        results[distill] = {n: m.weight.clone() for n, m in target_linears(pruned).items()}
    assert len(seen) == 3  # one teacher forward per LoRA step, only when distilling
    batch, teacher = seen[0]
    assert torch.equal(batch, ids[:2])
    torch.testing.assert_close(teacher, dense_logits, rtol=1e-5, atol=1e-5)
    assert any(not torch.equal(results[0.0][n], results[1.0][n]) for n in results[0.0])
    with pytest.raises(UserError, match="distill_only needs distill > 0"):
        SurgeonOptions(distill_only=True)
    with pytest.raises(UserError, match="distill must be"):
        SurgeonOptions(distill=-1.0)
