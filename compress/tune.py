"""``python -m compress tune``: measure a checkpoint's own factorized layer shapes on this GPU.

    python -m compress tune --model CKPT [--tokens 1,4,8,16,64,256,1024,4096] [--budget-s 120]
    python -m compress tune --shapes 4096x4096r1024,4096x11008r1472 [--out FILE]
    python -m compress tune --groups 4096:4096r1024+4096r1024+4096r1024 [--out FILE]

For every distinct (in_features, out_features, rank) of the checkpoint's `LowRankLinear` layers
(read from its config's ``quantization_config``; no weights are loaded) and every T bucket in
``--tokens``, it times on rotating random weights (more bytes than twice the L2, CUDA-graph
replays, medians) the candidates the dispatch can run: cuBLAS' two GEMMs (torch's own path), a
short list of fused Triton configs for T <= 8, Triton/padded GEMMs for ranks that are not
multiples of 8, and one dense GEMM of the same layer. Each candidate's output is checked against
an fp32 reference before it is timed, so a config that computes a wrong answer can never win.

The fastest factorized path per shape and T, with the dense time beside it (what
``lowrank_kernels.dispatch.dense_is_faster`` compares for the dense fallback), goes into this device's
tuning cache (``lowrank_kernels.tuning``: ``~/.cache/lowrank-kit/tuning/<device key>.json``, or
``$LOWRANK_TUNING_DIR``), which ``lowrank_matmul``, ``python -m compress bench`` and
``lowrank.serving`` read from then on. Shapes are measured in an order that covers every
(in, out) pair before a second rank of it, and no new point starts after ``--budget-s``; ranks
left out borrow the nearest measured aligned rank of the same (in, out), or run torch's two GEMMs.

With ``--model``, the budget left then times the checkpoint's fused sibling groups (q/k/v, gate/up whose
members are all factorized; ``lowrank.fusion``) at the decode row counts of ``--tokens``: one
``segmented_linear`` launch for the members' second factors (each of its launch configs) against cuBLAS'
GEMM per member. The table's ``groups`` section, the winner and its config per group and row count, is
what ``fuse_sibling_projections(low_rank_kernel="auto")`` follows.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from compress.errors import UserError, report_or_exit_code

__all__ = ["DEFAULT_TOKENS", "add_arguments", "candidates", "checkpoint_groups", "checkpoint_shapes", "main",
           "parse_shapes", "run", "tune_groups", "tune_shapes"]

DEFAULT_TOKENS = (1, 4, 8, 16, 64, 256, 1024, 4096)
DEFAULT_BUDGET_S = 120.0
_CUBLAS = {"gemm1": "cublas", "gemm2": "cublas"}
# Fused T=1 configs worth timing (indices into fused_candidates(1)): the two_launch variants that
# won the sweeps in bench/results/lowrank_tune_*, the default barrier kernel and its two-programs-per-SM form.
_T1_FUSED = (3, 4, 0, 5)
_MAX_COPIES = 256
# Set False where the fused kernel's grid barrier failed its smoke test: only two_launch/local configs run.
BARRIER_OK = True

Shape = tuple[int, int, int]  # (in_features n, out_features m, rank r)
Group = tuple[int, tuple[tuple[int, int], ...]]  # fused sibling group: (in_features n, ((out m, rank r), ...))


# ---------------------------------------------------------------------------- shapes
def parse_shapes(spec: str) -> list[Shape]:
    """``"4096x11008r1472,576x576r128"`` (in x out, rank) -> [(4096, 11008, 1472), (576, 576, 128)]."""
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        try:
            n, rest = item.lower().split("x")
            m, r = rest.split("r")
            shape = (int(n), int(m), int(r))
        except ValueError as exc:
            raise UserError(f"--shapes takes INxOUTrRANK items, e.g. 4096x11008r1472; got {item!r}") from exc
        if min(shape) <= 0 or shape[2] > min(shape[0], shape[1]):
            raise UserError(f"--shapes: {item!r} needs positive sizes and rank <= min(in, out)")
        out.append(shape)
    if not out:
        raise UserError("--shapes is empty")
    return out


def parse_groups(spec: str) -> list[Group]:
    """``"4096:4096r1024+4096r1024,576:1536r192+1536r192"`` (in: member out x rank, ...) -> [Group, ...]."""
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        try:
            n, rest = item.lower().split(":")
            members = tuple((int(m), int(r)) for m, r in (part.split("r") for part in rest.split("+")))
            group = (int(n), members)
        except ValueError as exc:
            raise UserError(f"--groups takes IN:OUTrRANK+OUTrRANK... items, e.g. 4096:11008r1504+11008r1504; "
                            f"got {item!r}") from exc
        if group[0] <= 0 or any(m <= 0 or not 0 < r <= min(m, group[0]) for m, r in members):
            raise UserError(f"--groups: {item!r} needs positive sizes and ranks <= min(in, out)")
        out.append(group)
    if not out:
        raise UserError("--groups is empty")
    return out


def _parse_tokens(spec: str | None) -> list[int]:
    if spec is None:
        return list(DEFAULT_TOKENS)
    try:
        tokens = sorted({int(v) for v in spec.split(",") if v.strip()})
    except ValueError as exc:
        raise UserError(f"--tokens must be a comma list of row counts, got {spec!r}") from exc
    if not tokens or tokens[0] <= 0:
        raise UserError(f"--tokens must be positive row counts, got {spec!r}")
    return tokens


def checkpoint_shapes(source: str | None) -> Counter:
    """Counter of (in, out, rank) over a compressed checkpoint's factorized layers, from its config alone."""
    return Counter(_factorized_layers(source).values())


def checkpoint_groups(source: str | None) -> Counter:
    """Counter of the fused sibling groups (q/k/v, gate/up; `lowrank.fusion.SIBLING_SETS`) whose members are
    all factorized and read one input width, as (in, ((out, rank), ...)) in the members' order."""
    from lowrank.fusion import SIBLING_SETS

    layers = _factorized_layers(source)
    counts: Counter = Counter()
    for parent in sorted({name.rsplit(".", 1)[0] for name in layers if "." in name}):
        for names in SIBLING_SETS:
            shapes = [layers.get(f"{parent}.{n}") for n in names]
            if all(shapes) and len({sh[0] for sh in shapes}) == 1:
                counts[(shapes[0][0], tuple((m, r) for _, m, r in shapes))] += 1
    return counts


def _factorized_layers(source: str | None) -> dict[str, Shape]:
    """{layer name: (in, out, rank)} of a compressed checkpoint's factorized layers, from its config alone."""
    from compress.model import _resolve_source

    name, _extra = _resolve_source(source)
    path = Path(name)
    if path.is_dir():
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"could not read {path / 'config.json'}: {exc}") from exc
    else:
        try:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(name).to_dict()
        except (OSError, ValueError) as exc:
            raise UserError(f"could not load the config of {source!r}: {str(exc).splitlines()[0]}") from exc
    quant = config.get("quantization_config") or {}
    layers: dict[str, Shape] = {}
    if quant.get("quant_method") != "lowrank":
        return layers
    widths, dense = quant.get("widths") or {}, quant.get("dense_shapes") or {}
    for layer, rank in (quant.get("ranks") or {}).items():
        shape = widths.get(layer) or dense.get(layer)
        if shape is None:
            raise UserError(f"the checkpoint's quantization_config gives {layer!r} a rank but no shape")
        out_f, in_f = shape
        layers[layer] = (int(in_f), int(out_f), int(rank))
    return layers


def order_shapes(counts: Counter) -> list[Shape]:
    """Round robin over (in, out) pairs, each pair's ranks by frequency: every pair gets a rank early."""
    groups: dict[tuple[int, int], list[Shape]] = {}
    for shape, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        groups.setdefault(shape[:2], []).append(shape)
    pairs = sorted(groups, key=lambda nm: -sum(counts[s] * s[2] * (s[0] + s[1]) for s in groups[nm]))
    out: list[Shape] = []
    for i in range(max((len(g) for g in groups.values()), default=0)):
        out += [groups[nm][i] for nm in pairs if i < len(groups[nm])]
    return out


# ---------------------------------------------------------------------------- candidates and timing
def candidates(T: int, n: int, m: int, r: int) -> list[tuple[str, dict]]:
    """(backend, config) pairs timed for one shape and T; the first is cuBLAS' two GEMMs."""
    from lowrank_kernels.dispatch import fused_candidates, gemm_candidates

    out: list[tuple[str, dict]] = [("two_gemm", dict(_CUBLAS))]
    if T == 1:
        fused = fused_candidates(1)
        out += [("triton_fused", dict(fused[i])) for i in _T1_FUSED if i < len(fused)]
    elif T <= 8:
        out += [("triton_fused", dict(c)) for c in fused_candidates(T)]
    if not BARRIER_OK:
        out = [(b, c) for b, c in out if b != "triton_fused" or c.get("sync", "barrier") != "barrier"]
    if r % 8 != 0 and T >= 16:
        g1, g2 = gemm_candidates(T, 1), gemm_candidates(T, 2)
        out.append(("two_gemm", {"gemm1": "cublas", "gemm2": g2[0]}))
        if T >= 256:
            out.append(("two_gemm", dict(_CUBLAS, pad_u=True)))
            out.append(("two_gemm", {"gemm1": g1[0], "gemm2": "cublas"}))
    return out


def label(backend: str, cfg: dict | None) -> str:
    """Short name of a candidate for logs and the table's ``candidates`` lists."""
    if backend == "two_gemm" and cfg:
        def one(c: Any) -> str:
            return "cb" if c == "cublas" else f"t{c['block_m']}x{c['block_n']}x{c['block_k']}s{c.get('split_k', 1)}"
        return f"2g[{one(cfg.get('gemm1', 'cublas'))}|{one(cfg.get('gemm2', 'cublas'))}]" + (
            "pad" if cfg.get("pad_u") else "")
    if backend == "triton_fused" and cfg:
        keys = ("block_r1", "block_k1", "block_m2", "block_r2", "num_warps", "block_t_fma", "sync",
                "programs_per_sm")
        return "F:" + ",".join(str(cfg[k]) for k in keys if k in cfg)
    return backend


def _l2_bytes(props: Any) -> int:
    """L2 size of a device's properties (50 MiB where torch does not report it): what rotating weights must exceed."""
    return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)


def _copies(nbytes: int, l2_bytes: int) -> int:
    """Weight copies to rotate through so that one pass reads more than twice the L2 from HBM."""
    return int(min(_MAX_COPIES, max(2, math.ceil(2 * l2_bytes / max(nbytes, 1)))))


class _Weights:
    """Rotating factor pairs and dense matrices of one shape (random, scaled like trained layers)."""

    def __init__(self, n: int, m: int, r: int, dtype: Any, l2_bytes: int, seed: int) -> None:
        import torch

        g = torch.Generator(device="cuda").manual_seed(seed)
        k = _copies(dtype.itemsize * r * (m + n), l2_bytes)
        self.U = [torch.randn(m, r, device="cuda", dtype=dtype, generator=g) / math.sqrt(r) for _ in range(k)]
        self.V = [torch.randn(r, n, device="cuda", dtype=dtype, generator=g) / math.sqrt(n) for _ in range(k)]
        kd = _copies(dtype.itemsize * m * n, l2_bytes)
        self.W = [torch.randn(m, n, device="cuda", dtype=dtype, generator=g) / math.sqrt(n) for _ in range(kd)]


def _time_candidate(w: _Weights, x: Any, backend: str, cfg: dict) -> float:
    import torch
    import torch.nn.functional as F
    from lowrank_kernels.lowrank_matmul import lowrank_matmul_launch

    from compress.timing import time_rotating

    out = torch.full((x.shape[0], w.U[0].shape[0]), float("nan"), device=x.device, dtype=x.dtype)
    lowrank_matmul_launch(x, w.U[0], w.V[0], backend=backend, config=cfg, out=out)
    ref = F.linear(F.linear(x.float(), w.V[0].float()), w.U[0].float())
    err = ((out.float() - ref).norm() / ref.norm()).item()
    if not (err < 3e-2) or not bool(torch.isfinite(out).all()):
        raise RuntimeError(f"wrong result (relative error {err:.3e})")
    return time_rotating([lambda U=U, V=V: lowrank_matmul_launch(x, U, V, backend=backend, config=cfg)
                          for U, V in zip(w.U, w.V, strict=True)])


def _time_dense(w: _Weights, x: Any) -> float:
    import torch.nn.functional as F

    from compress.timing import time_rotating

    return time_rotating([lambda W=W: F.linear(x, W) for W in w.W])


def tune_point(w: _Weights, n: int, m: int, r: int, T: int, dtype: Any,
               log: Callable[[str], None] = print) -> dict | None:
    """Time every candidate and dense at one shape and T; the table entry (None if nothing ran)."""
    import torch

    x = torch.randn(T, n, device=w.U[0].device, dtype=dtype)
    timed: list[tuple[float, str, dict]] = []
    for backend, cfg in candidates(T, n, m, r):
        try:
            timed.append((_time_candidate(w, x, backend, cfg), backend, cfg))
        except Exception as exc:  # noqa: BLE001 - a failing config is reported and skipped
            log(f"  [tune] {n}x{m}r{r} T={T} {label(backend, cfg)} skipped: {exc!r}"[:300])
    if not timed:
        return None
    timed.sort(key=lambda t: t[0])
    ms, backend, cfg = timed[0]
    two_gemm = next((t for t, b, c in timed if b == "two_gemm" and c == _CUBLAS), float("nan"))
    dense = _time_dense(w, x)
    return {"backend": backend, "config": cfg, "ms": ms, "two_gemm_ms": two_gemm, "dense_ms": dense,
            "sweep_ms": ms, "candidates": [[label(b, c), t] for t, b, c in timed[:6]]}


def tune_shapes(shapes: Iterable[Shape], tokens: Iterable[int], *, budget_s: float = DEFAULT_BUDGET_S,
                dtype: Any = None, log: Callable[[str], None] = print) -> dict:
    """Measure ``shapes`` (in order) at ``tokens`` rows within ``budget_s``; returns a dispatch table.

    No new point starts after the budget; the table lists the (shape, T) points left out.
    """
    import torch
    from lowrank_kernels.dispatch import config_key
    from lowrank_kernels.tuning import device_key, device_properties

    from compress.timing import env_info

    dtype = dtype or torch.bfloat16
    t0 = time.time()
    deadline = t0 + budget_s
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    dev = device_properties(props)
    l2 = _l2_bytes(props)
    tokens = list(tokens)
    entries: dict[str, dict] = {}
    skipped: list[str] = []
    for n, m, r in shapes:
        key = config_key(n, m, r)
        if time.time() > deadline:
            skipped.append(key)
            continue
        w = _Weights(n, m, r, dtype, l2, seed=n * 7 + m * 3 + r)
        for T in tokens:
            if time.time() > deadline:
                skipped.append(f"{key}@T{T}")
                continue
            point = tune_point(w, n, m, r, T, dtype, log)
            if point is None:
                continue
            entries.setdefault(key, {})[str(T)] = point
            log(f"  {key:18s} T={T:5d} {label(point['backend'], point['config']):34s} {point['ms'] * 1e3:8.1f}us"
                f"  2gemm {point['two_gemm_ms'] * 1e3:8.1f}us  dense {point['dense_ms'] * 1e3:8.1f}us")
        del w
        torch.cuda.empty_cache()
    return {
        "generated_by": "python -m compress tune",
        "note": "entries[<in>x<out>r<rank>][T] = fastest measured factorized backend/config (no bias); "
                "dense_ms: one dense GEMM of the same layer beside it; sweep_ms = ms (what dense_is_faster "
                "compares); T is matched to the nearest bucket in log2.",
        "device_key": device_key(dev),
        "device": dev,
        "env": env_info(),
        "dtype": str(dtype).replace("torch.", ""),
        "tokens": tokens,
        "budget_s": budget_s,
        "seconds": round(time.time() - t0, 1),
        "skipped": skipped,
        "entries": entries,
    }


# ---------------------------------------------------------------------------- fused sibling groups
class _GroupWeights:
    """Rotating copies of one fused low-rank group: the concatenated first factors and each member's U."""

    def __init__(self, n: int, members: tuple[tuple[int, int], ...], dtype: Any, l2_bytes: int, seed: int) -> None:
        import torch

        g = torch.Generator(device="cuda").manual_seed(seed)
        total_r = sum(r for _, r in members)
        k = _copies(dtype.itemsize * sum(r * (m + n) for m, r in members), l2_bytes)
        self.V = [torch.randn(total_r, n, device="cuda", dtype=dtype, generator=g) / math.sqrt(n) for _ in range(k)]
        self.U = [[torch.randn(m, r, device="cuda", dtype=dtype, generator=g) / math.sqrt(r) for m, r in members]
                  for _ in range(k)]
        self.offsets = [sum(r for _, r in members[:i]) for i in range(len(members))]


def _group_reference(w: _GroupWeights, x: Any) -> Any:
    """The group's output on `x` for the first weight copy, in fp32: what a segmented launch is checked against."""
    import torch
    import torch.nn.functional as F

    t = F.linear(x.float(), w.V[0].float())
    return torch.cat([F.linear(t[:, o:o + U.shape[1]], U.float()) for U, o in zip(w.U[0], w.offsets, strict=True)],
                     dim=1)


def _time_group(w: _GroupWeights, x: Any, kernel: str, config: tuple[int, int, int] | None = None,
                ref: Any = None) -> float:
    """Median time of one group call with `kernel` ("cublas" or "segmented", with its launch `config`); a
    segmented output is checked against the fp32 reference `ref` (`_group_reference`, computed here if not
    given) first, so a config that computes a wrong answer can never win."""
    import torch.nn.functional as F
    from lowrank_kernels.segmented_linear import segmented_linear

    from compress.timing import time_rotating

    def call(V: Any, Us: list) -> Any:
        t = F.linear(x, V)
        if kernel == "segmented":
            return segmented_linear(t, Us, None, w.offsets, config=config)
        return [F.linear(t[:, o:o + U.shape[1]], U) for U, o in zip(Us, w.offsets, strict=True)]

    if kernel == "segmented":
        ref = _group_reference(w, x) if ref is None else ref
        err = ((call(w.V[0], w.U[0]).float() - ref).norm() / ref.norm()).item()
        if not err < 3e-2:
            raise RuntimeError(f"wrong result (relative error {err:.3e})")
    return time_rotating([lambda V=V, Us=Us: call(V, Us) for V, Us in zip(w.V, w.U, strict=True)])


def tune_groups(groups: Iterable[Group], tokens: Iterable[int], *, budget_s: float, dtype: Any = None,
                log: Callable[[str], None] = print) -> tuple[dict, list[str]]:
    """Time each fused low-rank group's second factors, one segmented launch against cuBLAS per member, at the
    decode row counts of `tokens` (up to `lowrank.fusion.SEGMENTED_MAX_ROWS`) within `budget_s`.

    Every launch config of `segmented_linear.config_candidates` is timed. Returns ({group key: {T: {"kernel",
    "config" (the fastest segmented config), "segmented_ms", "cublas_ms", "candidates"}}}, points left out),
    the table's ``groups`` section that `lowrank_kernels.dispatch.group_kernel` reads.
    """
    import torch
    from lowrank_kernels.dispatch import group_key
    from lowrank_kernels.segmented_linear import config_candidates

    from lowrank.fusion import SEGMENTED_MAX_ROWS

    dtype = dtype or torch.bfloat16
    deadline = time.time() + budget_s
    l2 = _l2_bytes(torch.cuda.get_device_properties(torch.cuda.current_device()))
    rows = [T for T in tokens if T <= SEGMENTED_MAX_ROWS]
    entries: dict[str, dict] = {}
    skipped: list[str] = []
    for n, members in groups:
        key = group_key(n, members)
        if time.time() > deadline:
            skipped.append(key)
            continue
        w = _GroupWeights(n, members, dtype, l2, seed=n + sum(m * 3 + r for m, r in members))
        for T in rows:
            if time.time() > deadline:
                skipped.append(f"{key}@T{T}")
                continue
            x = torch.randn(T, n, device="cuda", dtype=dtype)
            cublas = _time_group(w, x, "cublas")
            ref = _group_reference(w, x)  # once per row count: every candidate config is checked against it
            timed: list[tuple[float, tuple[int, int, int]]] = []
            for config in config_candidates(T):
                try:
                    timed.append((_time_group(w, x, "segmented", config, ref=ref), config))
                except Exception as exc:  # noqa: BLE001 - a config that fails or computes wrong loses the point
                    log(f"  [tune] group {key} T={T} segmented {config} skipped: {exc!r}"[:300])
            segmented, best = min(timed) if timed else (None, None)
            kernel = "segmented" if segmented is not None and segmented < cublas else "cublas"
            entries.setdefault(key, {})[str(T)] = {
                "kernel": kernel, "config": list(best) if best is not None else None, "segmented_ms": segmented,
                "cublas_ms": cublas, "candidates": [[list(c), ms] for ms, c in sorted(timed)]}
            seg_us = f"{segmented * 1e3:8.1f}us" if segmented is not None else "  failed"
            log(f"  group {key:40s} T={T:3d} segmented {seg_us}  cublas {cublas * 1e3:8.1f}us")
        del w
        torch.cuda.empty_cache()
    return entries, skipped


# ---------------------------------------------------------------------------- command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="compressed checkpoint whose factorized layer shapes are tuned: HF directory or hub id "
                        "(default: bundled SmolLM2-135M-Instruct, which is dense: nothing to tune)")
    p.add_argument("--shapes", default=None,
                   help="instead of --model: comma list of INxOUTrRANK layer shapes, e.g. 4096x11008r1472")
    p.add_argument("--groups", default=None,
                   help="also (or, without --model/--shapes, only) time these fused sibling groups: comma list of "
                        "IN:OUTrRANK+OUTrRANK..., e.g. 4096:11008r1504+11008r1504 (--model finds its own)")
    p.add_argument("--tokens", default=None,
                   help=f"row counts (decode batch sizes, prefill lengths) to tune (default "
                        f"{','.join(map(str, DEFAULT_TOKENS))})")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help=f"no new measurement starts after this many seconds (default {DEFAULT_BUDGET_S:.0f})")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--out", default=None, help="also write the table to this JSON file")
    p.add_argument("--no-cache", action="store_true", help="do not write the per-device tuning cache")
    p.add_argument("--replace", action="store_true",
                   help="replace this device's cache instead of merging the new points into it")


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict:
    """Tune per `args`; returns {"table", "cache" (path or None), "out" (path or None)}. Raises `UserError`."""
    tokens = _parse_tokens(args.tokens)
    if not args.budget_s > 0:
        raise UserError(f"--budget-s must be positive, got {args.budget_s}")
    if args.shapes and args.model:
        raise UserError("pass --model or --shapes, not both")
    groups: Counter = Counter(parse_groups(args.groups)) if getattr(args, "groups", None) else Counter()
    import torch

    if not torch.cuda.is_available():
        raise UserError("compress tune times kernels on a CUDA GPU and none is visible")
    if args.shapes:
        counts = Counter(parse_shapes(args.shapes))
    elif groups and not args.model:
        counts = Counter()
    else:
        counts = checkpoint_shapes(args.model)
        groups += checkpoint_groups(args.model)
        if not counts:
            raise UserError(f"{args.model or 'the default model'} has no factorized layers (not a compressed "
                            "checkpoint): nothing to tune")
    from lowrank_kernels import tuning
    from lowrank_kernels.dispatch import reload_tables

    shapes = order_shapes(counts)
    log(f"[tune] {len(shapes)} distinct layer shapes ({sum(counts.values())} layers) x T in {tokens}; "
        f"budget {args.budget_s:.0f} s")
    table = tune_shapes(shapes, tokens, budget_s=args.budget_s, dtype=getattr(torch, args.dtype), log=log)
    table["layers"] = {f"{n}x{m}r{r}": c for (n, m, r), c in counts.items()}
    if groups:  # fused sibling groups (q/k/v, gate/up) in the budget left
        log(f"[tune] {len(groups)} distinct fused sibling groups")
        table["groups"], left_out = tune_groups(sorted(groups, key=lambda g: -groups[g]), tokens,
                                                budget_s=max(0.0, args.budget_s - table["seconds"]),
                                                dtype=getattr(torch, args.dtype), log=log)
        table["skipped"] += left_out
    result: dict = {"table": table, "cache": None, "out": None}
    if not args.no_cache:
        try:
            result["cache"] = str(tuning.save_cache(table["device"], table, replace=args.replace))
        except OSError as exc:
            raise UserError(f"could not write the tuning cache: {exc}") from exc
        reload_tables()
    if args.out:
        out = Path(args.out).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(table, indent=1) + "\n")
        result["out"] = str(out)
    return result


def summary(result: dict) -> str:
    table = result["table"]
    lines = [f"device {table['device_key']} ({table['device'].get('name')}): {len(table['entries'])} shapes tuned in "
             f"{table['seconds']:.0f} s" + (f", {len(table['skipped'])} points left out (budget)"
                                             if table["skipped"] else "")]
    dense_wins = sum(p["dense_ms"] < p["ms"] for e in table["entries"].values() for p in e.values())
    fused = sum(p["backend"] == "triton_fused" for e in table["entries"].values() for p in e.values())
    points = sum(len(e) for e in table["entries"].values())
    lines.append(f"{points} points: fused kernel fastest at {fused}, dense faster than every factorized path at "
                 f"{dense_wins} (used where a dense copy is held: --dense-fallback)")
    if table.get("groups"):
        seg = sum(p["kernel"] == "segmented" for e in table["groups"].values() for p in e.values())
        lines.append(f"{len(table['groups'])} fused sibling groups: one segmented launch faster than cuBLAS per "
                     f"member at {seg} of {sum(len(e) for e in table['groups'].values())} points")
    if result.get("cache"):
        lines.append(f"wrote {result['cache']}")
    if result.get("out"):
        lines.append(f"wrote {result['out']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m compress tune", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    return report_or_exit_code(lambda: run(args), summary)


if __name__ == "__main__":
    sys.exit(main())
