"""One device call: the dispatch table of this GPU from ``compress.tune``, checked by the per-layer sweep.

    PYTHONUNBUFFERED=1 python -m bench.tools.tune_device --out $OUT --tune-s 100 --sweep-s 80

Steps: (0) environment, device key, the copy-bandwidth and bf16-GEMM ceilings; (1) the fused
kernel's grid barrier once in a subprocess with a timeout (a deadlock cannot eat the session;
if it fails only two-launch fused configs are tuned); (2) ``compress.tune.tune_shapes`` (the code
behind ``python -m compress tune``) over the layer shapes of ``compress.speed``'s LLaMA-7B and
SmolLM2 models at 50% and 40%, then the ``bench.kernels.lowrank`` shapes, 50% ranks first, aligned and raw,
then 25% and 75%, within ``--tune-s``; the table goes to
``<out>/lowrank_matmul.<device key>.json``, the file to ship in kernels/configs/; (3) the
``bench.kernels.lowrank`` sweep at 50% ranks with that table alone (no cache), floors at the measured copy
bandwidth, and ``bench.tools.tune_lowrank.merge_dense`` (side-by-side dense timings, latency model) into
the table; (4) ``<out>/lowrank_<gpu>.json`` and a summary: every sweep point's dispatch against
min(dense, torch's two GEMMs), with and without a dense copy available.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

import bench.kernels.lowrank as bl
from bench.tools.tune_lowrank import barrier_smoke, ceilings, merge_dense
from compress.timing import env_info, gpu_slug, write_result


def e2e_shapes(sizes: tuple[float, ...] = (0.5, 0.4)) -> list[tuple[int, int, int]]:
    """(in, out, rank) of the factorized layers of compress.speed's llama7b and smollm2_shape models."""
    from compress.speed import SHAPES, uniform_rank

    out: list[tuple[int, int, int]] = []
    for size in sizes:
        for name in ("llama7b", "smollm2_shape"):
            spec = SHAPES[name]
            h, inter = spec["hidden_size"], spec["intermediate_size"]
            kv = h // spec["num_attention_heads"] * spec["num_key_value_heads"]
            for o, i in ((h, h), (kv, h), (inter, h), (h, inter)):
                r = uniform_rank(o, i, size, 32)
                if r is not None:
                    out.append((i, o, r))
    return list(dict.fromkeys(out))


def sweep_shapes() -> list[tuple[int, int, int]]:
    """The e2e models' shapes, then the bench.kernels.lowrank shapes: 50% ranks (aligned, raw), then 25%, 75%."""
    out: list[tuple[int, int, int]] = e2e_shapes()
    for fracs in ([0.5], [0.25, 0.75]):
        for _name, n, m in bl.SHAPES:
            out += [(n, m, r) for frac, r, _aligned in bl.ranks_for(n, m) if frac in fracs]
    return list(dict.fromkeys(out))


def report(records: list[dict], log) -> dict:
    """Ratios of the dispatch to min(dense, torch two-GEMM): factorized only, and with a dense copy."""
    rows = []
    for r in records:
        best = min(r.get("dense_ms", float("inf")), r["torch_two_gemm_ms"])
        rows.append({"shape": r["shape"], "r": r["r"], "T": r["T"], "backend": r["backend"],
                     "vs_two_gemm": r["lowrank_ms"] / r["torch_two_gemm_ms"],
                     "fallback_vs_best": r.get("fallback_ms", float("nan")) / best,
                     "uses_dense": r.get("fallback_uses_dense")})
    slow_2g = [x for x in rows if x["vs_two_gemm"] > 1.05]
    slow_best = [x for x in rows if x["fallback_vs_best"] > 1.05]
    log(f"[sweep] {len(rows)} points; factorized dispatch > 5% slower than torch two-GEMM at {len(slow_2g)}; "
        f"dispatch with a dense copy > 5% slower than min(dense, two-GEMM) at {len(slow_best)}")
    for x in sorted(slow_best, key=lambda x: -x["fallback_vs_best"])[:10]:
        log(f"  {x['shape']:16s} r={x['r']:5d} T={x['T']:5d} {x['backend']:12s} dense? {x['uses_dense']} "
            f"ratio {x['fallback_vs_best']:.2f}")
    log(f"{'shape':16s} {'r':>5s} {'T':>5s} {'backend':12s} {'ours us':>8s} {'2gemm':>8s} {'dense':>8s} "
        f"{'fb us':>8s} {'xDense':>6s} {'%floor':>6s}")
    for r in records:
        if r["param_fraction"] == 0.5 and r["aligned"]:
            log(f"{r['shape']:16s} {r['r']:5d} {r['T']:5d} {r['backend']:12s} {r['lowrank_ms'] * 1e3:8.1f} "
                f"{r['torch_two_gemm_ms'] * 1e3:8.1f} {r.get('dense_ms', float('nan')) * 1e3:8.1f} "
                f"{r.get('fallback_ms', float('nan')) * 1e3:8.1f} {r['speedup_vs_dense']:6.2f} "
                f"{r['pct_of_floor']:6.1f}")
    return {"points": len(rows), "slower_than_two_gemm_5pct": len(slow_2g),
            "fallback_slower_than_best_5pct": len(slow_best), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/results")))
    ap.add_argument("--tune-s", type=float, default=100)
    ap.add_argument("--sweep-s", type=float, default=80)
    ap.add_argument("--tokens", default="1,4,8,16,64,256,1024,4096,8192")
    args = ap.parse_args()
    from lowrank_kernels import dispatch, tuning
    from lowrank_kernels.tuning import device_key, device_properties

    import compress.tune as ct

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)

    t0 = time.time()
    env = env_info()
    dev = device_properties(torch.cuda.get_device_properties(0))
    key = device_key(dev)
    log(json.dumps(env))
    log(f"[device] {key} {json.dumps(dev)}")
    ceil = ceilings()
    log(f"[ceilings] copy {ceil['copy_tbps']:.2f} TB/s, bf16 GEMM {ceil['bf16_gemm_tflops']:.0f} TFLOP/s")
    ct.BARRIER_OK = barrier_smoke(timeout=90)
    log(f"[time] {time.time() - t0:.0f}s before tuning")
    tokens = [int(t) for t in args.tokens.split(",")]
    table = ct.tune_shapes(sweep_shapes(), tokens, budget_s=args.tune_s, log=log)
    table.update(generated_by="bench/tools/tune_device.py (compress.tune.tune_shapes over the bench.kernels.lowrank "
                              "shapes)",
                 ceilings=ceil, barrier_ok=ct.BARRIER_OK)
    tpath = out / f"lowrank_matmul.{key}.json"
    tpath.write_text(json.dumps(table, indent=1) + "\n")
    log(f"[time] {time.time() - t0:.0f}s after tuning ({len(table['entries'])} shapes, {len(table['skipped'])} "
        f"left out); table -> {tpath}")
    # The sweep runs the dispatch with this table alone.
    os.environ["LOWRANK_TUNING_DIR"] = "off"
    only = Path(tempfile.mkdtemp(prefix="tables-"))
    (only / tpath.name).write_text(tpath.read_text())
    tuning.CONFIG_DIR = only
    dispatch.reload_tables()
    assert dispatch.dispatch_info(torch.device("cuda", 0))["trust"] == "exact"
    bl.PEAK_TBPS = ceil["copy_tbps"]
    bl.PARAM_FRACTIONS = [0.5]
    records = bl.run_sweep(deadline=time.time() + args.sweep_s, log=log)
    merge_dense(table, records, log)
    tpath.write_text(json.dumps(table, indent=1) + "\n")
    summary = report(records, log)
    write_result(f"lowrank_{gpu_slug()}", {
        "records": records, "summary": {k: v for k, v in summary.items() if k != "rows"},
        "ceilings": ceil, "barrier_ok": ct.BARRIER_OK, "device": dev, "device_key": key,
        "table": tpath.name, "floor": {"tbps": bl.PEAK_TBPS, "tflops": bl.PEAK_TFLOPS}, "env": env}, out)
    log(f"[time] total {time.time() - t0:.0f}s")
    (out / "tune_device_log.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
