"""Objectives that keep a compressed model general (issue #16): Gram shrinkage, distillation, early stopping.

Exact properties on tiny random models (CPU): shrinkage α = 0 is the current whitened SVD and α = 1 the
plain SVD; the KL term vanishes when student = teacher; early stopping restores the LoRA with the lowest
held-out NLL; every option is off by default, so defaults are unchanged.
"""

from __future__ import annotations

import pytest
import torch

from compress.distill import check_distill, training_loss
from compress.errors import UserError
from compress.methods.acip import ACIPConfig, run_acip
from compress.methods.acip import train as acip_train
from compress.methods.acip.train import (
    distill_loss,
    holdout_nll,
    install_masked_layers,
    rows_per_pass,
    split_holdout,
)
from compress.methods.asvd import ASVDConfig, scaled_svd_factors, shrink_scales
from compress.methods.svd import SVDConfig
from compress.methods.svd_llm import SVDLLMConfig
from compress.whitening import shrink_gram, whitened_svd_factors
from lowrank.linear import svd_factors
from tests.conftest import make_tiny_llama

VOCAB = 128


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one thread is faster (conftest)


def _gram(n: int = 24, tokens: int = 200, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # Anisotropic inputs: a few strong directions, as real activations have.
    x = torch.randn(tokens, n, generator=gen, dtype=torch.float64) * torch.logspace(0, -2, n, dtype=torch.float64)
    return x.T @ x


def _truncated(U: torch.Tensor, V: torch.Tensor, r: int) -> torch.Tensor:
    return U[:, :r].double() @ V[:r].double()


# ---------------------------------------------------------------------------- Gram shrinkage
def test_shrink_zero_is_the_gram_itself_and_the_current_whitened_svd():
    w = torch.randn(16, 24, generator=torch.Generator().manual_seed(3))
    g = _gram()
    assert shrink_gram(g, 0.0) is g
    a = whitened_svd_factors(w, g, "l")
    b = whitened_svd_factors(w, g, "l", 0.0)
    for x, y in zip(a[:3], b[:3], strict=True):
        assert torch.equal(x, y)


def test_shrink_one_is_the_plain_svd():
    w = torch.randn(16, 24, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    g = _gram()
    U, V, s, _ = whitened_svd_factors(w, g, "l", 1.0)
    Up, Vp = svd_factors(w)
    plain_s = torch.linalg.svdvals(w)
    # Σ of W·(c^½·I) is c^½ times W's singular values; every truncation is the plain one.
    scale = float(g.diagonal().mean()) ** 0.5
    torch.testing.assert_close(s.double(), (plain_s * scale).float().double(), rtol=1e-5, atol=1e-6)
    for r in (1, 4, 9):
        torch.testing.assert_close(_truncated(U, V, r), _truncated(Up, Vp, r), rtol=1e-4, atol=1e-5)


def test_shrink_interpolates_the_gram():
    g = _gram()
    half = shrink_gram(g, 0.5)
    eye = torch.eye(g.shape[0], dtype=g.dtype)
    torch.testing.assert_close(half, 0.5 * g + 0.5 * g.diagonal().mean() * eye)
    assert torch.allclose(half, half.T)


def test_shrink_options_are_validated_and_off_by_default():
    assert SVDConfig().gram_shrink == 0.0 and SVDLLMConfig().gram_shrink == 0.0 and ASVDConfig().gram_shrink == 0.0
    assert ACIPConfig().gram_shrink == 0.0
    for bad in (-0.1, 1.5, True, "x"):
        with pytest.raises(UserError):
            SVDConfig(gram_shrink=bad)
    with pytest.raises(UserError):
        ASVDConfig(gram_shrink=2.0)
    with pytest.raises(UserError):
        ACIPConfig(gram_shrink=-1.0).validate()


def test_asvd_scale_shrink_one_is_the_plain_svd():
    w = torch.randn(12, 20, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    scales = torch.rand(20, generator=torch.Generator().manual_seed(6), dtype=torch.float64) + 0.1
    assert shrink_scales(scales, 0.0) is scales
    flat = shrink_scales(scales, 1.0)
    torch.testing.assert_close(flat, torch.full_like(scales, float(scales.mean())))
    U, V, _ = scaled_svd_factors(w, flat)
    Up, Vp = svd_factors(w)
    for r in (2, 7):
        torch.testing.assert_close(_truncated(U, V, r), _truncated(Up, Vp, r), rtol=1e-5, atol=1e-6)


def test_svd_method_records_the_shrink(random_tokens):
    from compress.methods.svd import score_svd

    model = make_tiny_llama()
    chunks = random_tokens(4, 16, seed=7)
    plain = score_svd(model, chunks, SVDConfig(progress=False))
    shrunk = score_svd(model, chunks, SVDConfig(progress=False, gram_shrink=0.3))
    assert "gram_shrink" not in plain.metadata and shrunk.metadata["gram_shrink"] == 0.3
    name = next(iter(plain.layers))
    assert not torch.allclose(plain.layers[name].U, shrunk.layers[name].U)


# ---------------------------------------------------------------------------- distillation
def test_kl_is_zero_for_identical_logits_and_positive_otherwise():
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(8))
    assert float(distill_loss(logits, logits)) == pytest.approx(0.0, abs=1e-6)
    other = logits + torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(9))
    assert float(distill_loss(other, logits)) > 1e-3
    # KL(teacher ‖ student), by hand for one position
    t, s = torch.log_softmax(logits[0, 0], -1), torch.log_softmax(other[0, 0], -1)
    one = distill_loss(other[:1, :1], logits[:1, :1])
    torch.testing.assert_close(one, (t.exp() * (t - s)).sum())


def test_kl_gradient_is_softmax_minus_teacher_distribution():
    gen = torch.Generator().manual_seed(21)
    teacher = torch.randn(3, 4, 17, generator=gen)
    student = torch.randn(3, 4, 17, generator=gen, requires_grad=True)
    distill_loss(student, teacher).backward()
    expected = (torch.softmax(student.detach(), -1) - torch.softmax(teacher, -1)) / (3 * 4)
    torch.testing.assert_close(student.grad, expected, rtol=1e-5, atol=1e-7)
    # the value against the textbook form, over every position
    t, s = torch.log_softmax(teacher, -1), torch.log_softmax(student.detach(), -1)
    torch.testing.assert_close(distill_loss(student.detach(), teacher), (t.exp() * (t - s)).sum(-1).mean())


@pytest.mark.parametrize("owner", ["", "surgeon "])
def test_distill_options_are_checked_in_one_place(owner):
    for bad in (-0.5, float("nan"), float("inf"), True, "1"):
        with pytest.raises(UserError, match=f"^{owner}distill must be a finite number"):
            check_distill(bad, False, owner=owner)
    with pytest.raises(UserError, match=f"^{owner}distill_only needs distill > 0"):
        check_distill(0.0, True, owner=owner)
    check_distill(0.25, True, owner=owner)
    # both methods' option classes route through it
    with pytest.raises(UserError, match="^distill must be"):
        ACIPConfig(distill=-1.0).validate()
    with pytest.raises(UserError, match="^distill_only needs"):
        ACIPConfig(distill=0.0, distill_only=True).validate()


def test_training_loss_combines_nll_and_kl_by_the_options():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    nll, kl = torch.rand((), generator=gen) + 0.1, torch.rand((), generator=gen) + 0.1
    w = float(torch.rand((), generator=gen)) + 0.1
    torch.testing.assert_close(training_loss(nll, kl, w, False), nll + w * kl)
    torch.testing.assert_close(training_loss(nll, kl, w, True), w * kl)
    assert training_loss(nll, None, w, False) is nll
    assert training_loss(nll, kl, 0.0, False) is nll


def test_rows_per_pass_caps_the_logit_elements():
    assert rows_per_pass(4, 1024, 49_152, budget=2**28) == 4  # SmolLM2: the whole batch in one pass
    assert rows_per_pass(4, 1024, 262_144, budget=2**28) == 1  # Gemma 3: one sequence a pass
    assert rows_per_pass(4, 1024, 262_144, budget=2**29) == 2
    assert rows_per_pass(4, 4096, 262_144, budget=2**28) == 1  # never zero
    assert rows_per_pass(3, 16, 128, budget=10**9) == 3  # never more than the batch


@pytest.mark.parametrize("distill", [0.0, 1.0])
def test_a_step_in_several_passes_has_the_gradients_of_one(monkeypatch, distill):
    ids = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(22))
    grads, nlls = [], []
    for budget in (None, 12 * VOCAB):  # the whole batch at once, then one sequence per pass
        if budget is not None:
            monkeypatch.setattr(acip_train, "LOGIT_ELEMENTS_PER_PASS", budget)
        torch.manual_seed(0)
        model = make_tiny_llama()
        bank, layers = _masked(model)
        model.eval()  # no dropout: the passes must see the same function
        bank.distill = distill
        with torch.no_grad():
            bank.p[::4] = -1.0
            for layer in layers.values():
                layer.lora_B.normal_(0, 0.05)
        params = [bank.p.requires_grad_(True)] + [t.requires_grad_(True) for layer in layers.values()
                                                    for t in (layer.lora_A, layer.lora_B)]
        optimizer = torch.optim.SGD(params, lr=0.0)
        nlls.append(acip_train._step_body(model, bank, optimizer, ids, 1e-2))
        grads.append([p.grad.clone() for p in params])
    torch.testing.assert_close(nlls[0], nlls[1], rtol=1e-5, atol=1e-6)
    for one, several in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(one, several, rtol=1e-4, atol=1e-6)


def _masked(model, rank: int = 4):
    from compress.methods.acip.train import compute_svd_factors
    from lowrank import target_linears

    names = list(target_linears(model))
    factors = compute_svd_factors(model, names)
    config = ACIPConfig(basis="plain", lora_rank=rank, progress=False)
    return install_masked_layers(model, factors, config, device="cpu", dtype=torch.float32)


def test_teacher_is_the_dense_model_and_kl_vanishes_at_the_start():
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(10))
    dense = make_tiny_llama()
    with torch.no_grad():
        ref = dense(ids).logits
    model = make_tiny_llama()
    bank, layers = _masked(model)
    # Knock out some singular values and give LoRA a nonzero B: the student now differs from the teacher.
    with torch.no_grad():
        bank.p[::3] = -1.0
        for layer in layers.values():
            layer.lora_B.normal_(0, 0.05)
    model.eval()
    with torch.no_grad():
        bank.refresh()
        student = model(ids).logits
        bank.teacher = True
        teacher = model(ids).logits
        bank.teacher = False
    torch.testing.assert_close(teacher, ref, rtol=1e-4, atol=1e-4)
    assert float(distill_loss(student, teacher)) > 1e-4
    # A fresh masked model (all masks on, LoRA B = 0) is its own teacher: KL exactly 0.
    fresh = make_tiny_llama()
    fbank, _ = _masked(fresh)
    fresh.eval()
    with torch.no_grad():
        fbank.refresh()
        s = fresh(ids).logits
        fbank.teacher = True
        t = fresh(ids).logits
    assert float(distill_loss(s, t)) == pytest.approx(0.0, abs=1e-6)


def fast(**overrides) -> ACIPConfig:
    base = dict(basis="plain", stop_ratio=0.6, lr=2e-2, reg_start=1e-2, reg_update_every=1, reg_update_factor=1.2,
                lora_rank=4, post_tune_steps=6, max_steps=80, progress=False)
    base.update(overrides)
    return ACIPConfig(**base)


def test_acip_with_distillation_runs_and_changes_the_result():
    calib = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(11))
    base = run_acip(make_tiny_llama(), calib, fast(distill=0.0))
    kl = run_acip(make_tiny_llama(), calib, fast(distill=1.0))
    only = run_acip(make_tiny_llama(), calib, fast(distill=1.0, distill_only=True))
    assert kl.metadata["config"]["distill"] == 1.0 and only.metadata["config"]["distill_only"] is True
    name = next(iter(base.layers))
    assert not torch.equal(base.layers[name].lora_B, kl.layers[name].lora_B)
    with pytest.raises(UserError):
        fast(distill=0.0, distill_only=True).validate()


# ---------------------------------------------------------------------------- early stopping
def test_split_holdout_is_disjoint_and_spread():
    chunks = torch.arange(40).view(10, 4)
    train, held = split_holdout(chunks, 0.2)
    assert held.shape[0] == 2 and train.shape[0] == 8
    assert not set(held[:, 0].tolist()) & set(train[:, 0].tolist())
    assert held[0, 0] == 0 and held[-1, 0] == 36  # first and last chunk: the ends of a mixture's sources
    assert split_holdout(chunks, 0.0) == (chunks, None)
    _, three = split_holdout(chunks, 3)
    assert three.shape[0] == 3
    _, capped = split_holdout(chunks[:2], 5)
    assert capped.shape[0] == 1  # one chunk always stays for training
    with pytest.raises(UserError):
        ACIPConfig(holdout=1.5).validate()


def test_early_stopping_restores_the_best_lora_by_held_out_loss():
    calib = torch.randint(0, VOCAB, (10, 16), generator=torch.Generator().manual_seed(12))
    # A large post-tuning learning rate over many steps overfits the 8 training chunks of random tokens;
    # the held-out NLL is tracked every 2 steps and the best LoRA must be the one returned.
    config = fast(holdout=2, holdout_every=2, holdout_patience=0, post_tune_steps=12, lr=5e-2, post_tune_size="stop")
    model = make_tiny_llama()
    score_map = run_acip(model, calib, config)
    info = score_map.metadata["holdout"]
    history = info["history"]
    assert info["holdout_chunks"] == 2 and len(history) >= 3
    best = min(history, key=lambda h: h["nll"])
    assert info["best_holdout_nll"] == pytest.approx(best["nll"]) and info["best_post_step"] == best["post_step"]
    assert best["nll"] < history[-1]["nll"] - 1e-3  # the last LoRA is worse: restoring is what is tested
    # Re-measure: the score map's LoRA, installed over the masks' final state, gives the best held-out NLL.
    _, held = split_holdout(calib, 2)
    assert _held_out_nll_of(model, score_map, config, held) == pytest.approx(best["nll"], rel=1e-5)


def _held_out_nll_of(model, score_map, config, held) -> float:
    """The held-out NLL with the score map's factors, final masks (its scores > 0) and LoRA installed."""
    from compress.methods.acip.train import install_masked_layers as install
    from lowrank import replace_module_, target_linears

    originals = dict(target_linears(model))
    factors = {n: (layer.U, layer.s, layer.Vh) for n, layer in score_map.layers.items()}
    bank, layers = install(model, factors, config, device="cpu", dtype=torch.float32)
    try:
        with torch.no_grad():
            alive = torch.cat([layer.scores > 0 for layer in score_map.layers.values()])
            bank.p.copy_(torch.where(alive, torch.full_like(bank.p, config.mask_scale), -torch.ones_like(bank.p)))
            for n, layer in layers.items():
                layer.lora_A.copy_(score_map.layers[n].lora_A)
                layer.lora_B.copy_(score_map.layers[n].lora_B)
        return holdout_nll(model, bank, held, 4, torch.device("cpu"))
    finally:
        for n, m in originals.items():
            replace_module_(model, n, m)


def test_patience_stops_post_tuning_early():
    calib = torch.randint(0, VOCAB, (10, 16), generator=torch.Generator().manual_seed(13))
    config = fast(holdout=2, holdout_every=1, holdout_patience=1, post_tune_steps=40, lr=5e-2, post_tune_size="stop")
    score_map = run_acip(make_tiny_llama(), calib, config)
    info = score_map.metadata["holdout"]
    assert info["post_steps_run"] < 40  # random tokens: the held-out loss stops improving quickly
    assert score_map.metadata["post_tune_steps"] == info["post_steps_run"]
