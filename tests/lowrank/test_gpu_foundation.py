"""LowRankLinear and the decode loop on a GPU: bf16, torch.compile fullgraph, CUDA-graph capture."""

from __future__ import annotations

import pytest
import torch

from lowrank import LowRankLinear, factorize_
from lowrank.serving import GraphedDecoder
from tests.conftest import make_tiny_llama

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("T", [1, 7, 300])
def test_lowrank_linear_bf16_compile_and_graph(T):
    torch.manual_seed(T)
    layer = LowRankLinear(576, 1536, 288, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(T, 576, device="cuda", dtype=torch.bfloat16)
    ref = (x.double() @ layer.V.double().T @ layer.U.double().T + layer.bias.double())
    eager = layer(x)
    torch_err = ((x @ layer.V.T @ layer.U.T + layer.bias).double() - ref).norm() / ref.norm()
    assert (eager.double() - ref).norm() / ref.norm() <= 2 * torch_err + 1e-3
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), eager, rtol=2e-2, atol=2e-2)
    static_x = x.clone()
    layer(static_x)  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = layer(static_x)
    fresh = torch.randn_like(x)
    static_x.copy_(fresh)
    graph.replay()
    torch.testing.assert_close(static_y, layer(fresh), rtol=0, atol=0)


@pytest.mark.parametrize("T", [1, 3, 129])
def test_inference_mode_gpu(T):
    """Under inference_mode the layer gives the no_grad result, as an inference tensor, within torch's own error."""
    torch.manual_seed(T)
    layer = LowRankLinear(64, 48, 8, device="cuda", dtype=torch.float16)
    x = torch.randn(T, 64, device="cuda", dtype=torch.float16)
    ref = x.double() @ layer.V.double().T @ layer.U.double().T + layer.bias.double()
    torch_err = ((x @ layer.V.T @ layer.U.T + layer.bias).double() - ref).norm() / ref.norm()
    with torch.no_grad():
        plain = layer(x)
    with torch.inference_mode():
        y = layer(x)
    assert y.shape == (T, 48) and y.dtype == torch.float16 and torch.is_inference(y) and not y.requires_grad
    assert torch.isfinite(y).all()
    assert (y.double() - ref).norm() / ref.norm() <= 2 * torch_err + 1e-3
    torch.testing.assert_close(y, plain, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_graphed_decode_matches_generate_bf16(arch):
    model = make_tiny_llama(arch=arch, layers=2, hidden=128, intermediate=320, vocab=256, heads=4, kv_heads=2)
    factorize_(model, lambda n, lin: 32)
    model = model.to("cuda", torch.bfloat16)
    prompt = torch.randint(0, 256, (2, 12), device="cuda")
    with torch.no_grad():
        reference = model.generate(prompt, max_new_tokens=64, min_new_tokens=64, do_sample=False,
                                   pad_token_id=0, eos_token_id=None)
    got = GraphedDecoder(model, max_cache_len=80).generate(prompt, 64)
    # bf16 ties can flip an argmax. Each row must match the reference up to its first divergence, and
    # there the reference's own top two logits must be a near-tie (else the decoder computed wrong).
    for row in range(prompt.shape[0]):
        diverged = (got[row] != reference[row]).nonzero()
        if diverged.numel() == 0:
            continue
        at = int(diverged[0])
        assert at >= prompt.shape[1], "the prompt itself was changed"
        with torch.no_grad():
            logits = model(reference[row: row + 1, :at]).logits[0, -1].float()
        top2 = logits.topk(2).values
        assert top2[0] - top2[1] <= 0.05 * top2[0].abs().clamp_min(1.0), (row, at, top2)
