"""Sibling projections fused into one GEMM compute the same function, in any call order, and come back apart."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowrank import LowRankLinear, factorize_
from lowrank.fusion import FusedSibling, SiblingGroup, fuse_sibling_projections, unfuse_sibling_projections
from lowrank.serving import GraphedDecoder
from tests.conftest import make_tiny_llama
from tests.tiny_families import make_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _fresh_ids(vocab: int, batch: int = 2, seq: int = 11):
    seed = int(torch.randint(0, 2**31, ()))
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _record_linear_calls(monkeypatch) -> list[tuple[int, ...]]:
    """Patch F.linear to note each call's weight shape; returns the (live) list of shapes."""
    calls: list[tuple[int, ...]] = []
    real = torch.nn.functional.linear

    def counting(x, w, b=None):
        calls.append(tuple(w.shape))
        return real(x, w, b)

    monkeypatch.setattr(torch.nn.functional, "linear", counting)
    return calls


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3"])
@pytest.mark.parametrize("compressed", [False, True])
def test_fused_model_computes_the_same_logits(family, compressed):
    model = make_model(family, vocab=96, seed=3)
    if compressed:
        factorize_(model, lambda name, lin: 10)
    ids = _fresh_ids(96)
    before = _logits(model, ids)
    groups = fuse_sibling_projections(model)
    assert len(groups) == 2 * model.config.num_hidden_layers  # q/k/v and gate/up in every block
    assert not any(isinstance(m, (nn.Linear, LowRankLinear)) and n.endswith(("q_proj", "k_proj", "v_proj",
                                                                               "gate_proj", "up_proj"))
                   for n, m in model.named_modules())
    torch.testing.assert_close(_logits(model, ids), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("compressed", [False, True])
def test_one_matmul_serves_the_group(compressed, monkeypatch):
    model = make_tiny_llama(layers=1)
    if compressed:
        factorize_(model, lambda name, lin: 8)
    fuse_sibling_projections(model)
    calls = _record_linear_calls(monkeypatch)
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 3, 64)
    q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    # dense: one matmul for all three; low-rank: one shared first factor, then one U per member
    assert len(calls) == (1 if not compressed else 4), calls
    group = attn.q_proj.sibling_group
    for i, part in enumerate((q, k, v)):
        torch.testing.assert_close(part, group.compute_one(x, i))
    assert group._pending_input is None and group._pending == [None, None, None]  # nothing held after v


@pytest.mark.parametrize("compressed", [False, True])
def test_long_dense_inputs_run_member_by_member(compressed, monkeypatch):
    model = make_tiny_llama(layers=1)
    if compressed:
        factorize_(model, lambda name, lin: 8)
    fuse_sibling_projections(model, dense_max_rows=5)
    calls = _record_linear_calls(monkeypatch)
    attn = model.model.layers[0].self_attn
    group = attn.q_proj.sibling_group
    for rows, fused in ((5, True), (6, False)):  # 1×5 rows fit the bound, 2×3 do not
        x = torch.randn(1, 5, 64) if rows == 5 else torch.randn(2, 3, 64)
        calls.clear()
        parts = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        if compressed:  # low-rank groups fuse whatever the length
            assert len(calls) == 4, calls
        else:
            assert len(calls) == (1 if fused else 3), (rows, calls)
            if not fused:  # each member's own rows of the fused weight, as the unfused model computes
                assert calls == [(n, 64) for n in group.out_features]
        for i, part in enumerate(parts):
            torch.testing.assert_close(part, group.compute_one(x, i))
        assert group._pending_input is None
    with pytest.raises(ValueError, match="dense_max_rows must be a positive integer"):
        fuse_sibling_projections(make_tiny_llama(layers=1), dense_max_rows=0)


def test_member_views_follow_dtype_moves_and_assigned_weights():
    """A long dense input reads cached views of the fused weight: they must follow .to() and assigned weights."""
    model = make_tiny_llama(layers=1)
    fuse_sibling_projections(model, dense_max_rows=2)
    attn = model.model.layers[0].self_attn
    group = attn.q_proj.sibling_group
    x = torch.randn(1, 7, 64)
    attn.q_proj(x)  # builds the views
    model.double()
    xd = x.double()
    assert attn.k_proj(xd).dtype == torch.float64
    lo, hi = group.out_bounds[1]
    torch.testing.assert_close(attn.k_proj(xd), xd @ group.weight[lo:hi].T)
    fresh = torch.randn_like(group.weight)
    group.load_state_dict({**group.state_dict(), "weight": fresh}, assign=True)
    torch.testing.assert_close(attn.k_proj(xd), xd @ fresh[lo:hi].T)


def test_other_call_orders_and_inputs_stay_correct():
    model = make_tiny_llama(layers=1)
    attn = model.model.layers[0].self_attn
    originals = [attn.q_proj, attn.k_proj, attn.v_proj]
    fuse_sibling_projections(model)
    x, other = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(attn.k_proj(x), originals[1](x))  # before q: computes alone
        torch.testing.assert_close(attn.q_proj(x), originals[0](x))
        torch.testing.assert_close(attn.v_proj(other), originals[2](other))  # another input: not q's leftovers
        torch.testing.assert_close(attn.k_proj(x), originals[1](x))  # leftover from q's call with x


@pytest.mark.parametrize("compressed", [False, True])
def test_unfuse_restores_the_state_dict_bitwise(compressed):
    model = make_tiny_llama(layers=2)
    if compressed:
        factorize_(model, lambda name, lin: 8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fuse_sibling_projections(model)
    assert set(model.state_dict()) != set(state)
    assert unfuse_sibling_projections(model) == 10  # 2 blocks × (3 + 2)
    after = model.state_dict()
    assert set(after) == set(state)
    assert all(torch.equal(after[k], state[k]) for k in state)
    assert not any(isinstance(m, (FusedSibling, SiblingGroup)) for m in model.modules())


def test_groups_that_cannot_fuse_are_left_alone():
    model = make_tiny_llama(layers=1)
    attn = model.model.layers[0].self_attn
    attn.q_proj = LowRankLinear.from_linear(attn.q_proj, 8)  # mixed dense and low-rank: no fusion
    mlp = model.model.layers[0].mlp
    mlp.gate_proj = LowRankLinear.from_linear(mlp.gate_proj, 8)
    mlp.up_proj = LowRankLinear.from_linear(mlp.up_proj, 8)
    mlp.up_proj.enable_dense_fallback(force=True)  # a dense copy is picked per call: no fusion
    assert fuse_sibling_projections(model) == []
    phi3 = make_model("phi3", vocab=96)  # fused qkv_proj / gate_up_proj already
    assert fuse_sibling_projections(phi3) == []


def test_parameters_count_once():
    model = make_tiny_llama(layers=2)
    before = sum(p.numel() for p in model.parameters())
    fuse_sibling_projections(model)
    assert sum(p.numel() for p in model.parameters()) == before


@pytest.mark.parametrize("compressed", [False, True])
def test_fused_decode_compiles_whole_and_matches(compressed, random_tokens):
    """The decode loop on a fused model: same greedy tokens, and the step traces with fullgraph=True."""
    torch._dynamo.reset()
    model = make_tiny_llama(layers=2)
    if compressed:
        factorize_(model, lambda name, lin: 12)
    prompt = random_tokens(batch=2, seq=7)
    reference = GraphedDecoder(model, max_cache_len=7 + 10).generate(prompt, max_new_tokens=10)
    fuse_sibling_projections(model)
    assert torch.equal(GraphedDecoder(model, max_cache_len=7 + 10).generate(prompt, max_new_tokens=10), reference)
    compiled = GraphedDecoder(model, max_cache_len=7 + 10, compile="eager")
    assert torch.equal(compiled.generate(prompt, max_new_tokens=10), reference)


def test_the_compiled_step_keeps_the_fusion():
    """Traced by dynamo (fullgraph), the fused model's decode step holds one linear per group, not one per member."""
    torch._dynamo.reset()
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def linears_in_step(model) -> int:
        graphs.clear()
        torch._dynamo.reset()
        decoder = GraphedDecoder(model, max_cache_len=12, compile=recording_backend)
        decoder.generate(torch.randint(0, 128, (1, 5)), max_new_tokens=3)
        return sum(1 for gm in graphs for node in gm.graph.nodes
                   if node.op == "call_function" and "linear" in str(node.target))

    model = make_tiny_llama(layers=2)
    plain = linears_in_step(model)
    fuse_sibling_projections(model)
    fused = linears_in_step(model)
    assert plain == 2 * 7 + 1  # q, k, v, o, gate, up, down per block, then the LM head
    assert fused == 2 * 4 + 1  # qkv, o, gate/up, down per block


@pytest.mark.parametrize("bias", [False, True])
def test_compiled_low_rank_group_reads_each_factor_once_per_step(bias):
    """Batch-8 decode rows, lowered by AOT autograd: every GEMM is one mm, no bmm over a broadcast U.

    A member's slice of the shared first-factor output sliced in 3D ([8, 1, rank]) lowers to a bmm with
    the member's U expanded over the 8 rows, reading U 8 times per step; the group must stay in 2D.
    """
    from torch._dynamo.backends.common import aot_autograd

    torch._dynamo.reset()
    members = [LowRankLinear(40, out, rank, bias=bias) for out, rank in ((40, 12), (16, 6), (16, 5))]
    group = SiblingGroup(members)
    lowered: list[str] = []

    def record(gm, example_inputs):
        lowered.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    step = torch.compile(lambda x: group.compute_all(x), backend=aot_autograd(fw_compiler=record), fullgraph=True)
    x = torch.randn(8, 1, 40)
    with torch.no_grad():
        parts = step(x)
        expected = [m(x) for m in members]
    assert not any("bmm" in op or "expand" in op for op in lowered), lowered
    assert sum(op.endswith(("aten.mm.default", "aten.addmm.default")) for op in lowered) == 1 + len(members)
    for got, want in zip(parts, expected, strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_segmented_second_factors_compute_the_same_logits(family, monkeypatch):
    """low_rank_kernel="segmented": decode-sized inputs run every member's U in one segmented_linear call
    (qwen2's q/k/v carry biases, packed in the group), longer ones the per-member GEMMs; same logits."""
    import lowrank_kernels.segmented_linear as seg

    from lowrank.fusion import SEGMENTED_MAX_ROWS

    model = make_model(family, vocab=96, seed=int(torch.randint(0, 2**31, ())))
    factorize_(model, lambda name, lin: 9)
    short, long = _fresh_ids(96, batch=2, seq=5), _fresh_ids(96, batch=2, seq=SEGMENTED_MAX_ROWS)
    want_short, want_long = _logits(model, short), _logits(model, long)
    calls = []
    real = seg._segmented_linear_op
    monkeypatch.setattr(torch.ops.lowrank, "segmented_linear",
                        lambda *a: calls.append(a[0].shape[0]) or real(*a), raising=False)
    groups = fuse_sibling_projections(model, low_rank_kernel="segmented")
    torch.testing.assert_close(_logits(model, short), want_short, rtol=1e-5, atol=1e-5)
    assert calls == [10] * len(groups)  # 2 x 5 rows, once per group
    calls.clear()
    torch.testing.assert_close(_logits(model, long), want_long, rtol=1e-5, atol=1e-5)
    assert calls == []  # 32 rows: above SEGMENTED_MAX_ROWS, cuBLAS per member


def test_segmented_group_compiles_into_one_op_per_group():
    """In the traced decode step each low-rank group holds one segmented_linear and one linear (its V)."""
    from torch._dynamo.backends.common import aot_autograd

    torch._dynamo.reset()
    model = make_tiny_llama(layers=2)
    factorize_(model, lambda name, lin: 12)
    fuse_sibling_projections(model, low_rank_kernel="segmented")
    ops: list[str] = []

    def record(gm, example_inputs):
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    decoder = GraphedDecoder(model, max_cache_len=12, compile=aot_autograd(fw_compiler=record))
    decoder.generate(torch.randint(0, 128, (2, 5)), max_new_tokens=3)
    assert ops.count("lowrank.segmented_linear.default") == 2 * 2  # q/k/v and gate/up in each block


def test_unknown_low_rank_kernel_is_refused():
    with pytest.raises(ValueError, match="low_rank_kernel must be one of"):
        fuse_sibling_projections(make_tiny_llama(layers=1), low_rank_kernel="cutlass")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compressed,low_rank_kernel", [(False, "cublas"), (True, "cublas"), (True, "segmented")])
def test_fused_decode_on_the_gpu_graphed_and_compiled(compressed, low_rank_kernel):
    """bf16, inductor and a CUDA-graph replay per token: the fused model decodes what the plain one does."""
    torch._dynamo.reset()
    model = make_tiny_llama(layers=2).cuda().to(torch.bfloat16)
    if compressed:
        factorize_(model, lambda name, lin: 16)
    prompt = torch.randint(0, 128, (2, 7), device="cuda")
    reference = GraphedDecoder(model, max_cache_len=7 + 16, compile=True).generate(prompt, max_new_tokens=16)
    fuse_sibling_projections(model, low_rank_kernel=low_rank_kernel)
    torch._dynamo.reset()
    got = GraphedDecoder(model, max_cache_len=7 + 16, compile=True).generate(prompt, max_new_tokens=16)
    # bf16: one GEMM over the concatenated weights may round differently from three; most tokens agree
    assert (got == reference).float().mean() > 0.9
