"""Perplexity on non-overlapping chunks, zero-shot tasks through lm-evaluation-harness, and generation samples.

lm-evaluation-harness (``pip install lm-eval``) is optional: without it, or without its datasets (offline),
`zero_shot` reports the tasks as skipped, with the reason, instead of failing.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.data import chunk_prefix, pack_tokens, tokenize_text
from compress.errors import UserError

__all__ = [
    "DEFAULT_PROMPTS",
    "DEFAULT_TASKS",
    "check_tasks",
    "generate_samples",
    "parse_limit",
    "perplexity",
    "perplexity_of_ids",
    "read_prompts",
    "report_json",
    "skip_summary",
    "write_report",
    "zero_shot",
]

DEFAULT_TASKS = ("piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "mathqa")
DEFAULT_PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "To make a good cup of tea, you should",
    "The main difference between a list and a tuple in Python is",
    "In machine learning, overfitting means",
    "The three primary colors are",
    "Water boils at a lower temperature on a mountain because",
    "The best way to learn a new language is",
)


@torch.inference_mode()
def perplexity_of_ids(
    model: nn.Module,
    chunks: torch.Tensor,
    *,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "perplexity",
    chunk_nll: list[float] | None = None,
) -> float:
    """exp(mean next-token NLL) over [n, L] chunks; each chunk is scored independently.

    Every token after a chunk's first is scored (L − 1 per chunk): for windows packed with a prefix
    token (`compress.data.pack_tokens(..., prefix=BOS)`, L = 1 + seq_len) that is exactly the window's
    seq_len tokens, the first predicted from the prefix, as in lm-eval's rolling log-likelihood. The
    NLL is summed in float64, so the result does not depend on the batch size. A `chunk_nll` list gets
    each chunk's summed NLL appended (for paired noise estimates between two models on the same chunks).
    """
    device = next(model.parameters()).device
    total_nll = 0.0
    total_tokens = 0
    starts = range(0, chunks.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch", leave=False)
    for start in starts:
        batch = chunks[start : start + batch_size].to(device)
        logits = model(input_ids=batch).logits
        # Cross-entropy in fp32 whatever the model dtype: bf16 log-softmax over 49k classes is lossy.
        nll = nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            batch[:, 1:].reshape(-1),
            reduction="sum" if chunk_nll is None else "none",
        )
        if chunk_nll is not None:
            rows = nll.double().view(batch.shape[0], -1).sum(dim=1)
            chunk_nll.extend(rows.tolist())
            nll = rows.sum()
        total_nll += float(nll.double())
        total_tokens += batch[:, 1:].numel()
    return math.exp(total_nll / total_tokens)


def perplexity(
    model: nn.Module,
    tokenizer,
    text: str,
    seq_len: int = 1024,
    batch_size: int = 8,
    *,
    max_chunks: int | None = None,
    progress: bool = True,
    bos: str = "auto",
) -> float:
    """Perplexity of `text` in non-overlapping chunks of `seq_len` tokens (the tail is dropped).

    `bos` picks the token put in front of each chunk (`compress.data.chunk_prefix`; ``"auto"``: the
    one the tokenizer adds by default, if any). `max_chunks` caps the work (the first chunks are
    taken), for quick CPU runs.
    """
    chunks = pack_tokens(tokenize_text(tokenizer, text), seq_len, chunk_prefix(tokenizer, bos))
    if max_chunks is not None:
        chunks = chunks[:max_chunks]
    return perplexity_of_ids(model, chunks, batch_size=batch_size, progress=progress)


# ----------------------------------------------------------------------------- generation samples
def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file, one per line; blank lines are ignored, other lines kept as written."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"prompts file not found: {file}")
    from compress.data import read_utf8

    prompts = [line for line in read_utf8(file, "prompts file").splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompts file has no prompts (one per line expected): {file}")
    return prompts


@torch.inference_mode()
def generate_samples(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 48) -> list[str]:
    """Greedy continuations of `prompts` (the new text only, special tokens dropped), one prompt at a time.

    Greedy decoding is forced whatever the checkpoint's generation config says (some ship with sampling
    switched on), so the result depends only on the model, the prompts and the device.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs = []
    for prompt in prompts:
        encoded = tokenizer(prompt, return_tensors="pt")
        ids = encoded["input_ids"].to(device)
        mask = encoded.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask.to(device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             num_beams=1, temperature=None, top_p=None, top_k=None, pad_token_id=pad_id)
        outputs.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return outputs


# ----------------------------------------------------------------------------- zero-shot (lm-evaluation-harness)
_INSTALL_HINT = "pip install 'lm-eval>=0.4', or the extra: pip install -e '.[lmeval]'"
# Exceptions raised from these packages while a task runs mean its dataset could not be fetched or read.
_DATA_PACKAGES = frozenset({"requests", "urllib3", "httpx", "httpcore", "aiohttp", "socket", "ssl",
                            "huggingface_hub", "datasets", "fsspec"})


def parse_limit(value: str | float | None) -> int | float | None:
    """--limit: a positive whole number of examples per task, or a fraction in (0, 1); None means all."""
    if value is None:
        return None
    message = f"--limit must be a positive whole number of examples per task or a fraction in (0, 1), got {value!r}"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(message) from None
    if not math.isfinite(number) or number <= 0 or (number >= 1 and number != int(number)):
        raise UserError(message)
    return number if number < 1 else int(number)


def _harness() -> tuple[Any, Any, Any] | str:
    """(lm_eval, HFLM, TaskManager), or the reason lm-evaluation-harness cannot be used."""
    try:
        import lm_eval
    except ImportError:
        return f"lm-eval is not installed ({_INSTALL_HINT})"
    try:
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        # TaskManager arrived in lm-eval 0.4.1; recent releases ship the HF backend as the extra [hf].
        return (f"lm-eval is unusable here ({exc}); it needs lm-eval>=0.4.1 with its HF backend: "
                "pip install -U 'lm-eval[hf]'")
    return lm_eval, HFLM, TaskManager


def check_tasks(tasks: list[str]) -> Any:
    """Check task names against lm-eval's registry before any heavy work.

    Returns lm-eval's TaskManager (to pass on to `zero_shot`), or None when lm-eval is unavailable
    (`zero_shot` then reports the tasks as skipped). Raises UserError for names lm-eval does not know.
    """
    harness = _harness()
    if isinstance(harness, str):
        return None
    manager = harness[2]()
    known = getattr(manager, "all_tasks", None)  # tasks, groups and tags
    if known is not None:
        known = set(known)
        unknown = [t for t in tasks if t not in known]
        if unknown:
            raise UserError(f"unknown lm-eval task(s): {', '.join(unknown)} (list them with `lm-eval ls tasks`, "
                            "or `lm-eval --tasks list` in older releases)")
    return manager


def _data_unavailable(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is a download / file-access failure rather than a bug."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        # OSError covers ConnectionError, TimeoutError, FileNotFoundError and requests' exceptions.
        if isinstance(current, OSError) or type(current).__module__.split(".")[0] in _DATA_PACKAGES:
            return True
        current = current.__cause__ or current.__context__
    return False


def _short(exc: BaseException, width: int = 160) -> str:
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= width else text[: width - 3] + "..."


def _metrics(out: dict[str, Any] | None) -> dict[str, dict[str, float]]:
    """Per-task numeric metrics from simple_evaluate's result ('acc,none' -> 'acc'; other filters kept)."""
    out = out or {}
    counts = out.get("n-samples") or {}
    parsed: dict[str, dict[str, float]] = {}
    for name, metrics in (out.get("results") or {}).items():
        row: dict[str, Any] = {}
        for key, value in metrics.items():
            metric, _, filt = str(key).partition(",")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue  # 'alias', 'N/A' stderr, NaN
            row[metric if filt in ("", "none") else f"{metric},{filt}"] = float(value)
        count = counts.get(name)
        if isinstance(count, dict) and isinstance(count.get("effective"), int):
            row["samples"] = count["effective"]
        if row:
            parsed[name] = row
    return parsed


def _lm_eval_version() -> str | None:
    try:
        return importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        return None


def zero_shot(
    model: nn.Module,
    tokenizer,
    tasks: list[str] | tuple[str, ...] = DEFAULT_TASKS,
    limit: int | float | None = None,
    batch_size: int = 8,
    *,
    task_manager: Any = None,
) -> dict[str, Any]:
    """Zero-shot accuracy of the in-memory `model` on lm-evaluation-harness tasks.

    Each task runs through its own `lm_eval.simple_evaluate` call on one `HFLM` wrapping `model` (not a
    path: compressed layers stay as they are), so a task whose dataset cannot be downloaded is skipped
    without losing the others. Returns ``{"tasks": {name: {"acc": .., "acc_norm": .., ...}},
    "skipped": {name: reason}, "limit": .., "num_fewshot": 0, "lm_eval_version": ..}``; without lm-eval
    every task is skipped. Errors other than data access (a bug in the model, say) propagate.
    """
    tasks = list(tasks)
    result: dict[str, Any] = {"tasks": {}, "skipped": {}, "limit": limit, "num_fewshot": 0,
                              "lm_eval_version": None}
    harness = _harness()
    if isinstance(harness, str):
        result["skipped"] = dict.fromkeys(tasks, harness)
        return result
    lm_eval, hflm, _ = harness
    result["lm_eval_version"] = _lm_eval_version()
    if task_manager is None:
        task_manager = check_tasks(tasks)
    lm = hflm(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    for task in tasks:
        try:
            out = lm_eval.simple_evaluate(model=lm, tasks=[task], num_fewshot=0, limit=limit,
                                          task_manager=task_manager, log_samples=False)
        except Exception as exc:
            if not _data_unavailable(exc):
                raise
            result["skipped"][task] = f"its dataset could not be loaded ({_short(exc)})"
            continue
        result["tasks"].update(_metrics(out))
    return result


def skip_summary(result: dict[str, Any]) -> str | None:
    """One line naming the skipped zero-shot tasks and why (None when nothing was skipped)."""
    skipped = result.get("skipped") or {}
    if not skipped:
        return None
    by_reason: dict[str, list[str]] = {}
    for task, reason in skipped.items():
        by_reason.setdefault(reason, []).append(task)
    parts = [f"{', '.join(names)}: {reason}" for reason, names in by_reason.items()]
    return f"zero-shot tasks skipped ({'; '.join(parts)}); the rest of the evaluation goes on"


# ----------------------------------------------------------------------------- report
def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def report_json(result: dict[str, Any]) -> str:
    """Strict JSON (NaN / infinities become null)."""
    return json.dumps(_finite(result), indent=2, ensure_ascii=False)


def write_report(result: dict[str, Any], out_dir: str | Path, name: str = "eval_report.json") -> Path:
    """Write `result` as JSON to out_dir/name atomically (temporary file, fsync, rename)."""
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    tmp = directory / f".{name}.{os.getpid()}.tmp"  # an ordinary open(): the file gets the umask's permissions
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(report_json(result) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path

