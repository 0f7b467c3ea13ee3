"""Calibration and evaluation text: files, jsonl, hub datasets, and an offline default.

Offline default: the English prose of CPython's own documentation, shipped with every
Python in ``pydoc_data.topics`` (about 465k characters, ~110k SmolLM2 tokens). Its topics,
in sorted order, are split 80/20 into a calibration part and a held-out evaluation part,
so the default run never evaluates on text it calibrated on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from compress.errors import UserError

__all__ = ["DEFAULT_DATA", "load_text", "pack_tokens", "calibration_batches", "tokenize_text"]

DEFAULT_DATA = "pydoc"
_CALIB_FRACTION = 0.8


def _pydoc_text(part: str) -> str:
    import pydoc_data.topics as topics

    keys = sorted(topics.topics)
    cut = int(len(keys) * _CALIB_FRACTION)
    chosen = keys[:cut] if part == "calib" else keys[cut:]
    return "\n\n".join(topics.topics[k].strip() for k in chosen)


def _hub_text(spec: str, part: str) -> str:
    # spec: hf:<dataset>[:<config>][:<split>]; text column "text".
    fields = spec[3:].split(":")
    name = fields[0]
    config = fields[1] if len(fields) > 1 and fields[1] else None
    split = fields[2] if len(fields) > 2 else ("train" if part == "calib" else "test")
    try:
        import datasets
    except ImportError as exc:
        raise UserError("hub datasets need the `datasets` package: pip install datasets") from exc
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # offline, unknown name...: one line for the user
        reason = type(exc).__name__
        raise UserError(f"could not load hub dataset {name!r} ({reason}); pass a local --data file") from exc
    if "text" not in ds.column_names:
        raise UserError(f"hub dataset {name!r} has no 'text' column (columns: {ds.column_names})")
    return "\n\n".join(ds["text"])


def load_text(spec: str | os.PathLike | None, part: str = "calib") -> str:
    """Text from `spec`: a .txt file, a .jsonl file (field "text"), ``hf:name[:config][:split]``, or the default.

    `part` ("calib" or "eval") only matters for the default and for hub datasets.
    """
    if part not in ("calib", "eval"):
        raise ValueError(f"part must be 'calib' or 'eval', got {part!r}")
    if spec is None or str(spec) == DEFAULT_DATA:
        return _pydoc_text(part)
    text_spec = str(spec)
    if text_spec.startswith("hf:"):
        return _hub_text(text_spec, part)
    path = Path(text_spec).expanduser()
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".jsonl":
        texts = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise UserError(f"{path}:{lineno}: each line needs a string field \"text\"")
            texts.append(record["text"])
        raw = "\n\n".join(texts)
    if not raw.strip():
        raise UserError(f"data file is empty: {path}")
    return raw


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids of the whole text as one 1-D tensor (no special tokens added)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def pack_tokens(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping [n, seq_len] chunks; the incomplete tail is dropped."""
    if seq_len <= 1:
        raise UserError(f"seq_len must be at least 2, got {seq_len}")
    n = ids.numel() // seq_len
    if n == 0:
        raise UserError(f"text has {ids.numel()} tokens, fewer than one sequence of {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


def calibration_batches(
    tokenizer, text: str, *, seq_len: int, num_samples: int, seed: int = 0
) -> torch.Tensor:
    """`num_samples` random non-overlapping windows of `seq_len` tokens, drawn reproducibly by `seed`.

    If the text holds fewer windows than asked for, all of them are used (with a warning
    printed once) rather than failing: small offline corpora stay usable.
    """
    chunks = pack_tokens(tokenize_text(tokenizer, text), seq_len)
    if num_samples <= 0:
        raise UserError(f"the number of calibration samples must be positive, got {num_samples}")
    if chunks.shape[0] <= num_samples:
        if chunks.shape[0] < num_samples:
            print(f"note: calibration text holds only {chunks.shape[0]} sequences of {seq_len} tokens "
                  f"(asked for {num_samples}); using all of them")
        return chunks
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(chunks.shape[0], generator=generator)[:num_samples]
    return chunks[order.sort().values]
