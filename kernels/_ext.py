"""Loader and Python API of the optional CUDA extension built from ``csrc/``.

``lowrank_gemv(x, U, V, bias=None)`` is a batch-1 decode kernel for the factorized layer
``y = (x·Vᵀ)·Uᵀ + bias`` (bf16/fp16, fp32 accumulation, sm_90): two tensor-core
skinny-GEMM kernels joined by a tiny fp32 buffer and programmatic dependent launch (see
``csrc/lowrank_gemv.cu``).  It is meant for a few tokens (T <= 8 per launch; more are
processed in chunks of 8).

The compiled module is found in this order, on the first call that needs it (never at
import time, so importing this module never initialises CUDA or starts a compiler):

1. ``lowrank_kernels._C``, built by ``pip install .`` / ``setup.py`` where a CUDA toolkit exists;
2. a just-in-time build of the same sources with ``torch.utils.cpp_extension.load``
   into ``$LOWRANK_KIT_CACHE`` (default ``~/.cache/lowrank-kit``)/torch_ext/<key>, which
   takes about a minute once and is reused afterwards.

Set ``LOWRANK_KIT_NO_JIT=1`` to forbid the just-in-time build.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import ModuleType

import torch
from lowrank_kernels.utils import check_lowrank_inputs
from torch import Tensor

__all__ = ["lowrank_gemv", "is_available", "load", "build_error"]

# csrc/ sits beside kernels/ in a checkout (editable install) and inside the package in a wheel.
_HERE = Path(__file__).resolve().parent
_CSRC = next((p for p in (_HERE / "csrc", _HERE.parent / "csrc") if (p / "bindings.cpp").is_file()), _HERE / "csrc")
_SOURCES = ("lowrank_gemv.cu", "bindings.cpp")
_LOCK = threading.Lock()
_MODULE: ModuleType | None = None
_ERROR: str | None = None
_DTYPES = (torch.bfloat16, torch.float16)


def _cache_dir() -> Path:
    root = Path(os.environ.get("LOWRANK_KIT_CACHE", Path.home() / ".cache" / "lowrank-kit"))
    cc = torch.cuda.get_device_capability()
    key = f"torch{torch.__version__}-cuda{torch.version.cuda}-sm{cc[0]}{cc[1]}".replace("+", "_")
    return root / "torch_ext" / key


def _jit_build() -> ModuleType:
    from torch.utils.cpp_extension import load as cpp_load

    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}"
    build_dir = _cache_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    return cpp_load(
        name="lowrank_kit_C",
        sources=[str(_CSRC / s) for s in _SOURCES],
        extra_include_paths=[str(_CSRC)],
        extra_cflags=["-O3"],
        # An explicit -gencode stops torch from adding its own arch list: one target, the
        # GPU in hand (the kernels need sm_90 for clusters and PDL).
        extra_cuda_cflags=[
            "-O3",
            "-std=c++17",
            "--use_fast_math",
            f"-gencode=arch=compute_{arch},code=sm_{arch}",
        ],
        build_directory=str(build_dir),
        verbose=False,
    )


def load() -> ModuleType:
    """The compiled extension module; builds it just in time if no prebuilt one exists.

    Raises:
        RuntimeError: no CUDA device of compute capability >= 9.0, or the build failed
            (the compiler's message is kept in ``build_error()``).
    """
    global _MODULE, _ERROR
    if _MODULE is not None:
        return _MODULE
    with _LOCK:
        if _MODULE is not None:
            return _MODULE
        if _ERROR is not None:
            raise RuntimeError(_ERROR)
        if not torch.cuda.is_available():
            raise RuntimeError("lowrank_kernels._ext: no CUDA device")  # not cached: a device may appear later
        if torch.cuda.get_device_capability() < (9, 0):
            _ERROR = "lowrank_kernels._ext: lowrank_gemv needs compute capability >= 9.0 (Hopper)"
            raise RuntimeError(_ERROR)
        try:
            from lowrank_kernels import _C  # type: ignore[attr-defined]

            _MODULE = _C
            return _MODULE
        except ImportError:
            pass
        if os.environ.get("LOWRANK_KIT_NO_JIT", "0") == "1":
            _ERROR = "lowrank_kernels._ext: lowrank_kernels._C is not installed and LOWRANK_KIT_NO_JIT=1"
            raise RuntimeError(_ERROR)
        try:
            _MODULE = _jit_build()
        except Exception as exc:  # compiler missing, build error, ...
            _ERROR = f"lowrank_kernels._ext: just-in-time build of csrc/ failed: {exc}"
            raise RuntimeError(_ERROR) from exc
        return _MODULE


def is_available() -> bool:
    """True when the extension is (or can be made) usable here; may build it the first time."""
    try:
        load()
    except RuntimeError:
        return False
    return True


def build_error() -> str | None:
    """Why the extension could not be loaded, if a previous attempt failed."""
    return _ERROR


def lowrank_gemv(
    x: Tensor,
    U: Tensor,
    V: Tensor,
    bias: Tensor | None = None,
    *,
    pdl: bool = True,
    cluster_down: int = 0,
    cluster_up: int = 0,
) -> Tensor:
    """``y = x @ V.T @ U.T + bias`` for ``x [..., in]``, ``V [r, in]``, ``U [out, r]`` (inference only).

    Same argument semantics and ``ValueError``s as ``lowrank_matmul.lowrank_matmul`` (both check
    through ``utils.check_lowrank_inputs``); in addition the tensors must be bf16 or fp16 on a
    CUDA device (``ValueError`` otherwise).  The intermediate ``x·Vᵀ`` stays fp32.  No autograd:
    the result does not require grad.

    ``pdl``, ``cluster_down`` and ``cluster_up`` are benchmark knobs (programmatic
    dependent launch of the second kernel; thread-block cluster sizes 1/2/4/8, 0 = auto).

    Raises:
        ValueError: shape, dtype or device mismatch, unsupported dtype, CPU tensors.
        RuntimeError: the extension cannot be loaded or built here.
    """
    check_lowrank_inputs(x, U, V, bias)
    if x.dtype not in _DTYPES:
        raise ValueError(f"lowrank_gemv supports bfloat16 and float16 only, got {x.dtype}")
    if cluster_down not in (0, 1, 2, 4, 8) or cluster_up not in (0, 1, 2, 4, 8):
        raise ValueError("cluster_down / cluster_up must be 0 (auto), 1, 2, 4 or 8")
    if not x.is_cuda:
        raise ValueError(f"lowrank_gemv needs CUDA tensors, got {x.device}")
    mod = load()
    in_features, out_features = V.shape[1], U.shape[0]
    lead = x.shape[:-1]
    x2 = x.detach().reshape(-1, in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    U = U.detach() if U.stride(-1) == 1 else U.detach().contiguous()
    V = V.detach() if V.stride(-1) == 1 else V.detach().contiguous()
    if bias is not None:
        bias = bias.detach() if bias.stride(0) == 1 else bias.detach().contiguous()
    y = mod.lowrank_gemv(x2, U, V, bias, pdl, cluster_down, cluster_up)
    return y.view(*lead, out_features)
