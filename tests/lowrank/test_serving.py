"""The static-cache decode loop produces the same greedy tokens as eager `generate`."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch

from lowrank import factorize_
from lowrank.serving import GraphedDecoder
from tests.conftest import make_tiny_llama


@torch.no_grad()
def _eager_greedy(model, prompt, new: int):
    """`generate`'s greedy answer, exactly `new` tokens (an explicit mask: generate would otherwise
    take prompt tokens equal to pad_token_id for padding)."""
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, pad_token_id=0, eos_token_id=None)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("compressed", [False, True])
def test_static_decode_matches_eager_generate(arch, compressed, random_tokens):
    model = make_tiny_llama(arch=arch, layers=2)
    if compressed:
        factorize_(model, lambda name, lin: 12)
    prompt = random_tokens(batch=2, seq=9)
    new = 64
    reference = _eager_greedy(model, prompt, new)
    decoder = GraphedDecoder(model, max_cache_len=9 + new)
    got = decoder.generate(prompt, max_new_tokens=new)
    assert got.shape == reference.shape
    assert torch.equal(got, reference)
    # a second call reuses the cache and gives the same answer
    assert torch.equal(decoder.generate(prompt, max_new_tokens=new), reference)


@pytest.mark.parametrize("compressed", [False, True])
def test_compiled_decode_step_traces_whole_and_matches_eager(compressed, random_tokens):
    """The decode step compiles with fullgraph=True (no graph breaks, through the custom op), and
    decodes the same tokens as eager generation. The "eager" backend keeps the CPU test fast; the
    GPU benchmark uses inductor (`bench.kernels.e2e --compile`)."""
    torch._dynamo.reset()
    model = make_tiny_llama(layers=2)
    if compressed:
        factorize_(model, lambda name, lin: 12)
    prompt = random_tokens(batch=1, seq=7)
    reference = _eager_greedy(model, prompt, 12)
    decoder = GraphedDecoder(model, max_cache_len=7 + 12, compile="eager")
    assert torch.equal(decoder.generate(prompt, max_new_tokens=12), reference)


def test_decoder_passes_the_cache_by_the_model_s_own_keyword(random_tokens):
    """transformers ≥ 5.24 takes the KV cache as `cache` and warns on `past_key_values`; older ones take only
    the old name. The decoder reads the keyword off the forward's signature and decodes without the warning."""
    import warnings

    from lowrank.serving import cache_keyword

    class OldStyle(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, cache_position=None, **kwargs):
            return input_ids

    class NewStyle(torch.nn.Module):
        def forward(self, input_ids, cache=None, **kwargs):
            return input_ids

    assert cache_keyword(OldStyle()) == "past_key_values"
    assert cache_keyword(NewStyle()) == "cache"
    model = make_tiny_llama(layers=1)
    import inspect

    expected = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    assert cache_keyword(model) == expected
    prompt = random_tokens(batch=1, seq=5)
    reference = _eager_greedy(model, prompt, 4)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*deprecated")
        got = GraphedDecoder(model, max_cache_len=5 + 4).generate(prompt, max_new_tokens=4)
    assert torch.equal(got, reference)


def test_compile_mode_is_checked_up_front():
    """Modes that record CUDA graphs of their own cannot run inside the decoder's capture: refused by name."""
    with pytest.raises(ValueError, match="reduce-overhead"):
        GraphedDecoder(make_tiny_llama(), max_cache_len=16, compile=True, compile_mode="reduce-overhead")
    with pytest.raises(ValueError, match="needs compile"):
        GraphedDecoder(make_tiny_llama(), max_cache_len=16, compile_mode="max-autotune-no-cudagraphs")


def test_decoder_rejects_overlong_requests(random_tokens):
    decoder = GraphedDecoder(make_tiny_llama(), max_cache_len=16)
    with pytest.raises(ValueError, match="max_cache_len"):
        decoder.generate(random_tokens(batch=1, seq=10), max_new_tokens=10)
    with pytest.raises(ValueError, match="CUDA"):
        GraphedDecoder(make_tiny_llama(), max_cache_len=16, use_cuda_graph=True)


# ----------------------------------------------------------------------------- pruned attention heads
@torch.no_grad()
def _drop_kv_groups_(model, layer: int, keep: list[int]) -> None:
    """Keep only the KV heads `keep` (with their query groups) in one attention layer: narrower q/k/v/o."""
    attn = model.model.layers[layer].self_attn
    head_dim, groups = attn.head_dim, attn.num_key_value_groups
    kv_rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in keep])
    q_rows = torch.cat([torch.arange(h * groups * head_dim, (h + 1) * groups * head_dim) for h in keep])

    def narrowed(linear: torch.nn.Linear, rows=None, cols=None) -> torch.nn.Linear:
        weight = linear.weight if rows is None else linear.weight[rows]
        weight = weight if cols is None else weight[:, cols]
        new = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None, dtype=weight.dtype)
        new.weight.copy_(weight)
        if linear.bias is not None:
            new.bias.copy_(linear.bias if rows is None else linear.bias[rows])
        return new

    attn.q_proj = narrowed(attn.q_proj, rows=q_rows)
    attn.k_proj = narrowed(attn.k_proj, rows=kv_rows)
    attn.v_proj = narrowed(attn.v_proj, rows=kv_rows)
    attn.o_proj = narrowed(attn.o_proj, cols=q_rows)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_static_decode_with_kv_groups_pruned_in_one_layer(arch, random_tokens):
    model = make_tiny_llama(arch=arch, layers=3, heads=4, kv_heads=2)
    _drop_kv_groups_(model, layer=1, keep=[1])
    prompt = random_tokens(batch=2, seq=7)
    new = 20
    reference = _eager_greedy(model, prompt, new)
    decoder = GraphedDecoder(model, max_cache_len=7 + new)
    assert torch.equal(decoder.generate(prompt, max_new_tokens=new), reference)
    cache = decoder._caches[2]
    heads = [layer.keys.shape[1] for layer in cache.layers]
    assert heads == [2, 1, 2]  # each layer's cache sized by its own KV heads, not config.num_key_value_heads


def test_begin_and_step_continue_like_generate(random_tokens):
    model = make_tiny_llama(layers=2)
    prompt = random_tokens(batch=1, seq=5)
    decoder = GraphedDecoder(model, max_cache_len=32)
    reference = decoder.generate(prompt, max_new_tokens=12)
    for eager in (False, True):
        tokens = [decoder.begin(prompt, 12)]
        for i in range(11):
            tokens.append(decoder.step(tokens[-1], 5 + i, eager=eager).clone())
        assert torch.equal(torch.cat([prompt, *tokens], dim=1), reference)


# ----------------------------------------------------------------------------- bench.kernels.e2e and `compress bench`
def test_kernel_table_and_decode_floor():
    from compress.speed import chrome_trace_kernels, decode_floor, kernel_table, kv_bytes_per_position

    trace = {"traceEvents": [
        {"ph": "X", "cat": "kernel", "name": "gemv", "dur": 3.0},
        {"ph": "X", "cat": "kernel", "name": "gemv", "dur": 5.0},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoD", "dur": 1.0},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "dur": 50.0},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "dur": 9.0},
    ]}
    table = kernel_table(chrome_trace_kernels(trace), steps=2, step_us=10.0)
    assert [r["kernel"] for r in table] == ["gemv", "Memcpy DtoD"]
    assert table[0]["count"] == 2 and table[0]["us_per_step"] == 4.0 and table[0]["share_of_step"] == 0.4

    model = make_tiny_llama(layers=3, hidden=64, heads=4, kv_heads=2, vocab=128, tie=False)
    _drop_kv_groups_(model, layer=0, keep=[0])
    per_position = (16 + 16 + 32 + 32 + 32 + 32) * 4  # fp32 K+V widths: 1 KV head, then 2 and 2
    assert kv_bytes_per_position(model) == per_position
    floor = decode_floor(model, context=10, cache_len=40)
    total = sum(p.numel() for p in model.parameters()) * 4
    assert floor["weight_bytes_read"] == total - 127 * 64 * 4  # one row of the untied embedding is read
    assert floor["kv_bytes_read"] == 10 * per_position
    # The bandwidth is the device's (measured on a GPU, nominal on the CPU), recorded with the floor.
    assert floor["floor_us"] == pytest.approx((total - 127 * 64 * 4 + 10 * per_position) / (floor["tbps"] * 1e6))


def test_e2e_smoke_sweep_and_profile(tmp_path):
    from compress.speed import main

    assert main(["--smoke", "--models", "tiny", "--sizes", "1.0,0.5", "--batches", "1", "--out", str(tmp_path)]) == 0
    sweep = json.loads(next(tmp_path.glob("e2e_*_smoke.json")).read_text())
    rows = sweep["models"]["tiny"]
    assert set(rows) == {"1.0", "0.5"} and all("error" not in r for r in rows.values())
    assert rows["0.5"]["weight_bytes_ratio"] < 1 and "1" in rows["0.5"]["decode_speedup"]

    assert main(["--smoke", "--profile", "--models", "tiny", "--sizes", "0.5", "--out", str(tmp_path)]) == 0
    result = json.loads(next(tmp_path.glob("e2e_profile_*_smoke.json")).read_text())
    row = result["models"]["tiny"]["0.5"]
    assert "error" not in row, row.get("error")
    decode = row["decode"]
    assert decode["kernels"] and decode["floor"]["floor_us"] > 0
    if not torch.cuda.is_available():
        assert decode["table_source"] == "eager_steps" and not decode["graphed"]
    assert row["prefill"]["kernels"] and row["prefill"]["ms"] > 0
    assert "## tiny 0.5" in next(tmp_path.glob("e2e_profile_*_smoke.md")).read_text()
    with zipfile.ZipFile(next(tmp_path.glob("e2e_profile_*_traces.zip"))) as archive:
        names = set(archive.namelist())
    assert "tiny_0.5_prefill.json" in names and names & {"tiny_0.5_decode_eager.json", "tiny_0.5_decode_graphed.json"}


def test_e2e_graph_prefill_is_recorded_and_falls_back_without_cuda(tmp_path):
    from compress.speed import main

    assert main(["--smoke", "--models", "tiny", "--sizes", "0.5", "--batches", "1", "--graph-prefill",
                 "--out", str(tmp_path)]) == 0
    result = json.loads(next(tmp_path.glob("e2e_*_graphprefill_smoke.json")).read_text())
    assert result["settings"]["graph_prefill"] is True
    prefill = result["models"]["tiny"]["0.5"]["prefill"]
    assert prefill["ms"] > 0
    if not torch.cuda.is_available():
        assert prefill["mode"] == "eager (no CUDA device)"
    assert main(["--smoke", "--models", "tiny", "--sizes", "0.5", "--batches", "1", "--out",
                 str(tmp_path / "eager")]) == 0
    eager = json.loads(next((tmp_path / "eager").glob("e2e_*_smoke.json")).read_text())
    assert eager["models"]["tiny"]["0.5"]["prefill"]["mode"] == "eager"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graphed_prefill_replays_the_eager_logits():
    from compress.speed import _prefill_call, graphed_prefill

    model = make_tiny_llama(layers=2).cuda().to(torch.bfloat16)
    factorize_(model, lambda name, lin: 8)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, 24), device="cuda")
    replay, mode = graphed_prefill(model, 24, vocab, ids)
    assert mode == "cuda_graph"
    with torch.no_grad():
        want = _prefill_call(model, 24, vocab, ids)().logits
        got = replay().logits
        torch.testing.assert_close(got, want)
        ids.copy_(torch.randint(0, vocab, (1, 24), device="cuda"))  # the graph reads the same ids tensor
        torch.testing.assert_close(replay().logits, _prefill_call(model, 24, vocab, ids)().logits)


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A compressed tiny Llama saved like `python -m compress` saves it, with a word-level tokenizer."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from lowrank import save_pretrained

    vocab = {f"w{i}": i for i in range(128)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="w0")),
                                  unk_token="w0")
    model = make_tiny_llama(layers=2)
    factorize_(model, lambda name, lin: 8)
    return save_pretrained(model, tmp_path / "ckpt", tok)


def test_compress_bench_cli(tiny_checkpoint, tmp_path, capsys):
    from compress.cli import main

    assert main(["bench", "--model", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip() == f"error: model path not found: {tmp_path / 'missing'}"
    if not torch.cuda.is_available():
        assert main(["bench", "--model", str(tiny_checkpoint)]) == 2
        err = capsys.readouterr().err.strip()
        assert "needs a CUDA GPU" in err and "--smoke" in err and "\n" not in err
    assert main(["bench", "--model", str(tiny_checkpoint), "--smoke", "--batches", "1,2", "--out",
                 str(tmp_path / "res")]) == 0
    out = capsys.readouterr().out
    assert "checkpoint" in out and "dense" in out
    result = json.loads(next((tmp_path / "res").glob("e2e_checkpoint_*.json")).read_text())
    rows = result["models"][str(tiny_checkpoint)]
    assert rows["checkpoint"]["target_fraction"] < 1 and rows["dense"]["target_fraction"] == 1
    assert rows["checkpoint"]["weight_bytes_ratio"] < 1
    assert rows["checkpoint"]["fused_groups"] == 0
    # --fuse-siblings: both sides fused (2 blocks × q/k/v, gate/up), sizes and bytes reported as unfused
    assert main(["bench", "--model", str(tiny_checkpoint), "--smoke", "--batches", "1", "--fuse-siblings",
                 "--out", str(tmp_path / "fused")]) == 0
    fused = json.loads(next((tmp_path / "fused").glob("e2e_checkpoint_*_fused_smoke.json")).read_text())
    frows = fused["models"][str(tiny_checkpoint)]
    assert frows["checkpoint"]["fused_groups"] == frows["dense"]["fused_groups"] == 4
    assert "error" not in frows["checkpoint"] and "error" not in frows["dense"]
    for key in ("target_fraction", "weight_bytes"):
        assert frows["checkpoint"][key] == rows["checkpoint"][key] and frows["dense"][key] == rows["dense"][key]


def test_e2e_group_kernel_is_recorded_and_needs_fusion(tmp_path, capsys):
    from compress.speed import main

    assert main(["--smoke", "--models", "tiny", "--sizes", "0.5", "--batches", "1", "--group-kernel", "segmented",
                 "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == ("error: --group-kernel picks how fused groups compute; it needs "
                                               "--fuse-siblings")
    assert main(["--smoke", "--models", "tiny", "--sizes", "1.0,0.5", "--batches", "1", "--fuse-siblings",
                 "--group-kernel", "segmented", "--out", str(tmp_path)]) == 0
    result = json.loads(next(tmp_path.glob("e2e_*_fused_segmented_smoke.json")).read_text())
    assert result["settings"]["group_kernel"] == "segmented"
    for row in result["models"]["tiny"].values():
        assert "error" not in row, row.get("error")
        assert row["group_kernel"] == "segmented" and row["fused_groups"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compressed", [False, True])
def test_cuda_graph_decode_with_kv_groups_pruned(compressed, random_tokens):
    model = make_tiny_llama(layers=3, heads=4, kv_heads=2)
    _drop_kv_groups_(model, layer=1, keep=[0])
    if compressed:
        factorize_(model, lambda name, lin: 8)
    model = model.cuda()
    prompt = random_tokens(batch=2, seq=7).cuda()
    graphed = GraphedDecoder(model, max_cache_len=40)
    assert graphed.use_cuda_graph
    got = graphed.generate(prompt, max_new_tokens=24)
    assert torch.equal(got, GraphedDecoder(model, max_cache_len=40, use_cuda_graph=False).generate(prompt, 24))
    assert torch.equal(got, _eager_greedy(model, prompt, 24))
    assert torch.equal(graphed.generate(prompt, max_new_tokens=24), got)  # replays reuse graph and cache
