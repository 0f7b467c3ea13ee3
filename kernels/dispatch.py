"""Backend choice of ``lowrank_matmul``: tuned table -> in-process autotune (opt-in) -> cuBLAS.

``select_backend`` picks, per layer shape and number of rows ``T``, one of the op's GPU paths
(``triton_fused``, ``two_gemm`` with cuBLAS or Triton GEMMs, ``ext_gemv``) and its launch config
(``lowrank_matmul_config``).  Tuned choices ship per device in
``configs/lowrank_matmul.<device key>.json``, keyed by device properties, never by name;
``python -m compress tune`` adds a per-device cache for a checkpoint's own shapes, and
``lowrank_kernels.tuning`` says which table applies to a GPU.  Shapes no table of this device
covers run cuBLAS' two GEMMs (``_default_choice``): torch's own path.

``dense_is_faster`` decides the dense fallback (one GEMM with ``W = U @ V``): from the device's
table's side-by-side timings for tuned shapes, else from a per-T latency model fitted to the same
sweep (``predicted_ms``).

``fused_candidates`` and ``gemm_candidates`` are the configs the tuners (``compress.tune``,
``bench.tools.tune_lowrank``) and the opt-in autotune time, in their JSON form.

Importing this module never initialises CUDA and works without Triton.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import torch
from lowrank_kernels import tuning
from lowrank_kernels.lowrank_matmul_config import CUBLAS_TWO_GEMM, config_for
from lowrank_kernels.utils import LaunchConfig, cuda_index, next_pow2
from torch import Tensor

__all__ = [
    "T_BUCKETS",
    "config_key",
    "dense_is_faster",
    "dispatch_info",
    "ext_gemv",
    "fused_candidates",
    "gemm_candidates",
    "group_key",
    "group_kernel",
    "predicted_ms",
    "reload_tables",
    "select_backend",
]

T_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 8192)
# A choice: (backend, its launch config or None for a backend without options).
Choice = tuple[str, LaunchConfig | None]
# Runs one backend with one config: (backend, config, x2, U, V, bias, y2) -> None (the op's launcher).
Runner = Callable[[str, Any, Tensor, Tensor, Tensor, "Tensor | None", Tensor], None]
_TABLES: dict[int, tuple[dict, str | None]] = {}
_CHOICE_CACHE: dict[tuple, Choice] = {}
_DENSE_CACHE: dict[tuple, bool] = {}
_GROUP_CACHE: dict[tuple, tuple[str, tuple[int, int, int]]] = {}


def config_key(n: int, m: int, r: int) -> str:
    """Key of a layer shape in the tuned table: in_features x out_features, rank."""
    return f"{n}x{m}r{r}"


def _load_table(path: Any = None) -> dict:
    """One table file as stored (default: the H100 table, ``tuning.CONFIG_PATH``); {} if unreadable."""
    return tuning.read_table(path or tuning.CONFIG_PATH) or {}


def _table_for(device: torch.device) -> tuple[dict, str | None]:
    """(table, trust) for a device, cached per device index: see ``lowrank_kernels.tuning``.

    trust is "exact" (use the choices and timings), "sibling" (same chip, other memory: only clear
    dense-fallback verdicts) or None (nothing applies; CPU too).
    """
    if device.type != "cuda":
        return {}, None
    idx = cuda_index(device)
    hit = _TABLES.get(idx)
    if hit is None:
        hit = _TABLES[idx] = tuning.dispatch_table(tuning.device_properties(torch.cuda.get_device_properties(idx)))
    return hit


def dispatch_info(device: torch.device) -> dict[str, Any]:
    """Which table the dispatch uses on ``device``: key, trust, source files, tuned layer shapes and fused
    sibling groups (for result JSON)."""
    info: dict[str, Any] = {"device_key": None, "trust": None, "sources": [], "tuned_shapes": 0, "tuned_groups": 0}
    if device.type == "cuda":
        idx = cuda_index(device)
        dev = tuning.device_properties(torch.cuda.get_device_properties(idx))
        table, trust = _table_for(torch.device("cuda", idx))
        info.update(device_key=tuning.device_key(dev), trust=trust, sources=list(table.get("sources", [])),
                    tuned_shapes=len(table.get("entries", {})) if trust == "exact" else 0,
                    tuned_groups=len(table.get("groups", {})) if trust == "exact" else 0)
    return info


def reload_tables() -> None:
    """Forget the tables and choices read so far (after ``compress tune`` wrote the cache, say)."""
    _TABLES.clear()
    _CHOICE_CACHE.clear()
    _DENSE_CACHE.clear()
    _GROUP_CACHE.clear()


def _bucket(T: int, available: list[int]) -> int:
    # Nearest tuned T in log space: latency regimes change by factors, not by offsets.
    lt = math.log2(max(T, 1))
    return min(available, key=lambda b: (abs(math.log2(b) - lt), b))


def ext_gemv() -> Callable[..., Tensor] | None:
    """The optional CUDA batch-1 GEMV from csrc/ (lowrank_kernels._ext.lowrank_gemv), or None."""
    try:
        from lowrank_kernels import _ext
    except Exception:  # noqa: BLE001 - any import failure just means "not available"
        return None
    return getattr(_ext, "lowrank_gemv", None)


# ---------------------------------------------------------------------------- candidates
def _gemv_cfg(br1: int, bk1: int, bm2: int, br2: int, warps: int) -> dict[str, Any]:
    return {"use_dot": False, "block_r1": br1, "block_k1": bk1, "block_m2": bm2, "block_r2": br2,
            "num_warps": warps}


def fused_candidates(T: int) -> list[dict[str, Any]]:
    """Small per-regime list of fused configs (``FusedConfig`` JSON form; tuners and opt-in autotune).

    Chosen from ptxas reports (no spills at these tile sizes) and the first H100 sweep: the
    FMA (GEMV) variants keep one ~16-32 KB weight tile per program in flight (two ahead
    with ``prefetch=2``), several programs per SM with ``programs_per_sm``; the tl.dot
    variants rely on Triton's cp.async pipeline instead of register double-buffers.
    The tuners time these; new entries go at the end.
    """
    if T == 1:
        return [
            _gemv_cfg(4, 2048, 16, 512, 8),
            dict(_gemv_cfg(8, 2048, 16, 1024, 16), early_u=True),
            _gemv_cfg(8, 2048, 16, 1024, 8),
            dict(_gemv_cfg(2, 4096, 8, 1024, 4), sync="two_launch"),
            dict(_gemv_cfg(4, 2048, 16, 512, 8), sync="two_launch"),
            # Several programs per SM (barrier grid clamped to the kernel's occupancy), so that
            # each SM has several weight tiles in flight; the smaller tiles give every program
            # about one work item at 4096^2.  Registers (ptxas 13.4, sm_90a) -> programs/SM:
            # 80 -> 3, 64 -> 4, 128 -> 4, 72 -> 7, 121 -> 4, 126 -> 2.
            dict(_gemv_cfg(4, 2048, 16, 512, 8), programs_per_sm=2),
            dict(_gemv_cfg(2, 4096, 8, 1024, 8), programs_per_sm=3),
            dict(_gemv_cfg(2, 4096, 8, 1024, 4), programs_per_sm=4),
            dict(_gemv_cfg(2, 2048, 8, 512, 4), programs_per_sm=4),
            dict(_gemv_cfg(2, 2048, 8, 512, 4), programs_per_sm=4, prefetch=2),
            dict(_gemv_cfg(4, 2048, 16, 512, 8), programs_per_sm=2, prefetch=2),
        ]
    if T <= 8:
        return [
            dict(_gemv_cfg(8, 1024, 16, 512, 8), block_t_fma=next_pow2(T)),
            dict(_gemv_cfg(8, 1024, 16, 512, 8), block_t_fma=next_pow2(T), sync="two_launch"),
        ]
    bt = 16 if T <= 16 else 64
    return [
        {"use_dot": True, "block_t": bt, "block_r1": 32 if bt == 16 else 16, "block_k1": 256, "block_m2": 64,
         "block_r2": 128, "num_warps": 4, "num_stages": 3},
        {"use_dot": True, "block_t": bt, "block_r1": 32 if bt == 16 else 16, "block_k1": 256, "block_m2": 64,
         "block_r2": 128, "num_warps": 4, "num_stages": 3, "sync": "two_launch"},
    ]


def gemm_candidates(T: int, which: int) -> list[dict[str, Any]]:
    """Triton NT-GEMM configs (``GemmConfig`` JSON form) for the first (which=1: t = x V^T) or second GEMM."""
    if T <= 64:
        base = [
            {"block_m": 16, "block_n": 64, "block_k": 128, "num_warps": 4, "num_stages": 4},
            {"block_m": 64, "block_n": 64, "block_k": 128, "num_warps": 4, "num_stages": 3},
        ]
        if which == 1:
            base += [dict(c, split_k=4) for c in base]
        return base
    if T <= 512:
        base = [
            {"block_m": 64, "block_n": 128, "block_k": 64, "num_warps": 4, "num_stages": 4},
            {"block_m": 128, "block_n": 64, "block_k": 64, "num_warps": 4, "num_stages": 4},
        ]
        if which == 1:
            base += [dict(base[0], split_k=4)]
        return base
    return [
        {"block_m": 128, "block_n": 128, "block_k": 64, "num_warps": 8, "num_stages": 3},
        {"block_m": 128, "block_n": 256, "block_k": 64, "num_warps": 8, "num_stages": 3},
    ]


# ---------------------------------------------------------------------------- backend choice
def _default_choice(T: int, N: int, M: int, R: int) -> Choice:
    """The choice for a shape and T no table of this device measured: cuBLAS' two GEMMs.

    That is torch's ``F.linear(F.linear(x, V), U, bias)`` itself, so an untuned device or shape is
    never slower than it.  Untuned fused configs were not safe: on an H200 the H100's default T=1
    config ran 4096->11008 r=1472 in 27.3 us against 19.3 us for torch's two GEMMs (issue #17).
    """
    return "two_gemm", CUBLAS_TWO_GEMM


def _autotune(x2: Tensor, U: Tensor, V: Tensor, bias: Tensor | None, run: Runner) -> Choice:
    """Opt-in (LOWRANK_MATMUL_AUTOTUNE=1) first-call timing of the candidate lists through ``run``."""
    T = x2.shape[0]
    cands: list[Choice] = []
    if T <= 64:
        cands += [("triton_fused", config_for("triton_fused", c)) for c in fused_candidates(T)]
    cands.append(("two_gemm", CUBLAS_TWO_GEMM))
    cands += [("two_gemm", config_for("two_gemm", {"gemm1": c1, "gemm2": c2}))
              for c1 in gemm_candidates(T, 1)[:2] for c2 in gemm_candidates(T, 2)[:1]]
    y2 = torch.empty((T, U.shape[0]), dtype=x2.dtype, device=x2.device)
    best, best_ms = cands[0], float("inf")
    for backend, cfg in cands:
        try:
            fn = lambda: run(backend, cfg, x2, U, V, bias, y2)  # noqa: B023 - used immediately
            for _ in range(3):
                fn()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                fn()
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end) / 10
        except Exception:  # noqa: BLE001 - a config that fails to compile is just skipped
            continue
        if ms < best_ms:
            best, best_ms = (backend, cfg), ms
    return best


def select_backend(x2: Tensor, U: Tensor, V: Tensor, bias: Tensor | None, *, run: Runner | None = None) -> Choice:
    """(backend, launch config) for ``x2 [T, in] @ V.T @ U.T``, cached per shape, T bucket and device.

    From this device's table (an untuned aligned rank borrows the nearest tuned aligned rank of the
    same layer shape); else, with ``LOWRANK_MATMUL_AUTOTUNE=1`` and a ``run`` (the op's launcher,
    which times the candidates), autotuning outside CUDA-graph capture; else ``_default_choice``.
    """
    T, N = x2.shape
    M, R = U.shape
    key = (N, M, R, T if T <= 16 else _bucket(T, list(T_BUCKETS)), x2.device.index)
    hit = _CHOICE_CACHE.get(key)
    if hit is not None:
        return hit
    choice = None
    table, trust = _table_for(x2.device)
    entries = table.get("entries", {}) if trust == "exact" else {}
    entry = entries.get(config_key(N, M, R))
    if entry is None and R % 8 == 0 and U.stride(0) % 8 == 0:
        # Untuned aligned rank of a tuned layer shape: borrow the nearest tuned aligned rank.
        # Misaligned ranks never borrow: their speed depends on the exact alignment (8-, 4- or
        # 2-byte rows), so they get the measured-safe defaults instead.
        same = [int(k.split("r")[1]) for k in entries if k.startswith(f"{N}x{M}r")]
        same = [r for r in same if r % 8 == 0]
        if same:
            entry = entries[config_key(N, M, min(same, key=lambda r: (abs(r - R), r)))]
    if entry:
        b = _bucket(T, [int(k) for k in entry])
        backend = entry[str(b)]["backend"]
        choice = (backend, config_for(backend, entry[str(b)].get("config", {})))
    if choice is None and run is not None and os.environ.get("LOWRANK_MATMUL_AUTOTUNE", "0") == "1" \
            and not torch.cuda.is_current_stream_capturing():
        choice = _autotune(x2, U, V, bias, run)
    if choice is None:
        choice = _default_choice(T, N, M, R)
    if choice[0] == "ext_gemv" and ext_gemv() is None:
        choice = _default_choice(T, N, M, R)
    _CHOICE_CACHE[key] = choice
    return choice


# ---------------------------------------------------------------------------- dense fallback
def predicted_ms(T: int, N: int, M: int, R: int | None, model: dict | None = None) -> float | None:
    """Latency-model estimate (ms) of the factorized dispatch (``R``) or of dense (``R=None``).

    The table's ``latency_model`` holds, per T bucket, ``ms = c0 + c1 * bytes + c2 * flops`` fitted
    by least squares to one sweep on the table's device (``bench.tools.tune_lowrank --merge-dense``); the
    default ``model`` is the H100 table's.  ``c0`` captures the
    launch cost that dominates small layers, ``c1``/``c2`` the bandwidth- and compute-bound terms.
    Ranks that are not multiples of 8 (ragged rows, slow in every GEMM library) have their own fit.
    """
    model = model if model is not None else _load_table().get("latency_model")
    if not model:
        return None
    kind = "dense" if R is None else ("lowrank" if R % 8 == 0 else "lowrank_ragged")
    coeffs = model[str(_bucket(T, [int(k) for k in model]))][kind]
    width = M * N if R is None else R * (M + N)
    nbytes = 2.0 * (width + T * (M + N))
    flops = 2.0 * T * width
    return coeffs[0] + coeffs[1] * nbytes + coeffs[2] * flops


@torch.compiler.assume_constant_result
def dense_is_faster(T: int, N: int, M: int, R: int, device: torch.device) -> bool:
    """Whether one dense GEMM with ``W = U @ V`` beats the factorized dispatch at ``T`` rows.

    Tuned shapes use the measured side-by-side timings in this device's table (``dense_ms`` against
    ``sweep_ms``, the factorized dispatch's time measured beside it); other shapes use the table's
    latency model (``predicted_ms``).  A sibling device's table (same chip, other memory class;
    ``lowrank_kernels.tuning``) counts only where dense took under ``SIBLING_DENSE_MARGIN`` of the
    factorized time.  With no table for the device (or on CPU) the answer is False: nothing was
    measured.  Constant for given arguments, so ``torch.compile`` evaluates it once at trace time.
    """
    key = (T if T <= 16 else _bucket(T, list(T_BUCKETS)), N, M, R, device.type, device.index)
    hit = _DENSE_CACHE.get(key)
    if hit is not None:
        return hit
    answer = False
    table, trust = _table_for(device)
    if trust is not None:
        margin = 1.0 if trust == "exact" else tuning.SIBLING_DENSE_MARGIN
        entry = table.get("entries", {}).get(config_key(N, M, R)) or {}
        measured = {int(t): v for t, v in entry.items() if "dense_ms" in v and "sweep_ms" in v}
        b = _bucket(T, list(measured)) if measured else None
        # A measured point decides only near its own T (within 2x): some entries were tuned at
        # small T only, and the balance flips between decode and prefill.
        if b is not None and abs(math.log2(b) - math.log2(max(T, 1))) <= 1.0:
            answer = measured[b]["dense_ms"] < margin * measured[b]["sweep_ms"]
        else:
            model = table.get("latency_model")
            dense = predicted_ms(T, N, M, None, model) if model else None
            factored = predicted_ms(T, N, M, R, model) if model else None
            answer = dense is not None and factored is not None and dense < margin * factored
    _DENSE_CACHE[key] = answer
    return answer


# ---------------------------------------------------------------------------- fused sibling groups
def group_key(n: int, members: tuple[tuple[int, int], ...]) -> str:
    """Key of a fused low-rank group in the tuned table: its in_features, then each member's out and rank."""
    return f"{n}:" + "+".join(f"{m}r{r}" for m, r in members)


@torch.compiler.assume_constant_result
def group_kernel(T: int, n: int, members: tuple[tuple[int, int], ...],
                 device: torch.device) -> tuple[str, tuple[int, int, int]]:
    """How a fused low-rank group computes its members' second factors at ``T`` rows on ``device``:
    (kernel, launch config).

    ``("segmented", config)`` (one ``segmented_linear`` launch for every member, with the tuned
    ``(BLOCK_M, BLOCK_K, num_warps)``) where this device's exact table (``python -m compress tune``)
    timed it faster than cuBLAS' one GEMM per member at a tuned T within a factor 2 of ``T``; else
    ``("cublas", (0, 0, 0))``, torch's own path, so a device or group nobody measured runs what it
    ran before the segmented kernel existed. Constant for given arguments, so ``torch.compile``
    evaluates it once at trace time.
    """
    key = (T if T <= 16 else _bucket(T, list(T_BUCKETS)), n, members, device.type, device.index)
    hit = _GROUP_CACHE.get(key)
    if hit is not None:
        return hit
    answer: tuple[str, tuple[int, int, int]] = ("cublas", (0, 0, 0))
    table, trust = _table_for(device)
    entry = (table.get("groups", {}) if trust == "exact" else {}).get(group_key(n, members)) or {}
    measured = {int(t): v for t, v in entry.items() if "kernel" in v}
    if measured:
        b = _bucket(T, list(measured))
        point = measured[b]
        if abs(math.log2(b) - math.log2(max(T, 1))) <= 1.0 and point["kernel"] == "segmented":
            config = point.get("config") or (0, 0, 0)
            answer = ("segmented", (int(config[0]), int(config[1]), int(config[2])))
    _GROUP_CACHE[key] = answer
    return answer
