"""LLM Surgeon quality and cost on SmolLM2-135M / WikiText-2, against minify and `svd` (docs/surgeon.md).

    python -m bench.quality.surgeon_quality --out $OUT           # GPU: model from $SMOLLM2_GGUF, text from $WIKITEXT2
    python -m bench.quality.surgeon_quality --tiny --out /tmp/x  # CPU smoke test: tiny random model, tiny text

Protocol: valid.txt is packed into 1024-token chunks; the first 80% are the calibration pool
(64 chunks drawn with seed 0), the last 20% are a held-out set for the ablations, so no
choice is made on test.txt. The model is pruned in fp32 on the GPU and evaluated in bf16 on
test.txt in non-overlapping 1024-token chunks (the protocol of every other method).

Rows, in order of priority (rows still pending when the wall time passes --max-seconds are
skipped and listed):

- main: surgeon (physical) at 90/80/70% of the WHOLE model's parameters, physically
  removed; minify (Taylor + ridge) and `svd` (whitened, uniform ranks) at the same whole-model
  sizes (their own size conventions converted);
- ablations at 80% whole-model size, on held-out valid: shots, damping, Fisher labels, unit
  ranking, no update, heads only / MLP only, LoRA correction;
- cost: one shot on a LLaMA-7B-shaped stack of --cost-layers layers (random weights from
  orthonormal factors with a decaying spectrum): curvature memory and time per phase.

Other domains (docs/domains.md): main rows are also scored on the out-of-domain texts of `bench.quality.domains`
(`--ood`: docs, legal, code) with the generation sanity metrics (row field ``domains``), and a table of
perplexity ÷ dense per text is printed last.
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
from compress.methods.surgeon import SurgeonOptions, surgeon_prune_
from compress.timing import env_info, gpu_slug, write_result
from lowrank.surgery import size_report

MAIN_SIZES = (0.9, 0.8, 0.7)  # whole-model fractions
TARGET_INCREASE_AT_80 = 0.15


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _split_valid(chunks: torch.Tensor, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    pool = int(0.8 * chunks.shape[0])
    gen = torch.Generator().manual_seed(0)
    pick = torch.randperm(pool, generator=gen)[: min(samples, pool)].sort().values
    return chunks[pick], chunks[pool:]


def _setup(args: argparse.Namespace, device: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, dict,
                                                           Any]:
    if args.tiny:
        from bench.quality.minify_quality import _tiny_setup

        model, calib, test, info = _tiny_setup(device)
        return model, calib[:16], calib[16:], test, info, None
    from compress.data import load_text, pack_tokens, tokenize_text
    from compress.errors import UserError
    from compress.model import load_model

    root = os.environ.get("WIKITEXT2")
    if not root or not (Path(root) / "valid.txt").is_file() or not (Path(root) / "test.txt").is_file():
        raise UserError("set WIKITEXT2 to a directory holding valid.txt and test.txt (or run with --tiny)")
    model, tokenizer = load_model(os.environ.get("SMOLLM2_GGUF"), dtype=torch.float32, device=device)
    valid = pack_tokens(tokenize_text(tokenizer, load_text(str(Path(root) / "valid.txt"), "calib")), args.seq_len)
    calib, held = _split_valid(valid, args.calib_samples)
    test = pack_tokens(tokenize_text(tokenizer, load_text(str(Path(root) / "test.txt"), "eval")), args.seq_len)
    info = {"model": os.environ.get("SMOLLM2_GGUF") or "bundled SmolLM2-135M-Instruct",
            "calibration": f"{calib.shape[0]} x {calib.shape[1]} tokens from the first 80% of valid.txt, seed 0",
            "held_out": f"last 20% of valid.txt: {held.shape[0]} chunks (ablations)",
            "eval": f"test.txt, {test.shape[0]} chunks of {test.shape[1]} tokens"}
    return model, calib, held, test, info, tokenizer


class Runner:
    def __init__(self, model: nn.Module, calib: torch.Tensor, held: torch.Tensor, test: torch.Tensor,
                 eval_dtype: torch.dtype, eval_batch: int) -> None:
        self.model, self.calib, self.held, self.test = model, calib, held, test
        self.eval_dtype, self.eval_batch = eval_dtype, eval_batch
        dense = size_report(model)
        self.model_params, self.target_params = dense.model_dense_params, dense.target_dense_params
        self.mlp_params = sum(m.weight.numel() for n, m in model.named_modules()
                              if isinstance(m, nn.Linear) and n.endswith(("gate_proj", "up_proj", "down_proj")))
        self.rows: list[dict[str, Any]] = []
        self.dense = {"test": self.ppl(copy.deepcopy(model), test), "held": self.ppl(copy.deepcopy(model), held)}
        self.tokenizer, self.suite, self.dense_suite = None, {}, None

    def set_domains(self, tokenizer: Any, suite: dict[str, torch.Tensor]) -> None:
        """Score main test rows on `suite` (bench.quality.domains texts) too, with the generation sanity metrics."""
        self.tokenizer, self.suite = tokenizer, suite
        self.dense_suite = domains.suite_report(copy.deepcopy(self.model).to(self.eval_dtype), tokenizer, suite,
                                                batch_size=self.eval_batch)

    def ppl(self, m: nn.Module, chunks: torch.Tensor) -> float:
        m = m.to(self.eval_dtype)
        value = perplexity_of_ids(m, chunks, batch_size=self.eval_batch, progress=False)
        del m
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return value

    def target_fraction(self, model_fraction: float) -> float:
        """Targeted-linear fraction that removes (1 − model_fraction) of the whole model."""
        return 1.0 - (1.0 - model_fraction) * self.model_params / self.target_params

    def record(self, group: str, label: str, m: nn.Module, seconds: float, split: str, **extra: Any) -> dict:
        report = size_report(m)
        row = {"group": group, "label": label, "target_fraction": round(report.target_fraction, 5),
               "model_fraction": round(report.model_fraction, 5), "split": split, **extra}
        row["perplexity"] = self.ppl(m, self.test if split == "test" else self.held)
        row["increase"] = row["perplexity"] / self.dense[split] - 1.0
        if self.suite and group == "main" and split == "test":
            row["domains"] = domains.suite_report(m, self.tokenizer, self.suite, self.dense_suite,
                                                  batch_size=self.eval_batch)
            row["domains"]["ratio"]["test"] = round(row["perplexity"] / self.dense["test"], 5)
        row["seconds"] = round(seconds, 3)
        self.rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "shots"}), flush=True)
        return row

    def surgeon(self, group: str, label: str, model_fraction: float, split: str, **options: Any) -> dict:
        m = copy.deepcopy(self.model)
        opts = SurgeonOptions(**{"batch_size": 8, **options})
        t0 = time.perf_counter()
        stats = surgeon_prune_(m, self.calib, self.target_fraction(model_fraction), opts, progress=False)
        _sync()
        seconds = time.perf_counter() - t0
        heads = [layer.self_attn.q_proj.out_features // layer.self_attn.head_dim for layer in m.model.layers]
        widths = [layer.mlp.down_proj.in_features for layer in m.model.layers]
        return self.record(group, label, m, seconds, split, method="surgeon", requested=model_fraction,
                           options={k: v for k, v in options.items()}, heads=heads, mlp_widths=widths,
                           shots=stats["shots"])

    def _baseline(self, method: str, score, to_size, fractions: tuple[float, ...], size_key: str | None = None) -> None:
        """Score `method` once on a copy, then materialize each whole-model fraction at `to_size(fraction)`.

        A row's seconds are the scoring time plus that size's materialization; `size_key` records
        the converted size in the row when it is in another convention (minify's MLP retention).
        """
        t0 = time.perf_counter()
        plan = score(copy.deepcopy(self.model), self.calib)
        _sync()
        score_s = time.perf_counter() - t0
        for fraction in fractions:
            m = copy.deepcopy(self.model)
            t0 = time.perf_counter()
            size = to_size(fraction)
            plan.materialize_(m, size)
            _sync()
            extra = {size_key: round(size, 4)} if size_key else {}
            self.record("main", f"{method} @{fraction:.0%} model", m, score_s + time.perf_counter() - t0, "test",
                        method=method, requested=fraction, **extra)

    def minify(self, fractions: tuple[float, ...]) -> None:
        """Minify (Taylor + ridge, one scoring pass) at each whole-model fraction (as an MLP retention)."""
        from compress.methods.minify import MinifyConfig, score_minify

        self._baseline("minify", lambda m, c: score_minify(m, c, MinifyConfig(batch_size=8, progress=False)),
                       lambda f: 1.0 - (1.0 - f) * self.model_params / self.mlp_params, fractions,
                       size_key="mlp_retention")

    def svd(self, fractions: tuple[float, ...]) -> None:
        """`svd` (whitened, uniform ranks, one calibration pass) at each whole-model fraction."""
        from compress.methods.svd import SVDConfig, score_svd

        self._baseline("svd", lambda m, c: score_svd(m, c, SVDConfig(batch_size=8, progress=False)),
                       self.target_fraction, fractions)


def _cost(layers: int, seq_len: int, samples: int, tiny: bool) -> dict[str, Any]:
    """One surgeon shot on a LLaMA-7B-shaped stack of `layers` decoder layers (bf16 model, fp32 factors)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = (dict(hidden_size=64, intermediate_size=172, num_attention_heads=4, num_key_value_heads=4, vocab_size=256)
             if tiny else dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                               num_key_value_heads=32, vocab_size=32000))
    config = LlamaConfig(num_hidden_layers=layers, max_position_embeddings=4096, **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():  # W = Q1·diag(decaying)·Q2ᵀ: realistic spectra, never zeros
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and ".layers." in name:
                out_f, in_f = m.weight.shape
                k = min(out_f, in_f)
                q1 = torch.linalg.qr(torch.randn(out_f, k, device=device, generator=gen))[0]
                q2 = torch.linalg.qr(torch.randn(in_f, k, device=device, generator=gen))[0]
                s = torch.logspace(0, -2, k, device=device) * (2.0 / k) ** 0.5 * 4
                m.weight.copy_((q1 * s) @ q2.T)
    ids = torch.randint(0, config.vocab_size, (samples, seq_len), generator=torch.Generator().manual_seed(1))
    params = size_report(model).target_params
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    stats = surgeon_prune_(model, ids, 0.95, SurgeonOptions(shots=1, batch_size=4), progress=False)
    _sync()
    shot = stats["shots"][0]
    result = {"layers": layers, "shape": shape, "calibration": f"{samples} x {seq_len}", "targeted_params": params,
              "model_bytes_bf16": 2 * sum(p.numel() for p in model.parameters()),
              "wall_seconds": round(time.perf_counter() - t0, 3), "shot": shot,
              "factor_gib": round(shot["factor_bytes"] / 2**30, 3)}
    if device == "cuda":
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        result["peak_above_model_gib"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def _table(rows: list[dict[str, Any]], dense: dict[str, float]) -> str:
    head = f"{'group':<10} {'variant':<44} {'split':<5} {'targ':>6} {'model':>6} {'ppl':>8} {'Δppl':>8} {'s':>7}"
    lines = [head, "-" * len(head), f"{'dense':<10} {'':<44} {'test':<5} {1:>6.3f} {1:>6.3f} {dense['test']:>8.2f}",
             f"{'dense':<10} {'':<44} {'held':<5} {1:>6.3f} {1:>6.3f} {dense['held']:>8.2f}"]
    for r in rows:
        lines.append(f"{r['group']:<10} {r['label']:<44} {r['split']:<5} {r['target_fraction']:>6.3f} "
                     f"{r['model_fraction']:>6.3f} {r['perplexity']:>8.2f} {100 * r['increase']:>+7.1f}% "
                     f"{r['seconds']:>7.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="directory for the JSON (default bench/results)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test on a tiny random model")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--shots", type=int, default=8, help="shots of the main rows")
    p.add_argument("--ablations", default="all", help="comma list of ablation groups, 'all' or 'none'")
    p.add_argument("--shot-list", type=lambda v: [int(x) for x in v.split(",")], default=[1, 4, 16],
                   help="shot counts of the 'shots' ablation (default 1,4,16)")
    p.add_argument("--select", action="store_true",
                   help="run the ablations first and use the best on held-out valid for the main table")
    p.add_argument("--no-baselines", dest="baselines", action="store_false", help="skip the minify / svd rows")
    p.add_argument("--cost-layers", type=int, default=4, help="LLaMA-7B-shaped layers for the cost row (0: skip)")
    p.add_argument("--max-seconds", type=float, default=500)
    p.add_argument("--ood", default="docs,legal,code",
                   help="bench.quality.domains texts scored beside test.txt for the main rows (comma list, or 'none')")
    p.add_argument("--ood-chunks", type=int, default=128, help="windows per out-of-domain text, at most")
    p.add_argument("--cost-only", action="store_true", help="only the LLaMA-7B-shaped cost row (no SmolLM2 needed)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.cost_only:
        cost = _cost(args.cost_layers or 4, args.seq_len, 16 if not args.tiny else 4, args.tiny)
        path = write_result(f"surgeon_cost_{'tiny' if args.tiny else gpu_slug()}", {"env": env_info(), "cost": cost},
                            args.out)
        print(json.dumps(cost, indent=2))
        print(f"wrote {path}")
        return 0
    model, calib, held, test, info, tokenizer = _setup(args, device)
    eval_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    run = Runner(model, calib, held, test, eval_dtype, args.eval_batch_size)
    print(f"dense perplexity: test {run.dense['test']:.3f}, held-out valid {run.dense['held']:.3f}", flush=True)
    ood_names = [n for n in args.ood.split(",") if n.strip() and n != "none"]
    if tokenizer is not None and ood_names:
        run.set_domains(tokenizer, domains.eval_chunks(tokenizer, args.seq_len, names=ood_names,
                                                       max_chunks=args.ood_chunks))
    skipped: list[str] = []

    def budget_left() -> bool:
        return time.perf_counter() - start < args.max_seconds

    # ---- ablations at 80% of the whole model, on held-out valid
    base = {"shots": args.shots}
    ablations: list[tuple[str, str, dict[str, Any]]] = [("default", "default", base)]
    ablations += [("shots", f"shots={s}", {**base, "shots": s}) for s in args.shot_list if s != args.shots]
    ablations += [("damping", f"damp_a=damp_g={d:g}", {**base, "damp_a": d, "damp_g": d}) for d in (0.01, 1.0)]
    ablations += [("fisher", "empirical Fisher", {**base, "fisher": "data"}),
                  ("ranking", "raw cost ranking", {**base, "normalize": "none"}),
                  ("update", "row and column updates (paper)", {**base, "update": "both"}),
                  ("update", "no weight update", {**base, "update": "none"}),
                  ("lora", "LoRA 20 steps/shot", {**base, "lora_steps": 20}),
                  ("lora", "LoRA 20 steps/shot, 4 shots", {**base, "shots": 4, "lora_steps": 20}),
                  ("units", "MLP channels only", {**base, "prune_heads": False})]
    wanted = None if args.ablations == "all" else set(args.ablations.split(",")) | {"default"}
    main_options: dict[str, Any] = dict(base)

    def run_ablations() -> None:
        for group, label, options in ablations:
            if args.ablations == "none" or (wanted is not None and group not in wanted):
                continue
            if not budget_left():
                skipped.append(label)
                continue
            try:
                run.surgeon(f"ablate:{group}", label, 0.8, "held", **options)
            except Exception as exc:  # one failing variant is recorded, the run goes on
                run.rows.append({"group": f"ablate:{group}", "label": label, "error": str(exc)})
                print(f"{label}: {exc}", flush=True)

    if args.select:
        # Choose the main table's options on held-out valid, never on test.
        run_ablations()
        tried = [r for r in run.rows if r.get("group", "").startswith("ablate:") and "perplexity" in r]
        best = min(tried, key=lambda r: r["perplexity"])
        main_options = dict(best["options"])
        print(f"selected on held-out valid: {best['label']} {main_options}", flush=True)

    # ---- main table: whole-model sizes, physically removed
    for fraction in MAIN_SIZES:
        run.surgeon("main", f"surgeon @{fraction:.0%} model", fraction, "test", **main_options)
    if args.baselines:
        for name, baseline in (("minify", run.minify), ("svd", run.svd)):
            if budget_left():
                baseline(MAIN_SIZES)
            else:
                skipped.append(name)
    if not args.select:
        run_ablations()

    # ---- cost on a LLaMA-7B-shaped stack
    cost = None
    if args.cost_layers > 0:
        if budget_left():
            cost = _cost(args.cost_layers, args.seq_len, 16 if not args.tiny else 4, args.tiny)
            print(json.dumps(cost), flush=True)
        else:
            skipped.append("cost")

    main_rows = {r["label"]: r for r in run.rows if r.get("group") == "main"}
    at80 = main_rows.get("surgeon @80% model")
    payload = {
        "env": env_info(),
        "protocol": {**info, "prune_dtype": "float32", "eval_dtype": str(eval_dtype), "device": device,
                     "main_options": main_options, "selected_on_held_out": args.select},
        "dense_perplexity": run.dense,
        "params": {"model": run.model_params, "targeted": run.target_params, "mlp": run.mlp_params},
        "target": {"size": "80% of the model", "limit_increase": TARGET_INCREASE_AT_80,
                   "increase": round(at80["increase"], 4) if at80 else None,
                   "met": bool(at80 and at80["increase"] <= TARGET_INCREASE_AT_80)},
        "skipped": skipped,
        "rows": run.rows,
        "cost": cost,
        "domains": None if run.dense_suite is None else {"texts": domains.provenance(run.suite),
                                                         "dense": run.dense_suite},
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    path = write_result(f"surgeon_quality_{'tiny' if args.tiny else gpu_slug()}", payload, args.out)
    print(f"wrote {path}")
    print(_table([r for r in run.rows if "perplexity" in r], run.dense))
    if run.dense_suite is not None:
        rows = [{"label": r["label"], **r["domains"]} for r in run.rows if r.get("domains")]
        print("perplexity ÷ dense on each text (test = WikiText-2 test; docs/domains.md):")
        print(domains.format_ratio_table(rows, ["test", *run.suite], {"test": run.dense["test"],
                                                                       **run.dense_suite["ppl"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
