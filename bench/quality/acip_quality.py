"""ACIP quality on SmolLM2-135M: scoring runs (plain and whitened basis), then perplexity at many sizes.

    python -m bench.quality.acip_quality --out $OUT --work-dir /tmp/acipq   # GPU: SMOLLM2_GGUF and WIKITEXT2 set
    python -m bench.quality.acip_quality --out /tmp/q --tiny                 # CPU smoke test, random tiny Llama

Model: `compress.model.load_model` (env SMOLLM2_GGUF), bf16 on CUDA. Data: $WIKITEXT2/valid.txt
for calibration (1024-token windows at stride 512), $WIKITEXT2/test.txt for evaluation
(non-overlapping 1024-token chunks, all of them).

For each basis in `--basis` (default ``plain,whitened``) it runs one ACIP scoring run and
evaluates, at sizes 1.0 … 0.4, the variants in `--variants`:

- acip            (paper's materialization: kept triplets + folded LoRA, no reset)
- acip+reset      (paper's reset rule, appendix D.3)
- acip+rm32       (ranks rounded to multiples of 32)
- svd-magnitude   (the same factors ranked by singular value, no LoRA: in the whitened basis this
                   is SVD-LLM's truncation with a global rank allocation)

plus once, as the baseline, `svd` (the toolkit's whitened SVD, uniform ranks). Each basis
writes ``acip_quality_<basis>.json`` under --out (the svd baseline and dense perplexity included).

Schedule: the paper's (lr 5e-5, λ from 1e-3 ×1.01 every 4 steps, 1000 post-tune steps, batch
4 × 1024) by default; `--time-scale S` runs it S times faster (lr·S, λ·1.01 every max(1, 4/S)
steps, 1000/S post-tune steps). Training steps replay CUDA graphs (`--eager` to turn that off).

Time limit: the script keeps to `--budget-s`. With `--work-dir` every finished piece (svd
baseline, each basis's results) and the running ACIP checkpoint live there: when the budget runs
out during training the run is checkpointed and the script exits with status 3; running the same
command again (same work dir, e.g. on a still-warm machine) resumes where it stopped. Without a
work dir, training is cut short instead and sizes below what the score map then covers are null.

Other domains (docs/domains.md): at `--ood-sizes` (default 0.9, 0.8, 0.6) every variant is also scored on
the out-of-domain texts of `bench.quality.domains` (`--ood`: docs, legal, code) with the generation sanity
metrics; each result row then carries ``domains`` (perplexity and ÷ dense per text, worst OOD ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

SIZES = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)
VARIANTS = ("acip", "acip+reset", "acip+rm32", "svd-magnitude")
PAUSED_EXIT = 3


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.quality.acip_quality", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for acip_quality_<basis>.json")
    p.add_argument("--work-dir", default=None,
                   help="directory for checkpoints and finished pieces; makes the run resumable across calls")
    p.add_argument("--tiny", action="store_true", help="random tiny Llama on random tokens (CPU smoke test)")
    p.add_argument("--budget-s", type=float, default=560.0,
                   help="wall-clock budget of this invocation, imports aside (default 560 s)")
    p.add_argument("--basis", default="plain,whitened", help="comma list of ACIP bases to score (plain, whitened)")
    p.add_argument("--variants", default="acip,acip+reset,svd-magnitude",
                   help=f"comma list of score-map variants to evaluate, from {','.join(VARIANTS)}")
    p.add_argument("--no-svd-baseline", action="store_true", help="skip the whitened-svd baseline")
    p.add_argument("--time-scale", type=float, default=1.0, help="run the paper's schedule this much faster")
    p.add_argument("--stop-ratio", type=float, default=0.4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--whiten-samples", type=int, default=128,
                   help="calibration windows (evenly spaced) for the whitened basis' Grams")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--stride", type=int, default=512, help="stride of the calibration windows")
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--eval-chunks", type=int, default=None, help="cap on evaluation chunks (default: all)")
    p.add_argument("--svd-calib-samples", type=int, default=64, help="calibration windows for the svd baseline")
    p.add_argument("--activation-checkpointing", default="none", choices=["none", "full", "selective"])
    p.add_argument("--eager", action="store_true", help="no CUDA graphs for the training steps")
    p.add_argument("--graph-check", action="store_true",
                   help="first compare a few eager and CUDA-graph steps (dropout off) and report the difference")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ood", default="docs,legal,code",
                   help="bench.quality.domains texts scored beside WikiText-2 test (comma list, or 'none')")
    p.add_argument("--ood-sizes", default="0.9,0.8,0.6", help="sizes at which the other texts are scored")
    p.add_argument("--ood-chunks", type=int, default=128, help="windows per out-of-domain text, at most")
    return p.parse_args()


def _windows(ids: torch.Tensor, seq_len: int, stride: int) -> torch.Tensor:
    starts = range(0, ids.numel() - seq_len + 1, stride)
    return torch.stack([ids[s : s + seq_len] for s in starts])


def _load(args: argparse.Namespace, device: str) -> tuple[Any, torch.Tensor, torch.Tensor, str, Any]:
    if args.tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(args.seed)
        config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
        model = LlamaForCausalLM(config).to(device).eval()
        gen = torch.Generator().manual_seed(args.seed)
        # A learnable toy language: a random first-order Markov chain, so NLL can actually improve.
        trans = torch.softmax(torch.randn(256, 256, generator=gen) * 3, dim=1)
        tokens = [0]
        for _ in range(20_000):
            tokens.append(int(torch.multinomial(trans[tokens[-1]], 1, generator=gen)))
        ids = torch.tensor(tokens)
        calib = _windows(ids[:15_000], args.seq_len, args.stride)
        evals = _windows(ids[15_000:], args.seq_len, args.seq_len)
        return model, calib, evals, "tiny-random-llama", None
    from compress.data import tokenize_text
    from compress.model import load_model

    root = os.environ.get("WIKITEXT2")
    if not root:
        raise SystemExit("set WIKITEXT2 to the directory holding valid.txt and test.txt (or pass --tiny)")
    model, tokenizer = load_model(None, dtype="auto", device=device)
    valid = tokenize_text(tokenizer, Path(root, "valid.txt").read_text(encoding="utf-8"))
    test = tokenize_text(tokenizer, Path(root, "test.txt").read_text(encoding="utf-8"))
    calib = _windows(valid, args.seq_len, args.stride)
    evals = _windows(test, args.seq_len, args.seq_len)
    return model, calib, evals, os.environ.get("SMOLLM2_GGUF", "smollm2-135m (default)"), tokenizer


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _acip_config(args: argparse.Namespace, basis: str, device: str, **overrides: Any):
    from compress.methods.acip import ACIPConfig

    scale = max(args.time_scale, 1e-6)
    base = dict(
        stop_ratio=args.stop_ratio,
        lr=5e-5 * scale,
        reg_update_every=max(1, round(4 / scale)),
        # Where S > 4 the per-step growth is raised too, so λ keeps pace with the faster masks.
        reg_update_factor=1.01 ** max(1.0, scale / 4),
        post_tune_steps=max(1, round(1000 / scale)),
        batch_size=args.batch_size,
        lora_rank=args.lora_rank,
        basis=basis,
        whiten_samples=args.whiten_samples,
        activation_checkpointing=args.activation_checkpointing,
        cuda_graphs=device == "cuda" and not args.eager,
        seed=args.seed,
        progress=False,  # one line per 100 steps instead (below): the log stays readable
    )
    base.update(overrides)
    return ACIPConfig(**base)


def _graph_check(model, calib: torch.Tensor, args: argparse.Namespace, device: str) -> dict[str, Any]:
    """A few steps eagerly and with CUDA graphs (dropout off, so only rounding may differ)."""
    from compress.methods.acip import run_acip

    if device != "cuda":
        return {"skipped": "no CUDA"}
    out: dict[str, Any] = {}
    for mode in ("eager", "cuda_graph"):
        losses: list[float] = []
        config = _acip_config(args, "plain", device, lr=1e-3, reg_start=1e-2, reg_update_every=1,
                              reg_update_factor=1.2, lora_dropout=0.0, post_tune_steps=4, max_steps=16,
                              cuda_graphs=mode == "cuda_graph")
        t0 = time.perf_counter()
        sm = run_acip(model, calib[:64], config, callback=lambda info: losses.append(info["loss"]))  # noqa: B023
        _sync(device)
        out[mode] = {"losses": [round(v, 5) for v in losses], "seconds": round(time.perf_counter() - t0, 2),
                     "step_mode": sm.metadata["step_mode"], "note": sm.metadata.get("step_mode_note"),
                     "scores": torch.cat([lf.scores for lf in sm.layers.values()])}
    a, b = out["eager"].pop("scores"), out["cuda_graph"].pop("scores")
    la, lb = out["eager"]["losses"], out["cuda_graph"]["losses"]
    out["max_abs_loss_diff"] = max(abs(x - y) for x, y in zip(la, lb, strict=False)) if la and lb else None
    out["same_pruned_fraction"] = round(float(((a > 0) == (b > 0)).float().mean()), 5)
    print(f"graph check: eager {out['eager']['seconds']} s vs graph {out['cuda_graph']['seconds']} s "
          f"({out['cuda_graph']['step_mode']}); max |Δloss| {out['max_abs_loss_diff']}; same masks "
          f"{out['same_pruned_fraction']:.4f}", flush=True)
    return out


def main() -> int:
    args = _parse()
    if args.tiny:  # the tiny model's context is 512 tokens
        args.seq_len, args.stride = min(args.seq_len, 64), min(args.stride, 32)
    t_script = time.perf_counter()
    from compress.eval import perplexity_of_ids
    from compress.methods.acip import ACIPPaused, run_acip
    from compress.methods.svd import SVDConfig, score_svd
    from compress.plan import temporarily_materialized
    from compress.timing import env_info
    from lowrank import size_report

    bases = [b.strip() for b in args.basis.split(",") if b.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS] + [b for b in bases if b not in ("plain", "whitened")]
    if unknown:
        raise SystemExit(f"unknown basis/variant: {unknown}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir) if args.work_dir else None
    if work is not None:
        _check_work_dir(work, args)
    model, calib, evals, model_name, tokenizer = _load(args, device)
    if args.eval_chunks is not None:
        evals = evals[: args.eval_chunks]
    load_seconds = time.perf_counter() - t_script

    def ppl() -> float:
        return perplexity_of_ids(model, evals, batch_size=args.eval_batch_size, progress=False)

    _sync(device)
    t0 = time.perf_counter()
    dense_ppl = ppl()
    _sync(device)
    eval_seconds = time.perf_counter() - t0
    print(f"loaded {model_name} in {load_seconds:.1f} s; dense perplexity {dense_ppl:.3f} "
          f"({evals.shape[0]} chunks, {eval_seconds:.2f} s)", flush=True)
    graph_check = _graph_check(model, calib, args, device) if args.graph_check else None
    # Out-of-domain texts (bench.quality.domains): scored at --ood-sizes, with the generation sanity metrics.
    from bench.quality import domains

    ood_names = [n for n in args.ood.split(",") if n.strip() and n != "none"] if tokenizer is not None else []
    ood_sizes = {round(float(v), 4) for v in args.ood_sizes.split(",") if v.strip()}
    suite = domains.eval_chunks(tokenizer, args.seq_len, names=ood_names,
                                max_chunks=args.ood_chunks) if ood_names else {}
    t0 = time.perf_counter()
    dense_suite = domains.suite_report(model, tokenizer, suite, batch_size=args.eval_batch_size) if suite else None
    ood_seconds = time.perf_counter() - t0

    def evaluate(plan, kwargs: dict[str, Any], covered_from: float = 0.0) -> list[dict[str, Any]]:
        rows = []
        for size in SIZES:
            if size < covered_from - 0.005:
                rows.append({"size": size, "actual_size": None, "perplexity": None,
                             "note": f"not covered (score map reaches {covered_from:.3f})"})
                continue
            _sync(device)
            t0 = time.perf_counter()
            with temporarily_materialized(model, plan, size, **kwargs):
                _sync(device)
                materialize_s = time.perf_counter() - t0
                actual = size_report(model).target_fraction
                value = ppl()
                row = {"size": size, "actual_size": round(actual, 5), "perplexity": round(value, 4),
                       "materialize_seconds": round(materialize_s, 4)}
                if suite and round(size, 4) in ood_sizes:
                    row["domains"] = domains.suite_report(model, tokenizer, suite, dense_suite,
                                                          batch_size=args.eval_batch_size)
                    row["domains"]["ratio"]["test"] = round(value / dense_ppl, 5)  # WikiText-2 test
            rows.append(row)
        return rows

    # The svd baseline first: its cost is then known, not a risk to the deadline.
    svd_piece = None if args.no_svd_baseline else _cached(work, "svd.json")
    if not args.no_svd_baseline and svd_piece is None:
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)
        pick = torch.randperm(calib.shape[0])[: args.svd_calib_samples].sort().values
        svd_plan = score_svd(model, calib[pick], SVDConfig(batch_size=args.batch_size, progress=False))
        svd_seconds = time.perf_counter() - t0
        svd_piece = {"scoring_seconds": round(svd_seconds, 2), "calib_windows": int(pick.numel()),
                     "results": evaluate(svd_plan, {})}
        del svd_plan
        _store(work, "svd.json", svd_piece)
        print(f"svd baseline scored in {svd_seconds:.1f} s and evaluated", flush=True)

    plans_per_size = len(variants) * len(SIZES)
    pieces: dict[str, dict[str, Any]] = {}
    for basis in bases:
        piece = _cached(work, f"acip_{basis}.json")
        if piece is None:
            reserve = plans_per_size * (eval_seconds * 1.15 + 0.5) + 25.0
            reserve += len(variants) * len([v for v in SIZES if round(v, 4) in ood_sizes]) * ood_seconds * 1.1
            train_deadline = t_script + args.budget_s - reserve
            ckpt = str(work / f"ckpt_{basis}") if work is not None else None
            config = _acip_config(args, basis, device, checkpoint_dir=ckpt, resume=work is not None)
            cut = {"phase": None}

            def at_deadline(info: dict[str, Any], deadline: float = train_deadline, cut: dict = cut,
                            basis: str = basis) -> Any:
                if info["step"] % 100 == 0 or info["phase"] == "done":
                    print(f"  [{basis}] step {info['step']:5d} {info['phase']:9s} size {info['size']:.3f} "
                          f"λ {info['lambda']:.2e} loss {info['loss']:.3f} ({info['seconds']:.0f} s)", flush=True)
                if time.perf_counter() > deadline:
                    cut["phase"] = info["phase"]
                    return "pause" if work is not None else True
                return None

            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            _sync(device)
            t0 = time.perf_counter()
            try:
                score_map = run_acip(model, calib, config, callback=at_deadline)
            except ACIPPaused as exc:
                status = {"status": "paused", "basis": basis, "message": str(exc),
                          "wall_seconds": round(time.perf_counter() - t_script, 1), "env": env_info()}
                (out / "acip_quality_status.json").write_text(json.dumps(status, indent=2) + "\n")
                print(f"PAUSED ({exc}); rerun the same command with --work-dir {work} to resume", flush=True)
                return PAUSED_EXIT
            _sync(device)
            scoring_seconds = time.perf_counter() - t0
            peak_gib = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
            meta = score_map.metadata
            print(f"ACIP[{basis}]: {meta['steps']} steps ({meta['acip_steps']} pruning, {meta['post_tune_steps']} "
                  f"post-tune) in {meta['train_seconds']:.1f} s = {meta['steps_per_second']:.2f} steps/s "
                  f"({meta['step_mode']}); reached size {meta['final_ratio']:.3f}; cut short in: {cut['phase']}",
                  flush=True)
            score_map.to(device)  # materialize on the GPU; the svd-magnitude map shares these tensors
            covered_from = score_map.min_size()
            plans = {"acip": (score_map, {}), "acip+reset": (score_map, {"reset": True}),
                     "acip+rm32": (score_map, {"rank_multiple": 32}),
                     "svd-magnitude": (score_map.singular_value_map(), {})}
            results = {}
            for name in variants:
                plan, kwargs = plans[name]
                results[name] = evaluate(plan, kwargs, covered_from if name.startswith("acip") else 0.0)
                print(f"evaluated {basis}/{name}", flush=True)
            piece = {
                "time_scale": args.time_scale,
                "config": meta["config"],
                "steps": meta["steps"], "acip_steps": meta["acip_steps"],
                "post_tune_steps": meta["post_tune_steps"],
                "stop_reached": meta["stop_reached"], "final_ratio": meta["final_ratio"],
                "covered_from": round(covered_from, 5), "cut_short_in": cut["phase"],
                "step_mode": meta["step_mode"], "step_mode_note": meta.get("step_mode_note"),
                "whitening": meta.get("whitening"),
                "train_seconds": meta["train_seconds"], "steps_per_second": meta["steps_per_second"],
                "scoring_seconds_this_call_incl_setup": round(scoring_seconds, 2),
                "peak_memory_gib_this_call": peak_gib,
                "history": meta["history"],
                "results": results,
            }
            del score_map, plans
            _store(work, f"acip_{basis}.json", piece)
        pieces[basis] = piece
        payload = {
            "bench": "acip_quality",
            "basis": basis,
            "model": model_name,
            "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
            "dtype": str(next(model.parameters()).dtype),
            "calibration": {"windows": int(calib.shape[0]), "seq_len": args.seq_len, "stride": args.stride},
            "eval": {"chunks": int(evals.shape[0]), "seq_len": int(evals.shape[1]), "dense_perplexity": dense_ppl,
                     "seconds_per_eval": round(eval_seconds, 3)},
            "schedule_note": "paper schedule run time_scale× faster (lr, λ growth, post-tune steps); "
                             "time_scale 1 is the paper's",
            "acip": {k: v for k, v in piece.items() if k != "results"},
            "results": dict(piece["results"]),
            "graph_check": graph_check,
            "domains": {"texts": domains.provenance(suite),
                        "dense": dense_suite, "ood_sizes": sorted(ood_sizes)} if suite else None,
            "wall_seconds_this_call": round(time.perf_counter() - t_script, 1),
            "env": env_info(),
        }
        if svd_piece is not None:
            payload["results"]["svd"] = svd_piece["results"]
            payload["svd_baseline"] = {k: v for k, v in svd_piece.items() if k != "results"}
        path = out / f"acip_quality_{basis}.json"
        path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        print(f"wrote {path}", flush=True)

    _print_table(dense_ppl, pieces, svd_piece)
    if dense_suite is not None:
        _print_domains(pieces, svd_piece, dense_suite)
    print(f"wall time {time.perf_counter() - t_script:.1f} s")
    return 0


def _print_domains(pieces: dict[str, dict[str, Any]], svd_piece: dict[str, Any] | None,
                   dense_suite: dict[str, Any]) -> None:
    from bench.quality import domains

    rows = []
    columns = {f"{'' if basis == 'plain' else 'w:'}{name}": results for basis, piece in pieces.items()
               for name, results in piece["results"].items()}
    if svd_piece is not None:
        columns["svd"] = svd_piece["results"]
    for name, results in columns.items():
        rows += [{"label": f"{name} {r['size']:g}", **r["domains"]} for r in results if r.get("domains")]
    texts = ["test", *dense_suite["ppl"]]
    dense = {"test": 1.0, **dense_suite["ppl"]}  # the test column is already a ratio
    print("perplexity ÷ dense on each text (test = WikiText-2 test; docs/domains.md):")
    print(domains.format_ratio_table(rows, texts, dense))


def _check_work_dir(work: Path, args: argparse.Namespace) -> None:
    """A work dir serves one set of settings: refuse to mix pieces computed under others."""
    volatile = {"out", "work_dir", "budget_s", "graph_check", "basis", "variants", "no_svd_baseline"}
    settings = {k: v for k, v in sorted(vars(args).items()) if k not in volatile}
    work.mkdir(parents=True, exist_ok=True)
    path = work / "settings.json"
    if path.is_file():
        stored = json.loads(path.read_text())
        changed = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
        if changed:
            raise SystemExit(f"{work} holds a run with other settings ({', '.join(changed)}); "
                             "use another --work-dir or the same settings")
    else:
        path.write_text(json.dumps(settings, indent=2) + "\n")


def _cached(work: Path | None, name: str) -> dict[str, Any] | None:
    if work is None or not (work / name).is_file():
        return None
    print(f"reusing {work / name}", flush=True)
    return json.loads((work / name).read_text())


def _store(work: Path | None, name: str, piece: dict[str, Any]) -> None:
    if work is not None:
        tmp = work / (name + ".tmp")
        tmp.write_text(json.dumps(piece, default=str))
        os.replace(tmp, work / name)


def _print_table(dense_ppl: float, pieces: dict[str, dict[str, Any]], svd_piece: dict[str, Any] | None) -> None:
    columns: dict[str, list[dict[str, Any]]] = {}
    for basis, piece in pieces.items():
        tag = "" if basis == "plain" else "w:"
        for name, rows in piece["results"].items():
            columns[tag + name] = rows
        print(f"{basis}: {piece['steps']} steps, {piece['steps_per_second']} steps/s ({piece['step_mode']}), "
              f"covers sizes ≥ {piece['covered_from']}")
    if svd_piece is not None:
        columns["svd"] = svd_piece["results"]
    print(f"perplexity (dense {dense_ppl:.3f}); w: = whitened basis; actual size in parentheses where it differs "
          "by > 0.005")
    header = f"{'size':>5} | " + " | ".join(f"{n:>15}" for n in columns)
    print(header)
    print("-" * len(header))
    for i, size in enumerate(SIZES):
        cells = []
        for rows in columns.values():
            row = rows[i]
            if row["perplexity"] is None:
                cells.append(f"{'n/a':>15}")
                continue
            cell = f"{row['perplexity']:.2f}"
            if abs(row["actual_size"] - size) > 0.005:
                cell += f"({row['actual_size']:.2f})"
            cells.append(f"{cell:>15}")
        print(f"{size:>5.2f} | " + " | ".join(cells))


if __name__ == "__main__":
    raise SystemExit(main())
