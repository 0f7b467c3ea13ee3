"""The Python API behind ``python -m compress``: score a model with a method, then materialize a size.

`compress` does both; `score` returns the method's `Plan` (`compress.plan`), which `load_plan`
reads back from the directory `Plan.save` wrote. Errors are plain exceptions (`ValueError`, or
`compress.errors.UserError` where a method refuses its input); the CLI words them for its flags.

``offload=True`` (svd, svd-llm, asvd, minify, surgeon): the model's weights stay in CPU memory and
the method streams it through `execution_device` one decoder block at a time
(`compress.streaming`, docs/scaling.md). Load the model on the CPU for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compress.errors import UserError
from compress.methods import MethodSpec, available_methods, get_method
from compress.mixture import mixture_batches
from compress.plan import PLAN_TYPES, Plan, recorded_plan_type
from compress.streaming import offloaded
from lowrank.surgery import SizeReport, size_report

__all__ = ["CompressResult", "check_materialize_options", "check_model", "check_offload", "check_size", "compress",
           "load_plan", "score"]


def check_size(size: float) -> float:
    """`size` as a float; `ValueError` unless it is a fraction in (0, 1]."""
    if not isinstance(size, (int, float)) or not 0.0 < float(size) <= 1.0:
        raise ValueError(f"size must be a fraction in (0, 1], got {size}")
    return float(size)


def check_offload(spec: MethodSpec, offload: Any) -> bool:
    """`offload` as a bool, refused (naming the methods that have it) where `spec` cannot stream."""
    if offload is None:
        return False
    if not isinstance(offload, bool):
        raise UserError(f"offload must be true or false, got {offload!r}")
    if offload and "offload" not in {f.name for f in dataclasses.fields(spec.config_cls)}:
        from compress.methods import available_methods

        able = [n for n, s in available_methods().items()
                if "offload" in {f.name for f in dataclasses.fields(s.config_cls)}]
        raise UserError(f"method {spec.name!r} cannot run with --offload (CPU-offloaded weights); "
                        f"methods that can: {', '.join(able)}")
    return offload


def check_model(model: nn.Module, method: str | MethodSpec) -> None:
    """Refuse, in one line naming the structure, a model that `method` cannot compress.

    Runs the method's own structure check (minify: separate gate/up/down MLPs; surgeon: separate
    q/k/v/o or gate/up/down; both refuse mixture-of-experts blocks) before any data is read or any
    evaluation starts. Methods without one (the SVD family, ACIP) take any model with target linears.
    """
    spec = get_method(method) if isinstance(method, str) else method
    if spec.check_model is not None:
        spec.check_model(model)


def check_materialize_options(spec: MethodSpec, options: Mapping[str, Any]) -> dict[str, Any]:
    """`options` for `Plan.materialize_` as a dict; `ValueError` naming any that `spec`'s plans do not take."""
    unknown = sorted(set(options) - set(spec.materialize_options))
    if unknown:
        takes = ", ".join(spec.materialize_options) or "none besides rank_multiple"
        raise ValueError(f"plans of method {spec.name!r} do not take the materialize option "
                         f"{', '.join(map(repr, unknown))} (they take: {takes})")
    return dict(options)


def load_plan(directory: str | os.PathLike) -> Plan:
    """The plan saved in `directory`, loaded by the class its directory records (`compress.plan.PLAN_TYPES`)."""
    available_methods()  # method modules register their plan types when they are imported
    return PLAN_TYPES[recorded_plan_type(directory)].load(directory)


@dataclass
class CompressResult:
    """What `compress` did: the plan, the size report of the compressed model and its per-layer ranks.

    `report` is None (and `ranks` empty) where `compress` was asked only to score (`materialize=False`).
    """

    plan: Plan
    report: SizeReport | None
    ranks: dict[str, int] = field(default_factory=dict)
    score_seconds: float = 0.0
    materialize_seconds: float = 0.0


def score(
    model: nn.Module,
    tokenizer: Any,
    method: str,
    *,
    data: str | list[str] | tuple[str, ...] | None = None,
    seq_len: int = 1024,
    num_samples: int = 64,
    seed: int = 0,
    batch_size: int | None = None,
    checkpoint_dir: str | None = None,
    resume: bool | None = None,
    offload: bool | None = None,
    bos: str = "auto",
    sizes: Sequence[float] | None = None,
    rank_multiple: int | None = None,
    **options: Any,
) -> Plan:
    """Run a method's calibration/scoring and return its Plan (materializable at its `sizes_covered`).

    `data`: one data spec or several, each ``SPEC[@WEIGHT]`` (a calibration mixture, weights = shares of
    the calibration tokens; `compress.mixture`); None is the offline default mixture (CPython docs prose
    and standard-library code).

    `bos` picks the token put in front of every calibration window (`compress.data.chunk_prefix`:
    ``"auto"`` uses the one the tokenizer adds by default, if any; ``"always"``; ``"never"``).

    `batch_size`, `checkpoint_dir`, `resume` and `offload` are shared settings: each applies to the
    methods whose config has it (`None`: the method's default). So are `sizes` and `rank_multiple`,
    for a method that prunes while it scores (surgeon): its plan covers `sizes` alone. `options` are the method's own
    config fields (`get_method(method).option_names()`); an unknown key raises `UserError`.
    `offload=True` streams the model from CPU memory (methods that support it).
    """
    spec = get_method(method)
    check_offload(spec, offload)
    shared = {"batch_size": batch_size, "checkpoint_dir": checkpoint_dir, "resume": resume, "offload": offload,
              "sizes": None if sizes is None else tuple(sizes), "rank_multiple": rank_multiple}
    config = spec.make_config(shared, **options)
    check_model(model, spec)
    chunks = None
    if spec.needs_calibration:
        # One source or a weighted mixture (compress.mixture; None: the offline default mixture).
        chunks, _ = mixture_batches(tokenizer, data, seq_len=seq_len, num_samples=num_samples, seed=seed, bos=bos)
    torch.manual_seed(seed)
    return spec.score(model, chunks, config)


def compress(
    model: nn.Module,
    tokenizer: Any,
    method: str = "svd",
    size: float = 0.8,
    *,
    rank_multiple: int = 1,
    offload: bool = False,
    execution_device: str | torch.device | None = None,
    materialize_options: Mapping[str, Any] | None = None,
    after_scoring: Callable[[Plan], None] | None = None,
    materialize: bool = True,
    **score_kwargs: Any,
) -> CompressResult:
    """Score `model` with `method` and materialize it, in place, at `size` of its targeted linear parameters.

    `offload`: weights in CPU memory, streamed block by block through `execution_device`
    (default: the current CUDA device, else the CPU) for scoring and materialization alike.
    `materialize_options`: passed to `Plan.materialize_` (e.g. ``{"reset": False}`` for score maps;
    `MethodSpec.materialize_options` lists what a method's plans take). `after_scoring` is called
    with the plan before it is materialized (e.g. to save it). `materialize=False` stops after the
    scoring (a process of a distributed scoring run that leaves materialization to rank 0).
    `score_kwargs` go to `score`.
    """
    size = check_size(size)
    spec = get_method(method)
    offload = check_offload(spec, offload)
    options = check_materialize_options(spec, materialize_options or {})
    stream = offloaded(model, execution_device) if offload else contextlib.nullcontext()
    with stream:
        start = time.perf_counter()
        plan = score(model, tokenizer, method, offload=offload or None, sizes=(size,), rank_multiple=rank_multiple,
                     **score_kwargs)
        score_seconds = time.perf_counter() - start
        if after_scoring is not None:
            after_scoring(plan)
        if not materialize:
            return CompressResult(plan, None, {}, score_seconds)
        start = time.perf_counter()
        ranks = plan.materialize_(model, size, rank_multiple=rank_multiple, **options)
        materialize_seconds = time.perf_counter() - start
    return CompressResult(plan, size_report(model), ranks, score_seconds, materialize_seconds)
