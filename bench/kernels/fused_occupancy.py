"""Does the fused decode kernel get faster with more programs per SM or deeper prefetch?

Times every T=1 candidate of ``lowrank_kernels.dispatch.fused_candidates(1)`` (plus a few
diagnostic variants) on the LLaMA-7B shapes at 50 % rank, next to dense ``F.linear`` and
torch's two GEMMs, and records per variant the compiled kernel's registers, spills, shared
memory, resident programs per SM (ours and the CUDA driver's count) and the grid it launched.

GPU (one device call, < 3 minutes)::

    python -m bench.kernels.fused_occupancy --out $OUT

No GPU (compile every variant for sm_90a, ptxas -v, H100 occupancy)::

    python -m bench.kernels.fused_occupancy --compile-only [--out DIR]

Hang protection: the barrier kernel spins until every program has arrived, so a grid larger
than what can be co-resident would never finish.  The launcher clamps the grid to the
occupancy, and this script also checks the grid against the driver's occupancy before the
first launch of each variant.  On top of that all GPU work runs in a worker subprocess that
reports each step as it goes; the parent kills a worker that stays silent for ``--stall-s``
seconds, records the step that hung and restarts the worker after it.

Timing is bench.kernels.lowrank's: every call reads a different weight copy (copies rotate through
more than 2x the L2 cache), and the median per-call time of CUDA-graph replays of a burst of
calls is taken.  A variant whose launches cannot be captured in a graph is timed eagerly and
flagged (``graph: false``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

SHAPES: list[tuple[str, int, int, int]] = [  # (name, in n, out m, rank r): LLaMA-7B at 50 % rank
    ("llama7b_qkvo", 4096, 4096, 1024),
    ("llama7b_up", 4096, 11008, 1472),
    ("llama7b_down", 11008, 4096, 1472),
]
TARGET_US = {"llama7b_qkvo": 9.3}  # 1.8x faster than dense cuBLAS (16.8 us) on H100
H100_SMS = 132
TAG = "@@FO "  # prefix of the worker's protocol lines on stdout


def _lm() -> Any:
    import lowrank_kernels.lowrank_matmul as lm

    return lm


def _occupancy() -> Any:
    from lowrank_kernels import occupancy

    return occupancy


def label(cfg: dict[str, Any]) -> str:
    parts = [f"r{cfg.get('block_r1')}k{cfg.get('block_k1')}m{cfg.get('block_m2')}r{cfg.get('block_r2')}"
             f"w{cfg.get('num_warps')}"]
    if cfg.get("sync", "barrier") != "barrier":
        parts.append(cfg["sync"])
    for key, short in (("programs_per_sm", "pps"), ("prefetch", "pf")):
        if cfg.get(key, 1) != 1:
            parts.append(f"{short}{cfg[key]}")
    if cfg.get("early_u"):
        parts.append("eu")
    if cfg.get("cooperative") is not None:
        parts.append(f"coop{int(bool(cfg['cooperative']))}")
    return "|".join(parts)


def variants() -> list[tuple[str, dict[str, Any]]]:
    """The tuner's T=1 candidates, then diagnostics: two of the multi-program grids without the
    cooperative attribute (what it costs) and deeper prefetch at one program per SM."""
    from lowrank_kernels import dispatch

    cands = [dict(c) for c in dispatch.fused_candidates(1)]
    extra = [dict(c, cooperative=False) for c in cands
             if c.get("programs_per_sm", 1) > 1 and c.get("prefetch", 1) == 1][:2]
    extra.append(dict(dispatch._gemv_cfg(4, 2048, 16, 512, 8), prefetch=2))
    out, seen = [], set()
    for c in cands + extra:
        if label(c) not in seen:
            seen.add(label(c))
            out.append((label(c), c))
    return out


def _launch_spec(n: int, m: int, r: int, cfg: dict[str, Any], nsm: int) -> tuple[Any, dict, tuple, int]:
    """(resolved params, constexpr meta, integer args, wanted grid) exactly as ``_launch_fused``
    builds them for a contiguous bf16 problem with T=1 and no bias."""
    import torch
    from lowrank_kernels.utils import pow2_divisor

    lm = _lm()
    p = lm._fused_params(1, n, m, r, cfg, nsm)
    va, ua = pow2_divisor(n, cap=8), pow2_divisor(r, cap=8)
    meta = lm._fused_meta(p, torch.bfloat16, False, va, ua)
    tail = (1, n, r, m, n, n // va, r // ua, m)
    items1 = math.ceil(r / p.block_r1) * p.ksplit
    items2 = math.ceil(m / p.block_m2)
    want = max(1, min(p.max_programs or (1 << 30), max(items1, items2)))
    return p, meta, tail, want


# ------------------------------------------------------------------ compile only (no GPU)
def compile_report(n: int, m: int, r: int, cfg: dict[str, Any], arch: int = 90) -> list[dict[str, Any]]:
    """Compile the variant's kernel(s) for ``sm_<arch>a`` and read ptxas' resource report."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    lm = _lm()
    p, meta, tail, want = _launch_spec(n, m, r, cfg, H100_SMS)
    phases = {"barrier": [0], "two_launch": [1, 2], "local": [3]}[p.sync]
    opts = {k: meta.pop(k) for k in ("num_warps", "num_stages")}
    fn = lm._lowrank_matmul_fused_kernel
    ints = dict(zip(("T", "N", "R", "M", "stride_xt", "stride_vr", "stride_um", "stride_yt"), tail, strict=True))
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(arch).path
    except Exception:  # noqa: BLE001 - older layouts: the binary next to the backend
        ptxas = str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas")
    rows = []
    for phase in phases:
        sig, attrs, const = {}, {}, dict(meta, PHASE=phase)
        for i, name in enumerate(fn.arg_names):
            if name in const:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = {"ws_ptr": "*fp32", "cnt_ptr": "*i32"}.get(name, "*bf16")
                attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                sig[name] = "i32"
                if name != "T" and ints[name] % 16 == 0:  # T is not specialized (do_not_specialize)
                    attrs[(i,)] = [["tt.divisibility", 16]]
        t0 = time.time()
        kernel = triton.compile(ASTSource(fn, sig, constexprs=const, attrs=attrs),
                                target=GPUTarget("cuda", arch, 32), options=opts)
        with tempfile.TemporaryDirectory() as tmp:
            ptx = Path(tmp) / "k.ptx"
            ptx.write_text(kernel.asm["ptx"])
            res = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a", str(ptx), "-o", str(Path(tmp) / "k.cubin")],
                                 capture_output=True, text=True)
        log = res.stdout + res.stderr
        regs = re.search(r"Used (\d+) registers", log)
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
        if regs is None:
            raise RuntimeError(f"ptxas gave no register count:\n{log[-2000:]}")
        regs_n = int(regs.group(1))
        occ = _occupancy().blocks_per_sm(regs_n, kernel.metadata.shared, opts["num_warps"])
        row = {"phase": phase, "regs": regs_n, "spill_stores": int(spills.group(1)) if spills else None,
               "spill_loads": int(spills.group(2)) if spills else None, "shared": kernel.metadata.shared,
               "num_warps": opts["num_warps"], "blocks_per_sm_h100": occ, "compile_s": round(time.time() - t0, 1)}
        if phase == 0:
            row["grid_h100"] = _occupancy().barrier_programs(want, H100_SMS, p.programs_per_sm, lambda occ=occ: occ)
            row["wanted_grid"] = want
        rows.append(row)
    del torch
    return rows


def compile_only(out: Path | None) -> None:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton >= 3.9 warns when unset; 1 = old default
    report = []
    for name, n, m, r in SHAPES:
        for lab, cfg in variants():
            try:
                rows = compile_report(n, m, r, cfg)
            except Exception as exc:  # noqa: BLE001 - report and go on
                print(f"{name:14s} {lab:40s} COMPILE FAILED: {exc!r}"[:600], flush=True)
                report.append({"shape": name, "label": lab, "config": cfg, "error": repr(exc)[:2000]})
                continue
            for row in rows:
                grid = f" grid {row['grid_h100']}/{row['wanted_grid']}" if "grid_h100" in row else ""
                print(f"{name:14s} {lab:40s} phase {row['phase']}: {row['regs']:3d} regs, spills "
                      f"{row['spill_stores']}/{row['spill_loads']} B, smem {row['shared']:6d} B, "
                      f"{row['blocks_per_sm_h100']} programs/SM on H100{grid}", flush=True)
            report.append({"shape": name, "label": lab, "config": cfg, "kernels": rows})
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "fused_occupancy_compile.json").write_text(json.dumps(report, indent=1) + "\n")


# ------------------------------------------------------------------ GPU worker
def _emit(**event: Any) -> None:
    print(TAG + json.dumps(event, default=str), flush=True)


def _graph_ms(calls: list) -> tuple[float, bool]:
    """Per-call ms from CUDA-graph replays (True), or eager event timing if capture fails (False)."""
    import torch

    from compress.timing import event_median_ms

    try:
        return _graph_only(calls), True
    except Exception:  # noqa: BLE001 - e.g. a launch attribute that stream capture rejects
        torch.cuda.synchronize()
        reps = max(len(calls), 200)
        seq = [calls[i % len(calls)] for i in range(reps)]
        return event_median_ms(lambda: [c() for c in seq], reps=7, per_call=reps), False


def _graph_only(calls: list) -> float:
    """bench.kernels.lowrank.time_rotating without its silent eager fallback."""
    import torch

    from compress.timing import cuda_graph_median, event_median_ms

    for c in calls[:2]:
        c()
    torch.cuda.synchronize()
    est = max(event_median_ms(lambda: [c() for c in calls], reps=1, per_call=len(calls)), 1e-3)
    burst = min(max(len(calls), int(math.ceil(1.0 / est))), max(len(calls), 2000))
    return cuda_graph_median(calls, iters=burst, reps=7, warmup=2, eager_fallback=False)


def _kernel_info(n: int, m: int, r: int, cfg: dict[str, Any], x, U, V, y) -> dict[str, Any]:
    """Registers, spills, shared memory and occupancy of the variant's barrier kernel, and the
    grid the launcher will use, computed before anything is launched."""
    import torch

    lm = _lm()
    dev = x.device
    nsm = torch.cuda.get_device_properties(dev).multi_processor_count
    p, meta, tail, want = _launch_spec(n, m, r, cfg, nsm)
    info: dict[str, Any] = {"sync": p.sync, "programs_per_sm": p.programs_per_sm, "sm_count": nsm,
                            "wanted_grid": want, "ksplit": p.ksplit, "cooperative": p.cooperative}
    if p.sync != "barrier":
        return info
    if p.cooperative:
        meta["launch_cooperative_grid"] = True
    ws = torch.empty(p.ksplit * r, dtype=torch.float32, device=dev)
    cnt = torch.zeros(2, dtype=torch.int32, device=dev)
    kernel = lm._lowrank_matmul_fused_kernel.warmup(x, V, U, y, y, ws, cnt, *tail, PHASE=0, grid=(1,), **meta)
    kernel._init_handles()
    props = torch.cuda.get_device_properties(dev)
    occupancy = _occupancy()
    ours = occupancy.blocks_per_sm(kernel.n_regs, kernel.metadata.shared, kernel.metadata.num_warps,
                                   regs_per_sm=getattr(props, "regs_per_multiprocessor", 65536),
                                   threads_per_sm=getattr(props, "max_threads_per_multi_processor", 2048),
                                   smem_per_sm=getattr(props, "shared_memory_per_multiprocessor", 233472))
    driver = occupancy.driver_blocks_per_sm(kernel.function, kernel.metadata.num_warps * 32, kernel.metadata.shared)
    resident = max(1, occupancy.kernel_blocks_per_sm(kernel, props) or 1)
    grid = occupancy.barrier_programs(want, nsm, p.programs_per_sm, lambda: resident)
    info.update({"regs": kernel.n_regs, "spills": kernel.n_spills, "shared": kernel.metadata.shared,
                 "num_warps": kernel.metadata.num_warps, "blocks_per_sm_ours": ours, "blocks_per_sm_driver": driver,
                 "resident_used": resident, "grid": grid})
    return info


def worker(skip: set[str], deadline: float) -> None:
    import torch
    import torch.nn.functional as F

    from bench.kernels.lowrank import WeightSet, floor_ms

    lm = _lm()
    torch.manual_seed(0)
    for name, n, m, r in SHAPES:
        steps = [f"{name}:baselines"] + [f"{name}:{lab}" for lab, _ in variants()]
        if all(step in skip for step in steps):  # done before a restart
            continue
        ws = WeightSet(n, m, r, torch.bfloat16, seed=n + m + r, dense=True)
        x = torch.randn(1, n, device="cuda", dtype=torch.bfloat16)
        U0, V0 = ws.U[0], ws.V[0]
        ref = F.linear(F.linear(x.double(), V0.double()), U0.double())
        t_err = ((F.linear(F.linear(x, V0), U0).double() - ref).norm() / ref.norm()).item()
        fl = floor_ms(1, n, m, r)
        step = f"{name}:baselines"
        if step not in skip:
            _emit(event="start", step=step)
            res: dict[str, Any] = {}
            pairs = list(zip(ws.U, ws.V, strict=True))
            for key, calls in (
                ("dense_ms", [lambda W=W, x=x: F.linear(x, W) for W in ws.W]),
                ("torch_two_gemm_ms", [lambda U=U, V=V, x=x: F.linear(F.linear(x, V), U) for U, V in pairs]),
                ("dispatch_ms", [lambda U=U, V=V, x=x: lm.lowrank_matmul_launch(x, U, V) for U, V in pairs]),
            ):
                try:
                    res[key] = _graph_ms(calls)[0]
                except Exception as exc:  # noqa: BLE001 - keep the other baselines
                    res[key], res[key.replace("_ms", "_error")] = math.nan, repr(exc)[:500]
                    torch.cuda.synchronize()
            _emit(event="result", step=step, kind="baselines", shape=name, n=n, m=m, r=r, floor_ms=fl,
                  torch_err=t_err, **res)
        for lab, cfg in variants():
            step = f"{name}:{lab}"
            if step in skip:
                continue
            if time.time() > deadline:
                _emit(event="deadline", step=step)
                return
            _emit(event="start", step=step)
            row: dict[str, Any] = {"shape": name, "n": n, "m": m, "r": r, "label": lab, "config": cfg,
                                   "floor_ms": fl}
            try:
                info = _kernel_info(n, m, r, cfg, x, U0, V0, torch.empty(1, m, device="cuda", dtype=torch.bfloat16))
                row.update(info)
                if info.get("blocks_per_sm_driver") and info["grid"] > info["sm_count"] * info["blocks_per_sm_driver"]:
                    raise RuntimeError("grid exceeds the driver's occupancy: not launched (would deadlock)")
                out = torch.full((1, m), float("nan"), device="cuda", dtype=torch.bfloat16)
                n_res = len(_occupancy()._RESIDENT)
                lm.lowrank_matmul_launch(x, U0, V0, backend="triton_fused", config=cfg, out=out)
                torch.cuda.synchronize()
                if len(_occupancy()._RESIDENT) > n_res:  # the launcher's own occupancy answer for this launch
                    row["resident_launcher"] = list(_occupancy()._RESIDENT.values())[-1]
                err = ((out.double() - ref).norm() / ref.norm()).item()
                row["err"] = err
                row["ok"] = bool(torch.isfinite(out).all()) and err <= 2 * t_err + 1e-3
                calls = [lambda U=U, V=V, x=x, c=cfg: lm.lowrank_matmul_launch(x, U, V, backend="triton_fused",
                                                                                config=c)
                         for U, V in zip(ws.U, ws.V, strict=True)]
                row["ms"], row["graph"] = _graph_ms(calls)
                row["pct_of_floor"] = 100.0 * fl / row["ms"]
            except Exception as exc:  # noqa: BLE001 - recorded; the next variant runs
                row["error"] = repr(exc)[:1500]
                torch.cuda.synchronize()
            _emit(event="result", step=step, kind="variant", **row)
        del ws
        torch.cuda.empty_cache()
    _emit(event="done")


# ------------------------------------------------------------------ GPU parent (watchdog)
def _run_worker(skip: set[str], deadline: float, stall_s: float, events: list[dict],
                cmd: list[str] | None = None) -> str:
    """Run one worker until it finishes ('done'), hits the deadline ('deadline'), stalls in a step
    ('hung': killed), dies in a step ('crashed') or fails outside one ('failed')."""
    cmd = cmd or [sys.executable, "-m", "bench.kernels.fused_occupancy", "--worker", "--deadline", str(deadline),
                  "--skip", json.dumps(sorted(skip))]
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(cmd, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout] + [lines.put(None)], daemon=True).start()
    current = None
    tail: list[str] = []
    while True:
        timeout = max(1.0, min(stall_s, deadline + 30 - time.time()))
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if current is not None:
                events.append({"event": "hung", "step": current, "stall_s": stall_s})
                print(f"[fused_occupancy] {current}: no progress for {timeout:.0f}s -> killed (hang?)", flush=True)
            return "hung" if current is not None else "deadline"
        if line is None:
            proc.wait()
            if current is not None:
                events.append({"event": "crashed", "step": current, "rc": proc.returncode, "output": tail[-20:]})
                print(f"[fused_occupancy] worker died in {current} (rc {proc.returncode})", flush=True)
                return "crashed"
            events.append({"event": "failed", "rc": proc.returncode, "output": tail[-40:]})
            print(f"[fused_occupancy] worker exited (rc {proc.returncode}) without finishing", flush=True)
            return "failed"
        if not line.startswith(TAG):
            tail.append(line.rstrip()[:500])
            print("  | " + line.rstrip()[:300], flush=True)
            continue
        ev = json.loads(line[len(TAG):])
        if ev["event"] == "start":
            current = ev["step"]
        elif ev["event"] == "result":
            events.append(ev)
            current = None
            _print_row(ev)
        elif ev["event"] in ("done", "deadline"):
            events.append(ev)
            proc.wait()
            return ev["event"]


def _print_row(ev: dict[str, Any]) -> None:
    if ev["kind"] == "baselines":
        print(f"{ev['shape']:14s} dense {ev['dense_ms'] * 1e3:6.1f}us  "
              f"torch 2-GEMM {ev['torch_two_gemm_ms'] * 1e3:6.1f}us  dispatch {ev['dispatch_ms'] * 1e3:6.1f}us  "
              f"floor {ev['floor_ms'] * 1e3:5.1f}us", flush=True)
        return
    if "error" in ev:
        print(f"{ev['shape']:14s} {ev['label']:44s} ERROR {ev['error'][:200]}", flush=True)
        return
    occ = (f"regs {ev.get('regs')} occ {ev.get('blocks_per_sm_ours')}/{ev.get('blocks_per_sm_driver')} "
           f"grid {ev.get('grid', '-')}/{ev.get('wanted_grid')}")
    print(f"{ev['shape']:14s} {ev['label']:44s} {ev['ms'] * 1e3:6.1f}us {ev['pct_of_floor']:5.1f}% floor "
          f"{'ok ' if ev['ok'] else 'BAD'} err {ev['err']:.1e} {'graph' if ev['graph'] else 'EAGER'}  {occ}",
          flush=True)


def summarize(events: list[dict[str, Any]]) -> dict[str, Any]:
    base = {e["shape"]: e for e in events if e.get("kind") == "baselines"}
    best: dict[str, Any] = {}
    for e in events:
        if e.get("kind") != "variant" or "ms" not in e or not e.get("ok"):
            continue
        b = best.get(e["shape"])
        if b is None or e["ms"] < b["ms"]:
            best[e["shape"]] = e
    out = {}
    for shape, e in best.items():
        bl = base.get(shape, {})
        out[shape] = {"best": e["label"], "ms": e["ms"], "pct_of_floor": e["pct_of_floor"],
                      "x_dense": bl.get("dense_ms", math.nan) / e["ms"],
                      "x_torch_two_gemm": bl.get("torch_two_gemm_ms", math.nan) / e["ms"],
                      "x_dispatch": bl.get("dispatch_ms", math.nan) / e["ms"],
                      "target_us": TARGET_US.get(shape), "meets_target": (e["ms"] * 1e3 <= TARGET_US[shape])
                      if shape in TARGET_US else None}
        print(f"[best] {shape:14s} {e['label']:44s} {e['ms'] * 1e3:6.1f}us  x{out[shape]['x_dense']:.2f} vs dense  "
              f"x{out[shape]['x_torch_two_gemm']:.2f} vs torch 2-GEMM  x{out[shape]['x_dispatch']:.2f} vs dispatch"
              + (f"  target {TARGET_US[shape]}us: {'MET' if out[shape]['meets_target'] else 'missed'}"
                 if shape in TARGET_US else ""), flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/results")))
    ap.add_argument("--budget-s", type=float, default=150.0, help="stop starting new variants after this long")
    ap.add_argument("--stall-s", type=float, default=45.0, help="kill a worker silent for this long (hang)")
    ap.add_argument("--compile-only", action="store_true", help="no GPU: compile for sm_90a and report ptxas -v")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--skip", default="[]", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.compile_only:
        compile_only(args.out if "--out" in (argv if argv is not None else sys.argv) else None)
        return
    if args.worker:
        worker(set(json.loads(args.skip)), args.deadline or time.time() + args.budget_s)
        return
    import torch

    from compress.timing import env_info, write_result

    if not torch.cuda.is_available():
        raise SystemExit("bench.kernels.fused_occupancy needs a CUDA GPU (or --compile-only)")
    t0 = time.time()
    deadline = t0 + args.budget_s
    env = env_info()
    print(json.dumps(env), flush=True)
    events: list[dict[str, Any]] = []
    skip: set[str] = set()
    for _attempt in range(6):
        status = _run_worker(skip, deadline, args.stall_s, events)
        skip |= {e["step"] for e in events if "step" in e and e["event"] in ("result", "hung", "crashed")}
        if status in ("done", "deadline", "failed") or time.time() > deadline:
            break
    payload = {"env": env, "shapes": SHAPES, "variants": dict(variants()),
               "baselines": [e for e in events if e.get("kind") == "baselines"],
               "results": [e for e in events if e.get("kind") == "variant"],
               "hung_or_crashed": [e for e in events if e["event"] in ("hung", "crashed", "failed")],
               "finished": any(e["event"] == "done" for e in events), "wall_s": round(time.time() - t0, 1)}
    payload["summary"] = summarize(events)
    path = write_result("fused_occupancy", payload, args.out)
    print(f"wrote {path} ({payload['wall_s']}s)", flush=True)


if __name__ == "__main__":
    main()
