"""Calibration mixtures: several data sources, each with a weight, drawn reproducibly into one set of chunks.

A source is any data spec `compress.data.load_text` reads (a .txt / .jsonl file, ``hf:NAME[:CONFIG][:SPLIT]``,
``offline:NAME[:PART]``, ``pydoc``), optionally followed by ``@WEIGHT``:

    --data wikitext-2/valid.txt@0.7 --data offline:docs@0.3

``@`` never occurs in hub specs and offline names; a path that itself contains ``@`` is read as a path when
the whole string names an existing file, or when what follows the last ``@`` is not a number. Weights are
shares of the calibration tokens (they need not sum to 1; missing weights count 1). For `num_samples`
sequences source i gets round(w_i·num_samples / Σw) of them (largest remainder), drawn
without replacement by `seed` from its own non-overlapping windows. A source with fewer windows than its
share gives all it has and the others make up the difference, in proportion to their weights; the shares
actually drawn are returned with the chunks. One source without a weight is exactly
`compress.data.calibration_batches` (the same windows as before mixtures existed).

The offline default (`DEFAULT_MIXTURE`) mixes CPython's documentation prose and standard-library source
code (`compress.corpora`), both of which every Python ships, so a default calibration is not one domain.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compress.errors import UserError

__all__ = ["DEFAULT_MIXTURE", "Source", "eval_sources", "format_sources", "mixture_batches", "parse_source",
           "parse_sources", "source_label"]

DEFAULT_MIXTURE = ("offline:docs@0.5", "offline:code@0.5")


@dataclass(frozen=True)
class Source:
    spec: str  # what load_text reads
    weight: float = 1.0
    weighted: bool = False  # whether a weight was written

    @property
    def label(self) -> str:
        return source_label(self.spec)


def source_label(spec: str | os.PathLike | None) -> str:
    """A short name for a data spec in reports: the corpus/hub spec itself, or a file's name."""
    if spec is None:
        return "default"
    text = str(spec)
    if text.startswith(("offline:", "hf:")) or text == "pydoc":
        return text
    return Path(text).name


def parse_source(text: str | os.PathLike) -> Source:
    """``SPEC[@WEIGHT]`` -> Source; the weight must be a positive finite number."""
    raw = str(text)
    if not raw.strip():
        raise UserError("--data got an empty data spec")
    spec, sep, tail = raw.rpartition("@")
    if not sep or Path(raw).expanduser().is_file():
        return Source(raw)
    try:
        weight = float(tail)
    except ValueError:
        return Source(raw)  # an '@' that belongs to the path
    if not spec:
        raise UserError(f"--data {raw!r}: a weight needs a data spec before the '@'")
    if not (math.isfinite(weight) and weight > 0):
        raise UserError(f"--data {raw!r}: the weight after '@' must be a positive number")
    return Source(spec, weight, True)


def parse_sources(data: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[Source]:
    """The calibration sources of `data`: None -> `DEFAULT_MIXTURE`; a string -> one source; a list -> each."""
    if data is None:
        items: Sequence[str | os.PathLike] = DEFAULT_MIXTURE
    elif isinstance(data, (str, os.PathLike)):
        items = [data]
    else:
        items = list(data)
        if not items:
            items = DEFAULT_MIXTURE
    sources = [parse_source(item) for item in items]
    specs = [s.spec for s in sources]
    if len(set(specs)) != len(specs):
        raise UserError(f"--data names a source twice: {specs}")
    return sources


def format_sources(sources: Sequence[Source]) -> str:
    """`sources` as the --data values that give them, for reports."""
    total = sum(s.weight for s in sources)
    if len(sources) == 1:
        return sources[0].spec
    return " + ".join(f"{s.spec}@{s.weight / total:.3g}" for s in sources)


def eval_sources(data: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[str]:
    """The evaluation texts that go with calibration `data`: each source's spec, weights dropped.

    `compress.data.load_text(spec, "eval")` then reads the held-out part of offline corpora (and of the
    pydoc default), and a file itself.
    """
    return [s.spec for s in parse_sources(data)]


def _shares(weights: Sequence[float], available: Sequence[int], total: int) -> list[int]:
    """Integer counts ≈ total·w/Σw (largest remainder), capped by `available`, the shortfall given to the rest."""
    n = len(weights)
    counts = [0] * n
    open_ = [i for i in range(n) if available[i] > 0]
    remaining = min(total, sum(available))
    while remaining > 0 and open_:
        w_sum = sum(weights[i] for i in open_)
        exact = {i: remaining * weights[i] / w_sum for i in open_}
        add = {i: int(math.floor(exact[i])) for i in open_}
        left = remaining - sum(add.values())
        for i in sorted(open_, key=lambda i: (-(exact[i] - add[i]), i))[:left]:
            add[i] += 1
        capped = False
        for i in open_:
            room = available[i] - counts[i]
            if add[i] >= room:
                add[i], capped = room, True
        for i in open_:
            counts[i] += add[i]
        remaining -= sum(add.values())
        open_ = [i for i in open_ if counts[i] < available[i]]
        if not capped:
            break
    return counts


def mixture_batches(
    tokenizer, data: str | os.PathLike | Sequence[str | os.PathLike] | None, *, seq_len: int, num_samples: int,
    seed: int = 0, bos: str = "auto",
) -> tuple[torch.Tensor, dict[str, Any]]:
    """[num_samples, seq_len (+1 with a prefix)] calibration chunks from the sources of `data`, and a report.

    The report: {"sources": [{"spec", "weight", "sequences", "available", "share"}], "seed"}. Chunks are
    ordered by source, then by position in the source's text.
    """
    from compress.data import calibration_batches, load_text

    if num_samples <= 0:
        raise UserError(f"the number of calibration samples must be positive, got {num_samples}")
    sources = parse_sources(data)
    if len(sources) == 1 and not sources[0].weighted:
        text = load_text(sources[0].spec, "calib")
        chunks = calibration_batches(tokenizer, text, seq_len=seq_len, num_samples=num_samples, seed=seed, bos=bos)
        entry = {"spec": sources[0].spec, "weight": 1.0, "sequences": int(chunks.shape[0]), "share": 1.0}
        return chunks, {"sources": [entry], "seed": seed}
    from compress.data import add_prefix, chunk_prefix, pack_tokens, tokenize_text

    pools = []
    for source in sources:
        ids = tokenize_text(tokenizer, load_text(source.spec, "calib"))
        if ids.numel() < seq_len:
            raise UserError(f"calibration source {source.spec} has {ids.numel()} tokens, fewer than one "
                            f"sequence of {seq_len}")
        pools.append(pack_tokens(ids, seq_len))
    counts = _shares([s.weight for s in sources], [p.shape[0] for p in pools], num_samples)
    if sum(counts) < num_samples:
        print(f"note: the calibration sources hold only {sum(counts)} sequences of {seq_len} tokens "
              f"(asked for {num_samples}); using all of them")
    picked = []
    report = []
    total_w = sum(s.weight for s in sources)
    for i, (source, pool, count) in enumerate(zip(sources, pools, counts, strict=True)):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + i)
        order = torch.randperm(pool.shape[0], generator=generator)[:count].sort().values
        picked.append(pool[order])
        target = source.weight / total_w
        if count < round(target * num_samples) and count == pool.shape[0]:
            print(f"note: {source.spec} holds only {pool.shape[0]} sequences of {seq_len} tokens, below its "
                  f"share {target:.3g}; the other sources make up the difference")
        report.append({"spec": source.spec, "weight": round(target, 6), "sequences": int(count),
                       "available": int(pool.shape[0])})
    chunks = torch.cat(picked)
    for entry in report:
        entry["share"] = round(entry["sequences"] / max(1, chunks.shape[0]), 6)
    return add_prefix(chunks, chunk_prefix(tokenizer, bos)), {"sources": report, "seed": seed}
