"""Helpers every kernel module shares, each defined once.

* the Triton import guard: ``triton``, ``tl`` and ``HAS_TRITON`` (and ``TensorDescriptor``, the
  host-side TMA descriptor of Triton >= 3.4);
* ``interpreting()``: whether Triton runs kernels in its interpreter (``TRITON_INTERPRET``);
* ``cuda_index`` and ``sm_count``: the device index and streaming-multiprocessor count;
* ``pow2_divisor`` and ``next_pow2``: the power-of-two arithmetic of tile sizes and alignment hints;
* ``dot_precision``: the ``tl.dot`` input precision for a dtype;
* ``check_lowrank_inputs``: the argument checks of the factorized layer, shared by the Triton op
  (``lowrank_matmul``) and the CUDA extension (``_ext``);
* ``LaunchConfig``: the JSON form (``to_dict`` / ``from_dict``) of the launch-config dataclasses.

Importing this module never initialises CUDA and works without Triton.
"""

from __future__ import annotations

import os
from dataclasses import fields
from typing import Any, TypeVar

import torch
from torch import Tensor

# Triton is optional: every kernel module imports (and falls back to torch) without it.  Only a
# missing Triton counts as absent; any other error while importing it is a broken install and is
# raised rather than hidden behind the slow path.
try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    HAS_TRITON = False

try:  # host-side TMA descriptors (Triton >= 3.4); kernels that use them keep a pointer fallback
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the Triton version
    TensorDescriptor = None

try:  # Triton >= 3.4 parses its environment switches in one place
    from triton import knobs as _triton_knobs
except ImportError:  # pragma: no cover - depends on the Triton version
    _triton_knobs = None

__all__ = [
    "HAS_TRITON",
    "NO_GPU_SM_COUNT",
    "LaunchConfig",
    "TensorDescriptor",
    "check_lowrank_inputs",
    "cuda_index",
    "dot_precision",
    "interpreting",
    "next_pow2",
    "pow2_divisor",
    "sm_count",
    "tl",
    "triton",
]

# SM count reported for anything that is not a CUDA device (the interpreter on the CPU): any fixed
# value keeps the launch plans that depend on it (e.g. gram's split-K choice) deterministic.
NO_GPU_SM_COUNT = 8
_SM_COUNTS: dict[int, int] = {}


def interpreting() -> bool:
    """True when Triton runs ``@triton.jit`` kernels in its interpreter, i.e. ``TRITON_INTERPRET`` is on.

    "On" means what Triton itself reads: ``1`` (Triton >= 3.4 also takes ``true``, ``yes``, ``on``,
    ``y`` in any case); anything else, or no Triton, is off.  Read from the environment at every
    call, so a test can set the variable.  Triton fixes whether a kernel is interpreted when it is
    decorated (at import), so changing the variable later changes only this answer, i.e. what the
    launchers accept, not how already imported kernels run.
    """
    if not HAS_TRITON:
        return False
    if _triton_knobs is not None:
        return bool(_triton_knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"  # Triton < 3.4 compares with "1" only


def cuda_index(device: torch.device) -> int:
    """Index of a CUDA device, the current one where ``device`` names none (``torch.device("cuda")``)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached per index); ``NO_GPU_SM_COUNT`` for any other."""
    if device.type != "cuda":
        return NO_GPU_SM_COUNT
    idx = cuda_index(device)
    n = _SM_COUNTS.get(idx)
    if n is None:
        n = _SM_COUNTS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return n


def pow2_divisor(*values: int, cap: int) -> int:
    """Largest power of two, at most ``cap`` (itself a power of two), that divides every value.

    Zero is divisible by anything and no values at all give ``cap``.  The kernels multiply a row
    stride or base offset divided by this back in as a constexpr, which lets Triton prove the
    alignment of every row and emit vector loads.
    """
    if cap < 1 or cap & (cap - 1):
        raise ValueError(f"cap must be a power of two >= 1, got {cap}")
    a = cap
    while a > 1 and any(int(v) % a for v in values):
        a //= 2
    return a


def next_pow2(n: int) -> int:
    """Smallest power of two >= ``n`` (1 for ``n <= 1``): Triton's block sizes must be powers of two."""
    return 1 << max(0, int(n) - 1).bit_length()


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: fp32 inputs stay exact ("ieee", the tests compare against fp32
    torch); 16-bit inputs ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_lowrank_inputs(x: Tensor, U: Tensor, V: Tensor, bias: Tensor | None) -> None:
    """``ValueError`` unless ``x [..., in]``, ``U [out, r]``, ``V [r, in]``, ``bias [out]`` (or None)
    agree in shape, share one floating dtype (no implicit upcast) and one device."""
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension [..., in_features]")
    if U.dim() != 2 or V.dim() != 2:
        raise ValueError(f"U and V must be 2-D, got U.dim()={U.dim()}, V.dim()={V.dim()}")
    if x.shape[-1] != V.shape[1]:
        raise ValueError(f"last dim of x ({x.shape[-1]}) != in_features of V ({V.shape[1]})")
    if U.shape[1] != V.shape[0]:
        raise ValueError(f"rank mismatch: U is {tuple(U.shape)} but V is {tuple(V.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != U.shape[0]):
        raise ValueError(f"bias must have shape ({U.shape[0]},), got {tuple(bias.shape)}")
    dtypes = {x.dtype, U.dtype, V.dtype} | ({bias.dtype} if bias is not None else set())
    if len(dtypes) != 1:
        raise ValueError(
            f"dtype mismatch (no implicit upcast): x={x.dtype}, U={U.dtype}, V={V.dtype}"
            + (f", bias={bias.dtype}" if bias is not None else "")
        )
    if not x.dtype.is_floating_point:
        raise ValueError(f"floating-point inputs required, got {x.dtype}")
    devices = {x.device, U.device, V.device} | ({bias.device} if bias is not None else set())
    if len(devices) != 1:
        raise ValueError(f"device mismatch: x={x.device}, U={U.device}, V={V.device}"
                         + (f", bias={bias.device}" if bias is not None else ""))


_Config = TypeVar("_Config", bound="LaunchConfig")


class LaunchConfig:
    """Base of the kernels' launch-config dataclasses (frozen, hashable): their JSON form and back.

    ``to_dict()`` gives the fields that differ from their defaults, nested configs as dicts: the
    partial form the dispatch tables in ``configs/`` store.  ``from_dict`` reads that form, or any
    fuller one, and refuses unknown fields by name.  ``from_dict(c.to_dict()) == c`` for every config.
    A subclass with config-valued fields parses them in ``_field_from_json``.
    """

    @classmethod
    def from_dict(cls: type[_Config], data: Any) -> _Config:
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__}: expected a dict of fields, got {type(data).__name__}")
        known = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known: {known}")
        return cls(**{k: cls._field_from_json(k, v) for k, v in data.items()})

    @classmethod
    def _field_from_json(cls, name: str, value: Any) -> Any:
        return value

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value != f.default:
                out[f.name] = value.to_dict() if isinstance(value, LaunchConfig) else value
        return out
