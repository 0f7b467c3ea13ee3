"""Benchmark of ``lowrank_kernels.lowrank_matmul`` against dense cuBLAS and the unfused torch path.

``python -m bench.kernels.lowrank [--quick] [--out DIR]`` (needs CUDA) sweeps LLaMA-7B and SmolLM2-135M
layer shapes, T in {1, ..., 8192} and ranks at 25/50/75 % of the dense parameter count, both
aligned (multiple of ``ALIGN``) and raw, and writes ``bench/results/lowrank_<gpu>.json`` plus a
PNG of the speedup over dense against T.

Method: every timed call reads a different weight copy (copies rotate so the set exceeds
2x the L2 cache; the activations stay hot as they would in a real layer stack), all inputs
are ``randn``, and each candidate is timed as the median per-call time of CUDA-graph replays
of a burst of calls, which removes the host launch overhead that would otherwise dominate
the microsecond-scale decode cases for every contender alike.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from compress.timing import (
    RESULTS_DIR,
    device_peaks,
    env_info,
    gpu_slug,
    peak_extra_bytes,
    time_rotating,
    write_result,
)

# (name, in_features n, out_features m)
SHAPES: list[tuple[str, int, int]] = [
    ("llama7b_qkvo", 4096, 4096),
    ("llama7b_up", 4096, 11008),
    ("llama7b_down", 11008, 4096),
    ("smollm135m_qkvo", 576, 576),
    ("smollm135m_up", 576, 1536),
    ("smollm135m_down", 1536, 576),
]
T_VALUES = [1, 4, 16, 64, 256, 1024, 4096, 8192]
PARAM_FRACTIONS = [0.25, 0.5, 0.75]
# Rank alignment: 64 keeps r a multiple of the 16-byte vector (8 bf16) and of the usual
# tensor-core K tile, so neither cuBLAS nor Triton pays for ragged rows or a ragged K tail.
ALIGN = 64
L2_BYTES = 50e6


def raw_rank(n: int, m: int, frac: float) -> int:
    """Rank whose factor pair holds ``frac`` of the dense parameters: r (m + n) = frac m n."""
    return max(1, int(frac * m * n / (m + n)))


def aligned_rank(n: int, m: int, frac: float, align: int = ALIGN) -> int:
    return max(align, int(round(raw_rank(n, m, frac) / align)) * align)


def ranks_for(n: int, m: int) -> list[tuple[float, int, bool]]:
    """(fraction, rank, aligned?) triples; a raw rank that is already aligned appears once."""
    out = []
    for f in PARAM_FRACTIONS:
        ra, rr = aligned_rank(n, m, f), raw_rank(n, m, f)
        out.append((f, ra, True))
        if rr != ra:
            out.append((f, rr, False))
    return out


def floor_ms(T: int, n: int, m: int, r: int, itemsize: int = 2) -> float:
    nbytes = itemsize * r * (m + n) + itemsize * T * (m + n)
    flops = 2.0 * T * r * (m + n)
    peaks = device_peaks()
    return max(nbytes / (peaks.tbps * 1e12), flops / (peaks.tflops * 1e12)) * 1e3


def n_copies(nbytes_per_set: int) -> int:
    """Weight sets to rotate through so that one pass is > 2x L2 (never cache-resident)."""
    return int(min(256, max(2, math.ceil(2 * L2_BYTES / max(nbytes_per_set, 1)))))


def peak_mem_mb(fn: Callable[[], Any]) -> float:
    """Peak extra allocator memory (MB) of one call beyond what is already allocated."""
    return peak_extra_bytes(fn) / 1e6


class WeightSet:
    """Rotating dense and factorized weights for one (n, m, r)."""

    def __init__(self, n: int, m: int, r: int, dtype: torch.dtype, seed: int = 0, dense: bool = True):
        g = torch.Generator(device="cuda").manual_seed(seed)
        lr_bytes = 2 * r * (m + n)
        k = n_copies(lr_bytes)
        self.U = [torch.randn(m, r, device="cuda", dtype=dtype, generator=g) / math.sqrt(r) for _ in range(k)]
        self.V = [torch.randn(r, n, device="cuda", dtype=dtype, generator=g) / math.sqrt(n) for _ in range(k)]
        self.W = []
        if dense:
            kd = n_copies(2 * m * n)
            self.W = [torch.randn(m, n, device="cuda", dtype=dtype, generator=g) / math.sqrt(n)
                      for _ in range(kd)]


def measure_point(ws: WeightSet, x: torch.Tensor, fn_lowrank: Callable, with_baselines: bool = True,
                  with_mem: bool = False) -> dict[str, float]:
    """Time dense, torch two-GEMM and ``fn_lowrank(x, U, V)`` on rotating weights."""
    res: dict[str, float] = {}
    res["lowrank_ms"] = time_rotating(
        [lambda U=U, V=V: fn_lowrank(x, U, V) for U, V in zip(ws.U, ws.V, strict=True)]
    )
    if with_baselines:
        res["torch_two_gemm_ms"] = time_rotating(
            [lambda U=U, V=V: F.linear(F.linear(x, V), U) for U, V in zip(ws.U, ws.V, strict=True)]
        )
        if ws.W:
            res["dense_ms"] = time_rotating([lambda W=W: F.linear(x, W) for W in ws.W])
    if with_mem:
        res["lowrank_peak_mb"] = peak_mem_mb(lambda: fn_lowrank(x, ws.U[0], ws.V[0]))
        res["torch_two_gemm_peak_mb"] = peak_mem_mb(lambda: F.linear(F.linear(x, ws.V[0]), ws.U[0]))
        if ws.W:
            res["dense_peak_mb"] = peak_mem_mb(lambda: F.linear(x, ws.W[0]))
    return res


def run_sweep(
    shapes: list[tuple[str, int, int]] | None = None,
    t_values: list[int] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    deadline: float | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Full sweep with the shipped dispatch; returns one record per (shape, rank, T)."""
    from lowrank_kernels.dispatch import _CHOICE_CACHE, dense_is_faster, select_backend
    from lowrank_kernels.lowrank_matmul import lowrank_matmul

    shapes = shapes or SHAPES
    t_values = t_values or T_VALUES
    records: list[dict[str, Any]] = []
    for name, n, m in shapes:
        for frac, r, aligned in ranks_for(n, m):
            ws = WeightSet(n, m, r, dtype, seed=n * 7 + m * 3 + r)
            for T in t_values:
                if deadline is not None and time.time() > deadline:
                    log(f"[sweep] deadline reached before {name} r={r} T={T}")
                    return records
                x = torch.randn(T, n, device="cuda", dtype=dtype)
                fn = lambda x, U, V: lowrank_matmul(x, U, V)
                try:
                    res = measure_point(ws, x, fn, with_mem=T in (1, 1024, 8192))
                except Exception as exc:  # noqa: BLE001 - record and continue the sweep
                    log(f"[sweep] {name} r={r} T={T} failed: {exc!r}")
                    continue
                if ws.W:
                    # The shipped dispatch with a dense copy available (LowRankLinear's dense
                    # fallback): it must match the better of dense and the factorized path.  The
                    # copies are random rather than U @ V: only their shape steers the dispatch.
                    k = max(len(ws.W), len(ws.U))
                    sets = [(ws.U[i % len(ws.U)], ws.V[i % len(ws.U)], ws.W[i % len(ws.W)]) for i in range(k)]
                    res["fallback_ms"] = time_rotating([
                        lambda x=x, U=U, V=V, W=W: lowrank_matmul(x, U, V, dense_weight=W) for U, V, W in sets
                    ])
                    res["fallback_uses_dense"] = dense_is_faster(T, n, m, r, x.device)
                    best = min(res["dense_ms"], res["torch_two_gemm_ms"])
                    res["fallback_vs_best_baseline"] = best / res["fallback_ms"]
                _CHOICE_CACHE.clear()
                backend, cfg = select_backend(x, ws.U[0], ws.V[0], None)
                cfg = cfg.to_dict() if cfg is not None else {}  # the tables' JSON form
                fl = floor_ms(T, n, m, r, x.element_size())
                lr = res["lowrank_ms"]
                nbytes = x.element_size() * (r * (m + n) + T * (m + n))
                rec = {
                    "shape": name, "n": n, "m": m, "r": r, "param_fraction": frac, "aligned": aligned, "T": T,
                    "dtype": str(dtype).replace("torch.", ""), "backend": backend, "config": cfg,
                    **res,
                    "floor_ms": fl,
                    "pct_of_floor": 100.0 * fl / lr,
                    "achieved_tbps": nbytes / (lr * 1e-3) / 1e12,
                    "achieved_tflops": 2.0 * T * r * (m + n) / (lr * 1e-3) / 1e12,
                    "speedup_vs_dense": res.get("dense_ms", float("nan")) / lr,
                    "speedup_vs_torch_two_gemm": res["torch_two_gemm_ms"] / lr,
                }
                records.append(rec)
                log(
                    f"{name:16s} r={r:5d}{'' if aligned else '*'} T={T:5d} {backend:12s} "
                    f"lr={lr * 1e3:9.1f}us dense={res.get('dense_ms', float('nan')) * 1e3:9.1f}us "
                    f"2g={res['torch_two_gemm_ms'] * 1e3:9.1f}us x{rec['speedup_vs_dense']:.2f} "
                    f"floor%={rec['pct_of_floor']:.0f}"
                    + (f" fallback={res['fallback_ms'] * 1e3:.1f}us{'(dense)' if res['fallback_uses_dense'] else ''}"
                       if "fallback_ms" in res else "")
                )
            del ws
            torch.cuda.empty_cache()
    return records


def plot(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Speedup over dense vs T, one panel per shape, one line per rank."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = list(dict.fromkeys(r["shape"] for r in records))
    cols = 3
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        sub = [r for r in records if r["shape"] == name]
        for r_val in sorted({r["r"] for r in sub}):
            pts = sorted((r["T"], r["speedup_vs_dense"], r["aligned"]) for r in sub if r["r"] == r_val)
            style = "-o" if pts[0][2] else "--x"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, ms=3, label=f"r={r_val}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(name)
        ax.set_xlabel("T (tokens)")
        ax.set_ylabel("speedup vs dense cuBLAS")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    global PARAM_FRACTIONS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="LLaMA shapes, 50%% ranks, T in {1,16,256,8192}")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--budget-s", type=float, default=None, help="stop the sweep after this many seconds")
    ap.add_argument("--shapes", default=None,
                    help=f"comma list from {', '.join(n for n, _, _ in SHAPES)} (default all)")
    ap.add_argument("--fractions", default=None, help="comma list of parameter fractions (default 0.25,0.5,0.75)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.kernels.lowrank needs a CUDA GPU")
    dtype = getattr(torch, args.dtype)
    shapes, t_values = SHAPES, T_VALUES
    if args.quick:
        shapes, t_values = SHAPES[:3], [1, 16, 256, 8192]
        PARAM_FRACTIONS = [0.5]
    if args.shapes:
        wanted = [v for v in args.shapes.split(",") if v]
        unknown = sorted(set(wanted) - {n for n, _, _ in SHAPES})
        if unknown:
            raise SystemExit(f"unknown shape(s) {unknown}; choose from {[n for n, _, _ in SHAPES]}")
        shapes = [s for s in shapes if s[0] in wanted]
    if args.fractions:
        PARAM_FRACTIONS = [float(v) for v in args.fractions.split(",") if v]
    deadline = time.time() + args.budget_s if args.budget_s else None
    records = run_sweep(shapes, t_values, dtype, deadline)
    name = f"lowrank_{gpu_slug()}"
    args.out.mkdir(parents=True, exist_ok=True)
    path = write_result(name, {"records": records, "env": env_info(), "align": ALIGN,
                               "floor": device_peaks().as_dict()}, args.out)
    png = plot(records, args.out / f"{name}.png")
    print(f"wrote {path}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()
