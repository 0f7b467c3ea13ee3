"""LowRankLinear: exact properties against torch references, editing, errors, compile."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowrank import LowRankLinear


def _rand_linear(in_f: int, out_f: int, bias: bool = True, seed: int | None = None) -> nn.Linear:
    if seed is not None:
        torch.manual_seed(seed)
    layer = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        layer.weight.normal_()
        if bias:
            layer.bias.normal_()
    return layer


@pytest.mark.parametrize("in_f,out_f,bias", [(37, 23, True), (16, 48, False), (64, 64, True)])
def test_full_rank_is_exact(in_f, out_f, bias):
    dense = _rand_linear(in_f, out_f, bias)
    lr = LowRankLinear.from_linear(dense)  # rank=None -> full
    assert lr.rank == min(in_f, out_f)
    x = torch.randn(5, 3, in_f)
    ref = dense(x)
    got = lr(x)
    # fp32 rounding of two matmuls vs one, relative to the output scale
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.parametrize("rank", [1, 5, 17])
def test_truncation_matches_svd_optimum(rank):
    dense = _rand_linear(41, 29, bias=False)
    lr = LowRankLinear.from_linear(dense, rank)
    approx = (lr.U @ lr.V).double()
    w = dense.weight.double()
    s = torch.linalg.svdvals(w)
    optimum = s[rank:].pow(2).sum().sqrt()  # Eckart-Young
    err = torch.linalg.norm(w - approx)
    assert torch.isclose(err, optimum, rtol=1e-5, atol=1e-6)


def test_truncate_stays_optimal_after_merge_lora():
    dense = _rand_linear(33, 27, bias=True)
    lr = LowRankLinear.from_linear(dense, 10)
    A, B = torch.randn(4, 33), torch.randn(27, 4)
    lr.merge_lora(A, B, 0.5)
    w = (lr.U @ lr.V).double()
    lr.truncate(6)
    s = torch.linalg.svdvals(w)
    err = torch.linalg.norm(w - (lr.U @ lr.V).double())
    assert torch.isclose(err, s[6:].pow(2).sum().sqrt(), rtol=1e-5)


def test_merge_lora_equals_base_plus_lora():
    dense = _rand_linear(30, 20)
    lr = LowRankLinear.from_linear(dense, 8)
    A, B, scaling = torch.randn(4, 30), torch.randn(20, 4), 0.75
    x = torch.randn(6, 30)
    expected = lr(x) + scaling * (x @ A.T @ B.T)
    lr.merge_lora(A, B, scaling)
    assert lr.rank == 12
    torch.testing.assert_close(lr(x), expected, rtol=1e-5, atol=1e-5)


def test_merge_lora_beyond_full_rank_is_exact():
    dense = _rand_linear(12, 10)
    lr = LowRankLinear.from_linear(dense, 8)
    A, B = torch.randn(5, 12), torch.randn(10, 5)
    x = torch.randn(4, 12)
    expected = lr(x) + -2.0 * (x @ A.T @ B.T)
    lr.merge_lora(A, B, -2.0)
    assert lr.rank == 10
    torch.testing.assert_close(lr(x), expected, rtol=1e-4, atol=1e-4)


def test_to_linear_roundtrip():
    lr = LowRankLinear(24, 18, 5)
    x = torch.randn(3, 24)
    torch.testing.assert_close(lr.to_linear()(x), lr(x), rtol=1e-5, atol=1e-5)


def test_state_dict_roundtrip_and_dtype():
    lr = LowRankLinear(20, 16, 4)
    other = LowRankLinear(20, 16, 4)
    other.load_state_dict(lr.state_dict())
    x = torch.randn(2, 20)
    assert torch.equal(lr(x), other(x))
    half = lr.to(torch.float16)
    assert half(x.half()).dtype == torch.float16


def test_extra_repr_mentions_rank_and_saving():
    text = repr(LowRankLinear(100, 50, 10))
    assert "rank=10" in text and "1500/5000" in text and "30.0% of dense" in text


@pytest.mark.parametrize("rank", [0, -1, 21])
def test_bad_rank(rank):
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear(20, 30, rank)


def test_bad_inputs():
    lr = LowRankLinear(8, 6, 2)
    with pytest.raises(ValueError, match="in_features=8"):
        lr(torch.randn(3, 7))
    with pytest.raises(ValueError, match="dtype"):
        lr(torch.randn(3, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="device"):
        lr(torch.randn(3, 8, device="meta"))


def test_inference_mode_and_autograd():
    lr = LowRankLinear(12, 9, 3)
    x = torch.randn(4, 12, requires_grad=True)
    lr(x).square().sum().backward()
    ref_U = lr.U.detach().clone().requires_grad_()
    ref_V = lr.V.detach().clone().requires_grad_()
    ((x.detach() @ ref_V.T @ ref_U.T + lr.bias.detach()).square().sum()).backward()
    torch.testing.assert_close(lr.U.grad, ref_U.grad)
    torch.testing.assert_close(lr.V.grad, ref_V.grad)
    with torch.inference_mode():
        assert lr(torch.randn(2, 12)).shape == (2, 9)


def test_torch_compile_fullgraph_cpu():
    lr = LowRankLinear(32, 24, 6)
    compiled = torch.compile(lr, fullgraph=True, backend="inductor")
    x = torch.randn(5, 32)
    torch.testing.assert_close(compiled(x), lr(x), rtol=1e-5, atol=1e-5)
