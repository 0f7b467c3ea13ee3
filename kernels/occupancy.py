"""Occupancy of compiled Triton kernels: how many programs can be resident on one SM at once.

The fused ``lowrank_matmul`` kernel synchronises its whole grid with a barrier, so every program
must be resident at the same time or the spinning ones wait forever for ones that cannot start.
``barrier_programs`` sizes such a grid: one program per SM always fits; more only within the
occupancy that ``resident_programs`` reads from the compiled kernel (``kernel_blocks_per_sm``:
registers, shared memory, warps and blocks per SM, counted as CUDA's occupancy calculator does in
``blocks_per_sm`` and capped by the driver's own answer, ``driver_blocks_per_sm``).

Importing this module never initialises CUDA.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lowrank_kernels.utils import cuda_index

__all__ = [
    "barrier_programs",
    "blocks_per_sm",
    "driver_blocks_per_sm",
    "kernel_blocks_per_sm",
    "resident_programs",
]

# Resident blocks per SM where torch's device properties do not say: 32 on sm_70/80/90/100,
# 16-24 on the other parts of those generations, so take 16 for anything not listed.
_MAX_BLOCKS_PER_SM = {(7, 0): 32, (8, 0): 32, (9, 0): 32, (10, 0): 32}
_RESIDENT: dict[tuple, int] = {}
_CUDA_LIB: list = []


def blocks_per_sm(n_regs: int, shared: int, num_warps: int, *, regs_per_sm: int = 65536,
                  threads_per_sm: int = 2048, smem_per_sm: int = 233472, max_blocks: int = 32,
                  warp_size: int = 32) -> int:
    """How many programs of one kernel fit on an SM at once (0: not even one).

    Counted as CUDA's occupancy calculator does (cuda_occupancy.h): registers are allocated
    per warp in units of 256 from 4 sub-partitions of ``regs_per_sm / 4`` each; every block
    also takes 1 KB of system shared memory, allocated in 128-byte units; and both the warps
    (``threads_per_sm / 32``) and the blocks per SM are capped.  Defaults are H100 (sm_90).
    """
    n_regs, shared, num_warps = int(n_regs), int(shared), int(num_warps)
    if n_regs > 255 or num_warps < 1:
        return 0
    parts = 4
    regs_per_warp = -(-max(n_regs, 1) * warp_size // 256) * 256
    if regs_per_warp * (-(-num_warps // parts) * parts) > regs_per_sm:
        return 0
    by_regs = ((regs_per_sm // parts) // regs_per_warp) * parts // num_warps
    by_threads = threads_per_sm // (num_warps * warp_size)
    by_smem = smem_per_sm // (-(-(shared + 1024) // 128) * 128)
    return max(0, min(by_regs, by_threads, by_smem, max_blocks))


def driver_blocks_per_sm(function: Any, threads: int, shared: int) -> int | None:
    """``cuOccupancyMaxActiveBlocksPerMultiprocessor`` of a loaded kernel (None where unavailable).

    This is the number the driver itself checks a cooperative launch against.
    """
    if not isinstance(function, int) or function == 0:
        return None
    try:
        import ctypes

        if not _CUDA_LIB:
            _CUDA_LIB.append(ctypes.CDLL("libcuda.so.1"))
        n = ctypes.c_int(0)
        rc = _CUDA_LIB[0].cuOccupancyMaxActiveBlocksPerMultiprocessor(
            ctypes.byref(n), ctypes.c_void_p(function), ctypes.c_int(threads), ctypes.c_size_t(shared))
    except Exception:  # noqa: BLE001 - no driver library: our own count stands alone
        return None
    return int(n.value) if rc == 0 else None


def kernel_blocks_per_sm(compiled: Any, props: Any) -> int | None:
    """Resident programs per SM of a compiled Triton kernel, or None if its metadata is unreadable.

    ``n_regs`` only exists once the binary is loaded (``CompiledKernel._init_handles`` in triton
    3.x, which ``warmup`` does not call); ``shared`` and ``num_warps`` are in its metadata.  The
    driver's own answer, where it can be had, caps ours (they should agree).
    """
    try:
        init = getattr(compiled, "_init_handles", None)
        if init is not None:
            init()
        n_regs = int(compiled.n_regs)
        shared = int(compiled.metadata.shared)
        warps = int(compiled.metadata.num_warps)
    except Exception:  # noqa: BLE001 - any missing attribute means "unknown"
        return None
    if n_regs <= 0 or warps <= 0 or shared < 0:
        return None
    warp_size = int(getattr(props, "warp_size", 32) or 32)
    occ = blocks_per_sm(
        n_regs, shared, warps,
        regs_per_sm=int(getattr(props, "regs_per_multiprocessor", 0) or 65536),
        threads_per_sm=int(getattr(props, "max_threads_per_multi_processor", 0) or 1024),
        smem_per_sm=int(getattr(props, "shared_memory_per_multiprocessor", 0) or 102400),
        max_blocks=_MAX_BLOCKS_PER_SM.get((getattr(props, "major", 0), getattr(props, "minor", 0)), 16),
        warp_size=warp_size,
    )
    drv = driver_blocks_per_sm(getattr(compiled, "function", None), warps * warp_size, shared)
    return occ if drv is None else min(occ, drv)


def resident_programs(device: torch.device, spec: tuple, warm: Callable[[], Any]) -> int:
    """Programs of one compiled kernel that can be resident on one SM at once (>= 1), cached.

    ``spec`` must determine the compiled kernel (constexprs, dtypes and everything Triton
    specializes on: integer arguments and 16-byte pointer alignment), because the register
    count, hence the occupancy, can differ between specializations.  ``warm()`` compiles the
    kernel without launching it and returns Triton's compiled-kernel object.  Anything that
    cannot be read gives 1: one program per SM is always resident once the kernel launches.
    """
    idx = cuda_index(device)
    key = (idx, spec)
    n = _RESIDENT.get(key)
    if n is None:
        try:
            occ = kernel_blocks_per_sm(warm(), torch.cuda.get_device_properties(idx))
        except Exception:  # noqa: BLE001 - compile errors resurface at the launch itself
            occ = None
        n = max(1, occ or 1)
        _RESIDENT[key] = n
    return n


def barrier_programs(want: int, nsm: int, programs_per_sm: int, resident: Callable[[], int]) -> int:
    """Grid size of a grid-barrier kernel: at most ``want``, and never more programs than can all
    be resident at once.  ``resident()`` (programs per SM the kernel's resources allow, >= 1)
    is consulted only when more than one program per SM is requested and useful."""
    per_sm = 1
    if programs_per_sm > 1 and want > nsm:
        per_sm = max(1, min(programs_per_sm, resident()))
    return max(1, min(want, nsm * per_sm))
