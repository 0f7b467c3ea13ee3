"""The `svd` methods' math, perplexity, and `python -m compress` end to end with its user errors."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compress.cli import main
from compress.data import calibration_batches, load_text, pack_tokens
from compress.eval import perplexity_of_ids
from compress.whitening import cholesky_with_damping, whitened_svd_factors
from tests.conftest import make_tiny_llama

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- math
def test_whitened_full_rank_is_exact():
    W = torch.randn(20, 30, dtype=torch.float64)
    X = torch.randn(200, 30, dtype=torch.float64)
    U, V, s, damping = whitened_svd_factors(W, X.T @ X)
    assert damping == 0.0
    torch.testing.assert_close((U.double() @ V.double()), W, rtol=1e-5, atol=1e-5)
    assert torch.all(s[:-1] >= s[1:])


@pytest.mark.parametrize("rank", [1, 4, 9])
def test_whitened_truncation_minimizes_output_error(rank):
    torch.manual_seed(rank)
    W = torch.randn(24, 32, dtype=torch.float64)
    # Correlated, anisotropic inputs: where whitening matters.
    mix = torch.randn(32, 32, dtype=torch.float64) * torch.logspace(0, -2, 32, dtype=torch.float64)
    X = torch.randn(500, 32, dtype=torch.float64) @ mix
    U, V, s, _ = whitened_svd_factors(W, X.T @ X)
    whitened = U[:, :rank].double() @ V[:rank].double()
    u, sv, vh = torch.linalg.svd(W, full_matrices=False)
    plain = u[:, :rank] * sv[:rank] @ vh[:rank]
    err_w = torch.linalg.norm((W - whitened) @ X.T)
    err_p = torch.linalg.norm((W - plain) @ X.T)
    assert err_w <= err_p * (1 + 1e-9)
    # and it is the optimum: the tail of the whitened spectrum
    assert torch.isclose(err_w, s[rank:].double().pow(2).sum().sqrt(), rtol=1e-4)


def test_cholesky_damping_fallback_and_errors():
    X = torch.randn(50, 8, dtype=torch.float64)
    X[:, 3] = 0.0  # a dead input feature makes the Gram singular
    chol, damping = cholesky_with_damping(X.T @ X, "layer.x")
    assert damping > 0 and torch.isfinite(chol).all()
    bad = torch.eye(4)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer.y"):
        cholesky_with_damping(bad, "layer.y")


# ----------------------------------------------------------------------------- data + eval
def test_default_text_splits_do_not_overlap():
    calib, held = load_text(None, "calib"), load_text(None, "eval")
    assert len(calib) > 100_000 and len(held) > 20_000
    assert held[:2000] not in calib


def test_perplexity_matches_hf_loss(random_tokens):
    model = make_tiny_llama()
    chunks = random_tokens(batch=5, seq=12)
    ppl = perplexity_of_ids(model, chunks, batch_size=2, progress=False)
    with torch.no_grad():
        losses = [model(input_ids=c[None], labels=c[None]).loss for c in chunks]
    assert math.isclose(ppl, math.exp(torch.stack(losses).mean().item()), rel_tol=1e-5)


def test_pack_and_calibration_sampling():
    ids = torch.arange(1000)
    assert pack_tokens(ids, 64).shape == (15, 64)

    class Tok:
        def __call__(self, text, **kw):
            return {"input_ids": list(range(len(text)))}

    a = calibration_batches(Tok(), "x" * 5000, seq_len=100, num_samples=7, seed=3)
    b = calibration_batches(Tok(), "x" * 5000, seq_len=100, num_samples=7, seed=3)
    assert a.shape == (7, 100) and torch.equal(a, b)


# ----------------------------------------------------------------------------- CLI
def _run(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_end_to_end(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "svd50"
    code, stdout, err = _run(["--model", tiny_model_dir, "--method", "svd", "--size", "0.5", "--out", out,
                              "--seq-len", "64", "--calib-samples", "8", "--eval-chunks", "4",
                              "--save-plan", tmp_path / "plan"], capsys)
    assert code == 0, err
    report = json.loads((out / "compress_report.json").read_text())
    assert abs(report["target_fraction"] - 0.5) < 0.03
    assert report["model_fraction"] > report["target_fraction"]  # embeddings are not targeted
    assert math.isfinite(report["dense_perplexity"]) and math.isfinite(report["compressed_perplexity"])
    assert "dense perplexity" in stdout and "whole model" in stdout

    # any size from the saved plan, without calibration
    code, stdout, err = _run(["materialize", "--model", tiny_model_dir, "--scores", tmp_path / "plan",
                              "--size", "0.7", "--out", tmp_path / "svd70"], capsys)
    assert code == 0, err
    code, stdout, err = _run(["eval", "--model", tmp_path / "svd70", "--seq-len", "64", "--eval-chunks", "2"],
                             capsys)
    assert code == 0, err
    assert json.loads(stdout[stdout.index("{"):])["target_fraction"] == pytest.approx(0.7, abs=0.03)


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--model", "/no/such/model", "--no-eval"], "not found"),
        (["--size", "1.5"], "--size"),
        (["--size", "0"], "--size"),
        (["--method", "nope"], "unknown method"),
        # refused from the method name, before the (here missing) model would be loaded
        (["--method", "svd", "--no-reset", "--model", "/no/such/model"], "--reset/--no-reset"),
        # method options are checked before the (missing) model loads: a misspelt key names the valid ones
        (["--method", "acip", "--method-opt", "stop_ratoi=0.3", "--model", "/no/such/model"], "stop_ratio"),
        # a key that a flag also sets has one meaning: the flag's
        (["--method", "acip", "--method-opt", "batch_size=2", "--model", "/no/such/model"], "--batch-size"),
        (["--method", "svd", "--method-opt", "offload=true", "--model", "/no/such/model"], "--offload"),
    ],
)
def test_cli_user_errors_are_one_line(argv, needle, capsys):
    code, _, err = _run(argv, capsys)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err


def test_cli_empty_data_and_unwritable_out(tiny_model_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    code, _, err = _run(["--model", tiny_model_dir, "--data", empty, "--no-eval"], capsys)
    assert code == 2 and "empty" in err and len(err.strip().splitlines()) == 1
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    code, _, err = _run(["--model", tiny_model_dir, "--out", blocker / "sub", "--no-eval"], capsys)
    assert code == 2 and "not writable" in err


def test_cli_subprocess_has_no_traceback():
    result = subprocess.run([sys.executable, "-m", "compress", "--size", "2"], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def test_cli_help_documents_options():
    """Every option the parser accepts is in --help with a help text, and every method is listed."""
    from compress.cli import build_parser
    from compress.methods import available_methods

    result = subprocess.run([sys.executable, "-m", "compress", "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0 and "Traceback" not in result.stderr
    parser = build_parser()
    options = [a for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS]
    assert len(options) >= 10
    for action in options:
        assert action.help and action.help.strip(), f"{action.option_strings} has no help text"
        assert max(action.option_strings, key=len) in result.stdout, action.option_strings
    for name in available_methods():
        assert name in result.stdout, f"method {name!r} missing from --help"
    assert "Traceback" not in result.stdout


def test_uniform_plan_at_full_size_is_the_dense_model(random_tokens):
    from compress.methods.svd import SVDConfig, score_svd

    model = make_tiny_llama()
    x = random_tokens(batch=2, seq=16)
    with torch.no_grad():
        before = model(x).logits
    plan = score_svd(model, random_tokens(batch=4, seq=32), SVDConfig(progress=False))
    plan.materialize_(model, 1.0)
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)


def test_make_config_is_strict_about_option_names():
    from compress.errors import UserError
    from compress.methods import get_method

    spec = get_method("acip")
    with pytest.raises(UserError, match="valid options: .*stop_ratio"):
        spec.make_config(stop_ratoi=0.3)
    # shared settings apply where the config has the field and are ignored where it has not
    assert spec.make_config({"batch_size": 3}).batch_size == 3
    assert not hasattr(get_method("svd-plain").make_config({"batch_size": 3}), "batch_size")
    with pytest.raises(UserError, match="given twice"):
        spec.make_config({"batch_size": 3}, batch_size=2)
