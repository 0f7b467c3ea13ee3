"""How long ACIP takes to materialize a size from its score map, per model shape and size.

    python -m bench.quality.materialize_time --shapes smollm2,gemma3_270m --device cpu
    python -m bench.quality.materialize_time --shapes smollm2,gemma3_270m,llama7b --device cuda

ACIP's promise is that, once scored, *any* size materializes in under a second. This measures what a
user waits for: `ScoreMap.select` plus `ScoreMap.materialize_` on a dense model holding its weights,
LoRA folded, the reset rule on (the defaults), synchronized on a GPU. Scoring is not timed and not
run: the score map holds random orthonormal factors (shared between layers of one shape, which
materialization only reads), a decaying spectrum, random scores and a random LoRA of the default
rank, so the selection and the per-layer work are those of a real map of that shape. The model is
built from a config with random weights: no checkpoint is needed.

Each size is timed `--repeats` times on the same model, put back to dense between repeats (the
original modules are swapped in again, which is not timed); the first call of a map also ranks its
entries once, timed apart as `first_select_s`. Results: one JSON per device in bench/results
(`materialize_time_<device>.json`) and a table on stdout.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from torch import nn

# Model shapes by name: (transformers config class name, its arguments).
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "smollm2": ("LlamaConfig", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3)),
    "gemma3_270m": ("Gemma3TextConfig", dict(vocab_size=262144, hidden_size=640, intermediate_size=2048,
                                             num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1,
                                             head_dim=256)),
    "llama7b": ("LlamaConfig", dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32)),
    "tiny": ("LlamaConfig", dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)),
}
# Which CausalLM class each config builds.
MODEL_CLASSES = {"LlamaConfig": "LlamaForCausalLM", "Gemma3TextConfig": "Gemma3ForCausalLM"}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.quality.materialize_time", description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="smollm2,gemma3_270m", help=f"comma list from {', '.join(SHAPES)}")
    p.add_argument("--sizes", default="0.9,0.8,0.7,0.6,0.5,0.4", help="comma list of sizes (fractions)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype of the model (the score map's factors stay float32, as ACIP stores them)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=None, help="directory for the JSON (default bench/results)")
    args = p.parse_args(argv)
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown:
        p.error(f"unknown shape {unknown[0]!r}; choose from {', '.join(SHAPES)}")
    try:
        args.size_list = [float(s) for s in args.sizes.split(",")]
    except ValueError:
        p.error(f"--sizes must be a comma list of numbers, got {args.sizes!r}")
    if not all(0.0 < s <= 1.0 for s in args.size_list):
        p.error(f"--sizes must lie in (0, 1], got {args.sizes!r}")
    if args.repeats < 1 or args.lora_rank < 0:
        p.error("--repeats must be at least 1 and --lora-rank at least 0")
    return args


def build_model(shape: str, device: str, dtype: torch.dtype) -> nn.Module:
    """A CausalLM of the named shape with random weights on `device` in `dtype`."""
    import transformers

    config_name, kwargs = SHAPES[shape]
    config = getattr(transformers, config_name)(**kwargs)
    model_class = getattr(transformers, MODEL_CLASSES[config_name])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_class(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype).eval()


def random_score_map(model: nn.Module, lora_rank: int, seed: int = 0):
    """A score map over `model`'s targeted linears: random orthonormal factors, decaying spectra, random scores."""
    from bench.quality.acip_cost import _random_orthonormal, _spectrum
    from compress.methods.acip.scoremap import ScoreMap, ScoreMapLayer
    from lowrank.surgery import target_linears

    targets = target_linears(model)
    device = str(next(model.parameters()).device)
    gen = torch.Generator(device=device).manual_seed(seed)
    bases: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    layers = {}
    for name, linear in targets.items():
        out_f, in_f = linear.out_features, linear.in_features
        k = min(out_f, in_f)
        if (out_f, in_f) not in bases:  # shared by the layers of one shape: materialization only reads them
            bases[(out_f, in_f)] = (_random_orthonormal(out_f, k, gen, device),
                                    _random_orthonormal(in_f, k, gen, device).T.contiguous(),
                                    _spectrum(k, out_f, in_f, device))
        U, Vh, s = bases[(out_f, in_f)]
        scores = s * torch.rand(k, generator=gen, device=device)  # random order, decaying on average
        lora_A = lora_B = None
        if lora_rank:
            lora_A = torch.randn(lora_rank, in_f, generator=gen, device=device) * 0.01
            lora_B = torch.randn(out_f, lora_rank, generator=gen, device=device) * 0.01
        layers[name] = ScoreMapLayer(U, s, Vh, scores, lora_A, lora_B)
    scaling = 1.0 if lora_rank else 0.0
    return ScoreMap("acip", layers, {}, scaling, "all", {}), targets


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_shape(shape: str, args: argparse.Namespace, dtype: torch.dtype) -> dict[str, Any]:
    from lowrank.linear import LowRankLinear
    from lowrank.surgery import replace_module_

    model = build_model(shape, args.device, dtype)
    score_map, originals = random_score_map(model, args.lora_rank)
    _sync(args.device)
    t0 = time.perf_counter()
    score_map.select(args.size_list[0])  # the first call ranks every entry once
    first_select_s = time.perf_counter() - t0
    rows = []
    for size in args.size_list:
        seconds, select_s = [], []
        for _ in range(args.repeats):
            _sync(args.device)
            t0 = time.perf_counter()
            score_map.select(size)
            t1 = time.perf_counter()
            score_map.materialize_(model, size, check=False)
            _sync(args.device)
            seconds.append(time.perf_counter() - t0)
            select_s.append(t1 - t0)
            low_rank = sum(isinstance(model.get_submodule(n), LowRankLinear) for n in originals)
            for name, linear in originals.items():  # back to dense for the next repeat (not timed)
                replace_module_(model, name, linear)
        rows.append({"size": size, "seconds_median": round(statistics.median(seconds), 4),
                     "seconds_max": round(max(seconds), 4),
                     "select_seconds_median": round(statistics.median(select_s), 4),
                     "low_rank_layers": low_rank, "dense_layers": len(originals) - low_rank})
    params = sum(p.numel() for p in model.parameters())
    del model, score_map
    return {"targeted_linears": len(originals), "parameters": params, "first_select_s": round(first_select_s, 4),
            "sizes": rows}


def main(argv: list[str] | None = None) -> int:
    from compress.timing import env_info, gpu_slug, write_result

    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA GPU is visible; pass --device cpu")
    dtype = getattr(torch, args.dtype)
    results: dict[str, Any] = {"bench": "materialize_time", "device": args.device, "dtype": args.dtype,
                               "lora_rank": args.lora_rank, "repeats": args.repeats, "reset": True,
                               "torch_threads": torch.get_num_threads(), "env": env_info(), "shapes": {}}
    print(f"{'shape':<12} {'size':>5} {'median s':>9} {'max s':>7} {'select s':>9} {'low-rank':>9} {'dense':>6}")
    for shape in args.shapes.split(","):
        entry = results["shapes"][shape] = time_shape(shape, args, dtype)
        for row in entry["sizes"]:
            print(f"{shape:<12} {row['size']:>5.2f} {row['seconds_median']:>9.3f} {row['seconds_max']:>7.3f} "
                  f"{row['select_seconds_median']:>9.4f} {row['low_rank_layers']:>9} {row['dense_layers']:>6}",
                  flush=True)
        print(f"{shape:<12} first select (ranking) {entry['first_select_s']:.3f} s", flush=True)
    slug = "cpu" if not args.device.startswith("cuda") else gpu_slug()
    path = write_result(f"materialize_time_{slug}", results, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
