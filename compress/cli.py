"""``python -m compress``: a thin command line over `compress.api`.

    python -m compress [--model M] [--method svd] [--size 0.8] [--out DIR] ...   compress, evaluate, save
    python -m compress materialize --scores PLAN --size 0.55 --out DIR          any size from a saved plan
    python -m compress eval --model DIR [--data FILE] [--tasks T,..]             perplexity, lm-eval tasks, samples
    python -m compress curve --scores PLAN --sizes 0.4:1.0:0.05                  perplexity at many sizes (CSV + PNG)
    python -m compress bench --model DIR [--profile] [--out DIR]                 serving speed of a checkpoint
    python -m compress tune --model DIR [--tokens 1,8,..] [--budget-s 120]       tune its layer shapes on this GPU

User errors print one line and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from compress.errors import UserError

SUBCOMMANDS = ("materialize", "eval", "curve", "bench", "tune")


def _launched_rank() -> int:
    """This process's rank when started by torchrun / accelerate launch with several processes, else 0."""
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def _device(arg: str) -> str:
    import torch

    if arg == "auto":
        arg = "cuda" if torch.cuda.is_available() else "cpu"
    if arg.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {arg} requested but CUDA is not available")
    if arg == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"  # one GPU per launched process
    return arg


def _writable_dir(path: str) -> Path:
    out = Path(path).expanduser().absolute()
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UserError(f"output directory {out} is not writable")
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is not a directory")
    return out


# Where a library error during loading names a damaged input rather than a bug of ours: the
# packages that parse model, tokenizer and plan files.
_FILE_FORMAT_MODULES = ("safetensors", "gguf", "transformers", "tokenizers", "numpy", "json", "struct")


def _raised_in_file_parser(exc: BaseException) -> bool:
    """Whether `exc` was raised by a file-format library (the deepest frame of its traceback)."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return False
    origin = frames[-1].filename.replace(os.sep, "/")
    return any(f"/{name}/" in origin or origin.endswith(f"/{name}.py") for name in _FILE_FORMAT_MODULES)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _damaged_file(path: Path) -> str | None:
    """"FILE: what is wrong" for the first unreadable file at `path` (the file itself, or a directory's
    JSON, safetensors and GGUF files), or None where each of them reads."""
    from lowrank.checkpoint import CheckpointError, verify_safetensors

    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    for f in files:
        kind = {".json": "JSON", ".safetensors": "safetensors", ".gguf": "GGUF"}.get(f.suffix)
        if kind is None:
            continue
        try:
            if f.stat().st_size == 0:
                return f"{f}: empty file"
            if kind == "JSON":
                json.loads(f.read_bytes())
            elif kind == "safetensors":
                verify_safetensors(f)
            else:
                from gguf import GGUFReader

                GGUFReader(f)
        except CheckpointError as exc:
            return str(exc)
        except Exception as exc:  # whatever the parser says about a damaged file
            return f"{f}: truncated or corrupt {kind} file ({type(exc).__name__}: {_first_line(exc)})"
    return None


def _model_path(model: str | None) -> str:
    """What --model names, for messages: the argument, or the bundled default's file."""
    if model is not None:
        return model
    from compress.model import default_model_path

    return str(default_model_path())


@contextlib.contextmanager
def file_errors(action: str, path: Any, *, reading: bool = True, atomic: bool = False) -> Iterator[None]:
    """The CLI's one error boundary for files: what goes wrong while `action`-ing `path` becomes one line.

    Reading (models, plans): a failure is first traced to the damaged file under `path` (a truncated
    safetensors, a short GGUF, broken JSON), named with its cause; an OSError (a missing shard, no
    permission) or an error raised inside a file-format library (a tokenizer file it cannot parse)
    names `path`. Writing (`reading=False`): an OSError (no space left, read-only file system) or a
    `CheckpointError` names `path` (and, for an `atomic` writer such as `save_pretrained`, says that
    `path` is as it was). Any other exception is a bug of ours and keeps its traceback.
    """
    from lowrank.checkpoint import CheckpointError

    try:
        yield
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as exc:
        where = Path(str(path)).expanduser()
        damaged = _damaged_file(where) if reading and where.exists() else None
        if damaged is not None:  # "FILE: cause"; the file is `path` itself or one inside it
            raise UserError(f"{action} {damaged}" if where.is_file() else f"{action} {path}: {damaged}") from None
        kept = f" ({path} is as it was)" if atomic else ""
        if isinstance(exc, OSError):
            raise UserError(f"{action} {path}: {exc.strerror or _first_line(exc)}{kept}") from None
        if isinstance(exc, CheckpointError):
            raise UserError(f"{action} {path}: {_first_line(exc)}{kept}") from None
        if reading and _raised_in_file_parser(exc):
            raise UserError(f"{action} {path}: unreadable file ({type(exc).__name__}: {_first_line(exc)})") from None
        raise


def _estimated_checkpoint_bytes(model, size: float) -> int:
    """An upper estimate of the checkpoint `model` compressed to `size` takes on disk."""
    from lowrank.surgery import target_linears

    targeted = sum(m.weight.numel() * m.weight.element_size() for m in target_linears(model).values()
                   if getattr(m, "weight", None) is not None)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return int((total - targeted) + targeted * min(1.0, size) * 1.05) + 16 * 2**20  # + tokenizer, config


def _check_room(directory: Path, needed: int, what: str) -> None:
    """Refuse, before the long work, an output whose file system has less free space than `needed`."""
    probe = directory
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise UserError(f"{what} {directory}: {free / 2**20:.0f} MiB free on its file system, "
                        f"about {needed / 2**20:.0f} MiB needed")


def _common_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="HF directory, hub id, or .gguf file (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--dtype", default="auto",
                   help="float32, bfloat16 or float16 (default auto: bf16 on GPU, fp32 on CPU)")


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-data", action="append", default=None, metavar="SPEC",
                   help="perplexity text: file, hf:..., offline:NAME; repeat it to report several texts "
                        "(default: each --data source: a file itself, the held-out part of an offline corpus)")
    p.add_argument("--eval-seq-len", type=int, default=None, help="perplexity chunk length (default: --seq-len)")
    p.add_argument("--eval-chunks", type=int, default=None,
                   help="score only the first N chunks (default: all on GPU, 16 on CPU)")
    p.add_argument("--eval-batch-size", type=int, default=8, help="chunks per forward pass in evaluation")


def build_parser() -> argparse.ArgumentParser:
    from compress.methods import available_methods

    methods = available_methods()
    method_help = "; ".join(f"{n}: {s.description}" for n, s in methods.items())
    p = argparse.ArgumentParser(
        prog="python -m compress",
        description="Compress a causal LM to a target size, report perplexity and parameters, and save a "
                    "checkpoint that `AutoModelForCausalLM.from_pretrained` loads after `import lowrank`. "
                    f"Subcommands: {', '.join(SUBCOMMANDS)} (see `python -m compress SUB --help`).",
    )
    _common_model_args(p)
    p.add_argument("--method", default="svd", help=f"compression method (default svd). {method_help}")
    p.add_argument("--size", type=float, default=0.8,
                   help="fraction of the targeted linear layers' parameters to keep, in (0, 1] (default 0.8)")
    p.add_argument("--out", default=None, help="write the compressed checkpoint here (atomically)")
    p.add_argument("--save-plan", default=None,
                   help="also save the method's plan (scores + factors) here, for `materialize` at any size it "
                        "covers (surgeon: the --size it was scored at)")
    p.add_argument("--data", action="append", default=None, metavar="SPEC[@WEIGHT]",
                   help="calibration text: .txt or .jsonl file, hf:NAME[:CONFIG][:SPLIT] or offline:NAME "
                        "(docs, code, legal); repeat it for a mixture, @WEIGHT = share of the calibration tokens, "
                        "e.g. --data valid.txt@0.7 --data offline:docs@0.3 (default: offline:docs@0.5 + "
                        "offline:code@0.5; docs/domains.md)")
    p.add_argument("--seq-len", type=int, default=1024, help="calibration sequence length (default 1024)")
    p.add_argument("--calib-samples", type=int, default=64, help="calibration sequences (default 64)")
    p.add_argument("--batch-size", type=int, default=4, help="calibration batch size (default 4)")
    p.add_argument("--rank-multiple", type=int, default=1,
                   help="round every rank to a multiple of this (1 = exact; see docs/ranks.md)")
    p.add_argument("--seed", type=int, default=0, help="random seed for calibration sampling (default 0)")
    p.add_argument("--no-eval", action="store_true", help="skip perplexity evaluation")
    _bos_arg(p, "calibration and evaluation window")
    _scoremap_args(p)
    p.add_argument("--method-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="set a method config field, e.g. --method-opt stop_ratio=0.3 "
                        "(repeatable; see docs/acip.md)")
    p.add_argument("--checkpoint-dir", default=None,
                   help="ACIP: training checkpoints go here (default: <--save-plan>/checkpoint)")
    p.add_argument("--resume", action="store_true",
                   help="ACIP: continue from the checkpoint in --checkpoint-dir")
    _offload_arg(p)
    _eval_args(p)
    return p


def _bos_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--bos", choices=("auto", "always", "never"), default="auto",
                   help=f"token in front of every {what}: auto = the one the tokenizer adds by default (BOS for "
                        "Gemma, Llama 3, Mistral; none for SmolLM2), always = BOS (else EOS), never = none. "
                        "With a prefix, perplexity scores all seq_len tokens of a window (default auto)")


def _window_prefix(tokenizer, args: argparse.Namespace, log=print) -> int | None:
    """The window prefix `--bos` picks for this tokenizer, announced in one line."""
    from compress.data import chunk_prefix, prefix_description

    log(prefix_description(tokenizer, args.bos))
    return chunk_prefix(tokenizer, args.bos)


def _offload_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--offload", action="store_true",
                   help="keep the weights in CPU memory and stream the model through --device one decoder block "
                        "at a time (svd, svd-llm, asvd, minify, surgeon): accelerator memory is one block plus "
                        "activations, whatever the model's size (docs/scaling.md)")


def _load_for(args: argparse.Namespace, device: str):
    """(model, tokenizer) on `device`, or in CPU memory, in `device`'s dtype, for --offload."""
    from compress.model import load_model, resolve_dtype

    with file_errors("cannot load model", _model_path(args.model)):
        if getattr(args, "offload", False):
            return load_model(args.model, dtype=resolve_dtype(args.dtype, device), device="cpu")
        return load_model(args.model, dtype=args.dtype, device=device)


def _streamed(model, args: argparse.Namespace, device: str):
    """`compress.streaming.offloaded(model, device)` for --offload, else a no-op context."""
    import contextlib

    if not getattr(args, "offload", False):
        return contextlib.nullcontext()
    from compress.streaming import offloaded

    return offloaded(model, device)


def _scoremap_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reset", action=argparse.BooleanOptionalAction, default=None,
                   help="score maps (acip, svd-magnitude): layers where factorizing saves nothing get their "
                        "original weights back, without LoRA (the ACIP paper's reset rule; on by default, "
                        "--no-reset keeps W + LoRA there)")


def parse_method_opts(pairs: list[str]) -> dict[str, Any]:
    """Parse KEY=VALUE pairs; values are read as bool, int, float or null where they look like one."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--method-opt expects KEY=VALUE, got {pair!r}")
        text = raw.strip()
        lowered = text.lower()
        value: Any
        if lowered in ("true", "false"):
            value = lowered == "true"
        elif lowered in ("none", "null"):
            value = None
        else:
            try:
                value = int(text)
            except ValueError:
                try:
                    value = float(text)
                except ValueError:
                    value = text
        out[key.strip().replace("-", "_")] = value
    return out


# Method config fields that a CLI flag sets: `--method-opt` refuses them, so each has one meaning.
FLAG_FOR_OPTION = {"batch_size": "--batch-size", "checkpoint_dir": "--checkpoint-dir", "resume": "--resume",
                   "offload": "--offload", "sizes": "--size", "rank_multiple": "--rank-multiple"}


def _checked_method_opts(spec, args: argparse.Namespace) -> dict[str, Any]:
    """--method-opt pairs, validated against `spec`'s config before any work starts."""
    opts = parse_method_opts(args.method_opt)
    for key in opts:
        if key in FLAG_FOR_OPTION:
            raise UserError(f"--method-opt {key}=...: set it with {FLAG_FOR_OPTION[key]} instead")
    try:
        spec.make_config(**opts)
    except UserError as exc:
        raise UserError(f"--method-opt: {exc}") from None
    except (TypeError, ValueError) as exc:  # the config's own validation of a value
        raise UserError(f"--method-opt for {spec.name!r}: {exc}") from None
    return opts


def _materialize_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m compress materialize",
                                description="Materialize a model of any size from a saved plan / score map, "
                                            "without calibration data.")
    _common_model_args(p)
    p.add_argument("--scores", required=True, help="score map / plan directory written by --save-plan")
    p.add_argument("--size", type=float, required=True, help="fraction of targeted linear parameters to keep")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--rank-multiple", type=int, default=1, help="round ranks to a multiple of this")
    _scoremap_args(p)
    _offload_arg(p)
    return p


def _curve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m compress curve",
                                description="Perplexity at many sizes from one score map / plan; "
                                            "writes CSV and PNG.")
    _common_model_args(p)
    p.add_argument("--scores", required=True, help="score map / plan directory written by --save-plan")
    p.add_argument("--sizes", default="0.4:1.0:0.05",
                   help="START:STOP:STEP (inclusive) or a comma list, e.g. 0.4,0.6,0.8 "
                        "(default 0.4:1.0:0.05)")
    p.add_argument("--data", action="append", default=None, metavar="SPEC",
                   help="evaluation text (file, hf:..., offline:NAME); repeat it for one perplexity column per "
                        "text (default: the held-out parts of offline:docs and offline:code)")
    p.add_argument("--seq-len", type=int, default=1024, help="perplexity chunk length (default 1024)")
    p.add_argument("--out", default=None, help="directory for curve.csv and curve.png (default: --scores)")
    p.add_argument("--rank-multiple", type=int, default=1, help="round ranks to a multiple of this")
    _scoremap_args(p)
    p.add_argument("--eval-chunks", type=int, default=None,
                   help="score only the first N chunks (default: all on GPU, 16 on CPU)")
    p.add_argument("--eval-batch-size", type=int, default=8, help="chunks per forward pass in evaluation")
    _bos_arg(p, "evaluation window")
    return p


def _eval_parser() -> argparse.ArgumentParser:
    from compress.eval import DEFAULT_TASKS

    p = argparse.ArgumentParser(
        prog="python -m compress eval",
        description="Evaluate a (compressed) model: perplexity on a text file, zero-shot tasks through "
                    "lm-evaluation-harness (optional: skipped with one line where it or its datasets are missing), "
                    "and greedy generation samples. Progress goes to stderr; the JSON report to stdout and, with "
                    "--out, to DIR/eval_report.json. See docs/eval.md.")
    _common_model_args(p)
    p.add_argument("--seq-len", type=int, default=1024, help="perplexity chunk length (default 1024)")
    p.add_argument("--data", action="append", default=None, metavar="SPEC",
                   help="perplexity text: .txt or .jsonl file, hf:NAME[:CONFIG][:SPLIT] or offline:NAME; repeat it "
                        "to report each text (default: the held-out parts of offline:docs and offline:code)")
    _eval_args(p)
    _bos_arg(p, "perplexity window")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                   help="comma-separated lm-eval task names, or 'none' (default: %(default)s)")
    p.add_argument("--limit", default=None,
                   help="lm-eval examples per task: a whole number, or a fraction in (0, 1) (default: all)")
    p.add_argument("--task-batch-size", type=int, default=8, help="lm-eval batch size (default 8)")
    p.add_argument("--samples", type=int, default=None,
                   help="generation samples for N prompts (default: 3 built-in prompts, or every line of "
                        "--prompts; 0 = none)")
    p.add_argument("--prompts", default=None, help="text file with one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=48, help="greedy tokens per sample (default 48)")
    p.add_argument("--out", default=None, help="also write the JSON report to DIR/eval_report.json (atomically)")
    return p


def _eval_tasks(spec: str) -> list[str]:
    names = [t.strip() for t in spec.split(",") if t.strip()]
    if not names or [n.lower() for n in names] == ["none"]:
        return []
    return list(dict.fromkeys(names))


def _eval_prompts(args: argparse.Namespace) -> list[str]:
    from compress.eval import DEFAULT_PROMPTS, read_prompts

    if args.samples is not None and args.samples < 0:
        raise UserError(f"--samples must be 0 or more, got {args.samples}")
    if args.prompts is not None:
        prompts = read_prompts(args.prompts)
        return prompts if args.samples is None else prompts[: args.samples]
    count = 3 if args.samples is None else args.samples
    if count > len(DEFAULT_PROMPTS):
        raise UserError(f"--samples {count}: there are {len(DEFAULT_PROMPTS)} built-in prompts; "
                        "pass more with --prompts FILE")
    return list(DEFAULT_PROMPTS[:count])


def _eval_specs(args: argparse.Namespace, data: Any) -> list[str]:
    """The evaluation data specs: --eval-data's, else each source of `data` (weights dropped)."""
    from compress.mixture import eval_sources

    return [str(s) for s in args.eval_data] if getattr(args, "eval_data", None) else eval_sources(data)


def _eval_texts(args: argparse.Namespace, data: Any) -> tuple[list[tuple[str, str]], int]:
    """[(label, text)] to score, and the chunk length: --eval-data's texts, else each source of `data`."""
    from compress.data import load_text
    from compress.mixture import source_label

    texts, labels = [], set()
    for spec in _eval_specs(args, data):
        label = source_label(spec)
        label = label if label not in labels else str(spec)
        labels.add(label)
        texts.append((label, load_text(spec, "eval")))
    return texts, getattr(args, "eval_seq_len", None) or args.seq_len


def _eval_text_and_len(args: argparse.Namespace, data_spec: Any) -> tuple[str, int]:
    """The first text `_eval_texts` gives, and the chunk length."""
    texts, seq_len = _eval_texts(args, data_spec)
    return texts[0][1], seq_len


def _perplexity(model, tokenizer, text: str, seq_len: int, args: argparse.Namespace, device: str) -> float:
    from compress.eval import perplexity

    chunks = args.eval_chunks if args.eval_chunks is not None else (None if device.startswith("cuda") else 16)
    return perplexity(model, tokenizer, text, seq_len, args.eval_batch_size, max_chunks=chunks, bos=args.bos)


def run_compress(args: argparse.Namespace) -> int:
    from compress.api import check_offload
    from compress.methods import get_method
    from lowrank import save_pretrained

    size = _checked_size(args.size)
    spec = get_method(args.method)
    check_offload(spec, args.offload)
    _materialize_kwargs(spec, args)  # --reset for a method whose plans take none: refused before the model loads
    out = _writable_dir(args.out) if args.out else None
    for where in (args.save_plan, args.checkpoint_dir):  # written after the long work: checked now
        if where:
            _writable_dir(where)
    if args.calib_samples <= 0 or args.seq_len < 2:
        raise UserError("--calib-samples must be positive and --seq-len at least 2")
    _checked_method_opts(spec, args)
    device = _device(args.device)
    if spec.needs_calibration:
        from compress.data import load_text
        from compress.mixture import parse_sources

        for source in parse_sources(args.data):  # fail fast on a bad data file, before any heavy work
            load_text(source.spec, "calib")
    if not args.no_eval:
        _eval_texts(args, args.data)  # and on a bad evaluation file
    model, tokenizer = _load_for(args, device)
    if out is not None:  # before the long work: a full disk is found now, not at the save
        _check_room(out, _estimated_checkpoint_bytes(model, size), "not enough room for the checkpoint at")
    with _streamed(model, args, device):  # --offload: every forward below streams from CPU memory
        result = _compress_loaded(model, tokenizer, args, spec, size, device)
    if _launched_rank() > 0:
        return 0  # distributed scoring: rank 0 saves and reports
    if out is not None:
        result["out"] = str(out)
        # The report goes inside the atomic write: nothing is added to --out after it is in place.
        report = {"compress_report.json": json.dumps(result, indent=2) + "\n"}
        with file_errors("cannot save the checkpoint to", out, reading=False, atomic=True):
            save_pretrained(model, out, tokenizer, extra_metadata={"method": args.method, "size": size},
                            extra_files=report)
    print(json.dumps(result, indent=2))
    return 0


def _compress_loaded(model, tokenizer, args: argparse.Namespace, spec, size: float, device: str) -> dict[str, Any]:
    """Dense evaluation, `compress.api.compress` (scoring and materialization) and compressed evaluation."""
    from compress.api import check_model, compress
    from lowrank import size_report

    check_model(model, spec)  # a structure the method cannot compress is refused before any work
    dense = size_report(model)
    result: dict[str, Any] = {"model": str(args.model or "smollm2-135m"), "method": args.method, "size": size,
                              "device": device, "dtype": str(next(model.parameters()).dtype), "bos": args.bos,
                              "window_prefix": _window_prefix(tokenizer, args)}
    if args.offload:
        result["offload"] = True
    # Under torchrun / accelerate launch all processes score together (ACIP: FSDP, docs/acip.md),
    # then rank 0 alone materializes, evaluates and saves. Every rank runs the dense evaluation
    # so that all reach the scoring's first collective together (its timeout is minutes).
    follower = _launched_rank() > 0
    if not args.no_eval:
        eval_texts, eval_len = _eval_texts(args, args.data)
        result["eval_seq_len"] = eval_len
        # One perplexity per evaluation text; the first is also reported as dense_perplexity.
        result["perplexities"] = {label: {"dense": _perplexity(model, tokenizer, text, eval_len, args, device)}
                                  for label, text in eval_texts}
        result["dense_perplexity"] = result["perplexities"][eval_texts[0][0]]["dense"]
        for label, values in result["perplexities"].items():
            print(f"dense perplexity [{label}]: {values['dense']:.3f}")
    opts = _checked_method_opts(spec, args)
    checkpoint_dir = args.checkpoint_dir
    if checkpoint_dir is None and args.save_plan:
        checkpoint_dir = str(Path(args.save_plan) / "checkpoint")

    def save_plan(plan) -> None:
        if args.save_plan and not follower:
            with file_errors("cannot save the plan to", args.save_plan, reading=False):
                plan.save(_writable_dir(args.save_plan))

    outcome = compress(model, tokenizer, args.method, size, rank_multiple=args.rank_multiple, offload=args.offload,
                       execution_device=device, materialize_options=_materialize_kwargs(spec, args),
                       after_scoring=save_plan, materialize=not follower, data=args.data, seq_len=args.seq_len,
                       num_samples=args.calib_samples, seed=args.seed, batch_size=args.batch_size,
                       checkpoint_dir=checkpoint_dir, resume=args.resume or None, bos=args.bos, **opts)
    if follower:
        return result
    plan, report = outcome.plan, outcome.report
    result["calibration_seconds"] = round(outcome.score_seconds, 2)
    result["materialize_seconds"] = round(outcome.materialize_seconds, 3)
    result.update({
        "dense_params": dense.model_params,
        "compressed_params": report.model_params,
        "target_fraction": round(report.target_fraction, 5),
        "model_fraction": round(report.model_fraction, 5),
        "untargeted_dense_params": report.untargeted_params,  # e.g. fused 3-D MoE experts, left dense
    })
    print(report.summary())
    describe = getattr(plan, "describe", None)
    if callable(describe):  # optional method-specific accounting (e.g. minify's MLP fraction)
        extra = dict(describe(model))
        if extra.get("summary"):
            print(extra.pop("summary"))
        result.update(extra)
    if not args.no_eval:
        for label, text in eval_texts:
            values = result["perplexities"][label]
            values["compressed"] = _perplexity(model, tokenizer, text, eval_len, args, device)
            values["ratio"] = round(values["compressed"] / values["dense"], 5)
            print(f"compressed perplexity [{label}]: {values['compressed']:.3f} ({values['ratio']:.3f}× dense)")
        result["compressed_perplexity"] = result["perplexities"][eval_texts[0][0]]["compressed"]
    return result


def run_materialize(argv: list[str]) -> int:
    from compress.api import check_offload, load_plan
    from lowrank import save_pretrained, size_report

    args = _materialize_parser().parse_args(argv)
    size = _checked_size(args.size)
    out = _writable_dir(args.out)
    with file_errors("cannot read the plan", args.scores):
        plan = load_plan(args.scores)
    spec = _method_of(plan)
    kwargs = _materialize_kwargs(spec, args)
    if args.offload:
        check_offload(spec, True)
    if size not in plan.sizes_covered:  # refused before any time goes into loading the model
        raise UserError(plan.sizes_covered.refusal([size]))
    device = _device(args.device)
    model, tokenizer = _load_for(args, device)
    _check_room(out, _estimated_checkpoint_bytes(model, size), "not enough room for the checkpoint at")
    t0 = time.perf_counter()
    with _streamed(model, args, device):
        plan.materialize_(model, size, rank_multiple=args.rank_multiple, **kwargs)
    seconds = time.perf_counter() - t0
    report = size_report(model)
    print(report.summary())
    print(f"selected and materialized in {seconds:.3f} s")
    reset = kwargs.get("reset", True) if "reset" in spec.materialize_options else None
    with file_errors("cannot save the checkpoint to", out, reading=False, atomic=True):
        save_pretrained(model, out, tokenizer, extra_metadata={"method": plan.method, "size": size, "reset": reset})
    print(f"saved {out}")
    return 0


def _checked_size(size: float) -> float:
    """`compress.api.check_size`, its refusal worded for --size."""
    from compress.api import check_size

    try:
        return check_size(size)
    except ValueError as exc:
        raise UserError(f"--{exc}") from None  # "--size must be a fraction in (0, 1], got ..."


def _method_of(plan):
    """The registered method that scored `plan` (its `MethodSpec`)."""
    from compress.methods import get_method

    return get_method(plan.method)


def _materialize_kwargs(spec, args: argparse.Namespace) -> dict[str, Any]:
    """The options --reset/--no-reset give `Plan.materialize_`, refused where `spec`'s plans take none."""
    from compress.api import check_materialize_options
    from compress.methods import available_methods

    options = {} if args.reset is None else {"reset": args.reset}
    try:
        return check_materialize_options(spec, options)
    except ValueError:
        takers = [name for name, s in available_methods().items() if "reset" in s.materialize_options]
        raise UserError(f"--reset/--no-reset apply to score maps ({', '.join(takers)}), not to this plan") from None


def _parse_sizes(spec: str) -> list[float]:
    try:
        if ":" in spec:
            start, stop, step = (float(v) for v in spec.split(":"))
            if step <= 0:
                raise ValueError
            count = int(round((stop - start) / step)) + 1
            sizes = [round(start + i * step, 6) for i in range(count)]
        else:
            sizes = [float(v) for v in spec.split(",") if v.strip()]
    except ValueError as exc:
        raise UserError(f"--sizes must be START:STOP:STEP or a comma list of fractions, "
                        f"got {spec!r}") from exc
    if not sizes or any(not 0.0 < v <= 1.0 for v in sizes):
        raise UserError(f"--sizes must be fractions in (0, 1], got {spec!r}")
    return sorted(set(sizes))


def run_curve(argv: list[str]) -> int:
    from compress.api import load_plan
    from compress.data import pack_tokens, tokenize_text
    from compress.eval import perplexity_of_ids
    from compress.model import load_model
    from compress.plan import temporarily_materialized
    from lowrank import size_report

    args = _curve_parser().parse_args(argv)
    sizes = _parse_sizes(args.sizes)
    with file_errors("cannot read the plan", args.scores):
        plan = load_plan(args.scores)
    kwargs = {"rank_multiple": args.rank_multiple, **_materialize_kwargs(_method_of(plan), args)}
    if any(v not in plan.sizes_covered for v in sizes):
        raise UserError(f"{plan.sizes_covered.refusal(sizes)}; drop them from --sizes")
    out = _writable_dir(args.out or args.scores)
    out.mkdir(parents=True, exist_ok=True)
    device = _device(args.device)
    with file_errors("cannot load model", _model_path(args.model)):
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=device)
    prefix = _window_prefix(tokenizer, args)
    limit = args.eval_chunks if args.eval_chunks is not None else (None if device.startswith("cuda") else 16)
    texts = {}  # label -> chunks; one perplexity column per text, the first also as "perplexity"
    for label, text in _eval_texts(args, args.data)[0]:
        texts[label] = pack_tokens(tokenize_text(tokenizer, text), args.seq_len, prefix)[:limit]

    def perplexities() -> dict[str, float]:
        return {label: perplexity_of_ids(model, chunks, batch_size=args.eval_batch_size, progress=False)
                for label, chunks in texts.items()}

    def columns(values: dict[str, float]) -> dict[str, float]:
        first = next(iter(values.values()))
        return {"perplexity": first, **({f"ppl[{k}]": v for k, v in values.items()} if len(values) > 1 else {})}

    dense = perplexities()
    rows = [{"requested_size": 1.0, "size": 1.0, "rank_multiple": "", **columns(dense), "params": None,
             "seconds": 0.0, "label": "dense"}]
    rows[0]["params"] = size_report(model).target_params
    print("dense: perplexity " + ", ".join(f"{k} {v:.3f}" for k, v in dense.items()))
    for size in sizes:
        t0 = time.perf_counter()
        with temporarily_materialized(model, plan, size, **kwargs):
            seconds = time.perf_counter() - t0
            report = size_report(model)
            values = perplexities()
        rows.append({"requested_size": size, "size": round(report.target_fraction, 6),
                     "rank_multiple": args.rank_multiple, **columns(values), "params": report.target_params,
                     "seconds": round(seconds, 4), "label": plan.method})
        print(f"size {size:.3f} (actual {report.target_fraction:.4f}): perplexity "
              + ", ".join(f"{k} {v:.3f} ({v / dense[k]:.3f}× dense)" for k, v in values.items()))
    csv_path = out / "curve.csv"
    keys = list(rows[0])
    lines = [",".join(keys)] + [",".join(str(r[k]) for k in keys) for r in rows]
    csv_path.write_text("\n".join(lines) + "\n")
    png_path = _plot_curve(rows, out / "curve.png", title=f"{plan.method}: perplexity vs size")
    print(f"wrote {csv_path}" + (f" and {png_path}" if png_path else " (matplotlib missing: no PNG)"))
    return 0


def _plot_curve(rows: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    per_text = [k for k in rows[0] if k.startswith("ppl[")]
    if per_text:  # several texts: perplexity ÷ dense on each
        for key in per_text:
            points = [(r["size"], r[key] / rows[0][key]) for r in rows if r["label"] != "dense"]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=key[4:-1])
        ax.axhline(1.0, color="gray", linestyle="--", label="dense")
        ax.set_ylabel("perplexity ÷ dense")
    else:
        points = [(r["size"], r["perplexity"]) for r in rows if r["label"] != "dense"]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=rows[-1]["label"])
        ax.axhline(rows[0]["perplexity"], color="gray", linestyle="--", label="dense")
        ax.set_ylabel("perplexity")
    ax.set_xlabel("size (fraction of targeted linear weights)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_eval(argv: list[str]) -> int:
    from compress.eval import (
        check_tasks,
        generate_samples,
        parse_limit,
        report_json,
        skip_summary,
        write_report,
        zero_shot,
    )
    from compress.model import DEFAULT_MODEL, load_model
    from lowrank import size_report

    args = _eval_parser().parse_args(argv)
    # Every input is checked before the model loads.
    tasks = _eval_tasks(args.tasks)
    limit = parse_limit(args.limit)
    prompts = _eval_prompts(args)
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.task_batch_size < 1:
        raise UserError(f"--task-batch-size must be at least 1, got {args.task_batch_size}")
    out = _writable_dir(args.out) if args.out else None
    device = _device(args.device)
    texts, seq_len = _eval_texts(args, args.data)
    task_manager = check_tasks(tasks) if tasks else None  # unknown task names fail here

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    with file_errors("cannot load model", _model_path(args.model)):
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=device)
    report = size_report(model)
    log(report.summary())
    prefix = _window_prefix(tokenizer, args, log)
    perplexities = {}  # one per text; the first is also "perplexity"
    for label, text in texts:
        perplexities[label] = _perplexity(model, tokenizer, text, seq_len, args, device)
        log(f"perplexity [{label}]: {perplexities[label]:.3f} (seq_len {seq_len})")
    ppl = perplexities[texts[0][0]]
    result: dict[str, Any] = {"model": str(args.model or DEFAULT_MODEL), "device": device,
                              "dtype": str(next(model.parameters()).dtype), "perplexity": ppl, "seq_len": seq_len,
                              "bos": args.bos, "window_prefix": prefix,
                              "data": _eval_specs(args, args.data)[0], "perplexities": perplexities,
                              "model_params": report.model_params, "target_fraction": report.target_fraction}
    if tasks:
        scores = zero_shot(model, tokenizer, tasks, limit, args.task_batch_size, task_manager=task_manager)
        skipped = skip_summary(scores)
        if skipped:
            log(skipped)
        for name, metrics in scores["tasks"].items():
            shown = [f"{k} {metrics[k]:.4f}" for k in ("acc", "acc_norm") if k in metrics]
            log(f"{name}: {', '.join(shown) or metrics}")
        result["zero_shot"] = scores
    if prompts:
        completions = generate_samples(model, tokenizer, prompts, args.max_new_tokens)
        result["samples"] = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions, strict=True)]
        for i, sample in enumerate(result["samples"], 1):
            log(f"[sample {i}] {sample['prompt']!r} -> {sample['completion']!r}")
        from compress.sanity import sanity_metrics

        result["sanity"] = sanity_metrics(completions)  # calibration artifacts, repeated n-grams
        log(f"samples: {result['sanity']['artifacts']['total']} calibration artifacts, "
            f"repeated {result['sanity']['repeat_n']}-gram rate {result['sanity']['repetition']:.1f}%")
    if out is not None:
        result["out"] = str(out / "eval_report.json")
        write_report(result, out)
    print(report_json(result))
    return 0


def _bench_module():
    from compress import speed

    return speed


def _bench_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m compress bench",
                                description="Serving speed of a checkpoint (static KV cache, one CUDA-graph replay "
                                            "per decoded token): decode tokens/s per batch size and prefill "
                                            "tokens/s, beside a dense twin of its architecture; --profile traces "
                                            "kernels. The same measurement as `python -m bench.kernels.e2e --model "
                                            "DIR`.")
    _bench_module().add_arguments(p, checkpoint=True)
    return p


def run_bench(argv: list[str]) -> int:
    e2e = _bench_module()
    args = _bench_parser().parse_args(argv)
    if args.out is not None:
        _writable_dir(args.out)
    else:
        args.no_save = True
    results = e2e.run(args)
    print(e2e.summary(results))
    if "path" in results:
        print(f"wrote {results['path']}" + (f", {results['markdown']}" if "markdown" in results else ""))
    else:
        print(json.dumps({k: v for k, v in results.items() if k != "env"}, indent=2, default=str))
    return 0


def run_tune(argv: list[str]) -> int:
    from compress import tune

    p = argparse.ArgumentParser(prog="python -m compress tune",
                                description="Time a compressed checkpoint's own layer shapes on this GPU (fused, "
                                            "two-GEMM, dense per T bucket) and store the fastest in the per-device "
                                            "tuning cache that the dispatch, `compress bench` and serving read.")
    tune.add_arguments(p)
    result = tune.run(p.parse_args(argv))
    print(tune.summary(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "materialize":
            return run_materialize(argv[1:])
        if argv and argv[0] == "eval":
            return run_eval(argv[1:])
        if argv and argv[0] == "curve":
            return run_curve(argv[1:])
        if argv and argv[0] == "bench":
            return run_bench(argv[1:])
        if argv and argv[0] == "tune":
            return run_tune(argv[1:])
        return run_compress(build_parser().parse_args(argv))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
