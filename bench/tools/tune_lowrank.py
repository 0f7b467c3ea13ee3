"""One-shot GPU session for ``lowrank_kernels.lowrank_matmul``: check, tune, write the dispatch table, benchmark.

Run on the device machine (one call, bounded by ``--budget-s``)::

    PYTHONUNBUFFERED=1 python -m bench.tools.tune_lowrank --out $OUT --budget-s 420

Steps: (0) measure the copy-bandwidth and bf16-GEMM ceilings; (1) run the fused kernel's grid
barrier once in a subprocess with a timeout, so a deadlock cannot eat the session; (2) check
every backend/config against an fp64 reference (NaN-poisoned outputs); (3) time the candidate
configs at aligned ranks for every shape and T bucket, then a short list at raw ranks, and
write ``lowrank_matmul.<device key>.json`` (``lowrank_kernels.tuning``); (4) run the
``bench.kernels.lowrank`` sweep with that table and print a summary table last.  Candidate outputs are
checked before they are timed, so a config that computes a wrong answer can never win.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.kernels.lowrank import (
    SHAPES,
    T_VALUES,
    WeightSet,
    floor_ms,
    plot,
    ranks_for,
    run_sweep,
    time_rotating,
)
from compress.timing import env_info, gpu_slug, write_result

LOG: list[str] = []
OUT = Path(".")


def log(msg: str) -> None:
    print(msg, flush=True)
    LOG.append(msg)


def flush_log() -> None:
    (OUT / "tune_log.txt").write_text("\n".join(LOG) + "\n")


def ceilings() -> dict[str, float]:
    """Measured copy bandwidth (read + write bytes) and bf16 dense GEMM rate."""
    n = 1 << 29  # 1 GiB of bf16
    src = torch.randn(n // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = time_rotating([lambda: dst.copy_(src)], min_burst_ms=5)
    tbps = 2 * src.numel() * 2 / (ms * 1e-3) / 1e12
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = time_rotating([lambda: x @ w], min_burst_ms=10)
    tflops = 2 * 8192**3 / (ms * 1e-3) / 1e12
    return {"copy_tbps": tbps, "bf16_gemm_tflops": tflops}


_SMOKE = r"""
import torch
from lowrank_kernels.lowrank_matmul import lowrank_matmul_launch, lowrank_matmul_ref
torch.manual_seed(0)
for (T, n, m, r) in [(1, 4096, 4096, 1024), (16, 576, 1536, 209), (1, 77, 45, 13)]:
    x = torch.randn(T, n, device="cuda", dtype=torch.bfloat16)
    U = torch.randn(m, r, device="cuda", dtype=torch.bfloat16) / r ** .5
    V = torch.randn(r, n, device="cuda", dtype=torch.bfloat16) / n ** .5
    for it in range(50):
        y = lowrank_matmul_launch(x, U, V, backend="triton_fused", config={"sync": "barrier"})
    torch.cuda.synchronize()
    ref = lowrank_matmul_ref(x.double(), U.double(), V.double())
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err < 2e-2, err
print("BARRIER_OK")
"""


def barrier_smoke(timeout: float = 120) -> bool:
    repo = Path(__file__).resolve().parents[2]
    try:
        p = subprocess.run([sys.executable, "-c", _SMOKE], cwd=repo, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        log("[smoke] fused barrier kernel TIMED OUT (deadlock?) -> barrier disabled for tuning")
        return False
    ok = "BARRIER_OK" in p.stdout
    log(f"[smoke] fused barrier kernel: {'ok' if ok else 'FAILED'}")
    if not ok:
        log(p.stdout[-2000:] + p.stderr[-4000:])
    return ok


def check_correctness() -> list[dict[str, Any]]:
    """Every backend vs an fp64 reference; error must be <= 2x torch's own error (+ eps)."""
    from lowrank_kernels.lowrank_matmul import lowrank_matmul_launch

    cases = [(1, 77, 45, 13, True), (3, 77, 45, 13, True), (17, 96, 200, 40, True),
             (1, 4096, 4096, 1024, False), (16, 4096, 11008, 1492, True), (64, 11008, 4096, 1472, False),
             (300, 576, 1536, 209, True)]
    backends: list[tuple[str, dict | None]] = [
        ("triton_fused", {"sync": "barrier"}),
        ("triton_fused", {"sync": "barrier", "early_u": True, "block_r2": 1024, "num_warps": 16}),
        ("triton_fused", {"sync": "two_launch"}),
        ("triton_fused", {"sync": "local"}),
        ("triton_fused", {"use_dot": True, "block_t": 16, "block_r1": 16, "block_k1": 256, "block_r2": 128}),
        ("two_gemm", {"gemm1": {"block_m": 64, "block_n": 64, "block_k": 64, "split_k": 4},
                      "gemm2": {"block_m": 64, "block_n": 128, "block_k": 64}}),
        ("two_gemm", {"gemm1": "cublas", "gemm2": {"block_m": 128, "block_n": 128, "block_k": 64}}),
        ("cublas", None),
        ("auto", None),
    ]
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        for T, n, m, r, has_bias in cases:
            g = torch.Generator(device="cuda").manual_seed(T * 1000 + r)
            x = torch.randn(2, T, n, device="cuda", dtype=dtype, generator=g)
            U = torch.randn(m, r, device="cuda", dtype=dtype, generator=g) / math.sqrt(r)
            V = torch.randn(r, n, device="cuda", dtype=dtype, generator=g) / math.sqrt(n)
            b = torch.randn(m, device="cuda", dtype=dtype, generator=g) if has_bias else None
            ref = F.linear(F.linear(x.double(), V.double()), U.double(), None if b is None else b.double())
            t_err = ((F.linear(F.linear(x, V), U, b).double() - ref).norm() / ref.norm()).item()
            for backend, cfg in backends:
                if cfg and cfg.get("sync") == "local" and r * n > 4_000_000:
                    continue
                out = torch.full((2, T, m), float("nan"), device="cuda", dtype=dtype)
                try:
                    lowrank_matmul_launch(x, U, V, b, backend=backend, config=cfg, out=out)
                    torch.cuda.synchronize()
                    err = ((out.double() - ref).norm() / ref.norm()).item()
                    ok = bool(torch.isfinite(out).all()) and err <= 2 * t_err + 1e-6
                except Exception as exc:  # noqa: BLE001
                    err, ok = float("nan"), False
                    log(f"[check] {backend} {cfg} raised {exc!r}"[:600])
                rows.append({"dtype": str(dtype), "T": T, "n": n, "m": m, "r": r, "backend": backend,
                             "config": cfg, "err": err, "torch_err": t_err, "ok": ok})
                if not ok:
                    log(f"[check] FAIL {dtype} T={T} {n}->{m} r={r} {backend} {cfg}: err={err:.3e} "
                        f"torch={t_err:.3e}")
    n_ok = sum(r["ok"] for r in rows)
    log(f"[check] {n_ok}/{len(rows)} backend/case/dtype combinations pass")
    return rows


def label(backend: str, cfg: dict | None) -> str:
    if not cfg:
        return backend
    if backend == "two_gemm":
        def one(c: Any) -> str:
            if c == "cublas":
                return "cb"
            return f"t{c['block_m']}x{c['block_n']}x{c['block_k']}s{c.get('split_k', 1)}w{c['num_warps']}"
        return f"2g[{one(cfg['gemm1'])}|{one(cfg['gemm2'])}]" + ("pad" if cfg.get("pad_u") else "")
    keys = ("use_dot", "block_t", "block_r1", "block_k1", "block_m2", "block_r2", "num_warps", "sync",
            "early_u", "programs_per_sm", "prefetch", "cooperative")
    short = {"use_dot": "dot", "block_t": "t", "block_r1": "r1", "block_k1": "k1", "block_m2": "m2",
             "block_r2": "r2", "num_warps": "w", "sync": "", "early_u": "eu", "programs_per_sm": "pps",
             "prefetch": "pf", "cooperative": "coop"}
    return "F:" + ",".join(f"{short[k]}{cfg[k]}" for k in keys if k in cfg)


def candidates(T: int, n: int, m: int, r: int, barrier_ok: bool) -> list[tuple[str, dict]]:
    from lowrank_kernels.dispatch import fused_candidates, gemm_candidates

    out: list[tuple[str, dict]] = []
    aligned = r % 8 == 0
    if T <= 64:
        for c in fused_candidates(T):
            c = dict(c)
            if not barrier_ok and c.get("sync", "barrier") == "barrier":
                c["sync"] = "two_launch"
            out.append(("triton_fused", c))
        if 2 * r * n <= 4_000_000:
            out.append(("triton_fused", dict(fused_candidates(T)[0], sync="local")))
    out.append(("two_gemm", {"gemm1": "cublas", "gemm2": "cublas"}))
    if T >= 16:
        g1, g2 = gemm_candidates(T, 1), gemm_candidates(T, 2)
        out.append(("two_gemm", {"gemm1": "cublas", "gemm2": g2[0]}))
        if not aligned or T <= 64:
            out.append(("two_gemm", {"gemm1": g1[-1] if T <= 64 else g1[0], "gemm2": g2[0]}))
        if not aligned:
            out.append(("two_gemm", {"gemm1": "cublas", "gemm2": g2[1]}))
            out.append(("two_gemm", {"gemm1": g1[0], "gemm2": "cublas"}))
    return out


def time_candidate(ws: WeightSet, x: torch.Tensor, backend: str, cfg: dict) -> float:
    from lowrank_kernels.lowrank_matmul import lowrank_matmul_launch

    U0, V0 = ws.U[0], ws.V[0]
    y = lowrank_matmul_launch(x, U0, V0, backend=backend, config=cfg)
    ref = F.linear(F.linear(x.float(), V0.float()), U0.float())
    err = ((y.float() - ref).norm() / ref.norm()).item()
    if not (err < 3e-2):
        raise RuntimeError(f"wrong result (rel err {err:.3e})")
    return time_rotating([lambda U=U, V=V: lowrank_matmul_launch(x, U, V, backend=backend, config=cfg)
                          for U, V in zip(ws.U, ws.V, strict=True)])


def _dedupe(T: int, n: int, m: int, r: int, cands: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """Drop candidates that resolve to the same kernel parameters for this problem size."""
    from lowrank_kernels.lowrank_matmul import _fused_params

    seen, out = set(), []
    for backend, cfg in cands:
        key = _fused_params(T, n, m, r, cfg, 132) if backend == "triton_fused" else json.dumps([backend, cfg],
                                                                                              sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append((backend, cfg))
    return out


def tune_point(ws: WeightSet, n: int, m: int, r: int, T: int, cands: list[tuple[str, dict]]) -> dict | None:
    x = torch.randn(T, n, device="cuda", dtype=torch.bfloat16)
    results = []
    for backend, cfg in _dedupe(T, n, m, r, cands):
        try:
            ms = time_candidate(ws, x, backend, cfg)
        except Exception as exc:  # noqa: BLE001 - a failing config is reported and skipped
            log(f"  [tune] {label(backend, cfg)} failed: {exc!r}"[:400])
            continue
        results.append((ms, backend, cfg))
    if not results:
        return None
    results.sort(key=lambda t: t[0])
    ms, backend, cfg = results[0]
    cublas = {"gemm1": "cublas", "gemm2": "cublas"}
    cub = next((t[0] for t in results if t[1] == "two_gemm" and t[2] == cublas), float("nan"))
    log(f"  T={T:5d} best {label(backend, cfg):60s} {ms * 1e3:8.1f}us  cublas2g {cub * 1e3:8.1f}us  "
        f"floor {floor_ms(T, n, m, r) * 1e3:6.1f}us  ({len(results)} cands)")
    return {"backend": backend, "config": cfg, "ms": ms,
            "candidates": [[label(b, c), t] for t, b, c in results[:8]]}


def tune(deadline: float, barrier_ok: bool) -> dict[str, dict]:
    from lowrank_kernels.dispatch import config_key

    entries: dict[str, dict] = {}
    # Priority order (the deadline may cut the tail): LLaMA at 50 % (the targets), aligned then
    # raw; SmolLM at 50 %; then the 25 / 75 % ranks.  Untuned ranks borrow the nearest tuned
    # rank of the same shape and alignment class at dispatch time.
    jobs: list[tuple[str, int, int, float, int]] = []
    for fracs in ([0.5], [0.25, 0.75]):
        for group in (SHAPES[:3], SHAPES[3:]):
            for name, n, m in group:
                for frac, r, _aligned in ranks_for(n, m):
                    if frac in fracs:
                        jobs.append((name, n, m, frac, r))
    for name, n, m, frac, r in jobs:
        ws = WeightSet(n, m, r, torch.bfloat16, seed=r + n, dense=False)
        log(f"[tune] {name} n={n} m={m} r={r} ({int(frac * 100)}%{'' if r % 8 == 0 else ', raw'})")
        for T in T_VALUES:
            if time.time() > deadline:
                log("[tune] deadline reached; remaining points use the nearest tuned rank or heuristics")
                return entries
            e = tune_point(ws, n, m, r, T, candidates(T, n, m, r, barrier_ok))
            if e:
                entries.setdefault(config_key(n, m, r), {})[str(T)] = e
        del ws
        torch.cuda.empty_cache()
        flush_log()
    return entries


def refine_misaligned(table: dict, deadline: float) -> None:
    """Second pass for raw (not 8-aligned) ranks at T >= 64: table choice vs plain cuBLAS vs
    cuBLAS on a per-call zero-padded U; the fastest measured one goes into the table."""
    from lowrank_kernels import dispatch
    entries = table.setdefault("entries", {})
    for name, n, m in SHAPES:
        for frac, r, _aligned in ranks_for(n, m):
            if r % 8 == 0:
                continue
            ws = WeightSet(n, m, r, torch.bfloat16, seed=r + n, dense=False)
            log(f"[refine] {name} n={n} m={m} r={r} ({int(frac * 100)}%, raw)")
            for T in (64, 256, 1024, 4096, 8192):
                if time.time() > deadline:
                    log("[refine] deadline reached")
                    return
                x = torch.randn(T, n, device="cuda", dtype=torch.bfloat16)
                dispatch._CHOICE_CACHE.clear()
                backend, cfg = dispatch.select_backend(x, ws.U[0], ws.V[0], None)
                cands = [(backend, cfg.to_dict() if cfg is not None else {}),
                         ("two_gemm", {"gemm1": "cublas", "gemm2": "cublas"}),
                         ("two_gemm", {"gemm1": "cublas", "gemm2": "cublas", "pad_u": True})]
                e = tune_point(ws, n, m, r, T, cands)
                if e:
                    entries.setdefault(dispatch.config_key(n, m, r), {})[str(T)] = e
            del ws
            torch.cuda.empty_cache()


def summary(records: list[dict[str, Any]]) -> None:
    log("")
    log("=== LLaMA-7B shapes, bf16, rank at 50% (aligned) — speedups of the dispatched path ===")
    log(f"{'shape':14s} {'r':>5s} {'T':>5s} {'backend':13s} {'ours us':>9s} {'dense us':>9s} "
        f"{'2gemm us':>9s} {'xDense':>7s} {'x2gemm':>7s} {'%floor':>7s}")
    for rec in records:
        if rec["shape"].startswith("llama") and rec["aligned"] and rec["param_fraction"] == 0.5:
            log(f"{rec['shape']:14s} {rec['r']:5d} {rec['T']:5d} {rec['backend']:13s} "
                f"{rec['lowrank_ms'] * 1e3:9.1f} {rec.get('dense_ms', float('nan')) * 1e3:9.1f} "
                f"{rec['torch_two_gemm_ms'] * 1e3:9.1f} {rec['speedup_vs_dense']:7.2f} "
                f"{rec['speedup_vs_torch_two_gemm']:7.2f} {rec['pct_of_floor']:7.1f}")
    def best(r: dict[str, Any]) -> float:
        return min(r.get("dense_ms", math.inf), r["torch_two_gemm_ms"])

    worse = [r for r in records if r["lowrank_ms"] > 1.02 * best(r)]
    log(f"points slower (>2%) than min(dense, torch 2-GEMM): {len(worse)}/{len(records)}")
    for r in sorted(worse, key=lambda r: r["lowrank_ms"] / best(r), reverse=True)[:12]:
        log(f"  {r['shape']:16s} r={r['r']:5d}{'' if r['aligned'] else '*'} T={r['T']:5d} {r['backend']:12s} "
            f"ours {r['lowrank_ms'] * 1e3:8.1f}us best-baseline {best(r) * 1e3:8.1f}us "
            f"ratio {r['lowrank_ms'] / best(r):.2f}")


def _fit_relative(rows: list[tuple[float, float, float]]) -> list[float]:
    """Non-negative ``ms ~ c0 + c1 * bytes + c2 * flops`` minimising the relative error.

    Rows are weighted by 1/ms so a 4 us layer counts as much as a 1 ms one; a coefficient that
    comes out negative is dropped and the rest refitted (a tiny active-set NNLS).
    """
    ms = torch.tensor([r[0] for r in rows], dtype=torch.float64)
    feats = torch.tensor([[1.0, r[1], r[2]] for r in rows], dtype=torch.float64)
    active = [0, 1, 2]
    while True:
        a = feats[:, active] / ms[:, None]
        sol = torch.linalg.lstsq(a, torch.ones_like(ms)[:, None]).solution[:, 0]
        if (sol >= 0).all() or len(active) == 1:
            coeffs = [0.0, 0.0, 0.0]
            for i, c in zip(active, sol.clamp_min(0).tolist(), strict=True):
                coeffs[i] = c
            return coeffs
        active.pop(int(sol.argmin()))


def merge_dense(table: dict, records: list[dict[str, Any]], log_fn=print) -> dict:
    """Add side-by-side dense timings and a fitted latency model to a dispatch table (in place).

    ``records`` is a ``bench.kernels.lowrank`` sweep: per (shape, rank, T) it timed the factorized
    dispatch (``lowrank_ms``) and dense cuBLAS (``dense_ms``) in one run.  Tuned entries get
    ``dense_ms`` and ``sweep_ms`` per T bucket (what ``dense_is_faster`` compares); the per-T
    ``latency_model`` covers shapes the table does not list.
    """
    by_key = {(r["n"], r["m"], r["r"], r["T"]): r for r in records if "dense_ms" in r}
    merged = 0
    for key, entry in table.get("entries", {}).items():
        n, rest = key.split("x")
        m, r = rest.split("r")
        for t, point in entry.items():
            rec = by_key.get((int(n), int(m), int(r), int(t)))
            if rec is not None:
                point["dense_ms"], point["sweep_ms"] = rec["dense_ms"], rec["lowrank_ms"]
                merged += 1
    model: dict[str, dict[str, list[float]]] = {}
    for t in sorted({r["T"] for r in records}):
        at_t = [r for r in by_key.values() if r["T"] == t]
        dense_rows: dict[tuple[int, int], tuple[float, float, float]] = {}
        factored_rows: dict[str, list[tuple[float, float, float]]] = {"lowrank": [], "lowrank_ragged": []}
        for r in at_t:
            n, m, rank = r["n"], r["m"], r["r"]
            io = 2.0 * t * (m + n)
            dense_rows[(n, m)] = (r["dense_ms"], 2.0 * m * n + io, 2.0 * t * m * n)
            factored_rows["lowrank" if rank % 8 == 0 else "lowrank_ragged"].append(
                (r["lowrank_ms"], 2.0 * rank * (m + n) + io, 2.0 * t * rank * (m + n)))
        if len(dense_rows) >= 3 and all(len(rows) >= 3 for rows in factored_rows.values()):
            model[str(t)] = {"dense": _fit_relative(list(dense_rows.values())),
                             **{k: _fit_relative(rows) for k, rows in factored_rows.items()}}
    table["latency_model"] = model
    table["dense_note"] = ("entries[..][T].dense_ms / sweep_ms: dense cuBLAS and the factorized dispatch timed side "
                           "by side in one bench.kernels.lowrank sweep; latency_model[T] = "
                           "{dense|lowrank|lowrank_ragged: [c0 ms, ms/byte, ms/flop]} fitted to that sweep (relative "
                           "least squares; ragged: rank % 8 != 0).")
    # Report how well the model explains the sweep it was fitted to.
    from lowrank_kernels.dispatch import predicted_ms

    wrong, total = 0, 0
    for r in by_key.values():
        if str(r["T"]) in model:
            predicted = predicted_ms(r["T"], r["n"], r["m"], None, model) < predicted_ms(
                r["T"], r["n"], r["m"], r["r"], model)
            wrong += predicted != (r["dense_ms"] < r["lowrank_ms"])
            total += 1
    log_fn(f"[dense] merged {merged} tuned points; latency model for T in {list(model)} picks the faster of "
           f"dense and factorized at {total - wrong}/{total} sweep points")
    return table


def main() -> None:
    global OUT
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/results")))
    ap.add_argument("--budget-s", type=float, default=420)
    ap.add_argument("--tune-s", type=float, default=190)
    ap.add_argument("--check", action="store_true", help="also run the backend x dtype correctness grid")
    ap.add_argument("--refine", action="store_true",
                    help="skip the full tuning: start from the shipped table and refine raw ranks")
    ap.add_argument("--merge-dense", type=Path, default=None, metavar="SWEEP_JSON",
                    help="no GPU: add the dense timings of a bench.kernels.lowrank sweep and a fitted latency model to "
                         "a shipped table (--table), then exit")
    ap.add_argument("--table", type=Path, default=None,
                    help="with --merge-dense: the table to update (default: the H100 table, "
                         "kernels/configs/lowrank_matmul.cc90_sm132_mem80g_l2_50m.json)")
    args = ap.parse_args()
    if args.merge_dense is not None:
        from lowrank_kernels.tuning import CONFIG_PATH

        path = args.table or CONFIG_PATH
        table = json.loads(path.read_text())
        merge_dense(table, json.loads(args.merge_dense.read_text())["records"])
        path.write_text(json.dumps(table, indent=1) + "\n")
        print(f"wrote {path}")
        return
    OUT = args.out
    OUT.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    env = env_info()
    log(json.dumps(env))
    ceil = {} if args.refine else ceilings()
    if ceil:
        log(f"[ceilings] copy {ceil['copy_tbps']:.2f} TB/s, bf16 GEMM {ceil['bf16_gemm_tflops']:.0f} TFLOP/s")
    barrier_ok = True if args.refine else barrier_smoke()
    checks = check_correctness() if args.check else []
    flush_log()
    log(f"[time] {time.time() - t0:.0f}s before tuning")
    if args.refine:
        from lowrank_kernels.dispatch import _table_for

        orig, trust = _table_for(torch.device("cuda", 0))
        if trust != "exact":
            raise SystemExit("--refine needs a shipped table of this device")
        refine_misaligned(orig, t0 + args.tune_s)
        entries = orig["entries"]
        env, ceil, barrier_ok = orig.get("env", env), orig.get("ceilings", {}), orig.get("barrier_ok", True)
    else:
        entries = tune(t0 + args.tune_s, barrier_ok)
    from lowrank_kernels.tuning import device_key, device_properties

    dev = device_properties(torch.cuda.get_device_properties(0))
    table = {
        "device_key": device_key(dev),
        "device": dev,
        "generated_by": "bench/tools/tune_lowrank.py",
        "note": "entries[<n>x<m>r<r>][T] = fastest measured backend/config (bf16, no bias); "
                "T is matched to the nearest bucket in log2.",
        "env": env,
        "ceilings": ceil,
        "barrier_ok": barrier_ok,
        "entries": entries,
    }
    tpath = OUT / f"lowrank_matmul.{device_key(dev)}.json"
    tpath.write_text(json.dumps(table, indent=1) + "\n")
    log(f"[time] {time.time() - t0:.0f}s after tuning; table -> {tpath}")
    # Benchmark the shipped dispatch: point the module at the fresh table.
    from lowrank_kernels import dispatch, tuning
    os.environ["LOWRANK_TUNING_DIR"] = "off"  # the fresh table alone, no per-device cache over it
    tuning.CONFIG_DIR = OUT
    dispatch.reload_tables()
    flush_log()
    records = run_sweep(deadline=t0 + args.budget_s, log=log)
    merge_dense(table, records, log)
    tpath.write_text(json.dumps(table, indent=1) + "\n")
    name = f"lowrank_{gpu_slug()}"
    write_result(name, {"records": records, "checks": checks, "ceilings": ceil, "barrier_ok": barrier_ok,
                        "env": env}, OUT)
    plot(records, OUT / f"{name}.png")
    summary(records)
    log(f"[time] total {time.time() - t0:.0f}s")
    flush_log()


if __name__ == "__main__":
    main()
