"""Minify's scoring and healing variants off the calibration domain, from one scoring run (issue #16).

    WIKITEXT2=... python -m bench.quality.minify_variants --out bench/results [--samples 32] [--windows 12]

Calibrates once on `mix` (70% WikiText-2 valid + 30% CPython docs), then materializes 90% of the MLP
under each variant (`MinifyPlan.with_options`: score, aggregation, healing target, ridge) and scores
WikiText-2 test, legal and code (the first `--windows` windows of 1024 tokens); ratios to dense on the
same windows. Options are chosen on legal and reported on code (docs/domains.md). Runs on the CPU in
float32 (about 25 minutes on 2 cores with the defaults) or on a GPU (`--device cuda`, bf16 evaluation).
Writes `minify_variants_<gpu or cpu>.json`.
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

import torch

from bench.quality import domains
from compress.methods.minify import MinifyConfig, score_minify
from compress.model import load_model
from compress.timing import env_info, gpu_slug, write_result

VARIANTS: dict[str, dict[str, Any]] = {
    "default (taylor, sq-sum, local)": {},
    "sum-abs": {"aggregation": "sum-abs"},
    "abs-sum": {"aggregation": "abs-sum"},
    "taylor-act": {"score": "taylor-act"},
    "activation": {"score": "activation"},
    "sequential": {"target": "sequential"},
    "ridge=1e-6": {"ridge": 1e-6},
    # the ridge pulls the refit toward the kept channels' own columns: from least squares (λ → 0) to slicing
    "prior=original ridge=1e-2": {"heal_prior": "original", "ridge": 1e-2},
    "prior=original ridge=1e-1": {"heal_prior": "original", "ridge": 1e-1},
    "prior=original ridge=1": {"heal_prior": "original", "ridge": 1.0},
    "no heal (sliced)": {"heal": False},
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="results directory (default bench/results)")
    p.add_argument("--samples", type=int, default=32, help="calibration sequences of 1024 tokens")
    p.add_argument("--windows", type=int, default=12, help="evaluation windows per text")
    p.add_argument("--size", type=float, default=0.9, help="kept fraction of the MLP")
    p.add_argument("--device", default="cpu")
    p.add_argument("--variants", default="all",
                   help="comma list of variant names to run (the default is always run first), or 'all'")
    p.add_argument("--tag", default="",
                   help="inserted in the result file name, e.g. 'prior' -> minify_variants_prior_cpu.json")
    args = p.parse_args(argv)
    if args.variants == "all":
        chosen = list(VARIANTS)
    else:
        chosen = [name.strip() for name in args.variants.split(",") if name.strip()]
        unknown = [name for name in chosen if name not in VARIANTS]
        if unknown:
            p.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
        default = next(iter(VARIANTS))
        chosen = [default] + [name for name in chosen if name != default]
    torch.manual_seed(0)
    model, tok = load_model(None, dtype=torch.float32, device=args.device)
    eval_dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    # domain_quality's texts and `mix` calibration (its `resolve` asks for $WIKITEXT2 if it is unset)
    windows = domains.eval_chunks(tok, 1024, names=("wiki", "legal", "code"), max_chunks=args.windows)
    calib, info = domains.calibration_chunks(tok, "mix", seq_len=1024, num_samples=args.samples)

    def perplexities(m: torch.nn.Module) -> dict[str, float]:
        return domains.perplexities(m.to(eval_dtype), windows, batch_size=4)

    dense = perplexities(copy.deepcopy(model))
    print("dense", {k: round(v, 3) for k, v in dense.items()}, flush=True)
    t0 = time.perf_counter()
    plan = score_minify(model, calib, MinifyConfig(batch_size=4, progress=False))
    result: dict[str, Any] = {
        "bench": "minify_variants", "size": args.size, "calibration": info, "calib_samples": args.samples,
        "eval_windows": args.windows, "eval_dtype": str(eval_dtype),
        "scoring_seconds": round(time.perf_counter() - t0, 1), "dense": dense, "rows": {}, "env": env_info()}
    tag = f"{args.tag}_" if args.tag else ""
    stem = f"minify_variants_{tag}{gpu_slug() if args.device.startswith('cuda') else 'cpu'}"
    for name in chosen:
        options = VARIANTS[name]
        m = copy.deepcopy(model)
        plan.with_options(**options).materialize_(m, args.size)
        ppl = perplexities(m)
        ratio = {k: ppl[k] / dense[k] for k in ppl}
        result["rows"][name] = {"options": options, "ppl": ppl, "ratio": ratio}
        print(name, {k: round(v, 3) for k, v in ratio.items()}, flush=True)
        write_result(stem, result, args.out)  # after every variant: a killed run keeps what finished
    return result


if __name__ == "__main__":
    main()
