"""Benchmark of a fused low-rank sibling group at decode: one launch for the second factors or one per member.

``python -m bench.kernels.segmented_linear [--models llama7b,smollm2] [--size 0.5] [--rows 1,4,8,16] [--out DIR]``
(needs a CUDA GPU).

Groups: q/k/v and gate/up of the LLaMA-7B and SmolLM2-135M shapes, each member factorized to
``--size`` of its parameters (ranks rounded to multiples of 32, as ``bench.kernels.e2e`` does); bf16.
Contenders, all computing the group's outputs from the same input rows:

* ``segmented``: ``t = x·[V_i]ᵀ`` (cuBLAS), then every member's ``t_i·U_iᵀ`` in one launch
  (``lowrank_kernels.segmented_linear``) with its default launch config: ``lowrank.fusion`` with
  ``low_rank_kernel="segmented"`` where nothing was tuned;
* ``segmented_tuned``: the same with the fastest of ``config_candidates`` (the row's ``config``), what
  ``compress tune`` would pick;
* ``cublas_members``: the same first GEMM, then one cuBLAS GEMM per member (the fusion's default);
* ``unfused_tuned``: each member alone through ``lowrank_matmul`` (the tuned dispatch), as an unfused model;
* ``dense``: one cuBLAS GEMM over the concatenated dense weight (a fused dense group), the speed to beat.

Method: the time per group call is the median over replays of a CUDA graph holding one call per copy of
the weights (`compress.timing.cuda_graph_median`); there are enough copies to span twice the L2 cache, so
weights come from HBM as in a model's decode step, and launch overhead is what a graphed step sees.
Bytes are the group's weights plus its inputs and outputs; the floor is bytes / the measured copy
bandwidth (`compress.timing.device_peaks`). Each row records its error against an fp64 reference.

Writes ``<out>/segmented_linear_<gpu>.json`` and ``.png`` (``--out`` defaults to bench/results).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lowrank_kernels.segmented_linear import config_candidates

from bench.kernels.report import plot_panels, table
from compress.timing import cuda_graph_median, device_peaks, env_info, gpu_slug, results_path, write_result

# model: (hidden, [(group name, [member out features])]); every member reads `hidden` inputs
MODELS = {
    "llama7b": (4096, [("qkv", [4096, 4096, 4096]), ("gate_up", [11008, 11008])]),
    "smollm2": (576, [("qkv", [576, 192, 192]), ("gate_up", [1536, 1536])]),
}
CONTENDERS = ("segmented", "segmented_tuned", "cublas_members", "unfused_tuned", "dense")
RANK_MULTIPLE = 32
MAX_COPIES = 256


def member_rank(size: float, out_f: int, in_f: int) -> int:
    """The rank `bench.kernels.e2e` gives this member at `size` (`compress.speed.uniform_rank`)."""
    from compress.speed import uniform_rank

    rank = uniform_rank(out_f, in_f, size, RANK_MULTIPLE)
    if rank is None:
        raise ValueError(f"at size {size} factorizing a {out_f}x{in_f} layer saves nothing")
    return rank


def _group_copy(hidden: int, outs: list[int], ranks: list[int], gen: torch.Generator, device: str = "cuda",
                dt: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """One copy of a group's weights: factors, concatenated V, and the dense weight."""
    Us = [(torch.randn(o, r, generator=gen) / math.sqrt(r)).to(device, dt) for o, r in zip(outs, ranks, strict=True)]
    Vs = [(torch.randn(r, hidden, generator=gen) / math.sqrt(hidden)).to(device, dt) for r in ranks]
    dense = torch.cat([(U.float() @ V.float()).to(dt) for U, V in zip(Us, Vs, strict=True)])
    return {"U": Us, "V": Vs, "V_cat": torch.cat(Vs).contiguous(), "dense": dense,
            "offsets": [sum(ranks[:i]) for i in range(len(ranks))]}


def _contenders(x: torch.Tensor, w: dict[str, Any], config: tuple[int, int, int] | None = None) -> dict[str, Any]:
    """name -> call computing the group's outputs: one [rows, Σ out] tensor, or one tensor per member (as the
    fused modules hand them out: no concatenation is timed). ``segmented_tuned`` launches with ``config``."""
    from lowrank_kernels.lowrank_matmul import lowrank_matmul
    from lowrank_kernels.segmented_linear import segmented_linear

    def segmented(cfg: tuple[int, int, int] | None = None):
        return segmented_linear(F.linear(x, w["V_cat"]), w["U"], None, w["offsets"], config=cfg)

    def cublas_members():
        t = F.linear(x, w["V_cat"])
        return [F.linear(t[:, o:o + U.shape[1]], U) for U, o in zip(w["U"], w["offsets"], strict=True)]

    def unfused_tuned():
        return [lowrank_matmul(x, U, V, None) for U, V in zip(w["U"], w["V"], strict=True)]

    return {"segmented": segmented, "segmented_tuned": lambda: segmented(config),
            "cublas_members": cublas_members, "unfused_tuned": unfused_tuned, "dense": lambda: F.linear(x, w["dense"])}


def bench_group(model: str, group: str, hidden: int, outs: list[int], size: float, rows: int, tbps: float,
                l2_bytes: int) -> list[dict[str, Any]]:
    ranks = [member_rank(size, o, hidden) for o in outs]
    gen = torch.Generator().manual_seed(0)
    low_bytes = 2 * sum(r * (o + hidden) for o, r in zip(outs, ranks, strict=True))
    dense_bytes = 2 * hidden * sum(outs)
    copies = max(1, min(MAX_COPIES, math.ceil(2 * l2_bytes / low_bytes)))
    weights = [_group_copy(hidden, outs, ranks, gen) for _ in range(copies)]
    x = torch.randn(rows, hidden, generator=gen).to("cuda", torch.bfloat16)
    w0 = weights[0]
    ref = torch.cat([(x.double() @ V.double().T) @ U.double().T for U, V in zip(w0["U"], w0["V"], strict=True)], 1)
    io_bytes = 2 * rows * (hidden + sum(outs))
    out = []
    for name in CONTENDERS:
        nbytes = (dense_bytes if name == "dense" else low_bytes) + io_bytes
        row: dict[str, Any] = {"model": model, "group": group, "rows": rows, "contender": name, "ranks": ranks,
                               "outs": outs, "hidden": hidden, "bytes": nbytes, "weight_copies": copies}
        try:
            if name == "segmented_tuned":  # every candidate config, the fastest kept
                timed = sorted((cuda_graph_median([_contenders(x, w, c)[name] for w in weights], reps=15), c)
                               for c in config_candidates(rows))
                row["config"], row["candidates"] = list(timed[0][1]), [[list(c), ms * 1e3] for ms, c in timed]
            calls = [_contenders(x, w, tuple(row.get("config") or (0, 0, 0)))[name] for w in weights]
            if name != "dense":  # dense computes U·V rounded to bf16: another function, no error to report
                y = calls[0]()
                y = torch.cat(y, 1) if isinstance(y, list) else y
                row["rel_err_vs_fp64"] = ((y.double() - ref).norm() / ref.norm()).item()
            row["us"] = cuda_graph_median(calls, reps=15) * 1e3
        except Exception as exc:  # one contender failing must not lose the others
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            out.append(row)
            continue
        row["pct_of_floor"] = 100 * (nbytes / tbps / 1e6) / row["us"]
        out.append(row)
    del weights
    torch.cuda.empty_cache()
    return out


def plot(payload: dict[str, Any], path: Path) -> None:
    """µs per group call against the rows, one panel per (model, group), one line per contender."""
    plot_panels(payload["rows"], path, panel_keys=("model", "group"), x_key="rows", contenders=CONTENDERS,
                title=lambda p: f"{p[0]} {p[1]}, size {payload['size']}", xlabel="rows (batch)",
                ylabel="µs per group", suptitle=f"fused low-rank groups at decode, {payload['env'].get('gpu', '')}",
                log2_x=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.kernels.segmented_linear", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list from {', '.join(MODELS)}")
    ap.add_argument("--size", type=float, default=0.5, help="fraction of each member's parameters kept (0, 1)")
    ap.add_argument("--rows", default="1,4,8,16", help="comma list of input rows (decode batch sizes)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    models = args.models.split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    try:
        rows = [int(r) for r in args.rows.split(",")]
    except ValueError:
        ap.error("--rows takes a comma list of integers")
    if any(r <= 0 for r in rows) or not 0.0 < args.size < 1.0:
        ap.error("--rows must be positive and --size in (0, 1)")
    if not torch.cuda.is_available():
        print("bench.kernels.segmented_linear times CUDA graphs and needs a CUDA GPU (none is visible)")
        return 2
    peaks = device_peaks()
    l2_bytes = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    results = []
    for model in models:
        hidden, groups = MODELS[model]
        for group, outs in groups:
            for n in rows:
                results += bench_group(model, group, hidden, outs, args.size, n, peaks.tbps, l2_bytes)
    payload = {"size": args.size, "floor": peaks.as_dict(), "l2_bytes": l2_bytes, "rows": results,
               "env": env_info()}
    path = write_result(f"segmented_linear_{gpu_slug()}", payload, args.out)
    plot(payload, results_path(args.out) / f"segmented_linear_{gpu_slug()}.png")
    print(f"wrote {path}")
    cases = [(model, group, n) for model in models for group, _ in MODELS[model][1] for n in rows]
    print("\n".join(table(results, cases, case_keys=("model", "group", "rows"), contenders=CONTENDERS)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
