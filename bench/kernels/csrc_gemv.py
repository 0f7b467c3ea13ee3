"""Benchmark of the CUDA decode GEMV ``lowrank_kernels._ext.lowrank_gemv`` (csrc/).

``python -m bench.kernels.csrc_gemv [--t 1,2,4,8] [--out DIR]`` (needs a Hopper GPU; builds the
extension just in time if ``lowrank_kernels._C`` is not installed).

Layers (in -> out, rank r): LLaMA-7B 4096->4096 r=1024, 4096->11008 r=1408/1536,
11008->4096 r=1408/1536, SmolLM2-135M 576->576 r=144; T in {1, 2, 4, 8}, bf16.

Contenders: ``ext`` (two kernels joined by programmatic dependent launch), ``ext_nopdl``
(the same kernels launched plainly), ``dense`` (``F.linear`` with the full [out, in]
weight, the layer before compression), ``torch_2gemm`` (``F.linear(F.linear(x, V), U, b)``)
and ``triton_fused`` (``lowrank_kernels.lowrank_matmul.lowrank_matmul_launch(..., backend="triton_fused")``) when
it is importable.

Method: each timed call reads a different copy of the weights (copies rotate so that the
set exceeds twice the L2 cache, as successive layers of a model would), all inputs are
``randn``, and the time per call is the median over replays of a CUDA graph holding a burst
of calls, which takes host launch overhead out for every contender alike.  The memory
floor is bytes / the measured copy bandwidth
(`compress.timing.device_peaks`) with bytes = 2·r·(in+out) + 2·T·(in+out) (dense: 2·in·out +
2·T·(in+out)); the copy bandwidth measured in the same run is reported beside it.

Writes ``<out>/csrc_gemv_<gpu>.json``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from compress.timing import cuda_graph_median, device_peaks, do_bench_median, env_info, gpu_slug, write_result

SHAPES = [
    ("llama7b_qkvo_r1024", 4096, 4096, 1024),
    ("llama7b_up_r1408", 4096, 11008, 1408),
    ("llama7b_up_r1536", 4096, 11008, 1536),
    ("llama7b_down_r1408", 11008, 4096, 1408),
    ("llama7b_down_r1536", 11008, 4096, 1536),
    ("smollm2_576_r144", 576, 576, 144),
]
L2_BYTES = 50e6


def _copies(bytes_per_set: int) -> int:
    return max(2, math.ceil(2 * L2_BYTES / bytes_per_set) + 1)


def bench_shape(
    name: str, n: int, m: int, r: int, ts: list[int], contenders: dict[str, Callable]
) -> list[dict]:
    dt = torch.bfloat16
    lr_bytes = 2 * r * (n + m)
    dense_bytes = 2 * n * m
    k_lr, k_dense = _copies(lr_bytes), _copies(dense_bytes)
    Vs = [(torch.randn(r, n, device="cuda") / n**0.5).to(dt) for _ in range(k_lr)]
    Us = [(torch.randn(m, r, device="cuda") / r**0.5).to(dt) for _ in range(k_lr)]
    Ws = [(torch.randn(m, n, device="cuda") / n**0.5).to(dt) for _ in range(k_dense)]
    b = torch.randn(m, device="cuda").to(dt)
    rows = []
    for T in ts:
        x = torch.randn(T, n, device="cuda").to(dt)
        io_bytes = 2 * T * (n + m)
        ref = (x.double() @ Vs[0].double().T) @ Us[0].double().T + b.double()
        burst = max(24, k_lr)
        for cname, fn in contenders.items():
            dense = cname == "dense"
            k = k_dense if dense else k_lr
            if dense:
                calls = [lambda x=x, w=Ws[i % k]: F.linear(x, w, b) for i in range(max(24, k))]
            else:
                calls = [lambda f=fn, x=x, u=Us[i % k], v=Vs[i % k]: f(x, u, v, b) for i in range(burst)]
            entry: dict[str, Any] = {"shape": name, "in": n, "out": m, "r": r, "T": T, "contender": cname}
            try:
                if not dense:
                    y = fn(x, Us[0], Vs[0], b)
                    entry["rel_err_vs_fp64"] = ((y.double() - ref).norm() / ref.norm()).item()
                try:
                    entry["us"] = cuda_graph_median(calls) * 1e3
                    entry["timing"] = "cuda_graph"
                except Exception as exc:  # e.g. a path that cannot be captured: time it eagerly
                    entry["graph_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                    entry["us"] = do_bench_median(calls[0]) * 1e3
                    entry["timing"] = "do_bench_l2_flushed"
            except Exception as exc:
                entry["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                rows.append(entry)
                continue
            nbytes = (dense_bytes if dense else lr_bytes) + io_bytes
            entry["bytes"] = nbytes
            entry["achieved_tbps"] = nbytes / entry["us"] / 1e6
            entry["pct_of_floor"] = 100 * (nbytes / device_peaks().tbps / 1e6) / entry["us"]
            rows.append(entry)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--t", type=str, default="1,2,4,8")
    ap.add_argument("--out", type=str, default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.kernels.csrc_gemv needs a CUDA GPU")
    from lowrank_kernels import _ext

    _ext.load()
    contenders: dict[str, Callable] = {
        "ext": lambda x, U, V, b: _ext.lowrank_gemv(x, U, V, b),
        "ext_nopdl": lambda x, U, V, b: _ext.lowrank_gemv(x, U, V, b, pdl=False),
        "dense": None,
        "torch_2gemm": lambda x, U, V, b: F.linear(F.linear(x, V), U, b),
    }
    try:
        from lowrank_kernels.lowrank_matmul import lowrank_matmul_launch

        contenders["triton_fused"] = lambda x, U, V, b: lowrank_matmul_launch(
            x, U, V, b, backend="triton_fused"
        )
    except Exception as exc:  # not importable here: reported, not fatal
        print(f"triton lowrank_matmul unavailable: {exc}")

    peaks = device_peaks()
    ts = [int(s) for s in args.t.split(",")]
    rows = []
    for name, n, m, r in SHAPES:
        rows += bench_shape(name, n, m, r, ts, contenders)
        torch.cuda.empty_cache()
    payload = {"floor": peaks.as_dict(), "measured_copy_tbps": peaks.tbps, "rows": rows, "env": env_info()}
    path = write_result(f"csrc_gemv_{gpu_slug()}", payload, args.out)
    print(f"wrote {path}; measured copy bandwidth {peaks.tbps:.2f} TB/s")
    for r in rows:
        if "error" in r:
            print(f"{r['shape']} T={r['T']} {r['contender']}: ERROR {r['error']}")
    names = [c for c in contenders]
    print(f"\nµs per call (CUDA graph, rotating weights); ext %floor at {peaks.tbps:.2f} TB/s (measured copy); "
          "ext err vs fp64")
    header = " ".join(f"{c:>12s}" for c in names)
    print(f"{'shape':20s} {'T':>2} {header} {'ext%floor':>9} {'ext err':>8}")
    for name, *_ in SHAPES:
        for T in ts:
            sel = {r["contender"]: r for r in rows if r["shape"] == name and r["T"] == T}
            cells = " ".join(
                f"{sel[c]['us']:12.2f}" if c in sel and "us" in sel[c] else f"{'-':>12s}" for c in names
            )
            e = sel.get("ext", {})
            print(
                f"{name:20s} {T:2d} {cells} {e.get('pct_of_floor', float('nan')):8.1f}% "
                f"{e.get('rel_err_vs_fp64', float('nan')):8.1e}"
            )


if __name__ == "__main__":
    main()
