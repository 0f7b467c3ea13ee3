"""Taylor–Ridge minification quality on SmolLM2-135M / WikiText-2 (docs/minify.md).

    python -m bench.quality.minify_quality --out $OUT          # GPU: model from $SMOLLM2_GGUF, text from $WIKITEXT2
    python -m bench.quality.minify_quality --tiny --out /tmp/x # CPU smoke test: tiny random model, tiny text

Protocol: score once in fp32 on 128 random windows of 1024 tokens from $WIKITEXT2/valid.txt
(seed 0), one forward + backward per batch; every variant is then materialized from that one
plan on a copy of the fp32 model, cast to bf16 and evaluated on $WIKITEXT2/test.txt in
non-overlapping 1024-token chunks. Rows:

- main table: 90/80/70% MLP retention × {taylor, activation} × {healed, unhealed};
- composition at one total size S (the targeted-linear fraction of minify at 80% MLP):
  minify alone, `svd` alone at S, and minify (90% MLP) + `svd` on the narrowed model to S;
- ablations at 80%: Taylor form × aggregation, ridge λ, width multiple, per-layer floor;
  the sequential (error-correcting) target at every retention. Rows still pending when the
  wall time passes --max-seconds (default 210) are skipped and listed, so a run stays < 4 min.

Times: forward/backward/Gram of the scoring pass, and materialization (ridge solves) per
row. The JSON goes to `<--out>/minify_quality_<gpu>.json`; the table is printed last.

Other domains (docs/domains.md): the main-table and composition rows are also scored on the
out-of-domain texts of `bench.quality.domains` (`--ood`: docs, legal, code) with the generation sanity metrics
(row field ``domains``), and a table of perplexity ÷ dense per text follows the main one.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.quality import domains
from compress.eval import perplexity_of_ids
from compress.methods.minify import MinifyConfig, MinifyPlan, score_minify
from compress.timing import env_info, gpu_slug, write_result
from lowrank.surgery import size_report

# Targets from the task: perplexity increase over dense at a given MLP retention (healed Taylor).
TARGETS = {0.9: 0.10, 0.7: 0.30}
RETENTIONS = (0.9, 0.8, 0.7)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _tiny_setup(device: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """A tiny random Llama and byte-level tokens of the offline pydoc text: seconds on a CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from compress.data import load_text, pack_tokens

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # a wider init than 0.02 so that pruning visibly changes the function
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model = model.to(device).eval()

    def byte_ids(text: str) -> torch.Tensor:
        return torch.tensor(list(text.encode("utf-8", errors="replace")), dtype=torch.long)

    calib = pack_tokens(byte_ids(load_text(None, "calib")[:40_000]), 128)[:24]
    test = pack_tokens(byte_ids(load_text(None, "eval")[:20_000]), 128)[:8]
    info = {"model": "tiny random llama (3 layers, d_ff 256)", "tokens": "utf-8 bytes of pydoc"}
    return model, calib, test, info


def _real_setup(args: argparse.Namespace, device: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor, dict]:
    from compress.data import calibration_batches, load_text, pack_tokens, tokenize_text
    from compress.errors import UserError
    from compress.model import load_model

    root = os.environ.get("WIKITEXT2")
    if not root or not (Path(root) / "valid.txt").is_file() or not (Path(root) / "test.txt").is_file():
        raise UserError("set WIKITEXT2 to a directory holding valid.txt and test.txt (or run with --tiny)")
    model, tokenizer = load_model(os.environ.get("SMOLLM2_GGUF"), dtype=torch.float32, device=device)
    calib = calibration_batches(tokenizer, load_text(str(Path(root) / "valid.txt"), "calib"),
                                seq_len=args.seq_len, num_samples=args.calib_samples, seed=0)
    test_text = load_text(str(Path(root) / "test.txt"), "eval")
    test = pack_tokens(tokenize_text(tokenizer, test_text), args.seq_len)
    info = {"model": os.environ.get("SMOLLM2_GGUF") or "bundled SmolLM2-135M-Instruct",
            "calibration": f"{calib.shape[0]} x {calib.shape[1]} tokens of valid.txt, seed 0",
            "eval": f"test.txt, {test.shape[0]} chunks of {test.shape[1]} tokens"}
    return model, calib, test, info, tokenizer


class Bench:
    """Materializes variants on copies of the dense fp32 model and evaluates them."""

    def __init__(self, model: nn.Module, test: torch.Tensor, eval_dtype: torch.dtype, batch: int) -> None:
        self.model, self.test, self.eval_dtype, self.batch = model, test, eval_dtype, batch
        self.rows: list[dict[str, Any]] = []
        self.dense_ppl = self.ppl(copy.deepcopy(model))
        self.tokenizer, self.suite, self.dense_suite = None, {}, None

    def set_domains(self, tokenizer: Any, suite: dict[str, torch.Tensor]) -> None:
        """Score main / compose rows on `suite` (bench.quality.domains texts) too, with the generation sanity
        metrics."""
        self.tokenizer, self.suite = tokenizer, suite
        self.dense_suite = domains.suite_report(copy.deepcopy(self.model).to(self.eval_dtype), tokenizer, suite,
                                                batch_size=self.batch)

    def ppl(self, m: nn.Module) -> float:
        m = m.to(self.eval_dtype)
        value = perplexity_of_ids(m, self.test, batch_size=self.batch, progress=False)
        del m
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return value

    def record(self, group: str, label: str, m: nn.Module, plan: MinifyPlan | None, seconds: dict[str, float],
               **extra: Any) -> dict[str, Any]:
        report = size_report(m)
        row: dict[str, Any] = {"group": group, "label": label, **extra}
        if plan is not None:
            info = plan.describe(m)
            row["mlp_fraction"] = info["mlp_fraction"]
            row["widths"] = [min(info["mlp_widths"].values()), max(info["mlp_widths"].values())]
            row["damped_layers"] = len(plan.last_stats.get("damped_layers", {}))
        row["target_fraction"] = round(report.target_fraction, 5)
        row["model_fraction"] = round(report.model_fraction, 5)
        row["perplexity"] = self.ppl(m)
        row["increase"] = row["perplexity"] / self.dense_ppl - 1.0
        if self.suite and group in ("main", "compose"):
            row["domains"] = domains.suite_report(m, self.tokenizer, self.suite, self.dense_suite,
                                                  batch_size=self.batch)
            row["domains"]["ratio"]["test"] = round(row["perplexity"] / self.dense_ppl, 5)
        row["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    def minify(self, group: str, label: str, plan: MinifyPlan, retention: float, **extra: Any) -> nn.Module:
        m = copy.deepcopy(self.model)
        t0 = time.perf_counter()
        plan.materialize_(m, retention)
        _sync()
        self.record(group, label, m, plan, {"materialize": time.perf_counter() - t0}, retention=retention,
                    score=plan.options.score, aggregation=plan.options.aggregation, heal=plan.options.heal,
                    ridge=plan.options.ridge, target=plan.options.target, **extra)
        return m


def _svd(model: nn.Module, calib: torch.Tensor, size: float, batch: int) -> tuple[nn.Module, dict]:
    """`svd` (whitened, uniform ranks) on `model` at `size` of its CURRENT targeted parameters."""
    from compress.methods.svd import SVDConfig, score_svd

    t0 = time.perf_counter()
    plan = score_svd(model, calib, SVDConfig(batch_size=batch, progress=False))
    _sync()
    t1 = time.perf_counter()
    plan.materialize_(model, size)
    _sync()
    return model, {"svd_score": t1 - t0, "svd_materialize": time.perf_counter() - t1}


def _table(rows: list[dict[str, Any]], dense: float) -> str:
    head = (f"{'group':<11} {'variant':<34} {'MLP':>6} {'targ':>6} {'model':>6} {'ppl':>8} {'Δppl':>8} "
            f"{'mat s':>6}")
    lines = [head, "-" * len(head), f"{'dense':<11} {'':<34} {1:>6.3f} {1:>6.3f} {1:>6.3f} {dense:>8.2f} "
             f"{'':>8} {'':>6}"]
    for r in rows:
        mlp = f"{r['mlp_fraction']:.3f}" if "mlp_fraction" in r else "—"
        secs = sum(r["seconds"].values())
        lines.append(f"{r['group']:<11} {r['label']:<34} {mlp:>6} {r['target_fraction']:>6.3f} "
                     f"{r['model_fraction']:>6.3f} {r['perplexity']:>8.2f} {100 * r['increase']:>+7.1f}% "
                     f"{secs:>6.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="directory for the JSON (default bench/results)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test on a tiny random model")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per scoring / SVD calibration batch")
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--ood", default="docs,legal,code",
                   help="bench.quality.domains texts scored beside test.txt for main/compose rows "
                        "(comma list, or 'none')")
    p.add_argument("--ood-chunks", type=int, default=128, help="windows per out-of-domain text, at most")
    p.add_argument("--max-seconds", type=float, default=210,
                   help="skip the remaining ablation rows past this wall time, so the run fits its 4 minutes")
    args = p.parse_args(argv)
    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = None
    if args.tiny:
        model, calib, test, info = _tiny_setup(device)
    else:
        model, calib, test, info, tokenizer = _real_setup(args, device)
    eval_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    setup_s = time.perf_counter() - start
    bench = Bench(model, test, eval_dtype, args.eval_batch_size)
    print(f"dense perplexity {bench.dense_ppl:.3f} ({eval_dtype})", flush=True)
    ood_names = [n for n in args.ood.split(",") if n.strip() and n != "none"]
    if tokenizer is not None and ood_names:
        bench.set_domains(tokenizer, domains.eval_chunks(tokenizer, args.seq_len, names=ood_names,
                                                         max_chunks=args.ood_chunks))

    # ---- one scoring pass serves every minify row
    t0 = time.perf_counter()
    plan = score_minify(model, calib, MinifyConfig(batch_size=args.batch_size, progress=False))
    _sync()
    score_s = time.perf_counter() - t0
    timing = {k: v for k, v in plan.metadata["timing_seconds"].items() if k != "total"}
    print(f"scoring: {score_s:.2f} s {timing}", flush=True)

    # ---- main table
    heal_s = None
    for retention in RETENTIONS:
        for score in ("taylor", "activation"):
            for heal in (True, False):
                variant = plan.with_options(score=score, heal=heal)
                bench.minify("main", f"{score} {'healed' if heal else 'unhealed'} @{retention:.0%}", variant,
                             retention)
                if retention == 0.8 and score == "taylor" and heal:
                    heal_s = bench.rows[-1]["seconds"]["materialize"]

    # ---- composition: equal total size S (targeted-linear fraction of minify @80%)
    minify80 = next(r for r in bench.rows if r["group"] == "main" and r["label"] == "taylor healed @80%")
    size = minify80["target_fraction"]
    m, secs = _svd(copy.deepcopy(model), calib, size, args.batch_size)
    bench.record("compose", f"svd alone @targ {size:.3f}", m, None, secs)
    del m
    m = copy.deepcopy(model)
    t0 = time.perf_counter()
    plan.materialize_(m, 0.9)
    _sync()
    minify_s = time.perf_counter() - t0
    first = size_report(m).target_fraction
    m, secs = _svd(m, calib, size / first, args.batch_size)
    bench.record("compose", f"minify 90% + svd @targ {size:.3f}", m, plan, {"materialize": minify_s, **secs},
                 retention=0.9, svd_size_of_narrowed=round(size / first, 5))
    del m
    compose = [r for r in bench.rows if r["group"] == "compose"] + [minify80]

    # ---- ablations (80% MLP retention, healed, unless stated); skipped past --max-seconds
    ablations: list[tuple[str, str, MinifyPlan, float]] = []
    for score in ("taylor", "taylor-act"):
        for agg in ("sq-sum", "sum-abs", "abs-sum"):
            if (score, agg) != (plan.options.score, plan.options.aggregation):  # default: in the main table
                ablations.append(("aggregate", f"{score} {agg} @80%",
                                  plan.with_options(score=score, aggregation=agg), 0.8))
    ablations += [("ridge", f"λ={r:g}·mean diag @80%", plan.with_options(ridge=r), 0.8)
                  for r in (0.0, 1e-5, 1e-3, 1e-2)]
    ablations += [("align", "width multiple 1 @80%", plan.with_options(width_multiple=1), 0.8),
                  ("floor", "floor 25% @80%", plan.with_options(min_keep=0.25), 0.8)]
    ablations += [("sequential", f"sequential target @{r:.0%}", plan.with_options(target="sequential"), r)
                  for r in RETENTIONS]
    skipped = []
    for group, label, variant, retention in ablations:
        if time.perf_counter() - start > args.max_seconds:
            skipped.append(label)
            continue
        bench.minify(group, label, variant, retention)
    if skipped:
        print(f"time budget of {args.max_seconds:.0f} s reached: skipped {skipped}", flush=True)

    # ---- targets and summary
    targets = {}
    for retention, limit in TARGETS.items():
        label = f"taylor healed @{retention:.0%}"
        row = next(r for r in bench.rows if r["group"] == "main" and r["label"] == label)
        increase = row["increase"]
        targets[f"{retention:.0%} MLP"] = {"perplexity": row["perplexity"], "limit": limit,
                                          "increase": round(increase, 4), "met": increase <= limit}
    total_s = time.perf_counter() - start
    payload = {
        "env": env_info(),
        "protocol": {**info, "scoring_dtype": "float32", "eval_dtype": str(eval_dtype), "device": device,
                     "defaults": {k: v for k, v in vars(plan.options).items()}},
        "dense_perplexity": bench.dense_ppl,
        "timing_seconds": {"setup": round(setup_s, 2), "score_total": round(score_s, 2), **timing,
                           "heal_default_80": heal_s,
                           "calibrate_plus_heal": round(score_s + (heal_s or 0), 2),
                           "total": round(total_s, 2)},
        "targets": targets,
        "skipped_ablations": skipped,
        "rows": bench.rows,
        "domains": None if bench.dense_suite is None else {
            "texts": domains.provenance(bench.suite), "dense": bench.dense_suite},
        "composition_same_size": [{k: r[k] for k in ("label", "target_fraction", "model_fraction",
                                                      "perplexity")} for r in compose],
    }
    path = write_result(f"minify_quality_{'tiny' if args.tiny else gpu_slug()}", payload, args.out)
    print(f"wrote {path}")
    print(json.dumps({k: payload[k] for k in ("dense_perplexity", "timing_seconds", "targets",
                                               "composition_same_size")}, indent=2))
    print(_table(bench.rows, bench.dense_ppl))
    if bench.dense_suite is not None:
        rows = [{"label": r["label"], **r["domains"]} for r in bench.rows if r.get("domains")]
        print("perplexity ÷ dense on each text (test = WikiText-2 test; docs/domains.md):")
        print(domains.format_ratio_table(rows, ["test", *bench.suite], {"test": bench.dense_ppl,
                                                                         **bench.dense_suite["ppl"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
