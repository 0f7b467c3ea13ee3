"""ACIP's cost on a LLaMA-7B-shaped model: steps/s and peak memory, and any-size materialization time.

    python -m bench.quality.acip_cost --out $OUT            # GPU (bf16): 32 layers, 4096 hidden, 11008 MLP
    python -m bench.quality.acip_cost --out /tmp/c --tiny   # CPU smoke test

The model is built from a config with random weights; its 224 targeted linears are replaced
directly by ACIP's masked SVD layers, whose factors are random orthonormal matrices (QR of a
Gaussian, a few per shape, column-permuted per layer) with a decaying spectrum that never
reaches zero — no 224 SVDs, and never a dense copy of the layers. Every layer owns its own
factor tensors, so memory is what a real run holds. One measured step is exactly
`compress.methods.acip.train.training_step` (bank refresh, forward, NLL + λ·L1, backward, AdamW).

Targets: ≥ 2.5 steps/s and ≤ 45 GB at batch 4 × 1024 (paper, Table A5: 1.68 steps/s, 62.45 GB).
Then the training state is dropped and one size is selected and materialized from a score map
over the same factors (LoRA folded), timed on the GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

LLAMA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.quality.acip_cost", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for acip_cost.json")
    p.add_argument("--tiny", action="store_true", help="small model on CPU (smoke test)")
    p.add_argument("--steps", type=int, default=10, help="measured steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--activation-checkpointing", default="selective,full,none",
                   help="comma list of modes to measure, the first is the headline (default "
                        "selective,full,none); selective recomputes only element-wise ops and keeps the "
                        "SVD matmul outputs")
    p.add_argument("--size", type=float, default=0.5, help="size to time selection + materialization at")
    p.add_argument("--pool", type=int, default=2, help="random orthonormal bases drawn per layer shape")
    p.add_argument("--budget-s", type=float, default=170.0, help="stop measuring steps after this much time")
    return p.parse_args()


def _random_orthonormal(rows: int, cols: int, gen: torch.Generator, device: str) -> torch.Tensor:
    """[rows, cols] with orthonormal columns (QR of a Gaussian, signs fixed by R's diagonal)."""
    g = torch.randn(rows, cols, generator=gen, device=device, dtype=torch.float32)
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(r))[None, :]


def _spectrum(k: int, rows: int, cols: int, device: str) -> torch.Tensor:
    """Power-law decay s_i ∝ (i+1)^-0.6 plus a floor (no zeros), scaled like a 0.02-std weight matrix."""
    i = torch.arange(k, device=device, dtype=torch.float32)
    s = (i + 1).pow(-0.6) + 0.05
    return s * (0.02 * math.sqrt(rows * cols) / s.norm())


def build(args: argparse.Namespace, device: str, dtype: torch.dtype) -> dict[str, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from compress.methods.acip.functional import Segments
    from compress.methods.acip.layer import MaskBank, MaskedSVDLinear
    from compress.methods.acip.train import ACIPConfig
    from lowrank.surgery import replace_module_, target_linears

    config = LlamaConfig(**(TINY if args.tiny else LLAMA_7B))
    config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)  # dense linears exist briefly; each is freed as it is replaced
    finally:
        torch.set_default_dtype(previous)
    model.to(dtype)  # in case the constructor chose its own dtype: activations must match the factors
    targets = target_linears(model)
    names = list(targets)
    shapes = {n: (m.out_features, m.in_features) for n, m in targets.items()}
    acip = ACIPConfig(activation_checkpointing=args.activation_checkpointing, progress=False)
    segments = Segments.from_shapes([shapes[n] for n in names])
    bank = MaskBank(segments, acip.mask_scale, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    pools: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    spectra: dict[str, torch.Tensor] = {}
    torch.manual_seed(0)
    for i, name in enumerate(names):
        out_f, in_f = shapes[name]
        k = min(out_f, in_f)
        if (out_f, in_f) not in pools:
            pools[(out_f, in_f)] = [(_random_orthonormal(out_f, k, gen, device),
                                     _random_orthonormal(in_f, k, gen, device).T.contiguous())
                                    for _ in range(args.pool)]
        u_base, vh_base = pools[(out_f, in_f)][i % args.pool]
        perm = torch.randperm(k, generator=gen, device=device)
        s = _spectrum(k, out_f, in_f, device)
        U = u_base[:, perm].to(dtype)  # a permutation of orthonormal columns is orthonormal
        Vs = (s[:, None] * vh_base[perm]).to(dtype)
        old = replace_module_(model, name, MaskedSVDLinear(U, Vs, None, bank, i, lora_rank=acip.lora_rank,
                                                           lora_alpha=acip.lora_alpha,
                                                           lora_dropout=acip.lora_dropout))
        del old
        spectra[name] = s
    pools.clear()
    layers = {n: model.get_submodule(n) for n in names}
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"model": model, "bank": bank, "layers": layers, "names": names, "shapes": shapes,
            "spectra": spectra, "acip": acip, "config": config}


def main() -> int:
    args = _parse()
    t_script = time.perf_counter()
    from compress.methods.acip.scoremap import ScoreMap, ScoreMapLayer
    from compress.methods.acip.train import (
        disable_activation_checkpointing,
        enable_activation_checkpointing,
        training_step,
    )
    from compress.timing import env_info
    from lowrank import size_report
    from lowrank.surgery import replace_module_

    # Fewer fragmentation spikes; read at the first CUDA allocation, which has not happened yet.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.tiny:
        args.seq_len = min(args.seq_len, 128)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    built = build(args, device, dtype)
    build_seconds = time.perf_counter() - t0
    model, bank, layers, acip = built["model"], built["bank"], built["layers"], built["acip"]
    model.requires_grad_(False)
    bank.p.requires_grad_(True)
    lora = [p for layer in layers.values() for p in (layer.lora_A, layer.lora_B)]
    for p in lora:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW([bank.p] + lora, lr=acip.lr, weight_decay=0.0, fused=device == "cuda")
    model.train()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, built["config"].vocab_size, (args.batch_size, args.seq_len), generator=gen)
               for _ in range(4)]

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    deadline = t_script + args.budget_s
    modes = [m.strip() for m in args.activation_checkpointing.split(",") if m.strip()]
    runs: dict[str, dict[str, Any]] = {}
    for mode in modes:
        if time.perf_counter() > deadline - 30:
            runs[mode] = {"skipped": "time budget"}
            continue
        enable_activation_checkpointing(model, mode)
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        times: list[float] = []
        try:
            for i in range(args.warmup):
                training_step(model, bank, optimizer, batches[i % 4].to(device), acip.reg_start)
            sync()
            for i in range(args.steps):
                t0 = time.perf_counter()
                nll = training_step(model, bank, optimizer, batches[i % 4].to(device), acip.reg_start)
                sync()
                times.append(time.perf_counter() - t0)
                if time.perf_counter() > deadline:
                    break
        except torch.OutOfMemoryError as exc:  # "none" may not fit; record it and go on
            runs[mode] = {"error": f"out of memory: {str(exc).splitlines()[0][:200]}"}
            optimizer.zero_grad(set_to_none=True)
            bank.values = None
            gc.collect()
            torch.cuda.empty_cache()
            print(f"{mode}: out of memory", flush=True)
            continue
        finally:
            disable_activation_checkpointing(model, mode)
        steps_per_s = len(times) / sum(times)
        median_ms = sorted(times)[len(times) // 2] * 1e3
        run: dict[str, Any] = {"steps_measured": len(times), "steps_per_second": round(steps_per_s, 4),
                               "median_step_ms": round(median_ms, 2),
                               "step_ms": [round(t * 1e3, 2) for t in times], "loss": round(float(nll), 4)}
        if device == "cuda":
            run["peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
            run["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 1e9, 3)
        runs[mode] = run
        print(f"{mode}: {len(times)} steps, {steps_per_s:.3f} steps/s (median {median_ms:.1f} ms); "
              f"peak allocated {run.get('peak_allocated_gb', 'n/a')} GB, "
              f"reserved {run.get('peak_reserved_gb', 'n/a')} GB", flush=True)

    # ---- any-size materialization from a score map over the same factors
    del optimizer
    for p in lora:
        p.grad = None
    bank.p.grad = None
    score_layers = {}
    with torch.no_grad():
        scores = bank.p.detach().float() + torch.rand(bank.p.shape, device=device) * 1e-3  # break ties
        per_layer = bank.segments.split(scores)
        for i, name in enumerate(built["names"]):
            layer = layers[name]
            s = built["spectra"][name]
            vh = (layer.Vs.float() / s[:, None]).to(dtype)  # the score map stores U, s, Vh
            score_layers[name] = ScoreMapLayer(layer.U, s, vh, per_layer[i].clone(), layer.lora_A.detach(),
                                               layer.lora_B.detach())
    # Stand-ins for the original dense layers: shapes only (meta), as materialize expects nn.Linear.
    for name, (out_f, in_f) in built["shapes"].items():
        replace_module_(model, name, nn.Linear(in_f, out_f, bias=False, device="meta", dtype=dtype))
    layers.clear()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    score_map = ScoreMap("acip", score_layers, {}, acip.lora_alpha / acip.lora_rank, "all", {})
    sync()
    t0 = time.perf_counter()
    selection = score_map.select(args.size)
    select_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    score_map.materialize_(model, args.size, device=device, check=False)
    sync()
    materialize_s = time.perf_counter() - t0
    actual = size_report(model).target_fraction
    print(f"select {select_s * 1e3:.1f} ms + materialize {materialize_s:.3f} s at size {args.size} "
          f"(actual {actual:.4f}, ranking {selection.global_count} entries)", flush=True)

    total = time.perf_counter() - t_script
    headline = modes[0] if modes else None
    payload = {
        "bench": "acip_cost",
        "model": "tiny" if args.tiny else "llama-7b-shaped (random orthonormal factors, decaying spectrum)",
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "dtype": str(dtype),
        "batch": [args.batch_size, args.seq_len],
        "warmup_steps": args.warmup,
        "headline_mode": headline,
        "runs": runs,
        "targets": {"steps_per_second": 2.5, "peak_memory_gb": 45},
        "paper_table_a5": {"steps_per_second": 1.68, "peak_memory_gb": 62.45},
        "build_seconds": round(build_seconds, 2),
        "materialize": {"size": args.size, "actual_size": round(actual, 5),
                        "select_seconds": round(select_s, 4), "materialize_seconds": round(materialize_s, 4)},
        "allocator": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "wall_seconds": round(total, 1),
        "env": env_info(),
    }
    path = out / "acip_cost.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"\nwrote {path}; wall {total:.1f} s; select + materialize at size {args.size}: "
          f"{select_s + materialize_s:.3f} s")
    print(f"{'checkpointing':<14} {'steps/s':>9} {'peak alloc GB':>14} {'peak reserved GB':>17}   "
          "targets: >= 2.5 steps/s, <= 45 GB; paper A5: 1.68 steps/s, 62.45 GB")
    for mode, run in runs.items():
        if "steps_per_second" not in run:
            print(f"{mode:<14} {run.get('error') or run.get('skipped')}")
            continue
        print(f"{mode:<14} {run['steps_per_second']:>9.3f} {run.get('peak_allocated_gb', 'n/a'):>14} "
              f"{run.get('peak_reserved_gb', 'n/a'):>17}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
