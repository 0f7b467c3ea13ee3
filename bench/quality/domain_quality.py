"""Quality off the calibration domain (issue #16): one process, one model load, a ranked ablation grid.

    python -m bench.quality.domain_quality --out $OUT --part 1/2  # GPU: $SMOLLM2_GGUF, $WIKITEXT2, $LOWRANK_CORPORA
    python -m bench.quality.domain_quality --out $OUT --part 2/2
    python -m bench.quality.domain_quality --out /tmp/dq --smoke  # CPU, tiny random model, < 1 minute
    python -m bench.quality.domain_quality --list                 # the grid, its estimated cost and parts

SmolLM2-135M is loaded once (fp32 master on the device for scoring that wants fp32: svd, minify,
surgeon; a bf16 copy for ACIP, as in bench.quality.acip_quality, and for every evaluation). Dense is scored on
every text of `bench.quality.domains.EVAL_TEXTS` (WikiText-2 test, held-out CPython docs, legal, code; 1024-token
windows, the first --eval-chunks of each), then the grid runs job by job in order of how much each job
tells (`GRID`): svd on WikiText-2 valid vs the ``mix`` calibration set at every size ACIP is compared
at, ACIP on ``mix`` with the default objective, KL distillation against the dense model, early
stopping on a held-out slice and fewer LoRA steps, svd with a shrunk Gram, minify and surgeon. Every
compressed model is scored on every text (perplexity ÷ dense on the same text) and gets the generation
sanity metrics (`compress.sanity`: calibration artifacts, repeated 4-gram rate) on fixed prompts.

Time: each job has an estimate from the H100 runs in bench/results (svd scoring 10-12 s, ACIP 16 steps/s
with CUDA graphs, surgeon ~75 s per size, one evaluation ~2 s + ~2.5 s of generation). ``--part K/N``
cuts the ordered grid into N contiguous parts of about equal estimated cost; a job whose estimate no
longer fits in --budget-minutes is skipped (and listed), an ACIP run that outlives twice its estimate
or the budget is cut short, and the JSON is rewritten after every evaluated size, so a run killed at
its limit still returns every size it finished (the killed job's status reads "running").
``--jobs a,b`` runs named jobs only; ``--grid all`` adds the extra jobs (ACIP on WikiText-2 alone,
smaller LoRA, ACIP with a shrunk Gram, surgeon variants).

Output: ``<out>/domain_quality_<part>_<gpu>.json`` (rows, per-text provenance with sha256, calibration
draws, targets, timings) and a compact table on stdout. Options are chosen on `SELECTION_TEXT` (legal)
and reported on `REPORT_TEXTS` (code); WikiText-2 test is never used to choose.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.quality import domains

SVD_SIZES = (0.9, 0.8, 0.7, 0.6)
ACIP_SIZES = (0.9, 0.8, 0.7, 0.6)
ACIP_VARIANT_SIZES = (0.9, 0.8, 0.6)
EVAL_SECONDS = 4.5  # one model: perplexity on every text (~2 s) + greedy sanity samples (~2.5 s), H100
# Issue #16 targets: worst out-of-domain ratio per (method, size); sizes in each method's convention.
TARGETS = {("acip", 0.9): 1.15, ("acip", 0.8): 1.5, ("acip", 0.6): 2.5, ("svd", 0.9): 1.3, ("svd", 0.8): 2.0,
           ("surgeon", 0.9): 1.2, ("surgeon", 0.8): 1.5, ("minify", 0.9): 1.1}


@dataclass
class Job:
    key: str
    tier: str  # "core" or "extra"
    estimate_s: float  # H100-based estimate of the whole job, evaluations included
    kind: str  # svd | acip | minify | surgeon
    calibration: str  # a bench.quality.domains.CALIBRATIONS name
    sizes: tuple[float, ...]
    options: dict[str, Any] = field(default_factory=dict)
    variant: str = "default"
    extra: dict[str, Any] = field(default_factory=dict)


def _svd_job(calib: str, shrink: float, sizes: tuple[float, ...], tier: str = "core") -> Job:
    opts = {"gram_shrink": shrink} if shrink else {}
    return Job(f"svd-{calib}-g{shrink:g}", tier, 12 + EVAL_SECONDS * len(sizes), "svd", calib, sizes, opts,
               "default" if not shrink else f"gram_shrink={shrink:g}")


PRUNE_STEPS = 1145  # ACIP's pruning phase on SmolLM2 with the paper's schedule (bench/results, whitened)
# Seconds per ACIP step on SmolLM2 (bf16, CUDA graphs, distill=1, the default): 1374 steps took 207 s alone on an
# H100 (acip-mix-short, 2026-12-07). A run is cut at twice its estimate; at 1/16 s two runs that shared the GPU
# were cut before post-tuning and published an early stop (docs/domains.md).
ACIP_STEP_SECONDS = 1 / 6
PAPER_POST_TUNE_STEPS = 1000  # the paper's LoRA post-tuning steps; ACIPConfig's default is 200 (docs/domains.md)


def _scaled_steps(steps: int, scale: float) -> int:
    """A step count of the paper's schedule run `scale` times faster; 0 (no post-tuning) stays 0."""
    return max(1, round(steps / scale)) if steps else 0


def _acip_job(key: str, variant: str, calib: str, options: dict[str, Any], *, sizes=ACIP_VARIANT_SIZES,
              magnitude: bool = False, tier: str = "core", scale: float = 1.0) -> Job:
    """An ACIP job; `scale` > 1 runs the paper's schedule that much faster (as bench.quality.acip_quality
    --time-scale). Post-tuning runs the paper's 1000 steps unless `options` sets `post_tune_steps`."""
    evals = len(sizes) * (2 if magnitude else 1)
    post_tune = options.get("post_tune_steps", PAPER_POST_TUNE_STEPS)
    steps = (PRUNE_STEPS + post_tune) / scale
    options = dict(options)
    if "post_tune_steps" in options:
        options["post_tune_steps"] = _scaled_steps(post_tune, scale)
    return Job(key, tier, 12 + steps * ACIP_STEP_SECONDS + EVAL_SECONDS * evals, "acip", calib, sizes, options, variant,
               {"magnitude": magnitude, "time_scale": scale})


def grid(acip_time_scale: float = 1.0) -> list[Job]:
    """The jobs, ordered by how much each tells (the paper's ACIP schedule: 1145 pruning + 1000 post-tuning steps)."""
    s = acip_time_scale
    es = {"holdout": 16, "holdout_every": max(1, round(50 / s)), "holdout_patience": 4}
    return [
        _svd_job("wiki", 0.0, SVD_SIZES),
        _svd_job("mix", 0.0, SVD_SIZES),
        # ACIP's default objective is distill=1 (KL to dense), chosen by this grid's acip-mix-kl run
        # against the paper's NLL-only loss (docs/domains.md); both are kept under their old keys.
        _acip_job("acip-mix", "distill=0 (NLL only, the paper's loss)", "mix", {"distill": 0.0}, sizes=ACIP_SIZES,
                  magnitude=True, scale=s),
        _acip_job("acip-mix-kl", "distill=1 (KL to dense)", "mix", {"distill": 1.0}, scale=s),
        _acip_job("acip-mix-es", "early stop (16 held out)", "mix", es, scale=s),
        _acip_job("acip-mix-short", "post_tune_steps=200", "mix", {"post_tune_steps": 200}, scale=s),
        _svd_job("mix", 0.05, (0.9, 0.8)),
        _svd_job("mix", 0.3, (0.9, 0.8)),
        Job("minify-mix", "core", 8 + 3 * EVAL_SECONDS, "minify", "mix", (0.9,), {},
            extra={"variants": {"default": {}, "unhealed": {"heal": False}, "ridge=1e-2": {"ridge": 1e-2},
                                # the ridge toward the kept columns (docs/minify.md), best on legal on the CPU
                                "prior=original ridge=1e-1": {"heal_prior": "original", "ridge": 0.1}}}),
        Job("surgeon-mix", "core", 2 * (75 + EVAL_SECONDS), "surgeon", "mix", (0.9, 0.8), {}),
        # extra: the calibration domain's effect on ACIP, a smaller LoRA, a shrunk basis, surgeon variants
        _acip_job("acip-wiki", "default", "wiki", {}, magnitude=True, tier="extra", scale=s),
        _acip_job("acip-mix-r8", "lora_rank=8", "mix", {"lora_rank": 8}, tier="extra", scale=s),
        # Post-tuning fits the one LoRA every size shares to the stop-ratio model: none at all, or 200 steps
        # each under the masks of a size drawn between the stop ratio and 1 (post_tune_size=any).
        _acip_job("acip-mix-post0", "post_tune_steps=0", "mix", {"post_tune_steps": 0}, tier="extra", scale=s),
        _acip_job("acip-mix-any", "post_tune_size=any (200 steps)", "mix",
                  {"post_tune_steps": 200, "post_tune_size": "any"}, tier="extra", scale=s),
        # Runs cut during pruning scored better at 90/80 % the earlier they stopped: prune only down to the
        # smallest size reported (60 %), then post-tune across sizes as the default does.
        _acip_job("acip-mix-any-s60", "post_tune_size=any, stop_ratio=0.6", "mix",
                  {"post_tune_steps": 200, "post_tune_size": "any", "stop_ratio": 0.6}, tier="extra", scale=s),
        _acip_job("acip-mix-g0.05", "gram_shrink=0.05", "mix", {"gram_shrink": 0.05}, tier="extra", scale=s),
        _acip_job("acip-mix-kl-es", "distill=1 + early stop", "mix", {"distill": 1.0, **es},
                  tier="extra", scale=s),
        _svd_job("wiki", 0.05, (0.9, 0.8), tier="extra"),
        _svd_job("wiki", 0.3, (0.9, 0.8), tier="extra"),
        Job("surgeon-mix-nolora", "extra", 35 + EVAL_SECONDS, "surgeon", "mix", (0.8,), {"lora_steps": 0},
            "no LoRA"),
        # the surgeon's LoRA distilled to the dense model, as ACIP's default (compress.distill)
        Job("surgeon-mix-kl", "extra", 2 * (90 + EVAL_SECONDS), "surgeon", "mix", (0.9, 0.8), {"distill": 1.0},
            "LoRA distill=1"),
        Job("surgeon-wiki", "extra", 75 + EVAL_SECONDS, "surgeon", "wiki", (0.8,), {}),
        Job("minify-wiki", "extra", 8 + EVAL_SECONDS, "minify", "wiki", (0.9,), {},
            extra={"variants": {"default": {}}}),
    ]


GRID: list[Job] = grid()

CALIB_SAMPLES = {"svd": 64, "acip": 256, "minify": 128, "surgeon": 64}
SMOKE_CALIB_SAMPLES = {"svd": 8, "acip": 12, "minify": 8, "surgeon": 6}


def split_parts(jobs: list[Job], parts: int) -> list[list[Job]]:
    """`jobs` in order, cut into `parts` contiguous runs so that the longest estimated run is shortest."""
    costs = [j.estimate_s for j in jobs]
    parts = max(1, min(parts, len(jobs))) if jobs else 1

    @functools.cache
    def best(start: int, k: int) -> tuple[float, tuple[int, ...]]:
        # (longest run, cut positions) for jobs[start:] in k runs
        if k == 1:
            return sum(costs[start:]), ()
        options = []
        for cut in range(start + 1, len(costs) - k + 2):
            rest, cuts = best(cut, k - 1)
            options.append((max(sum(costs[start:cut]), rest), (cut, *cuts)))
        return min(options)

    cuts = (0, *best(0, parts)[1], len(jobs)) if jobs else (0, 0)
    out = [jobs[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
    return out + [[] for _ in range(parts - len(out))]


# ---------------------------------------------------------------------------- setup
def _smoke_setup(device: str) -> tuple[nn.Module, Any, dict[str, Any]]:
    """A tiny random Llama with a small byte-level BPE tokenizer trained on the offline corpora."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from compress.corpora import corpus_text

    text = "\n".join(corpus_text(f"offline:{n}:calib")[:20_000] for n in ("docs", "code", "legal"))
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator([text], trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                                        show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model.to(device).eval(), tok, {"model": "tiny random llama (smoke)", "tokenizer": "BPE 400 (smoke)"}


def _real_setup(device: str) -> tuple[nn.Module, Any, dict[str, Any]]:
    from compress.model import load_model

    model, tokenizer = load_model(os.environ.get("SMOLLM2_GGUF"), dtype=torch.float32, device=device)
    return model.eval(), tokenizer, {"model": os.environ.get("SMOLLM2_GGUF") or "bundled SmolLM2-135M-Instruct"}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Context:
    """The loaded model(s), texts, dense reference, calibration cache and the result being written."""

    def __init__(self, args: argparse.Namespace, device: str) -> None:
        self.args, self.device = args, device
        self.t_start = time.perf_counter()
        self.deadline = self.t_start + 60 * args.budget_minutes
        setup = _smoke_setup if args.smoke else _real_setup
        self.model32, self.tokenizer, self.info = setup(device)
        self.eval_dtype = torch.bfloat16 if device == "cuda" else torch.float32
        self.model = copy.deepcopy(self.model32).to(self.eval_dtype) if self.eval_dtype != torch.float32 \
            else self.model32
        self.texts = domains.eval_chunks(self.tokenizer, args.seq_len, max_chunks=args.eval_chunks,
                                         allow_stand_in=args.smoke)
        self._calib: dict[tuple[str, int], tuple[torch.Tensor, dict[str, Any]]] = {}
        self.load_seconds = time.perf_counter() - self.t_start
        self.dense: dict[str, Any] = {}
        self.rows: list[dict[str, Any]] = []
        self.jobs: dict[str, dict[str, Any]] = {}
        # Rewrites the result file; called after every evaluated size, so a run killed at its time
        # limit keeps the sizes it finished, not only its finished jobs.
        self.save: Callable[[], Any] | None = None
        dense_params = sum(m.weight.numel() for m in self._targets(self.model32).values())
        self.model_params = sum(p.numel() for p in self.model32.parameters())
        self.target_params = dense_params

    @staticmethod
    def _targets(model: nn.Module) -> dict[str, nn.Module]:
        from lowrank.surgery import target_linears

        return target_linears(model)

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def calibration(self, name: str, method: str) -> torch.Tensor:
        samples = (SMOKE_CALIB_SAMPLES if self.args.smoke else CALIB_SAMPLES)[method]
        key = (name, samples)
        if key not in self._calib:
            self._calib[key] = domains.calibration_chunks(self.tokenizer, name, seq_len=self.args.seq_len,
                                                          num_samples=samples, allow_stand_in=self.args.smoke)
        return self._calib[key][0]

    def calibration_report(self) -> dict[str, Any]:
        return {f"{name}/{n}": info for (name, n), (_, info) in self._calib.items()}

    # ------------------------------------------------------------------ evaluation
    def score(self, model: nn.Module) -> tuple[dict[str, float], dict[str, Any], list[str]]:
        from compress.sanity import greedy_completions, sanity_metrics

        ppl = domains.perplexities(model, self.texts, self.args.eval_batch_size)
        samples = greedy_completions(model, self.tokenizer, max_new_tokens=self.args.max_new_tokens)
        return ppl, sanity_metrics(samples), samples

    def evaluate(self, job: Job, label: str, model: nn.Module, size: float, convention: str,
                 **extra: Any) -> dict[str, Any]:
        from compress.sanity import sanity_check
        from lowrank.surgery import size_report

        t0 = time.perf_counter()
        report = size_report(model)
        ppl, sanity, samples = self.score(model)
        _sync()
        ratio = domains.ratios(ppl, self.dense["ppl"])
        row = {"job": job.key, "label": label, "method": extra.pop("method", job.kind),
               "calibration": job.calibration, "variant": extra.pop("variant", job.variant), "size": size,
               "size_convention": convention, "target_fraction": round(report.target_fraction, 5),
               "model_fraction": round(report.model_fraction, 5), "ppl": ppl, "ratio": ratio,
               "worst_ood": domains.worst_ood(ratio), "selection": ratio.get(domains.SELECTION_TEXT),
               "sanity": {**sanity, **sanity_check(sanity, self.dense["sanity"])}, "samples": samples,
               "eval_seconds": round(time.perf_counter() - t0, 2), **extra}
        self.rows.append(row)
        if self.save is not None:
            self.save()
        cells = " ".join(f"{k} {v:.3f}" for k, v in ratio.items())
        print(f"  {label:<40} ×dense: {cells} | artifacts {sanity['artifacts']['total']} rep "
              f"{sanity['repetition']:.1f}%", flush=True)
        return row


# ---------------------------------------------------------------------------- jobs
def _config(method: str, **options: Any) -> Any:
    from compress.methods import get_method

    return get_method(method).make_config(**options)


def run_svd(ctx: Context, job: Job) -> dict[str, Any]:
    from compress.methods import get_method

    chunks = ctx.calibration(job.calibration, "svd")
    config = _config("svd", batch_size=8, progress=False, **job.options)
    t0 = time.perf_counter()
    plan = get_method("svd").score(ctx.model32, chunks, config)
    _sync()
    seconds = time.perf_counter() - t0
    for size in job.sizes:
        m = copy.deepcopy(ctx.model)
        plan.materialize_(m, size)
        ctx.evaluate(job, f"svd {size:.0%} [{job.calibration}] {job.variant}", m, size, "targeted")
        del m
    return {"scoring_seconds": round(seconds, 2), "calibration_sequences": int(chunks.shape[0])}


def _acip_base(ctx: Context) -> dict[str, Any]:
    # The grid's jobs run the paper's post-tuning (1000 steps at the stop ratio) unless they set their own
    # (acip-mix-short: 200 steps, acip-mix-any: sizes drawn per step; both ACIP's defaults since those jobs'
    # results), so every key keeps the meaning its published rows had.
    scale = ctx.args.acip_time_scale
    base: dict[str, Any] = {"progress": False, "seed": 0, "cuda_graphs": ctx.device == "cuda",
                            "post_tune_steps": _scaled_steps(PAPER_POST_TUNE_STEPS, scale),
                            "post_tune_size": "stop"}  # the paper's, as every key before acip-mix-any measured
    if scale != 1.0:  # the paper's schedule `scale` times faster, as bench.quality.acip_quality --time-scale
        base.update(lr=5e-5 * scale, reg_update_every=max(1, round(4 / scale)),
                    reg_update_factor=1.01 ** max(1.0, scale / 4))
    if ctx.args.smoke:  # a schedule that prunes a tiny model to its stop ratio in a few dozen steps
        base.update(stop_ratio=0.5, lr=1e-2, reg_start=1e-2, reg_update_every=1, reg_update_factor=1.3,
                    post_tune_steps=6, max_steps=40, lora_rank=4, whiten_samples=0, batch_size=2)
    return base


def run_acip(ctx: Context, job: Job) -> dict[str, Any]:
    from compress.methods.acip import run_acip as acip
    from compress.plan import temporarily_materialized

    chunks = ctx.calibration(job.calibration, "acip")
    options = {**_acip_base(ctx), **job.options}
    if ctx.args.smoke and "holdout" in job.options:
        options.update(holdout=2, holdout_every=2, holdout_patience=1)
    if ctx.args.smoke and job.options.get("post_tune_steps"):
        options["post_tune_steps"] = 3
    config = _config("acip", **options)
    t0 = time.perf_counter()
    evals = len(job.sizes) * (2 if job.extra.get("magnitude") else 1)
    # Cut the run short past twice its estimate, or when the budget must still cover its evaluations.
    cutoff = min(t0 + 2 * job.estimate_s, ctx.deadline - evals * EVAL_SECONDS - 10)
    cut = {"at": None}

    def callback(info: dict[str, Any]) -> bool | None:
        if info["step"] % 250 == 0 or info["phase"] == "done":
            print(f"  [{job.key}] step {info['step']:5d} {info['phase']:9s} size {info['size']:.3f} "
                  f"loss {info['loss']:.3f} ({info['seconds']:.0f} s)", flush=True)
        if time.perf_counter() > cutoff and info["phase"] != "done":
            cut["at"] = f"step {info['step']} ({info['phase']})"
            return True
        return None

    score_map = acip(ctx.model, chunks, config, callback=callback)
    _sync()
    seconds = time.perf_counter() - t0
    meta = score_map.metadata
    score_map.to(ctx.device)
    covered = score_map.min_size()
    plans = [("acip", job.variant, score_map)]
    if job.extra.get("magnitude"):
        plans.append(("svd-magnitude", "whitened basis", score_map.singular_value_map()))
    for method, variant, plan in plans:
        for size in job.sizes:
            if method == "acip" and size < covered - 0.005:
                print(f"  acip {size:.0%}: not covered (score map reaches {covered:.3f})", flush=True)
                continue
            with temporarily_materialized(ctx.model, plan, size):
                ctx.evaluate(job, f"{method} {size:.0%} [{job.calibration}] {variant}", ctx.model, size, "targeted",
                             method=method, variant=variant)
    keys = ("steps", "acip_steps", "post_tune_steps", "train_seconds", "steps_per_second", "step_mode",
            "step_mode_note", "final_ratio", "stop_reached", "holdout", "whitening")
    return {"scoring_seconds": round(seconds, 2), "calibration_sequences": int(chunks.shape[0]),
            "covered_from": round(covered, 5), "cut_short": cut["at"],
            "config": {k: v for k, v in options.items() if k != "progress"},
            **{k: meta[k] for k in keys if k in meta}}


def run_minify(ctx: Context, job: Job) -> dict[str, Any]:
    from compress.methods.minify import score_minify

    chunks = ctx.calibration(job.calibration, "minify")
    t0 = time.perf_counter()
    plan = score_minify(ctx.model32, chunks, _config("minify", batch_size=8, progress=False, **job.options))
    _sync()
    seconds = time.perf_counter() - t0
    for variant, opts in job.extra["variants"].items():
        for size in job.sizes:
            m = copy.deepcopy(ctx.model)
            plan.with_options(**opts).materialize_(m, size)
            ctx.evaluate(job, f"minify {size:.0%} MLP [{job.calibration}] {variant}", m, size, "mlp", variant=variant)
            del m
    return {"scoring_seconds": round(seconds, 2), "calibration_sequences": int(chunks.shape[0])}


def run_surgeon(ctx: Context, job: Job) -> dict[str, Any]:
    from compress.methods import get_method

    chunks = ctx.calibration(job.calibration, "surgeon")
    options = {"batch_size": 8, "progress": False, **job.options}
    if ctx.args.smoke:  # two shots of two LoRA steps: the plumbing, in seconds
        options = {"shots": 2, "lora_steps": 2, **options}
    seconds = {}
    for fraction in job.sizes:
        m = copy.deepcopy(ctx.model32)
        t0 = time.perf_counter()
        target = 1.0 - (1.0 - fraction) * ctx.model_params / ctx.target_params
        plan = get_method("surgeon").score(m, chunks, _config("surgeon", sizes=(target,), **options))
        plan.materialize_(m, target)
        _sync()
        seconds[str(fraction)] = round(time.perf_counter() - t0, 2)
        m = m.to(ctx.eval_dtype)
        ctx.evaluate(job, f"surgeon {fraction:.0%} model [{job.calibration}] {job.variant}", m, fraction, "model",
                     targeted_size=round(target, 5))
        del m
    return {"prune_seconds": seconds, "calibration_sequences": int(chunks.shape[0])}


RUNNERS: dict[str, Callable[[Context, Job], dict[str, Any]]] = {"svd": run_svd, "acip": run_acip,
                                                                 "minify": run_minify, "surgeon": run_surgeon}


# ---------------------------------------------------------------------------- targets and output
def check_targets(rows: list[dict[str, Any]], dense_sanity: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Issue #16's targets on the rows there are: worst OOD ratio limits, ACIP vs svd / svd-magnitude, sanity."""
    out = []
    for row in rows:
        limit = TARGETS.get((row["method"], round(row["size"], 2)))
        if limit is not None and row["worst_ood"] is not None:
            out.append({"target": f"{row['method']} {row['size']:.0%} worst OOD ≤ {limit}", "row": row["label"],
                        "value": row["worst_ood"], "met": row["worst_ood"] <= limit})
    baselines = {(r["method"], round(r["size"], 2), r["calibration"]): r for r in rows
                 if r["method"] in ("svd", "svd-magnitude") and r["variant"] in ("default", "whitened basis")}
    for row in rows:
        if row["method"] != "acip" or row["size"] > 0.9:
            continue
        for base in ("svd", "svd-magnitude"):
            other = baselines.get((base, round(row["size"], 2), row["calibration"]))
            if other is not None:
                beats = all(row["ratio"][t] < other["ratio"][t] for t in row["ratio"])
                out.append({"target": f"acip beats {base} on every text", "row": row["label"],
                            "value": {t: [row["ratio"][t], other["ratio"][t]] for t in row["ratio"]}, "met": beats})
    for row in rows:
        sanity = row["sanity"]
        out.append({"target": "no artifacts, repetition ≤ dense + 5", "row": row["label"],
                    "value": [sanity["artifacts"]["total"], sanity["repetition"]],
                    "met": bool(sanity.get("artifacts_ok") and sanity.get("repetition_ok"))})
    return out


def _payload(ctx: Context, part: str, skipped: list[str]) -> dict[str, Any]:
    from compress.timing import env_info

    targets = check_targets(ctx.rows, ctx.dense.get("sanity"))
    return {
        "bench": "domain_quality", "part": part, "smoke": ctx.args.smoke, **ctx.info,
        "acip_time_scale": ctx.args.acip_time_scale,
        "device": torch.cuda.get_device_name(0) if ctx.device == "cuda" else "cpu",
        "eval_dtype": str(ctx.eval_dtype), "seq_len": ctx.args.seq_len, "eval_chunks_cap": ctx.args.eval_chunks,
        "texts": domains.provenance(ctx.texts, allow_stand_in=ctx.args.smoke),
        "selection_text": domains.SELECTION_TEXT, "report_texts": list(domains.REPORT_TEXTS),
        "ood_texts": list(domains.OOD_TEXTS),
        "calibrations": {k: list(v) for k, v in domains.CALIBRATIONS.items()},
        "calibration_draws": ctx.calibration_report(),
        "calib_samples": SMOKE_CALIB_SAMPLES if ctx.args.smoke else CALIB_SAMPLES,
        "dense": ctx.dense, "jobs": ctx.jobs, "skipped": skipped, "rows": ctx.rows,
        "targets": targets, "targets_met": sum(t["met"] for t in targets), "targets_total": len(targets),
        "timing": {"load_seconds": round(ctx.load_seconds, 2),
                   "wall_seconds": round(time.perf_counter() - ctx.t_start, 1)},
        "env": env_info(),
    }


def _write(ctx: Context, part: str, skipped: list[str]) -> Path:
    from compress.timing import gpu_slug, write_result

    tag = part.replace("/", "of")
    name = f"domain_quality_{'smoke' if ctx.args.smoke else gpu_slug()}_part{tag}"
    return write_result(name, _payload(ctx, part, skipped), ctx.args.out)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.quality.domain_quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="directory for the JSON (default bench/results)")
    p.add_argument("--part", default="1/1", help="K/N: run the K-th of N parts of the ordered grid (default 1/1)")
    p.add_argument("--grid", choices=("core", "all"), default="core", help="core jobs, or also the extra ones")
    p.add_argument("--jobs", default=None, help="comma list of job keys to run (overrides --grid and --part)")
    p.add_argument("--sizes", default=None,
                   help="comma list replacing every selected job's sizes (e.g. 0.8 for one point of a job); "
                        "surgeon, which scores once per size, scales its time estimate with the count")
    p.add_argument("--budget-minutes", type=float, default=9.0,
                   help="wall-clock budget of this process; jobs that no longer fit are skipped (default 9)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--eval-chunks", type=int, default=128, help="windows scored per text, at most (default 128)")
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=None, help="sanity sample length (default 48; smoke 8)")
    p.add_argument("--acip-time-scale", type=float, default=1.0,
                   help="run ACIP's schedule this much faster (default 1: the paper's 2145 steps; 2 halves "
                        "every ACIP job's cost)")
    p.add_argument("--smoke", action="store_true", help="CPU end-to-end check on a tiny random model (< 1 min)")
    p.add_argument("--list", action="store_true", help="print the grid, its estimates and parts, and exit")
    args = p.parse_args(argv)
    if args.smoke:
        args.seq_len, args.eval_chunks = min(args.seq_len, 32), min(args.eval_chunks, 2)
        torch.set_num_threads(1)  # a tiny model: threads only contend
        args.max_new_tokens = args.max_new_tokens or 8
    args.max_new_tokens = args.max_new_tokens or 48
    return args


def with_sizes(job: Job, sizes: tuple[float, ...]) -> Job:
    """`job` at `sizes` instead of its own; a method that scores once per size (surgeon) rescales its estimate."""
    estimate = job.estimate_s * len(sizes) / len(job.sizes) if job.kind == "surgeon" else job.estimate_s
    return dataclasses.replace(job, sizes=sizes, estimate_s=estimate)


def parse_sizes(text: str) -> tuple[float, ...]:
    """--sizes as `compress curve` reads it (comma list or START:STOP:STEP), below 1, largest first as in the grid."""
    from compress.cli import _parse_sizes
    from compress.errors import UserError

    try:
        sizes = _parse_sizes(text)
    except UserError as exc:
        raise SystemExit(str(exc)) from None
    if 1.0 in sizes:
        raise SystemExit(f"--sizes must be fractions below 1 (1 is the dense model, scored anyway), got {text!r}")
    return tuple(sorted(sizes, reverse=True))


def select_jobs(args: argparse.Namespace) -> tuple[list[Job], str]:
    jobs, part = _selected_jobs(args)
    if args.sizes:
        sizes = parse_sizes(args.sizes)
        jobs = [with_sizes(j, sizes) for j in jobs]
    return jobs, part


def _selected_jobs(args: argparse.Namespace) -> tuple[list[Job], str]:
    if args.jobs:
        wanted = [k.strip() for k in args.jobs.split(",") if k.strip()]
        by_key = {j.key: j for j in grid(args.acip_time_scale)}
        unknown = [k for k in wanted if k not in by_key]
        if unknown:
            raise SystemExit(f"unknown job(s) {unknown}; known: {', '.join(by_key)}")
        return [by_key[k] for k in wanted], "jobs"
    try:
        k, n = (int(v) for v in args.part.split("/"))
        if not 1 <= k <= n:
            raise ValueError
    except ValueError:
        raise SystemExit(f"--part must be K/N with 1 ≤ K ≤ N, got {args.part!r}") from None
    jobs = [j for j in grid(args.acip_time_scale) if args.grid == "all" or j.tier == "core"]
    return split_parts(jobs, n)[k - 1], f"{k}/{n}"


def _print_grid(args: argparse.Namespace) -> None:
    for n in (1, 2, 3, 4):
        parts = split_parts([j for j in grid(args.acip_time_scale) if args.grid == "all" or j.tier == "core"], n)
        print(f"{n} part(s): " + " | ".join(f"{sum(j.estimate_s for j in part):.0f} s" for part in parts))
    for i, job in enumerate(grid(args.acip_time_scale), 1):
        print(f"{i:2d}. {job.key:<18} {job.tier:<5} ~{job.estimate_s:5.0f} s  {job.kind} [{job.calibration}] "
              f"{job.variant} sizes {list(job.sizes)} {job.options}")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.list:
        _print_grid(args)
        return 0
    jobs, part = select_jobs(args)
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    ctx = Context(args, device)
    t0 = time.perf_counter()
    ppl, sanity, samples = ctx.score(ctx.model)
    ctx.dense = {"ppl": ppl, "sanity": sanity, "samples": samples, "seconds": round(time.perf_counter() - t0, 2)}
    print(f"loaded in {ctx.load_seconds:.1f} s; dense perplexity " + ", ".join(f"{k} {v:.3f}" for k, v in ppl.items())
          + f"; samples: {sanity['artifacts']['total']} artifacts, repetition {sanity['repetition']:.1f}% "
          f"({ctx.dense['seconds']:.1f} s)", flush=True)
    scale = 0.02 if args.smoke else 1.0  # smoke jobs take a sliver of the GPU estimates
    skipped: list[str] = []
    path = _write(ctx, part, skipped)
    ctx.save = lambda: _write(ctx, part, skipped)
    for job in jobs:
        if job.estimate_s * scale * 1.05 > ctx.left():
            skipped.append(job.key)
            ctx.jobs[job.key] = {"status": "skipped", "reason": f"estimate {job.estimate_s:.0f} s > "
                                                                f"{ctx.left():.0f} s left"}
            print(f"skip {job.key}: estimated {job.estimate_s:.0f} s, {ctx.left():.0f} s left", flush=True)
            continue
        print(f"== {job.key} ({job.kind} [{job.calibration}] {job.variant}; ~{job.estimate_s:.0f} s)", flush=True)
        t_job = time.perf_counter()
        # A file that still says "running" was written by a process killed inside this job: its rows
        # are the sizes the job finished.
        ctx.jobs[job.key] = {"status": "running", "estimate_seconds": job.estimate_s}
        try:
            meta = RUNNERS[job.kind](ctx, job)
            status = "done"
        except Exception as exc:  # noqa: BLE001 - one failing job is recorded; the grid goes on
            meta = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
            status = "error"
            print(f"  {job.key} failed: {meta['error']}", flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        ctx.jobs[job.key] = {"status": status, "seconds": round(time.perf_counter() - t_job, 1),
                             "estimate_seconds": job.estimate_s, **meta}
        path = _write(ctx, part, skipped)
    print(f"wrote {path}")
    texts = list(ctx.texts)
    print(f"perplexity ÷ dense (selection text: {domains.SELECTION_TEXT}; report: {', '.join(domains.REPORT_TEXTS)};"
          f" worst OOD over {', '.join(domains.OOD_TEXTS)})")
    dense_row = {"label": "dense", "ratio": {t: 1.0 for t in texts}, "sanity": ctx.dense["sanity"]}
    print(domains.format_ratio_table([dense_row, *ctx.rows], texts, ctx.dense["ppl"]))
    payload = _payload(ctx, part, skipped)
    misses = [t for t in payload["targets"] if not t["met"]]
    print(f"targets met: {payload['targets_met']}/{payload['targets_total']}"
          + (f"; missed: {', '.join(sorted({t['target'] for t in misses}))}" if misses else ""))
    if skipped:
        print(f"skipped (budget): {', '.join(skipped)} -> rerun with --jobs {','.join(skipped)}")
    print(f"wall time {time.perf_counter() - ctx.t_start:.1f} s")
    return 1 if any(j["status"] == "error" for j in ctx.jobs.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
