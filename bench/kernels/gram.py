"""Benchmark of ``kernels.gram.gram_accumulate`` (G += XᵀX, fp32 accumulator, bf16 tokens).

``python -m bench.kernels.gram [--n 16384] [--d 576,1536,4096,11008] [--tune] [--out DIR]`` (needs CUDA).

Contenders, per d, at N tokens of bf16 ``randn`` activations:

* ``ours``: ``gram_accumulate`` with its default configuration (upper-triangle tiles only,
  mirrored; exactly symmetric, accumulates into G);
* ``torch_mm_out_fp32``: ``torch.mm(X.T, X, out_dtype=torch.float32)``, the peer: a full
  GEMM into a fresh fp32 matrix (no accumulation, no symmetry guarantee);
* ``torch_addmm_fp32``: ``G.addmm_(X.T.float(), X.float())``, the plain fp32 way to
  accumulate (upcast included).

Reported per contender: median latency (``triton.testing.do_bench``, L2 flushed between
calls), TFLOP/s counted as SYRK (N·d·(d+1) flops: the half product that is needed) and as
full GEMM (2·N·d² flops: what the peer computes), the percentage of the floor, the peak of
extra device memory during one call, the relative Frobenius error against an fp64
product, and whether the result is exactly symmetric.  The floor is
max(SYRK flops / measured dense bf16 peak, bytes / measured copy bandwidth), both ceilings
measured in the same run.

``--tune`` also times a set of alternative tile configurations and split-K factors and
reports the best (the defaults in ``kernels/gram.py`` were chosen this way).

Writes ``<out>/gram_<gpu>.json`` and ``<out>/gram_<gpu>.png`` (``--out`` defaults to
``bench/results``, or ``$BENCH_RESULTS_DIR``).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from lowrank_kernels.gram import GramConfig, default_config, gram_accumulate, gram_accumulate_batched

from compress.timing import RESULTS_DIR, do_bench_median, env_info, gpu_slug, peak_extra_bytes, write_result

D_VALUES = (576, 1536, 4096, 11008)


def measure_ceilings() -> dict[str, float]:
    """Dense bf16 matmul rate and device-to-device copy bandwidth, measured here."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    tflops = 2 * 8192**3 / do_bench_median(lambda: torch.mm(a, b)) / 1e9
    src = torch.randn(256 * 2**20, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    tbps = 2 * src.numel() * 4 / do_bench_median(lambda: dst.copy_(src)) / 1e9
    return {"bf16_mm_tflops": tflops, "copy_tbps": tbps}


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm()).item()




def tune_candidates(d: int) -> list[GramConfig]:
    tma = [
        GramConfig(128, 128, 64, num_warps=4, num_stages=3, tma=True),
        GramConfig(128, 128, 64, num_warps=4, num_stages=4, tma=True),
        GramConfig(128, 128, 64, num_warps=8, num_stages=3, tma=True),
        GramConfig(128, 128, 64, num_warps=8, num_stages=4, tma=True),
        GramConfig(128, 256, 64, num_warps=8, num_stages=3, tma=True),
        GramConfig(128, 128, 64, num_warps=8, num_stages=4, tma=True, persistent=1),
        GramConfig(128, 128, 64, num_warps=4, num_stages=4, tma=True, persistent=2),
        GramConfig(128, 128, 64, num_warps=8, num_stages=3, tma=True, warp_specialize=True),
        GramConfig(128, 128, 64, num_warps=4, num_stages=3, tma=True, warp_specialize=True),
    ]
    big = [
        GramConfig(128, 128, 64, num_warps=8, num_stages=3),
        GramConfig(128, 128, 64, num_warps=8, num_stages=4),
        GramConfig(128, 128, 64, num_warps=4, num_stages=4),
        GramConfig(128, 256, 64, num_warps=8, num_stages=3),
        GramConfig(256, 128, 64, num_warps=8, num_stages=3),
        GramConfig(128, 128, 64, num_warps=8, num_stages=3, mirror="separate"),
        GramConfig(128, 128, 64, num_warps=8, num_stages=3, group=4),
        GramConfig(128, 128, 64, num_warps=8, num_stages=3, group=16),
        GramConfig(128, 128, 128, num_warps=8, num_stages=2),
        GramConfig(128, 128, 64, num_warps=4, num_stages=3),
    ]
    if d >= 4096:
        # Pointer configurations that were within 10% of the best in the first sweep.
        return tma + [big[2], big[3], big[-1]]
    small = []
    bases = (
        GramConfig(128, 128, 64, num_warps=8, num_stages=3),
        GramConfig(64, 64, 64, num_warps=4, num_stages=4),
        GramConfig(64, 64, 64, num_warps=4, num_stages=4, tma=True),
    )
    for base in bases:
        for split in (None, 4, 8):
            small.append(GramConfig(**{**asdict(base), "split_k": split}))
    return small


def bench_d(d: int, n: int, peak_tflops: float, copy_tbps: float, tune: bool) -> dict[str, Any]:
    gen = torch.Generator(device="cuda").manual_seed(d)
    X = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    g = torch.randn(d, d, device="cuda", generator=gen)
    G0 = g + g.T
    del g
    ref = G0.double() + X.double().T @ X.double()
    ref_prod = ref - G0.double()

    syrk_flops = n * d * (d + 1)
    gemm_flops = 2 * n * d * d
    bytes_min = n * d * 2 + 2 * d * d * 4  # X once; G read and written once
    floor_ms = max(syrk_flops / peak_tflops / 1e9, bytes_min / copy_tbps / 1e9)

    def row(name: str, fn, result_fn, err_ref: torch.Tensor, cfg: GramConfig | None = None) -> dict[str, Any]:
        try:
            out = result_fn()
            torch.cuda.synchronize()
            err = _rel(out, err_ref)
            sym = bool(torch.equal(out, out.T))
            del out
            ms = do_bench_median(fn)
            mem = peak_extra_bytes(fn)
        except Exception as exc:  # a config that fails to compile must not end the sweep
            err = f"{type(exc).__name__}: {str(exc)[:300]}"
            return {"name": name, "error": err, "config": cfg and asdict(cfg)}
        return {
            "name": name,
            "config": cfg and asdict(cfg),
            "ms": ms,
            "tflops_syrk": syrk_flops / ms / 1e9,
            "tflops_gemm_equiv": gemm_flops / ms / 1e9,
            "pct_of_floor": 100 * floor_ms / ms,
            "peak_extra_mib": mem / 2**20,
            "rel_err_vs_fp64": err,
            "exactly_symmetric": sym,
        }

    G = G0.clone()

    def ours_with(cfg: GramConfig | None):
        def result():
            out = G0.clone()
            gram_accumulate(out, X, config=cfg)
            return out

        return (lambda: gram_accumulate(G, X, config=cfg)), result

    rows = []
    fn, res = ours_with(None)
    rows.append(row("ours", fn, res, ref, default_config(d, X.dtype)))
    rows.append(
        row(
            "torch_mm_out_fp32",
            lambda: torch.mm(X.T, X, out_dtype=torch.float32),
            lambda: torch.mm(X.T, X, out_dtype=torch.float32),
            ref_prod,
        )
    )
    rows.append(
        row(
            "torch_addmm_fp32",
            lambda: G.addmm_(X.T.float(), X.float()),
            lambda: G0.clone().addmm_(X.T.float(), X.float()),
            ref,
        )
    )
    tuned = []
    if tune:
        for cfg in tune_candidates(d):
            fn, res = ours_with(cfg)
            tuned.append(row("ours_tune", fn, res, ref, cfg))
    peer = rows[1].get("ms")
    for r in rows + tuned:
        if "ms" in r and peer:
            r["speedup_vs_torch_mm_out_fp32"] = peer / r["ms"]
    ok = [r for r in tuned if "ms" in r]
    best = min(ok, key=lambda r: r["ms"]) if ok else None
    return {
        "d": d,
        "n": n,
        "floor_ms": floor_ms,
        "syrk_flops": syrk_flops,
        "gemm_flops": gemm_flops,
        "rows": rows,
        "tune": tuned,
        "best_tuned": best,
    }


def bench_batched(d: int = 4096, n: int = 4096, layers: int = 4) -> dict[str, Any]:
    """One launch for several layers vs one call per layer (same default config)."""
    Xs = [torch.randn(n, d, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]
    Gs = [torch.zeros(d, d, device="cuda") for _ in range(layers)]

    def loop():
        for g, x in zip(Gs, Xs, strict=True):
            gram_accumulate(g, x)

    ms_loop = do_bench_median(loop)
    ms_batched = do_bench_median(lambda: gram_accumulate_batched(Gs, Xs))
    return {"d": d, "n": n, "layers": layers, "ms_loop": ms_loop, "ms_batched": ms_batched}


def plot(payload: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ds = [r["d"] for r in payload["results"]]
    names = ["ours", "torch_mm_out_fp32", "torch_addmm_fp32"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.25
    for i, name in enumerate(names):
        tf = []
        for res in payload["results"]:
            r = next((r for r in res["rows"] if r["name"] == name), {})
            tf.append(r.get("tflops_gemm_equiv", 0.0))
        axes[0].bar([j + i * width for j in range(len(ds))], tf, width, label=name)
    axes[0].set_xticks([j + width for j in range(len(ds))], [str(d) for d in ds])
    axes[0].set_xlabel("d")
    axes[0].set_ylabel("TFLOP/s counted as full GEMM (2·N·d²)")
    axes[0].set_title(f"G += XᵀX, N={payload['n']}, bf16 in, fp32 out")
    axes[0].legend(fontsize=8)
    sp = []
    for res in payload["results"]:
        r = next((r for r in res["rows"] if r["name"] == "ours"), {})
        sp.append(r.get("speedup_vs_torch_mm_out_fp32", 0.0))
    axes[1].bar([str(d) for d in ds], sp, color="tab:green")
    axes[1].axhline(1.6, ls="--", color="k", lw=1, label="target 1.6x")
    axes[1].set_xlabel("d")
    axes[1].set_ylabel("speedup vs torch.mm(out_dtype=fp32)")
    axes[1].legend(fontsize=8)
    fig.suptitle(payload["env"].get("gpu", ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--d", type=str, default=",".join(map(str, D_VALUES)))
    ap.add_argument("--tune", action="store_true", help="also time alternative configurations")
    ap.add_argument("--out", type=str, default=None)
    ap.add_argument(
        "--write-best",
        type=str,
        default=None,
        help="with --tune: write {d: fastest config} as JSON (the LOWRANK_GRAM_CONFIG format)",
    )
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.kernels.gram needs a CUDA GPU")
    out_dir = Path(args.out or os.environ.get("BENCH_RESULTS_DIR") or RESULTS_DIR)
    ceil = measure_ceilings()
    torch.cuda.empty_cache()
    print(f"ceilings: bf16 mm {ceil['bf16_mm_tflops']:.0f} TFLOP/s, copy {ceil['copy_tbps']:.2f} TB/s")
    results = []
    for d in (int(s) for s in args.d.split(",")):
        res = bench_d(d, args.n, ceil["bf16_mm_tflops"], ceil["copy_tbps"], args.tune)
        torch.cuda.empty_cache()
        results.append(res)
        for r in res["rows"] + res["tune"]:
            if "error" in r:
                print(f"d={d:6d} {r['name']:18s} {r.get('config')} ERROR {r['error']}")
    payload = {
        "n": args.n,
        "ceilings": ceil,
        "results": results,
        "batched": [bench_batched(), bench_batched(d=576, n=2048, layers=8)],
        "env": env_info(),
    }
    path = write_result(f"gram_{gpu_slug()}", payload, out_dir)
    plot(payload, out_dir / f"gram_{gpu_slug()}.png")
    print(f"wrote {path}")
    if args.write_best:
        best = {str(res["d"]): res["best_tuned"]["config"] for res in results if res["best_tuned"]}
        Path(args.write_best).write_text(json.dumps(best))

    if args.tune:
        print("\ntuning (d, config, ms, speedup vs torch.mm out fp32, err):")
        for res in results:
            for r in res["tune"]:
                if "ms" in r:
                    c = r["config"]
                    print(
                        f"  d={res['d']:6d} {c['block_m']}x{c['block_n']}x{c['block_k']} w{c['num_warps']} "
                        f"s{c['num_stages']} g{c['group']} split={c['split_k']} {c['mirror'][:3]} "
                        f"tma={int(c['tma'])} p{c['persistent']} ws={int(c['warp_specialize'])} "
                        f"{r['ms']:8.3f} ms {r.get('speedup_vs_torch_mm_out_fp32', 0):5.2f}x "
                        f"err {r['rel_err_vs_fp64']:.1e}"
                    )
    for b in payload["batched"]:
        print(
            f"batched {b['layers']} x d={b['d']} N={b['n']}: "
            f"loop {b['ms_loop']:.3f} ms, one launch {b['ms_batched']:.3f} ms"
        )
    print(f"\nN={args.n}, bf16 X, fp32 G; TFLOP/s as SYRK (N·d·(d+1)) / as full GEMM (2·N·d²)")
    print(
        f"{'d':>6} {'contender':18s} {'ms':>8} {'syrk TF':>8} {'gemm TF':>8} {'%floor':>7} {'xpeer':>6} "
        f"{'err':>8} {'sym':>4} {'MiB':>7}"
    )
    for res in results:
        for r in res["rows"] + ([res["best_tuned"]] if res["best_tuned"] else []):
            if "ms" not in r:
                continue
            name = r["name"] if r["name"] != "ours_tune" else "best_tuned"
            print(
                f"{res['d']:6d} {name:18s} {r['ms']:8.3f} {r['tflops_syrk']:8.0f} "
                f"{r['tflops_gemm_equiv']:8.0f} {r['pct_of_floor']:6.1f}% "
                f"{r.get('speedup_vs_torch_mm_out_fp32', 0):6.2f} {r['rel_err_vs_fp64']:8.1e} "
                f"{str(r['exactly_symmetric'])[0]:>4} {r['peak_extra_mib']:7.1f}"
            )


if __name__ == "__main__":
    main()
