"""Benchmark of ``lowrank_kernels.decode_attention`` against torch's SDPA at decode (one query token).

``python -m bench.kernels.decode_attention [--batches 1,8] [--cache 768] [--filled 128,512,768] [--out DIR]``
(needs a CUDA GPU).

Head layouts (query heads / key-value heads / head size): SmolLM2-135M 9/3/64, Qwen2-1.5B 12/2/128,
LLaMA-7B 32/32/128; bf16. The cache is allocated at ``--cache`` positions, as a static cache is, and
filled to each ``--filled`` length; the boolean mask hides the rest, as transformers' SDPA mask does.

Contenders:
* ``decode_attention``: the op, mask given (it skips blocks the mask hides);
* ``sdpa_gqa``: ``F.scaled_dot_product_attention(..., attn_mask, enable_gqa=True)`` over the whole cache;
* ``sdpa_repeat``: key/value heads repeated to the query heads first (transformers' path when it cannot
  use ``enable_gqa``), then SDPA.

Method: the time per call is the median over replays of a CUDA graph holding a burst of calls
(`compress.timing.cuda_graph_median`), which takes host launch overhead out for every contender alike.
Bytes are the filled keys and values plus the query and output; the floor is bytes / the measured copy
bandwidth (`compress.timing.device_peaks`). Each row also records the error against an fp64 reference.

Writes ``<out>/decode_attention_<gpu>.json`` and ``.png`` (``--out`` defaults to bench/results).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.kernels.report import plot_panels, table
from compress.timing import cuda_graph_median, device_peaks, env_info, gpu_slug, results_path, write_result

# name: (query heads, key/value heads, head size)
LAYOUTS = {"smollm2": (9, 3, 64), "qwen2_1.5b": (12, 2, 128), "llama7b": (32, 32, 128)}
BURST = 32  # calls per captured graph
CONTENDERS = ("decode_attention", "sdpa_gqa", "sdpa_repeat")


def _contenders(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    from lowrank_kernels.decode_attention import decode_attention_launch

    group = q.shape[1] // k.shape[1]
    q4 = q[:, :, None]
    mask4 = mask[:, None, None, :]
    return {
        "decode_attention": lambda: decode_attention_launch(q, k, v, mask),
        "sdpa_gqa": lambda: F.scaled_dot_product_attention(q4, k, v, attn_mask=mask4, enable_gqa=group > 1)[:, :, 0],
        "sdpa_repeat": lambda: F.scaled_dot_product_attention(
            q4, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=mask4)[:, :, 0],
    }


def bench_case(layout: str, batch: int, cache: int, filled: int, tbps: float) -> list[dict[str, Any]]:
    from lowrank_kernels.decode_attention import decode_attention_ref, num_splits

    hq, hkv, d = LAYOUTS[layout]
    dt = torch.bfloat16
    q = torch.randn(batch, hq, d, device="cuda", dtype=dt)
    k = torch.randn(batch, hkv, cache, d, device="cuda", dtype=dt)
    v = torch.randn(batch, hkv, cache, d, device="cuda", dtype=dt)
    mask = (torch.arange(cache, device="cuda") < filled)[None, :].expand(batch, cache).contiguous()
    ref = decode_attention_ref(q.double(), k.double(), v.double(), mask)
    nbytes = 2 * (2 * batch * hkv * filled * d + 2 * batch * hq * d)
    rows = []
    for name, call in _contenders(q, k, v, mask).items():
        row: dict[str, Any] = {"layout": layout, "batch": batch, "cache": cache, "filled": filled, "contender": name,
                               "bytes": nbytes}
        try:
            out = call()
            row["rel_err_vs_fp64"] = ((out.double() - ref).norm() / ref.norm()).item()
            row["us"] = cuda_graph_median([call] * BURST) * 1e3
        except Exception as exc:  # one contender failing must not lose the others
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            rows.append(row)
            continue
        row["pct_of_floor"] = 100 * (nbytes / tbps / 1e6) / row["us"]
        if name == "decode_attention":
            row["splits"] = num_splits(batch * hq, cache, q.device)
        rows.append(row)
    return rows


def plot(payload: dict[str, Any], path: Path) -> None:
    """µs per call against the filled length, one panel per (layout, batch), one line per contender."""
    plot_panels(payload["rows"], path, panel_keys=("layout", "batch"), x_key="filled", contenders=CONTENDERS,
                title=lambda p: f"{p[0]}, batch {p[1]}", xlabel="filled positions", ylabel="µs per call",
                suptitle=f"decode attention, cache {payload['cache']} positions, {payload['env'].get('gpu', '')}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.kernels.decode_attention", description=__doc__.split("\n\n")[0])
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma list from {', '.join(LAYOUTS)}")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--cache", type=int, default=768, help="allocated cache positions (default 768)")
    ap.add_argument("--filled", default="128,512,768", help="filled positions, each at most --cache")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    layouts = args.layouts.split(",")
    unknown = [name for name in layouts if name not in LAYOUTS]
    if unknown:
        ap.error(f"unknown layout(s) {unknown}; choose from {list(LAYOUTS)}")
    try:
        batches = [int(b) for b in args.batches.split(",")]
        filled = [int(f) for f in args.filled.split(",")]
    except ValueError:
        ap.error("--batches and --filled take comma lists of integers")
    if any(b <= 0 for b in batches) or any(not 0 < f <= args.cache for f in filled):
        ap.error(f"--batches must be positive and --filled within 1..{args.cache}")
    if not torch.cuda.is_available():
        print("bench.kernels.decode_attention times CUDA graphs and needs a CUDA GPU (none is visible)")
        return 2
    peaks = device_peaks()
    rows = []
    for layout in layouts:
        for batch in batches:
            for length in filled:
                rows += bench_case(layout, batch, args.cache, length, peaks.tbps)
    payload = {"cache": args.cache, "floor": peaks.as_dict(), "rows": rows, "env": env_info()}
    path = write_result(f"decode_attention_{gpu_slug()}", payload, args.out)
    plot(payload, results_path(args.out) / f"decode_attention_{gpu_slug()}.png")
    print(f"wrote {path}")
    cases = [(layout, batch, length) for layout in layouts for batch in batches for length in filled]
    print("\n".join(table(rows, cases, case_keys=("layout", "batch", "filled"), contenders=CONTENDERS)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
