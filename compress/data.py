"""Calibration and evaluation text: files, jsonl, hub datasets, and an offline default.

Offline default: the English prose of CPython's own documentation, shipped with every
Python in ``pydoc_data.topics`` (about 465k characters, ~110k SmolLM2 tokens). Its topics,
in sorted order, are split 80/20 into a calibration part and a held-out evaluation part,
so the default run never evaluates on text it calibrated on.

Chunk prefix (``--bos auto|always|never``, `chunk_prefix`): every calibration and evaluation window
of ``seq_len`` text tokens is fed to the model the way it was trained. Where the tokenizer puts a
BOS token in front of a text by default (Gemma, Llama 3, Mistral, ...), each window becomes
``[BOS] + seq_len tokens``; perplexity then scores exactly the window's ``seq_len`` tokens, the first
one predicted from the prefix, as lm-evaluation-harness's rolling log-likelihood does. A tokenizer
that adds nothing (SmolLM2) gets no prefix, and its windows and numbers are what they always were.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from compress.errors import UserError

__all__ = ["BOS_MODES", "DEFAULT_DATA", "add_prefix", "calibration_batches", "chunk_prefix", "load_text",
           "pack_tokens", "prefix_description", "tokenize_text"]

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


def read_utf8(path: Path, what: str = "data file") -> str:
    """The text of `path`, decoded strictly: a file that is not UTF-8 text is refused, naming the offset
    of its first bad byte (a lenient decode would calibrate on replacement characters without a word)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} {path} is not UTF-8 text (first bad byte at offset {exc.start})") from None
    if "\x00" in text:
        raise UserError(f"{what} {path} is not text (NUL byte at offset {raw.index(0)})")
    return text.removeprefix("\ufeff")


def load_text(spec: str | os.PathLike | None, part: str = "calib") -> str:
    """Text from `spec`: a .txt file, a .jsonl file (field "text"), ``hf:name[:config][:split]``,
    ``offline:NAME[:PART]`` (a named corpus, `compress.corpora`), or the default.

    `part` ("calib" or "eval") only matters for the default, offline corpora and hub datasets.
    """
    if part not in ("calib", "eval"):
        raise ValueError(f"part must be 'calib' or 'eval', got {part!r}")
    if spec is None or str(spec) == DEFAULT_DATA:
        return _pydoc_text(part)
    text_spec = str(spec)
    if text_spec.startswith("offline:"):  # named offline corpora (compress/corpora.py)
        from compress.corpora import corpus_text

        return corpus_text(text_spec, part)
    if text_spec.startswith("hf:"):
        return _hub_text(text_spec, part)
    path = Path(text_spec).expanduser()
    if not path.is_file():
        raise UserError(f"data path {path} is not a file" if path.exists() else f"data file not found: {path}")
    raw = read_utf8(path)
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


BOS_MODES = ("auto", "always", "never")
_PROBE = "The quick brown fox jumps over the lazy dog."


def _default_prefix(tokenizer) -> int | None:
    """The special token the tokenizer itself puts in front of a text (BOS where it adds one), or None."""
    with_special = list(tokenizer(_PROBE)["input_ids"])
    plain = list(tokenizer(_PROBE, add_special_tokens=False)["input_ids"])
    if len(with_special) <= len(plain) or with_special[:1] == plain[:1]:
        return None
    first = int(with_special[0])
    specials = {int(i) for i in getattr(tokenizer, "all_special_ids", None) or ()}
    return first if first in specials or first == tokenizer.bos_token_id else None


def chunk_prefix(tokenizer, bos: str = "auto") -> int | None:
    """The token id put in front of every calibration and evaluation window, or None for no prefix.

    `bos`: ``"auto"`` takes the token the tokenizer adds in front of a text by default (BOS for
    Gemma, Llama 3, Mistral; none for SmolLM2, whose windows stay as they were); ``"always"`` the
    BOS token, else EOS (lm-evaluation-harness's prefix token); ``"never"`` none.
    """
    if bos not in BOS_MODES:
        raise UserError(f"--bos must be one of {', '.join(BOS_MODES)}, got {bos!r}")
    if bos == "never":
        return None
    if bos == "auto":
        return _default_prefix(tokenizer)
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise UserError("--bos always: the tokenizer has neither a BOS nor an EOS token to put in front of a window")


def prefix_description(tokenizer, bos: str = "auto") -> str:
    """One line saying which prefix `chunk_prefix` chose and why (printed once per run by the CLI)."""
    prefix = chunk_prefix(tokenizer, bos)
    if prefix is None:
        why = "the tokenizer adds none by default" if bos == "auto" else "--bos never"
        return f"window prefix: none ({why}); perplexity scores seq_len - 1 tokens per window"
    name = tokenizer.convert_ids_to_tokens(prefix)
    why = {"auto": "the tokenizer adds it by default", "always": "--bos always"}[bos]
    return (f"window prefix: {name!r} (id {prefix}; {why}); each window is [prefix] + seq_len tokens, "
            "perplexity scores all seq_len")


def add_prefix(chunks: torch.Tensor, prefix: int | None) -> torch.Tensor:
    """[n, L] windows with `prefix` put in front of each ([n, L + 1]); unchanged for None."""
    if prefix is None:
        return chunks
    column = torch.full((chunks.shape[0], 1), int(prefix), dtype=chunks.dtype, device=chunks.device)
    return torch.cat([column, chunks], dim=1)


def pack_tokens(ids: torch.Tensor, seq_len: int, prefix: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of `seq_len` tokens, [n, seq_len]; the incomplete tail is dropped.

    With a `prefix` token each window gets it in front: [n, 1 + seq_len], the same text tokens.
    """
    if seq_len <= 1:
        raise UserError(f"seq_len must be at least 2, got {seq_len}")
    n = ids.numel() // seq_len
    if n == 0:
        raise UserError(f"text has {ids.numel()} tokens, fewer than one sequence of {seq_len}")
    return add_prefix(ids[: n * seq_len].view(n, seq_len), prefix)


def calibration_batches(
    tokenizer, text: str, *, seq_len: int, num_samples: int, seed: int = 0, bos: str = "auto"
) -> torch.Tensor:
    """`num_samples` random non-overlapping windows of `seq_len` tokens, drawn reproducibly by `seed`.

    Each window gets the prefix `chunk_prefix(tokenizer, bos)` in front (then [n, 1 + seq_len]);
    the windows drawn are the same with or without it. If the text holds fewer windows than asked
    for, all of them are used (with a warning printed once) rather than failing: small offline
    corpora stay usable.
    """
    prefix = chunk_prefix(tokenizer, bos)
    chunks = pack_tokens(tokenize_text(tokenizer, text), seq_len)
    if num_samples <= 0:
        raise UserError(f"the number of calibration samples must be positive, got {num_samples}")
    if chunks.shape[0] <= num_samples:
        if chunks.shape[0] < num_samples:
            print(f"note: calibration text holds only {chunks.shape[0]} sequences of {seq_len} tokens "
                  f"(asked for {num_samples}); using all of them")
        return add_prefix(chunks, prefix)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(chunks.shape[0], generator=generator)[:num_samples]
    return add_prefix(chunks[order.sort().values], prefix)
