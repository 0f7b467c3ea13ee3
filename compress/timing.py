"""Measurement helpers shared by `python -m compress bench` and the benchmarks in ``bench/``:
environment metadata, JSON output, timing. They ship with the package; bench/ imports them.

Everything here imports without a GPU; CUDA is touched only when a function that
needs it is called, so ``python -m bench.<name> --help`` works on any machine.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parent.parent
# bench/results in a checkout; from an installed wheel there is none, so results go to ./bench_results.
RESULTS_DIR = _REPO / "bench" / "results" if (_REPO / "bench").is_dir() else Path.cwd() / "bench_results"
# Fallbacks for the floors when there is no GPU to measure (CPU smoke runs): an H100 SXM's figures.
# On a GPU the floors use `device_peaks()`, measured on the device itself, so a "% of floor" is
# against the GPU that ran, not against the GPU this was first written on.
HBM_TBPS = 3.0
PEAK_BF16_TFLOPS = 791.0


@dataclass(frozen=True)
class DevicePeaks:
    """Memory and compute rates every floor is computed from, and where they came from."""

    tbps: float  # device-to-device copy, bytes read + written per second / 1e12
    tflops: float  # bf16 GEMM
    source: str

    def as_dict(self) -> dict[str, Any]:
        return {"tbps": round(self.tbps, 3), "tflops": round(self.tflops, 1), "source": self.source}


@functools.cache
def device_peaks() -> DevicePeaks:
    """Copy bandwidth and bf16 GEMM rate of GPU 0, measured once per process (~0.5 s).

    ``LOWRANK_PEAK_TBPS`` / ``LOWRANK_PEAK_TFLOPS`` override the measurement (a shared GPU under
    load would measure low). Without CUDA: the nominal H100 figures above, marked as such.
    """
    import torch

    env_tbps, env_tflops = os.environ.get("LOWRANK_PEAK_TBPS"), os.environ.get("LOWRANK_PEAK_TFLOPS")
    if not torch.cuda.is_available():
        return DevicePeaks(float(env_tbps or HBM_TBPS), float(env_tflops or PEAK_BF16_TFLOPS), "nominal (no GPU)")

    def best_ms(fn: Callable[[], Any], reps: int) -> float:
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return min(times)  # a peak: the best of a few, not the median

    if env_tbps:
        tbps = float(env_tbps)
    else:
        src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")  # far beyond any L2
        dst = torch.empty_like(src)
        tbps = 2 * src.numel() / (best_ms(lambda: dst.copy_(src), 10) * 1e-3) / 1e12
        del src, dst
    if env_tflops:
        tflops = float(env_tflops)
    else:
        n = 8192
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        tflops = 2 * n**3 / (best_ms(lambda: a @ b, 10) * 1e-3) / 1e12
        del a, b
    torch.cuda.empty_cache()
    source = "env" if env_tbps and env_tflops else "measured on this GPU (1 GiB copy, 8192^3 bf16 GEMM)"
    return DevicePeaks(tbps, tflops, source)


def _git_commit() -> str:
    """$GIT_COMMIT when set, else HEAD of the checkout, else "unknown".

    The environment variable wins: a tree copied to a GPU machine may carry a stale .git whose
    HEAD is not the code that runs (it happened: docs/notes/results_commits.md).
    """
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    repo = _REPO
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10, check=True
        )
        commit = out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("GIT_COMMIT", "unknown")
    try:
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        dirty = ""
    return commit + ("-dirty" if dirty else "")


def gpu_name() -> str:
    """Device name of GPU 0, or ``"cpu"`` without CUDA."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return "cpu"


def gpu_slug() -> str:
    """File-name friendly short GPU name, e.g. ``"h100"`` for 'NVIDIA H100 80GB HBM3'."""
    name = gpu_name().lower()
    for key in ("h200", "h100", "a100", "l40s", "l4", "a10g", "4090", "3090"):
        if key in name:
            return key
    return "".join(c if c.isalnum() else "_" for c in name).strip("_") or "unknown"


def env_info() -> dict[str, Any]:
    """Metadata to store next to every benchmark result so numbers can be traced to hardware and code."""
    import torch

    info: dict[str, Any] = {
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "gpu": gpu_name(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["sm_count"] = props.multi_processor_count
        info["gpu_mem_gib"] = round(props.total_memory / 2**30, 1)
        info["capability"] = f"{props.major}.{props.minor}"
        l2 = getattr(props, "L2_cache_size", None)
        if l2 is not None:
            info["l2_mb"] = round(l2 / 1e6, 1)
        try:
            drv = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10, check=True,
            )
            info["driver"] = drv.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            info["driver"] = None
    return info


def results_path(results_dir: Path | str | None = None) -> Path:
    """The directory results go to (created): ``results_dir``, else ``$BENCH_RESULTS_DIR``, else bench/results."""
    out_dir = Path(results_dir or os.environ.get("BENCH_RESULTS_DIR") or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def write_result(name: str, payload: dict[str, Any], results_dir: Path | str | None = None) -> Path:
    """Write ``payload`` (plus ``env`` metadata unless present) to ``<results_dir>/<name>.json``.

    ``results_dir`` defaults to ``bench/results``; the environment variable
    ``BENCH_RESULTS_DIR`` overrides the default (handy when the tree is read-only).
    """
    out_dir = results_path(results_dir)
    body = dict(payload)
    body.setdefault("env", env_info())
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(body, indent=2, sort_keys=False, default=str) + "\n")
    tmp.replace(path)  # atomic: a crashed run never leaves half a JSON file behind
    return path


def do_bench_median(
    fn: Callable[[], Any],
    warmup: int = 25,
    rep: int = 100,
    grad_to_none: list | None = None,
) -> float:
    """Median runtime of ``fn`` in milliseconds via ``triton.testing.do_bench``.

    ``warmup`` and ``rep`` are in milliseconds (do_bench's convention). do_bench
    flushes L2 between calls, which matters for memory-bound kernels.
    """
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median"))


def median(values: list[float]) -> float:
    """The middle element after sorting (the upper one of an even count), as every timer here reports."""
    return sorted(values)[len(values) // 2]


def event_median_ms(run: Callable[[], Any], reps: int = 5, per_call: int = 1, cuda: bool | None = None) -> float:
    """Median over ``reps`` runs of ``run()``'s time in ms, divided by ``per_call``.

    Timed by CUDA events on the current stream when ``cuda`` (default: CUDA is available), by
    the wall clock otherwise (CPU smoke runs).
    """
    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    times = []
    for _ in range(reps):
        if cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / per_call)
        else:
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3 / per_call)
    return median(times)


def cuda_graph_median(
    calls: Callable[[], Any] | Sequence[Callable[[], Any]],
    iters: int | None = None,
    reps: int = 15,
    *,
    warmup: int = 3,
    eager_fallback: bool = False,
) -> float:
    """Median per-call time (ms) of ``calls`` issued back to back from one CUDA graph.

    ``calls`` is one callable or a list of them; the graph holds ``iters`` calls taken round-robin
    from the list (default: 20 for a single callable, else each listed call once). The first ``warmup``
    calls run on a side stream before the capture (lazy initialisation must happen outside it).
    The graph is replayed ``reps`` times and the median replay time is divided by its length.
    Removes Python/launch overhead, which dominates single-token decode kernels that run for
    only a few microseconds. With ``eager_fallback``, a capture that fails (an op that syncs, say)
    is replaced by issuing the same calls eagerly.
    """
    import torch

    from lowrank.serving import capture_cuda_graph

    single = callable(calls)
    calls = [calls] if single else list(calls)
    count = iters if iters is not None else (20 if single else len(calls))
    seq = [calls[i % len(calls)] for i in range(count)]

    def issue_all() -> None:
        for call in seq:
            call()

    try:
        graph, _ = capture_cuda_graph(issue_all, warmup=[calls[i % len(calls)] for i in range(warmup)])
        run = graph.replay
        run()
    except Exception:  # noqa: BLE001 - only with eager_fallback: time the same calls eagerly
        if not eager_fallback:
            raise
        torch.cuda.synchronize()
        run = issue_all
        run()
    torch.cuda.synchronize()
    return event_median_ms(run, reps, per_call=count)


def time_rotating(calls: list[Callable[[], Any]], min_burst_ms: float = 1.0, reps: int = 7) -> float:
    """Median per-call ms of ``calls`` issued round-robin, replayed from one CUDA graph.

    The burst holds every call at least once and lasts about ``min_burst_ms``. Falls back to eager
    event timing if capture fails (e.g. an op that syncs).
    """
    import math

    import torch

    for c in calls[:2]:  # compile / autotune / allocate outside capture
        c()
    torch.cuda.synchronize()
    # estimate per-call time to size the burst
    est = max(event_median_ms(lambda: [c() for c in calls], reps=1, per_call=len(calls)), 1e-3)
    burst = max(len(calls), int(math.ceil(min_burst_ms / est)))
    burst = min(burst, max(len(calls), 2000))
    return cuda_graph_median(calls, iters=burst, reps=reps, warmup=2, eager_fallback=True)


def peak_extra_bytes(fn: Callable[[], Any]) -> int:
    """Peak allocator memory (bytes) that one call of ``fn`` adds beyond what is already allocated."""
    import torch

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return int(peak)
