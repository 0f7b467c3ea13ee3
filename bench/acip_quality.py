"""ACIP quality on SmolLM2-135M: one scoring run, then perplexity at many sizes vs two baselines.

    python -m bench.acip_quality --out $OUT            # GPU: SMOLLM2_GGUF and WIKITEXT2 set
    python -m bench.acip_quality --out /tmp/q --tiny   # CPU smoke test, random tiny Llama

Model: `compress.model.load_model` (env SMOLLM2_GGUF), bf16 on CUDA. Data: $WIKITEXT2/valid.txt
for calibration (1024-token windows at stride 512), $WIKITEXT2/test.txt for evaluation
(non-overlapping 1024-token chunks, all of them).

It runs ONE ACIP scoring run and evaluates, at sizes 1.0 … 0.4:

- acip            (paper's materialization: kept triplets + folded LoRA, no reset)
- acip+reset      (paper's reset rule, appendix D.3)
- acip+rm32       (ranks rounded to multiples of 32)
- svd-magnitude   (the same SVD factors ranked by singular value, no LoRA)
- svd             (the toolkit's whitened SVD, uniform ranks)

Budget: the whole script must end within `--budget-s` (default 385 s, under 7 minutes). The
paper's schedule (lr 5e-5, λ·1.01 every 4 steps, 1000 post-tune steps) takes thousands of
steps; `--time-scale S` (default 4) runs it S times faster: lr·S, λ·1.01 every max(1, 4/S)
steps (λ grows (4/S')× faster per step) and 1000/S post-tune steps. Training stops early at
a deadline computed from the measured cost of evaluation, so the script always finishes;
sizes below what the score map then covers are reported as null.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

SIZES = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.acip_quality", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for acip_quality.json (and the score map)")
    p.add_argument("--tiny", action="store_true", help="random tiny Llama on random tokens (CPU smoke test)")
    p.add_argument("--budget-s", type=float, default=385.0,
                   help="wall-clock budget of the whole script, imports aside (default 385 s: 7 min, margin)")
    p.add_argument("--time-scale", type=float, default=4.0, help="run the paper's schedule this much faster")
    p.add_argument("--stop-ratio", type=float, default=0.4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--stride", type=int, default=512, help="stride of the calibration windows")
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--eval-chunks", type=int, default=None, help="cap on evaluation chunks (default: all)")
    p.add_argument("--svd-calib-samples", type=int, default=64,
                   help="calibration windows for the svd baseline")
    p.add_argument("--activation-checkpointing", default="none", choices=["none", "full", "selective"])
    p.add_argument("--save-score-map", action="store_true", help="also write the score map under --out")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def _windows(ids: torch.Tensor, seq_len: int, stride: int) -> torch.Tensor:
    starts = range(0, ids.numel() - seq_len + 1, stride)
    return torch.stack([ids[s : s + seq_len] for s in starts])


def _load(args: argparse.Namespace, device: str) -> tuple[Any, torch.Tensor, torch.Tensor, str]:
    if args.tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(args.seed)
        config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
        model = LlamaForCausalLM(config).to(device).eval()
        gen = torch.Generator().manual_seed(args.seed)
        # A learnable toy language: a random first-order Markov chain, so NLL can actually improve.
        trans = torch.softmax(torch.randn(256, 256, generator=gen) * 3, dim=1)
        tokens = [0]
        for _ in range(20_000):
            tokens.append(int(torch.multinomial(trans[tokens[-1]], 1, generator=gen)))
        ids = torch.tensor(tokens)
        calib = _windows(ids[:15_000], args.seq_len, args.stride)
        evals = _windows(ids[15_000:], args.seq_len, args.seq_len)
        return model, calib, evals, "tiny-random-llama"
    from compress.data import tokenize_text
    from compress.model import load_model

    root = os.environ.get("WIKITEXT2")
    if not root:
        raise SystemExit("set WIKITEXT2 to the directory holding valid.txt and test.txt (or pass --tiny)")
    model, tokenizer = load_model(None, dtype="auto", device=device)
    valid = tokenize_text(tokenizer, Path(root, "valid.txt").read_text(encoding="utf-8"))
    test = tokenize_text(tokenizer, Path(root, "test.txt").read_text(encoding="utf-8"))
    calib = _windows(valid, args.seq_len, args.stride)
    evals = _windows(test, args.seq_len, args.seq_len)
    return model, calib, evals, os.environ.get("SMOLLM2_GGUF", "smollm2-135m (default)")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> int:
    args = _parse()
    if args.tiny:  # the tiny model's context is 512 tokens
        args.seq_len, args.stride = min(args.seq_len, 64), min(args.stride, 32)
    t_script = time.perf_counter()
    from bench.common import env_info
    from compress.acip import ACIPConfig, run_acip, temporarily_materialized
    from compress.eval import perplexity_of_ids
    from compress.methods.svd import SVDConfig, score_svd
    from lowrank import size_report

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, calib, evals, model_name = _load(args, device)
    if args.eval_chunks is not None:
        evals = evals[: args.eval_chunks]
    load_seconds = time.perf_counter() - t_script

    def ppl() -> float:
        return perplexity_of_ids(model, evals, batch_size=args.eval_batch_size, progress=False)

    _sync(device)
    t0 = time.perf_counter()
    dense_ppl = ppl()
    _sync(device)
    eval_seconds = time.perf_counter() - t0
    print(f"loaded {model_name} in {load_seconds:.1f} s; dense perplexity {dense_ppl:.3f} "
          f"({evals.shape[0]} chunks, {eval_seconds:.2f} s)", flush=True)

    # The svd baseline first: its cost is then known, not a risk to the deadline.
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    pick = torch.randperm(calib.shape[0])[: args.svd_calib_samples].sort().values
    svd_plan = score_svd(model, calib[pick], SVDConfig(batch_size=args.batch_size, progress=False))
    svd_seconds = time.perf_counter() - t0
    print(f"svd baseline scored in {svd_seconds:.1f} s", flush=True)

    variants = ["acip", "acip+reset", "acip+rm32", "svd-magnitude", "svd"]
    # Time still needed after training: every evaluation (+ materialization), the svd baseline's
    # calibration pass, and a safety margin for the unexpected.
    reserve = len(variants) * len(SIZES) * (eval_seconds * 1.15 + 0.5) + 25.0
    train_deadline = t_script + args.budget_s - reserve
    scale = max(args.time_scale, 1e-6)
    config = ACIPConfig(
        stop_ratio=args.stop_ratio,
        lr=5e-5 * scale,
        reg_update_every=max(1, round(4 / scale)),
        # Where S > 4 the per-step growth is raised too, so λ keeps pace with the faster masks.
        reg_update_factor=1.01 ** max(1.0, scale / 4),
        post_tune_steps=max(1, round(1000 / scale)),
        batch_size=args.batch_size,
        lora_rank=args.lora_rank,
        activation_checkpointing=args.activation_checkpointing,
        seed=args.seed,
        progress=False,  # one line per 100 steps instead (below): the log stays readable
    )
    deadline_hit = {"phase": None}

    def stop_at_deadline(info: dict[str, Any]) -> bool:
        if info["step"] % 100 == 0 or info["phase"] == "done":
            print(f"  step {info['step']:5d} {info['phase']:9s} size {info['size']:.3f} "
                  f"λ {info['lambda']:.2e} loss {info['loss']:.3f} ({info['seconds']:.0f} s)", flush=True)
        if time.perf_counter() > train_deadline:
            deadline_hit["phase"] = info["phase"]
            return True
        return False

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    t0 = time.perf_counter()
    score_map = run_acip(model, calib, config, callback=stop_at_deadline)
    _sync(device)
    scoring_seconds = time.perf_counter() - t0
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    meta = score_map.metadata
    print(f"ACIP: {meta['steps']} steps ({meta['acip_steps']} pruning, {meta['post_tune_steps']} post-tune) "
          f"in {meta['train_seconds']:.1f} s = {meta['steps_per_second']:.2f} steps/s; reached size "
          f"{meta['final_ratio']:.3f} (stop ratio {args.stop_ratio}); deadline hit in: "
          f"{deadline_hit['phase']}", flush=True)
    if args.save_score_map:
        score_map.save(out / "score_map")

    score_map.to(device)  # materialize on the GPU; the svd-magnitude map shares these tensors
    svd_mag = score_map.singular_value_map()

    plans = {
        "acip": (score_map, {}),
        "acip+reset": (score_map, {"reset": True}),
        "acip+rm32": (score_map, {"rank_multiple": 32}),
        "svd-magnitude": (svd_mag, {}),
        "svd": (svd_plan, {}),
    }
    results: dict[str, list[dict[str, Any]]] = {}
    covered_from = score_map.min_size()
    for name, (plan, kwargs) in plans.items():
        rows = []
        for size in SIZES:
            if name.startswith("acip") and size < covered_from - 0.005:
                rows.append({"size": size, "actual_size": None, "perplexity": None,
                             "note": f"not covered (score map reaches {covered_from:.3f})"})
                continue
            _sync(device)
            t0 = time.perf_counter()
            with temporarily_materialized(model, plan, size, **kwargs):
                _sync(device)
                materialize_s = time.perf_counter() - t0
                actual = size_report(model).target_fraction
                value = ppl()
            rows.append({"size": size, "actual_size": round(actual, 5), "perplexity": round(value, 4),
                         "materialize_seconds": round(materialize_s, 4)})
        results[name] = rows
        print(f"evaluated {name}", flush=True)

    total = time.perf_counter() - t_script
    payload = {
        "bench": "acip_quality",
        "model": model_name,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "dtype": str(next(model.parameters()).dtype),
        "calibration": {"windows": int(calib.shape[0]), "seq_len": args.seq_len, "stride": args.stride},
        "eval": {"chunks": int(evals.shape[0]), "seq_len": int(evals.shape[1]), "dense_perplexity": dense_ppl,
                 "seconds_per_eval": round(eval_seconds, 3)},
        "acip": {
            "time_scale": args.time_scale,
            "note": "paper schedule run time_scale× faster (lr, λ growth, post-tune steps); see docstring",
            "config": meta["config"],
            "steps": meta["steps"], "acip_steps": meta["acip_steps"],
            "post_tune_steps": meta["post_tune_steps"],
            "stop_reached": meta["stop_reached"], "final_ratio": meta["final_ratio"],
            "covered_from": round(covered_from, 5), "deadline_hit_in": deadline_hit["phase"],
            "train_seconds": meta["train_seconds"], "steps_per_second": meta["steps_per_second"],
            "scoring_seconds_incl_svd": round(scoring_seconds, 2), "peak_memory_gib": peak_gib,
            "history": meta["history"],
        },
        "svd_baseline_seconds": round(svd_seconds, 2),
        "results": results,
        "wall_seconds": round(total, 1),
        "env": env_info(),
    }
    path = out / "acip_quality.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")

    print(f"\nwrote {path}; wall time {total:.1f} s; ACIP {meta['steps_per_second']:.2f} steps/s"
          + (f", peak {peak_gib:.2f} GiB" if peak_gib is not None else ""))
    header = f"{'size':>6} | " + " | ".join(f"{n:>13}" for n in plans)
    print(f"perplexity (dense {dense_ppl:.3f}); actual size in parentheses where it differs by > 0.005")
    print(header)
    print("-" * len(header))
    for i, size in enumerate(SIZES):
        cells = []
        for name in plans:
            row = results[name][i]
            if row["perplexity"] is None:
                cells.append(f"{'n/a':>13}")
                continue
            cell = f"{row['perplexity']:.2f}"
            if abs(row["actual_size"] - size) > 0.005:
                cell += f"({row['actual_size']:.2f})"
            cells.append(f"{cell:>13}")
        print(f"{size:>6.2f} | " + " | ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
