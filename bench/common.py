"""Shared helpers for the benchmarks in ``bench/``: environment metadata, JSON output, timing.

Everything here imports without a GPU; CUDA is touched only when a function that
needs it is called, so ``python -m bench.<name> --help`` works on any machine.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _git_commit() -> str:
    """HEAD of the checkout, or a marker when git or the repository is unavailable (e.g. a copied tree)."""
    repo = Path(__file__).resolve().parent.parent
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


def write_result(name: str, payload: dict[str, Any], results_dir: Path | str | None = None) -> Path:
    """Write ``payload`` (plus ``env`` metadata unless present) to ``<results_dir>/<name>.json``.

    ``results_dir`` defaults to ``bench/results``; the environment variable
    ``BENCH_RESULTS_DIR`` overrides the default (handy when the tree is read-only).
    """
    out_dir = Path(results_dir or os.environ.get("BENCH_RESULTS_DIR") or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
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


def cuda_graph_median(fn: Callable[[], Any], iters: int = 20, reps: int = 15) -> float:
    """Median per-call time (ms) of ``fn`` replayed ``iters`` times inside one CUDA graph.

    Removes Python/launch overhead, which dominates single-token decode kernels
    that run for only a few microseconds.
    """
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    times.sort()
    return times[len(times) // 2]


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
