"""Perplexity of dense SmolLM2 and of the `svd` / `svd-plain` methods across sizes (issue: Foundation).

    python -m bench.svd_quality --valid $WIKITEXT2/valid.txt --test $WIKITEXT2/test.txt [--out DIR]

Protocol: calibrate on `--valid` (64 random windows of 1024 tokens, seed 0), evaluate on
`--test` in non-overlapping chunks, bf16 on the GPU. One whitened-SVD plan serves every size.
Writes `svd_quality_<gpu>.json` into `--out` (default bench/results).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from bench.common import env_info, gpu_slug, write_result
from compress.data import calibration_batches, load_text
from compress.eval import perplexity
from compress.methods import get_method
from compress.model import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--valid", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--sizes", default="0.9,0.8,0.7,0.6,0.5")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--dense-seq-lens", default="512,1024,2048")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = [float(s) for s in args.sizes.split(",")]
    model, tokenizer = load_model(args.model, dtype=torch.float32, device=device)
    test_text = load_text(args.test, "eval")
    eval_dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def ppl(m, seq_len: int) -> float:
        return perplexity(m.to(eval_dtype), tokenizer, test_text, seq_len, batch_size=8, progress=False)

    results: dict = {"env": env_info(), "protocol": {
        "calibration": f"{args.calib_samples} x {args.seq_len} tokens from {Path(args.valid).name}, seed 0",
        "eval": f"{Path(args.test).name}, non-overlapping chunks, {eval_dtype}", "scoring_dtype": "float32"}}
    dense_bf16 = copy.deepcopy(model)
    results["dense"] = {int(s): ppl(dense_bf16, int(s)) for s in args.dense_seq_lens.split(",")}
    del dense_bf16
    print("dense", results["dense"], flush=True)

    chunks = calibration_batches(tokenizer, load_text(args.valid, "calib"), seq_len=args.seq_len,
                                 num_samples=args.calib_samples, seed=0)
    for method in ("svd", "svd-plain"):
        spec = get_method(method)
        t0 = time.perf_counter()
        plan = spec.score(model, chunks, spec.make_config(progress=False))
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        rows = {}
        for size in sizes if method == "svd" else sizes[:1]:
            compressed = copy.deepcopy(model)
            plan.materialize_(compressed, size)
            rows[str(size)] = ppl(compressed, args.seq_len)
            del compressed
            print(method, size, rows[str(size)], flush=True)
        results[method] = {"seconds_to_score": round(seconds, 2), "perplexity": rows}
    path = write_result(f"svd_quality_{gpu_slug()}", results, args.out)
    print(f"wrote {path}")
    print(f"{'size':>6} | svd")
    for size in sizes:
        print(f"{size:>6} | {results['svd']['perplexity'][str(size)]:.2f}")


if __name__ == "__main__":
    main()
