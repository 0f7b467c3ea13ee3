"""The static-cache decode loop produces the same greedy tokens as eager `generate`."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

from lowrank import factorize_
from lowrank.serving import GraphedDecoder


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("compressed", [False, True])
def test_static_decode_matches_eager_generate(arch, compressed, random_tokens):
    model = make_tiny_llama(arch=arch, layers=2)
    if compressed:
        factorize_(model, lambda name, lin: 12)
    prompt = random_tokens(batch=2, seq=9)
    new = 64
    with torch.no_grad():
        reference = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                   pad_token_id=0, eos_token_id=None)
    decoder = GraphedDecoder(model, max_cache_len=9 + new)
    got = decoder.generate(prompt, max_new_tokens=new)
    assert got.shape == reference.shape
    assert torch.equal(got, reference)
    # a second call reuses the cache and gives the same answer
    assert torch.equal(decoder.generate(prompt, max_new_tokens=new), reference)


def test_decoder_rejects_overlong_requests(random_tokens):
    decoder = GraphedDecoder(make_tiny_llama(), max_cache_len=16)
    with pytest.raises(ValueError, match="max_cache_len"):
        decoder.generate(random_tokens(batch=1, seq=10), max_new_tokens=10)
    with pytest.raises(ValueError, match="CUDA"):
        GraphedDecoder(make_tiny_llama(), max_cache_len=16, use_cuda_graph=True)
