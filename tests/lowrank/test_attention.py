"""lowrank.attention: the decode-attention kernel behind transformers' attention interface.

Under ``TRITON_INTERPRET=1`` (CI) the Triton kernels run on the CPU; without it the op runs its
torch reference. Either way the model must compute what SDPA computes.
"""

from __future__ import annotations

import json

import lowrank_kernels.decode_attention as kernel_module
import pytest
import torch

from lowrank import factorize_
from lowrank.attention import ATTENTION_NAME, decode_attention_applies, use_decode_attention
from lowrank.serving import GraphedDecoder
from tests.conftest import make_tiny_llama
from tests.tiny_families import make_model


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the decode-attention calls that reach the kernel module."""
    calls = []
    real = kernel_module.decode_attention

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(kernel_module, "decode_attention", counted)
    return calls


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "gemma3", "phi3", "gpt_neox"])
def test_decode_matches_sdpa_across_families(family, kernel_calls, random_tokens):
    """Greedy decoding through the static cache gives SDPA's tokens, and the kernel ran at every
    decode step of every layer (sliding-window layers included: their masks come from SDPA)."""
    model = make_model(family, vocab=160)
    prompt = random_tokens(batch=2, seq=11, vocab=160)
    new = 24
    reference = GraphedDecoder(model, max_cache_len=11 + new).generate(prompt, new)
    assert use_decode_attention(model) == "sdpa"
    assert model.config._attn_implementation == ATTENTION_NAME
    got = GraphedDecoder(model, max_cache_len=11 + new).generate(prompt, new)
    assert torch.equal(got, reference)
    assert len(kernel_calls) == (new - 1) * model.config.num_hidden_layers
    with torch.no_grad():  # prefill (many query tokens) is SDPA's own: identical logits
        model.set_attn_implementation("sdpa")
        want = model(got).logits
        use_decode_attention(model)
        torch.testing.assert_close(model(got).logits, want, rtol=0, atol=0)


@pytest.mark.parametrize("compressed", [False, True])
def test_left_padded_batch_follows_the_mask(compressed, random_tokens):
    """Padding inside the cache is masked, not only the unfilled tail: one decode step of a
    left-padded batch gives SDPA's logits."""
    from transformers import StaticCache

    model = make_tiny_llama(layers=2)
    if compressed:
        factorize_(model, lambda name, lin: 12)
    prompt = random_tokens(batch=3, seq=10)
    mask = torch.ones_like(prompt)
    mask[0, :4] = 0
    mask[2, :1] = 0
    step_token = random_tokens(batch=3, seq=1)

    def decode_logits() -> torch.Tensor:
        cache = StaticCache(config=model.config, max_cache_len=24)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            model(input_ids=prompt, attention_mask=mask, position_ids=positions, past_key_values=cache,
                  cache_position=torch.arange(10), use_cache=True)
            full = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
            out = model(input_ids=step_token, attention_mask=full, position_ids=positions[:, -1:] + 1,
                        past_key_values=cache, cache_position=torch.tensor([10]), use_cache=True)
        return out.logits[:, -1]

    want = decode_logits()
    use_decode_attention(model)
    torch.testing.assert_close(decode_logits(), want, rtol=1e-5, atol=1e-5)


def test_compiled_decode_step_traces_whole(random_tokens):
    """fullgraph=True traces through the custom op: the captured graph holds it, and the tokens are
    SDPA's (a recording backend that runs the graph as is keeps the CPU test fast)."""
    torch._dynamo.reset()
    model = make_tiny_llama(layers=2)
    prompt = random_tokens(batch=1, seq=7)
    reference = GraphedDecoder(model, max_cache_len=19).generate(prompt, 12)
    use_decode_attention(model)
    targets = []

    def recording_backend(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    got = GraphedDecoder(model, max_cache_len=19, compile=recording_backend).generate(prompt, 12)
    assert torch.equal(got, reference)
    assert sum("decode_attention" in t for t in targets) == model.config.num_hidden_layers


def test_what_the_kernel_does_not_cover_goes_to_sdpa():
    q = torch.randn(2, 4, 1, 8)
    k = torch.randn(2, 2, 12, 8)
    mask = torch.ones(2, 1, 1, 12, dtype=torch.bool)
    assert decode_attention_applies(q, k, k, mask, 0.0, {})
    assert decode_attention_applies(q, k, k, None, 0.0, {"sliding_window": 8})  # the mask carries the window
    assert not decode_attention_applies(torch.randn(2, 4, 3, 8), k, k, None, 0.0, {})  # prefill
    assert not decode_attention_applies(q, k, k, mask, 0.1, {})  # dropout
    assert not decode_attention_applies(q, k, k, mask, 0.0, {"softcap": 50.0})
    assert not decode_attention_applies(q, k, k, mask, 0.0, {"s_aux": torch.zeros(4)})
    assert not decode_attention_applies(q, k, k, mask.float(), 0.0, {})  # additive masks: SDPA's business
    assert not decode_attention_applies(q, k, k, torch.ones(2, 4, 1, 12, dtype=torch.bool), 0.0, {})
    assert not decode_attention_applies(q, k, k[..., :6], mask, 0.0, {})
    assert not decode_attention_applies(q, k, k, mask[..., :10], 0.0, {})


def test_soft_capped_family_is_refused_by_name():
    """Gemma 2 soft-caps its attention logits and runs eager attention; the fallback is SDPA, so the
    switch is refused, saying why, and the model keeps its attention."""
    model = make_model("gemma2", vocab=160)
    before = model.config._attn_implementation
    assert before != "sdpa"
    with pytest.raises(ValueError, match="soft-caps"):
        use_decode_attention(model)
    assert model.config._attn_implementation == before


def test_use_decode_attention_needs_a_transformers_model():
    with pytest.raises(ValueError, match="transformers model"):
        use_decode_attention(torch.nn.Linear(2, 2))


def test_e2e_records_the_attention(tmp_path):
    from compress.speed import main

    assert main(["--smoke", "--models", "tiny", "--sizes", "0.5", "--batches", "1", "--decode-attention",
                 "--out", str(tmp_path)]) == 0
    result = json.loads(next(tmp_path.glob("e2e_*_decattn_smoke.json")).read_text())
    assert result["settings"]["decode_attention"] is True
    for row in result["models"]["tiny"].values():
        assert "error" not in row, row.get("error")
        assert row["attention"] == ATTENTION_NAME


def test_bench_refuses_a_model_off_sdpa_in_one_line(tmp_path, capsys):
    from compress.cli import main
    from tests.tiny_families import save_family

    path = save_family("gemma2", tmp_path / "gemma2", "The quick brown fox jumps over the lazy dog. " * 20)
    assert main(["bench", "--model", str(path), "--smoke", "--batches", "1", "--decode-attention",
                 "--out", str(tmp_path / "res")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the loading progress bars
    assert last.startswith("error: --decode-attention: ") and "soft-caps" in last
