"""Streaming layer-wise methods with CPU offload (compress.streaming, `--offload`), on the CPU.

On the CPU the execution device is the offload device, so an offloaded run must give bitwise the
same plans and models as a resident one; the tests also check that the hooks really ran (block
by block, with the other blocks' weights untouched), that backward passes go through
checkpointed blocks, and that the model comes back exactly as it was.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from accelerate.hooks import ModelHook
from torch import nn

from compress import streaming
from compress.api import check_offload, score
from compress.calibrate import first_block_inputs
from compress.cli import main
from compress.errors import UserError
from compress.methods import get_method
from compress.methods.asvd import ASVDConfig, score_asvd
from compress.methods.minify import MinifyConfig, score_minify
from compress.methods.surgeon import SurgeonConfig, score_surgeon
from compress.methods.svd import SVDConfig, score_svd
from compress.methods.svd_llm import SVDLLMConfig, score_svd_llm
from compress.streaming import StreamHook, execution_device, held, offloaded, stream_hooks
from lowrank import load_pretrained
from lowrank.surgery import decoder_layers
from tests.conftest import make_tiny_llama


def _snapshot(model: nn.Module) -> dict[str, object]:
    return {"params": dict(model.named_parameters()), "buffers": dict(model.named_buffers()),
            "forwards": {n for n, m in model.named_modules() if "forward" in m.__dict__}}


def _assert_restored(model: nn.Module, before: dict[str, object] | None = None) -> None:
    """No hook, no wrapped forward, every tensor in CPU memory (and the very same objects as `before`)."""
    assert not streaming.is_offloaded(model) and not hasattr(model, "_stream_state")
    for name, module in model.named_modules():
        assert not hasattr(module, "_hf_hook") and not hasattr(module, "_old_forward"), name
        assert "forward" not in module.__dict__, name
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        assert t.device.type == "cpu", name
    if before is not None:
        params = dict(model.named_parameters())
        assert params.keys() == before["params"].keys()
        assert all(params[n] is p for n, p in before["params"].items())


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


class _Counter:
    """Counts StreamHook.acquire calls while installed (proves the offloaded run streamed)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.acquires = 0
        original = StreamHook.acquire

        def acquire(hook: StreamHook, unit: nn.Module) -> None:
            self.acquires += 1
            original(hook, unit)

        monkeypatch.setattr(StreamHook, "acquire", acquire)


# ---------------------------------------------------------------------------- the machinery
def test_offloaded_forward_is_exact_streams_block_by_block_and_restores(random_tokens):
    model = make_tiny_llama(layers=3)
    ids = random_tokens(2, 16)
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    before = _snapshot(model)
    _, blocks = decoder_layers(model)
    resident = {i: dict(b.named_parameters()) for i, b in enumerate(blocks)}
    seen: list[tuple[int, bool, bool]] = []

    def probe(i: int):
        def hook(module: nn.Module, args: tuple) -> None:
            # Block i runs on swapped-in copies; every other block holds its resident CPU tensors.
            running = blocks[i].self_attn.q_proj.weight is not resident[i]["self_attn.q_proj.weight"]
            others = all(p is resident[j][n] for j, b in enumerate(blocks) if j != i
                         for n, p in b.named_parameters())
            seen.append((i, running, others))

        return hook

    handles = [b.self_attn.q_proj.register_forward_pre_hook(probe(i)) for i, b in enumerate(blocks)]
    try:
        with offloaded(model, "cpu") as streamed:
            assert streamed is model and execution_device(model) == torch.device("cpu")
            hooks = stream_hooks(model)
            assert all(isinstance(b._hf_hook, StreamHook) and isinstance(b._hf_hook, ModelHook) for b in blocks)
            assert {type(m).__name__ for m in hooks} >= {"LlamaDecoderLayer", "Embedding", "LlamaForCausalLM"}
            with torch.no_grad():
                logits = model(input_ids=ids).logits
            assert all(b._hf_hook.loads == 1 and b._hf_hook.calls == 1 for b in blocks)
            # Between forwards every block holds its resident tensors again.
            assert all(p is resident[i][n] for i, b in enumerate(blocks) for n, p in b.named_parameters())
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(logits, reference)
    assert seen == [(0, True, True), (1, True, True), (2, True, True)]
    _assert_restored(model, before)


def test_blocks_compute_on_the_execution_device_only_while_they_run(random_tokens):
    # "meta" stands in for an accelerator: a block's weights must be there during its forward,
    # and in CPU memory before and after. (The whole model cannot run on meta: its mask code
    # reads values; a block can.)
    model = make_tiny_llama(layers=2)
    x, kwargs = next(first_block_inputs(model, random_tokens(2, 8), 2))
    _, blocks = decoder_layers(model)
    devices: list[tuple[str, str]] = []
    handle = blocks[1].mlp.down_proj.register_forward_pre_hook(
        lambda m, a: devices.append((m.weight.device.type, blocks[0].mlp.down_proj.weight.device.type)))
    try:
        with offloaded(model, "meta"), torch.no_grad():
            out = blocks[1](x, **kwargs)
            assert blocks[1].mlp.down_proj.weight.device.type == "cpu"
    finally:
        handle.remove()
    assert out.device.type == "meta"
    assert devices == [("meta", "cpu")]
    _assert_restored(model)


def test_held_block_loads_once_and_streams_replaced_modules(random_tokens):
    model = make_tiny_llama(layers=2)
    x, kwargs = next(first_block_inputs(model, random_tokens(2, 8), 2))
    _, blocks = decoder_layers(model)
    with offloaded(model, "cpu"), torch.no_grad():
        hook = blocks[0]._hf_hook
        with held(blocks[0]):
            a = blocks[0](x, **kwargs)
            # A module put in mid-hold (svd-llm, minify do this) streams on the next call.
            new = nn.Linear(160, 64, bias=False)
            new.weight.copy_(blocks[0].mlp.down_proj.weight)
            weight = new.weight
            blocks[0].mlp.down_proj = new
            b = blocks[0](x, **kwargs)
            assert new.weight is not weight  # the copy in use while held
        assert hook.loads == 1 and hook.calls == 2 and hook.depth == 0
        assert new.weight is weight
    assert torch.equal(a, b)
    _assert_restored(model)


def test_backward_runs_through_checkpointed_blocks(random_tokens, monkeypatch):
    layers, batches = 3, 2
    model = make_tiny_llama(layers=layers)
    for p in model.parameters():
        p.requires_grad_(False)
    ids = random_tokens(2 * batches, 16)

    def activation_grads(m: nn.Module) -> list[torch.Tensor]:
        grads = []
        leaves: list[torch.Tensor] = []

        def as_leaf(mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            leaves.append(out.detach().requires_grad_(True))
            return leaves[-1]

        h = m.get_input_embeddings().register_forward_hook(as_leaf)
        try:
            for chunk in ids.split(2):
                m(input_ids=chunk, use_cache=False).logits.square().sum().backward()
                grads.append(leaves[-1].grad)
        finally:
            h.remove()
        return grads

    reference = activation_grads(model)
    calls = {"checkpoint": 0, "fresh": 0, "recomputed": 0}
    real = streaming.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls["checkpoint"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(streaming, "checkpoint", counting_checkpoint)
    _, blocks = decoder_layers(model)
    probe = blocks[1].mlp.up_proj.register_forward_hook(
        lambda m, a, o: calls.__setitem__("recomputed" if streaming.recomputing() else "fresh",
                                          calls["recomputed" if streaming.recomputing() else "fresh"] + 1))
    try:
        with offloaded(model, "cpu"):
            grads = activation_grads(model)
            loads = [b._hf_hook.loads for b in blocks]
    finally:
        probe.remove()
    assert all(torch.equal(g, r) for g, r in zip(grads, reference, strict=True))
    assert calls["checkpoint"] == layers * batches  # one checkpointed call per block per batch
    assert calls["fresh"] == batches and calls["recomputed"] == batches  # the backward re-ran each block
    assert loads == [2 * batches] * layers  # weights came over for the forward and again for the backward
    assert not streaming.recomputing()
    _assert_restored(model)


def test_blocks_called_with_a_kv_cache_are_not_checkpointed(random_tokens, monkeypatch):
    """A block updates its KV cache in place; re-running it for the backward would append its keys twice.
    transformers ≥ 5.24 hands the cache to each block as `cache`, older releases as `past_key_values`."""
    model = make_tiny_llama(layers=2)
    for p in model.parameters():
        p.requires_grad_(False)
    calls = []
    real = streaming.checkpoint
    monkeypatch.setattr(streaming, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = random_tokens(1, 8)
    with offloaded(model, "cpu"):
        cached = model(input_ids=ids, use_cache=True).logits
        assert calls == []
        plain = model(input_ids=ids, use_cache=False).logits
        assert len(calls) == 2  # without a cache every block is checkpointed
    torch.testing.assert_close(cached, plain)
    for key in ("cache", "past_key_values", "past_key_value"):
        assert not streaming._is_block_call_checkpointable({key: object()})
    assert streaming._is_block_call_checkpointable({"cache": None, "use_cache": False})
    _assert_restored(model)


def test_streamed_forward_refuses_trainable_parameters(random_tokens):
    model = make_tiny_llama(layers=2)
    with offloaded(model, "cpu"):
        with pytest.raises(RuntimeError, match="requires grad"):
            model(input_ids=random_tokens(1, 8))
    _assert_restored(model)


def test_bad_inputs_are_clear_errors():
    model = make_tiny_llama(layers=2)
    with pytest.raises(UserError, match="offload must be true or false"):
        with streaming.maybe_offloaded(model, "yes"):
            pass
    model.lm_head.weight = nn.Parameter(torch.zeros(128, 64, device="meta"))  # a weight not in CPU memory
    with pytest.raises(UserError, match="lm_head.weight is on meta"):
        with offloaded(model, "cpu"):
            pass
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            with offloaded(make_tiny_llama(layers=1), "cuda"):
                pass
    with pytest.raises(UserError, match="decoder blocks"):
        with offloaded(nn.Sequential(nn.Linear(2, 2)), "cpu"):
            pass
    with pytest.raises(UserError, match="cannot run with --offload.*svd, "):
        check_offload(get_method("svd-plain"), True)
    with pytest.raises(UserError, match="offload must be true or false"):
        check_offload(get_method("svd"), "on")
    with pytest.raises(UserError, match="cannot run with --offload"):
        score(make_tiny_llama(layers=1), None, "svd-plain", offload=True)
    fresh = make_tiny_llama(layers=2)
    with offloaded(fresh, "cpu"), pytest.raises(UserError, match="already offloaded"):
        with offloaded(fresh, "meta"):
            pass
    _assert_restored(fresh)


# ---------------------------------------------------------------------------- the five methods
def _factor_plans_equal(a, b) -> None:
    assert list(a.layers) == list(b.layers) and a.metadata == b.metadata
    for n, la in a.layers.items():
        lb = b.layers[n]
        for field in ("U", "V", "scores", "dense_weight"):
            assert torch.equal(getattr(la, field), getattr(lb, field)), (n, field)


def _minify_plans_equal(a, b) -> None:
    assert list(a.layers) == list(b.layers)
    for n, la in a.layers.items():
        lb = b.layers[n]
        assert torch.equal(la.gram, lb.gram) and torch.equal(la.act_seq, lb.act_seq)
        assert torch.equal(la.weight_seq, lb.weight_seq)
    assert lb.gram.device.type == "cpu"


METHODS = {
    "svd": (score_svd, lambda **k: SVDConfig(progress=False, batch_size=2, **k), _factor_plans_equal, 0.6, {}),
    "svd-llm": (score_svd_llm, lambda **k: SVDLLMConfig(progress=False, batch_size=2, **k), _factor_plans_equal,
                0.6, {}),
    "asvd": (score_asvd, lambda **k: ASVDConfig(progress=False, batch_size=2, sensitivity_samples=2,
                                                 ratios=(0.3, 0.6), **k), _factor_plans_equal, 0.6, {}),
    "minify": (score_minify, lambda **k: MinifyConfig(progress=False, batch_size=2, width_multiple=8, **k),
               _minify_plans_equal, 0.6, {"target": "sequential"}),
    "surgeon": (score_surgeon, lambda **k: SurgeonConfig(progress=False, batch_size=2, shots=2, lora_steps=2,
                                                        sizes=(0.7,), **k),
                None, 0.7, {}),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_offload_gives_the_same_plan_and_model(method, random_tokens, monkeypatch):
    scorer, config, plans_equal, size, second = METHODS[method]
    model = make_tiny_llama(layers=2)
    ids = random_tokens(6, 16)
    resident, streamed = copy.deepcopy(model), copy.deepcopy(model)
    plan_r = scorer(resident, ids, config())
    ranks_r = plan_r.materialize_(resident, size)
    counter = _Counter(monkeypatch)
    before = _snapshot(streamed)
    plan_o = scorer(streamed, ids, config(offload=True))
    _assert_restored(streamed, before)  # scoring leaves the model as it found it
    assert plan_o.offload if hasattr(plan_o, "offload") else True
    scored_acquires = counter.acquires
    assert scored_acquires > 0  # surgeon's shots run in its scoring
    ranks_o = plan_o.materialize_(streamed, size)
    # svd-llm's update runs forwards; the other plans materialize without one.
    assert (counter.acquires > scored_acquires) == (method == "svd-llm")
    assert ranks_o == ranks_r
    if plans_equal is not None:
        plans_equal(plan_r, plan_o)
    _assert_same_state(resident, streamed)
    _assert_restored(streamed)
    with torch.no_grad():
        fresh = random_tokens(2, 16)
        assert torch.equal(resident(input_ids=fresh).logits, streamed(input_ids=fresh).logits)
    if second:  # another materialization option, through the streamed path (held blocks)
        resident2, streamed2 = copy.deepcopy(model), copy.deepcopy(model)
        ranks_r = plan_r.with_options(**second).materialize_(resident2, size)
        acquires = counter.acquires
        assert plan_o.with_options(**second).materialize_(streamed2, size) == ranks_r
        assert counter.acquires > acquires
        _assert_same_state(resident2, streamed2)
        _assert_restored(streamed2)


@pytest.mark.parametrize("method", ["minify", "surgeon"])
def test_gradient_methods_checkpoint_every_block_of_every_batch(method, random_tokens, monkeypatch):
    layers, batches = 2, 3
    model = make_tiny_llama(layers=layers)
    ids = random_tokens(2 * batches, 16)
    calls = {"n": 0}
    real = streaming.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(streaming, "checkpoint", counting_checkpoint)
    if method == "minify":
        score_minify(model, ids, MinifyConfig(progress=False, batch_size=2, offload=True))
    else:  # one shot, no LoRA: exactly one K-FAC pass (forward + backward per batch)
        plan = score_surgeon(model, ids, SurgeonConfig(progress=False, batch_size=2, shots=1, lora_steps=0,
                                                       offload=True, sizes=(0.8,)))
        plan.materialize_(model, 0.8)
    assert calls["n"] == layers * batches
    _assert_restored(model)


# ---------------------------------------------------------------------------- CLI and bench
def test_cli_offload(tiny_model_dir, cli_text, tmp_path, capsys):
    base = ["--model", str(tiny_model_dir), "--device", "cpu", "--data", str(cli_text), "--seq-len", "32",
            "--calib-samples", "4", "--eval-chunks", "1"]
    assert main([*base, "--method", "svd", "--offload", "--size", "0.7", "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "compress_report.json").read_text())
    assert report["offload"] is True and report["compressed_perplexity"] > 0
    capsys.readouterr()
    assert main([*base, "--method", "svd-plain", "--offload", "--no-eval"]) == 2
    assert "cannot run with --offload" in capsys.readouterr().err
    # A saved svd-llm plan (its update runs forwards) materializes the same with and without --offload.
    plan_dir = tmp_path / "plan"
    assert main([*base, "--method", "svd-llm", "--no-eval", "--size", "0.7", "--save-plan", str(plan_dir)]) == 0
    common = ["materialize", "--model", str(tiny_model_dir), "--device", "cpu", "--scores", str(plan_dir),
              "--size", "0.6"]
    assert main([*common, "--out", str(tmp_path / "resident")]) == 0
    assert main([*common, "--offload", "--out", str(tmp_path / "streamed")]) == 0
    _assert_same_state(load_pretrained(tmp_path / "resident", dtype=torch.float32),
                       load_pretrained(tmp_path / "streamed", dtype=torch.float32))


def test_bench_smoke(tmp_path):
    from bench.quality.streaming_memory import main as bench_main

    results = bench_main(["--smoke", "--out", str(tmp_path)])
    runs = results["runs"]
    assert {r["method"] for r in runs} == {"svd", "minify"}
    assert all(r["same_selection"] and r["bitwise_weights"] and r["bitwise_logits"] for r in runs)
    saved = json.loads((tmp_path / "streaming_memory_smoke.json").read_text())
    assert saved["env"]["git_commit"] and len(saved["runs"]) == 2
