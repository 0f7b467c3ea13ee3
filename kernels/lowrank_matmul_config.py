"""Launch configurations of ``lowrank_matmul``'s Triton backends, as frozen dataclasses.

* ``FusedConfig``: the persistent two-phase kernel (``backend="triton_fused"``);
* ``GemmConfig``: one Triton NT-GEMM;
* ``TwoGemmConfig``: the two GEMMs of ``backend="two_gemm"`` / ``"triton_gemm"``, each cuBLAS or Triton.

They follow ``gram.GramConfig``'s style and share its JSON form (``utils.LaunchConfig``): the
dispatch tables in ``configs/lowrank_matmul.<device key>.json`` and the tuners' candidate lists store
``config.to_dict()`` (only the fields that differ from the defaults), and ``config_for`` reads
them back.  The configs live apart from the op so that the dispatch (``dispatch``), which picks
them, and the launchers (``lowrank_matmul``), which run them, both import them without importing
each other.

Importing this module never initialises CUDA and works without Triton.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lowrank_kernels.utils import LaunchConfig

__all__ = ["CUBLAS", "CUBLAS_TWO_GEMM", "FusedConfig", "GemmConfig", "TwoGemmConfig", "config_for"]

CUBLAS = "cublas"  # a TwoGemmConfig GEMM run by cuBLAS (torch.mm / addmm) instead of Triton
SYNC_MODES = ("barrier", "two_launch", "local")


@dataclass(frozen=True)
class FusedConfig(LaunchConfig):
    """Tile sizes and options of the fused kernel; ``lowrank_matmul._fused_params`` resolves them
    against a problem size (tiles clipped to it, ``None`` fields chosen)."""

    use_dot: bool | None = None  # None: False at T == 1, True otherwise
    block_t: int = 16
    block_t_fma: int = 1  # rows per work item on the FMA path (1 = GEMV)
    block_r1: int = 4
    block_k1: int = 2048
    ksplit: int | None = None  # None: enough K splits that phase 1 has ~one item per SM
    block_m2: int = 16
    block_r2: int = 512
    num_warps: int = 8
    num_stages: int = 1
    sync: str = "barrier"  # "two_launch": phases as two launches; "local": shrink per program
    early_u: bool = False
    max_programs: int | None = None  # cap on the grid (tests use it to give programs several items)
    # Barrier mode only: launch up to this many programs per SM.  More resident programs keep
    # more weight tiles in flight per SM (one program holds one tile), but every program must
    # be co-resident or the grid barrier deadlocks, so the launcher clamps the request to the
    # compiled kernel's occupancy (see occupancy.resident_programs) and falls back to 1 when unknown.
    programs_per_sm: int | None = 1  # None: 1
    # Barrier mode only: launch with CUDA's cooperative attribute, under which the driver
    # refuses (raises) a grid that cannot be co-resident instead of letting it hang, even
    # when other streams occupy SMs.  None: on exactly when more than one program per SM is
    # requested (the historical one-per-SM launch stays a plain launch).
    cooperative: bool | None = None
    # GEMV path: weight tiles in flight per program.  1: the next tile is requested before
    # the current one is reduced.  2: two tiles ahead, with the loop unrolled by two so
    # that each tile is loaded into the register buffer it is consumed from (a rotating
    # buffer would need a register copy of a load still in flight, which waits for it).
    prefetch: int = 1

    def __post_init__(self) -> None:
        if self.sync not in SYNC_MODES:
            raise ValueError(f"unknown fused sync mode {self.sync!r} (one of {SYNC_MODES})")
        if self.programs_per_sm is not None and int(self.programs_per_sm) < 1:
            raise ValueError(f"programs_per_sm must be >= 1, got {self.programs_per_sm!r}")
        if int(self.prefetch) not in (1, 2):
            raise ValueError(f"prefetch must be 1 or 2, got {self.prefetch!r}")


@dataclass(frozen=True)
class GemmConfig(LaunchConfig):
    """Tiles of the Triton NT-GEMM ``C = A @ B.T``; ``split_k > 1`` accumulates atomically in fp32."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    group_m: int = 8
    split_k: int = 1
    num_warps: int = 8
    num_stages: int = 3


@dataclass(frozen=True)
class TwoGemmConfig(LaunchConfig):
    """``t = x V^T`` (``gemm1``) then ``y = t U^T + b`` (``gemm2``), each ``CUBLAS`` or a ``GemmConfig``.

    ``None`` is the backend's default: cuBLAS for ``two_gemm``, the first Triton candidate for
    ``triton_gemm``.  ``pad_u``: copy a U with unaligned rows into a zero-padded aligned buffer
    per call (cuBLAS path only; see ``lowrank_matmul._run_two_gemm``).
    """

    gemm1: GemmConfig | str | None = None
    gemm2: GemmConfig | str | None = None
    pad_u: bool = False

    def __post_init__(self) -> None:
        for name in ("gemm1", "gemm2"):
            value = getattr(self, name)
            if not (value is None or value == CUBLAS or isinstance(value, GemmConfig)):
                raise ValueError(f"TwoGemmConfig.{name} must be {CUBLAS!r}, a GemmConfig or None, got {value!r}")

    @classmethod
    def _field_from_json(cls, name: str, value: Any) -> Any:
        if name in ("gemm1", "gemm2") and isinstance(value, dict):
            return GemmConfig.from_dict(value)
        return value

    @property
    def uses_triton(self) -> bool:
        """Whether either GEMM is a Triton kernel."""
        return isinstance(self.gemm1, GemmConfig) or isinstance(self.gemm2, GemmConfig)


# cuBLAS for both GEMMs: torch's own two-GEMM path, the dispatch's choice wherever nothing was tuned.
CUBLAS_TWO_GEMM = TwoGemmConfig(gemm1=CUBLAS, gemm2=CUBLAS)
_CONFIG_TYPES: dict[str, type[LaunchConfig]] = {
    "triton_fused": FusedConfig,
    "two_gemm": TwoGemmConfig,
    "triton_gemm": TwoGemmConfig,
}
# Built once: a frozen config is shared, and building one costs microseconds on every launch.
_DEFAULTS: dict[type[LaunchConfig], LaunchConfig] = {kind: kind() for kind in set(_CONFIG_TYPES.values())}


def config_for(backend: str, config: Any) -> LaunchConfig | None:
    """The config of ``backend`` from its JSON form (a dict, as the tables store it) or as given.

    ``None`` for a backend without options (``cublas``, ``torch``, ``ext_gemv``): their configs are
    ignored, as they always were.  ``None`` or ``{}`` for one with options gives its defaults.
    """
    kind = _CONFIG_TYPES.get(backend)
    if kind is None:
        return None
    return kind.from_dict(config) if config is not None else _DEFAULTS[kind]
