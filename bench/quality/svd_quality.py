"""Perplexity of dense SmolLM2 and of layer-wise SVD methods across sizes.

    python -m bench.quality.svd_quality --valid $WIKITEXT2/valid.txt --test $WIKITEXT2/test.txt [--out DIR]
    python -m bench.quality.svd_quality --valid ... --test ... --methods svd-llm,asvd --name baselines_quality

Protocol: calibrate on `--valid` (64 random windows of 1024 tokens, seed 0), evaluate on
`--test` in non-overlapping chunks, bf16 on the GPU. One plan per method serves every size
(its scoring time and each size's materialization time are recorded: SVD-LLM's sequential update
runs at materialization). Writes `<--name>_<gpu>.json` into `--out` (default bench/results).

Every model (dense included) is also scored on the out-of-domain texts of `bench.quality.domains` (`--ood`,
default docs, legal, code; the first `--ood-chunks` windows of each) beside `--test`, with the generation
sanity metrics, and a table of perplexity ÷ dense per text is printed last (docs/domains.md).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from bench.quality import domains
from compress.data import calibration_batches, load_text, pack_tokens, tokenize_text
from compress.eval import perplexity
from compress.methods import get_method
from compress.model import load_model
from compress.timing import env_info, gpu_slug, write_result
from lowrank.surgery import size_report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--valid", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--sizes", default="0.9,0.8,0.7,0.6,0.5")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--dense-seq-lens", default="512,1024,2048")
    p.add_argument("--methods", default="svd,svd-plain", help="comma list of registered methods")
    p.add_argument("--name", default="svd_quality", help="result file stem")
    p.add_argument("--dense", action=argparse.BooleanOptionalAction, default=True,
                   help="also evaluate the dense model at --dense-seq-lens")
    p.add_argument("--ood", default="docs,legal,code",
                   help="bench.quality.domains texts scored beside --test (comma list, or 'none')")
    p.add_argument("--ood-chunks", type=int, default=128, help="windows per out-of-domain text, at most")
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
    if args.dense:
        dense_bf16 = copy.deepcopy(model)
        results["dense"] = {int(s): ppl(dense_bf16, int(s)) for s in args.dense_seq_lens.split(",")}
        del dense_bf16
        print("dense", results["dense"], flush=True)

    ood_names = [n for n in args.ood.split(",") if n.strip() and n != "none"]
    suite = {"test": pack_tokens(tokenize_text(tokenizer, test_text), args.seq_len)}
    suite.update(domains.eval_chunks(tokenizer, args.seq_len, names=ood_names, max_chunks=args.ood_chunks))
    dense_suite = domains.suite_report(copy.deepcopy(model).to(eval_dtype), tokenizer, suite)
    results["domains"] = {"texts": domains.provenance({k: v for k, v in suite.items() if k != "test"}),
                          "dense": dense_suite, "rows": []}

    chunks = calibration_batches(tokenizer, load_text(args.valid, "calib"), seq_len=args.seq_len,
                                 num_samples=args.calib_samples, seed=0)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for method in methods:
        spec = get_method(method)
        t0 = time.perf_counter()
        plan = spec.score(model, chunks, spec.make_config(progress=False))
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        rows, fractions, mat_seconds = {}, {}, {}
        for size in sizes if method != "svd-plain" else sizes[:1]:  # plain SVD is in the millions anyway
            compressed = copy.deepcopy(model)
            t0 = time.perf_counter()
            plan.materialize_(compressed, size)
            if device == "cuda":
                torch.cuda.synchronize()
            mat_seconds[str(size)] = round(time.perf_counter() - t0, 3)
            fractions[str(size)] = round(size_report(compressed).target_fraction, 5)
            rows[str(size)] = ppl(compressed, args.seq_len)
            results["domains"]["rows"].append({"label": f"{method} {size:g}", "method": method, "size": size,
                                               **domains.suite_report(compressed, tokenizer, suite, dense_suite)})
            del compressed
            print(method, size, fractions[str(size)], rows[str(size)], flush=True)
            results[method] = {"seconds_to_score": round(seconds, 2), "perplexity": rows,
                               "target_fraction": fractions, "materialize_seconds": mat_seconds}
            path = write_result(f"{args.name}_{gpu_slug()}", results, args.out)  # partial results survive a kill
    print(f"wrote {path}")
    print(f"{'size':>6} | " + " | ".join(methods))
    for size in sizes:
        cells = [results[m]["perplexity"].get(str(size)) for m in methods]
        print(f"{size:>6} | " + " | ".join(f"{c:.2f}" if c is not None else "-" for c in cells))
    print("perplexity ÷ dense on each text (docs/domains.md):")
    dense_row = {"label": "dense", "ratio": {t: 1.0 for t in suite}, "sanity": dense_suite.get("sanity")}
    print(domains.format_ratio_table([dense_row, *results["domains"]["rows"]], list(suite), dense_suite["ppl"]))


if __name__ == "__main__":
    main()
