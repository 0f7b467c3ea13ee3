"""Prefill time on the GPU versus in eager Python: the SmolLM2-shape model, dense and at 50%, with and without
the dense fallback, each timed eagerly (CUDA events around ``model(...)``) and as one CUDA-graph replay (GPU
work only), side by side in one process.

Why: ``bench.kernels.e2e`` times prefill eagerly, and at SmolLM2 scale that is bound by Python and launch overhead
(tens of ms for a few ms of GPU work), so its prefill ratios for small models mostly measure the host.

    python -m bench.kernels.prefill_overhead --out $OUT
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from compress.speed import _prefill_call, build_synthetic
from compress.timing import cuda_graph_median, env_info, event_median_ms, gpu_slug, write_result
from lowrank.serving import enable_dense_fallback


def _without_fallback(model: torch.nn.Module) -> None:
    for module in model.modules():
        if hasattr(module, "disable_dense_fallback"):
            module.disable_dense_fallback()


@torch.no_grad()
def run(tokens: list[int], reps: int) -> dict:
    torch.manual_seed(0)
    dense = build_synthetic("smollm2_shape", 1.0, 32, "cuda", torch.bfloat16)
    half = build_synthetic("smollm2_shape", 0.5, 32, "cuda", torch.bfloat16)
    vocab = dense.config.vocab_size
    rows: dict[str, dict[str, float]] = {}
    # The last variant repeats the first compressed one: eager timings of a host-bound model drift
    # between repeats, and the repeat shows by how much.
    variants = [("dense", dense, None), ("0.5", half, _without_fallback),
                ("0.5+fallback", half, lambda m: enable_dense_fallback(m, [1, 8, *tokens])),
                ("0.5 again", half, _without_fallback)]
    for label, model, prepare in variants:
        if prepare is not None:
            prepare(model)
        for T in tokens:
            call = _prefill_call(model, T, vocab)
            for _ in range(3):
                call()
            eager = event_median_ms(call, reps=reps)
            graph = cuda_graph_median([call], iters=3, reps=reps, warmup=2, eager_fallback=True)
            rows[f"{label} T={T}"] = {"eager_ms": eager, "graph_ms": graph}
            print(f"{label:14s} T={T:5d} eager {eager:7.2f} ms  graph {graph:7.2f} ms", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kernels.prefill_overhead", description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="512,4096", help="prefill lengths (batch 1)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: bench.kernels.prefill_overhead needs a CUDA GPU", file=sys.stderr)
        return 2
    tokens = [int(t) for t in args.tokens.split(",") if t]
    rows = run(tokens, args.reps)
    path = write_result(f"prefill_overhead_{gpu_slug()}", {"env": env_info(), "rows": rows}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
