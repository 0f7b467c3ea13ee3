"""The texts every quality benchmark reports on, and the calibration sets it draws from (docs/domains.md).

Evaluation texts (`EVAL_TEXTS`), each scored in non-overlapping windows of the run's sequence length:

- ``wiki``: WikiText-2 test ($WIKITEXT2/test.txt): the domain the published numbers calibrated on;
- ``docs``: `offline:docs:eval`, held-out CPython documentation topics (its calibration part is in the
  ``mix`` calibration set, so it is not out of domain for runs calibrated on ``mix``);
- ``legal``: `offline:legal:eval`, licence texts: out of domain; options and defaults are CHOSEN on it
  (`SELECTION_TEXT`);
- ``code``: `offline:code:eval`, standard-library Python source: out of domain; REPORTED only, never
  used for a choice (`REPORT_TEXTS`).

Calibration sets (`CALIBRATIONS`): ``wiki`` = WikiText-2 valid alone (the old protocol), ``mix`` =
70 % WikiText-2 valid + 30 % `offline:docs:calib` (weights = shares of the calibration tokens). Neither
includes legal or code text, so both stay out of domain for every run. The targets of issue #16 count
the worst of `OOD_TEXTS`, as perplexity ÷ the dense model's on the same text.

`offline:*` texts are built by `compress.corpora`; set LOWRANK_CORPORA to the exported folder on a
machine whose Python differs from the reference build, so every run scores the same bytes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["CALIBRATIONS", "EVAL_TEXTS", "OOD_TEXTS", "REPORT_TEXTS", "SELECTION_TEXT", "calibration_chunks",
           "eval_chunks", "format_ratio_table", "perplexities", "provenance", "ratios", "resolve", "suite_report",
           "worst_ood"]

WIKI_VALID = "$WIKITEXT2/valid.txt"
WIKI_TEST = "$WIKITEXT2/test.txt"
EVAL_TEXTS: dict[str, str] = {"wiki": WIKI_TEST, "docs": "offline:docs:eval", "legal": "offline:legal:eval",
                              "code": "offline:code:eval"}
CALIBRATIONS: dict[str, tuple[str, ...]] = {"wiki": (WIKI_VALID,),
                                            "mix": (WIKI_VALID + "@0.7", "offline:docs:calib@0.3")}
SELECTION_TEXT = "legal"
REPORT_TEXTS = ("code",)
OOD_TEXTS = ("legal", "code")

# Stand-ins when WikiText-2 is absent (smoke runs only: numbers are then not the benchmark's).
_SMOKE_WIKI = {WIKI_VALID: "offline:legal:calib", WIKI_TEST: "offline:legal:eval"}


def wikitext_dir() -> Path | None:
    root = os.environ.get("WIKITEXT2")
    if root and (Path(root) / "valid.txt").is_file() and (Path(root) / "test.txt").is_file():
        return Path(root)
    return None


def resolve(spec: str, *, allow_stand_in: bool = False) -> str:
    """`spec` with $WIKITEXT2 expanded (a weight suffix kept); without WikiText-2 a stand-in or SystemExit."""
    if "$WIKITEXT2" not in spec:
        return spec
    base, sep, weight = spec.partition("@")
    root = wikitext_dir()
    if root is not None:
        return base.replace("$WIKITEXT2", str(root)) + sep + weight
    if allow_stand_in:
        return _SMOKE_WIKI[base] + sep + weight
    raise SystemExit("set WIKITEXT2 to the directory holding valid.txt and test.txt")


def eval_chunks(tokenizer, seq_len: int, *, names: Sequence[str] | None = None, max_chunks: int | None = None,
                bos: str = "auto", allow_stand_in: bool = False) -> dict[str, torch.Tensor]:
    """{text name: [n, L] windows} for the named `EVAL_TEXTS` (all by default), the first `max_chunks` of each."""
    from compress.data import chunk_prefix, load_text, pack_tokens, tokenize_text

    prefix = chunk_prefix(tokenizer, bos)
    out = {}
    for name in names or EVAL_TEXTS:
        spec = resolve(EVAL_TEXTS[name], allow_stand_in=allow_stand_in)
        chunks = pack_tokens(tokenize_text(tokenizer, load_text(spec, "eval")), seq_len, prefix)
        out[name] = chunks[:max_chunks] if max_chunks is not None else chunks
    return out


def calibration_chunks(tokenizer, name: str, *, seq_len: int, num_samples: int, seed: int = 0, bos: str = "auto",
                       allow_stand_in: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
    """Calibration windows of `CALIBRATIONS[name]` (`compress.mixture.mixture_batches`) and the shares drawn."""
    from compress.mixture import mixture_batches

    specs = [resolve(s, allow_stand_in=allow_stand_in) for s in CALIBRATIONS[name]]
    chunks, info = mixture_batches(tokenizer, specs, seq_len=seq_len, num_samples=num_samples, seed=seed, bos=bos)
    return chunks, {"name": name, **info}


def perplexities(model: nn.Module, texts: Mapping[str, torch.Tensor], batch_size: int = 16) -> dict[str, float]:
    from compress.eval import perplexity_of_ids

    return {name: perplexity_of_ids(model, chunks, batch_size=batch_size, progress=False)
            for name, chunks in texts.items()}


def ratios(ppl: Mapping[str, float], dense: Mapping[str, float]) -> dict[str, float]:
    return {k: round(v / dense[k], 5) for k, v in ppl.items() if k in dense}


def worst_ood(ratio: Mapping[str, float]) -> float | None:
    values = [ratio[k] for k in OOD_TEXTS if k in ratio]
    return max(values) if values else None


def suite_report(model: nn.Module, tokenizer, texts: Mapping[str, torch.Tensor], dense: Mapping[str, Any] | None = None,
                 *, batch_size: int = 16, max_new_tokens: int = 48, samples: bool = True) -> dict[str, Any]:
    """Perplexity on every text, ÷ `dense`'s (an earlier `suite_report` of the dense model) when given, and the
    generation sanity metrics on the fixed prompts (`compress.sanity`), with their check against dense's."""
    from compress.sanity import greedy_completions, sanity_check, sanity_metrics

    ppl = perplexities(model, texts, batch_size)
    out: dict[str, Any] = {"ppl": ppl}
    if dense is not None:
        out["ratio"] = ratios(ppl, dense["ppl"])
        out["worst_ood"] = worst_ood(out["ratio"])
    if samples:
        completions = greedy_completions(model, tokenizer, max_new_tokens=max_new_tokens)
        metrics = sanity_metrics(completions)
        if dense is not None and "sanity" in dense:
            metrics.update(sanity_check(metrics, dense["sanity"]))
        out["sanity"], out["samples"] = metrics, completions
    return out


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def provenance(texts: Mapping[str, torch.Tensor], *, allow_stand_in: bool = False) -> dict[str, Any]:
    """What each text is: spec, sha256 and size of its source, and the windows scored."""
    from compress.corpora import describe, is_corpus_spec, parse_corpus_spec

    out: dict[str, Any] = {}
    for name, chunks in texts.items():
        spec = resolve(EVAL_TEXTS[name], allow_stand_in=allow_stand_in)
        entry: dict[str, Any] = {"spec": spec, "windows": int(chunks.shape[0]), "window_len": int(chunks.shape[1])}
        if is_corpus_spec(spec):
            entry.update(describe(*parse_corpus_spec(spec, "eval")))
        elif Path(spec).is_file():
            entry.update({"sha256": _sha256_file(Path(spec)), "bytes": Path(spec).stat().st_size})
        out[name] = entry
    return out


def format_ratio_table(rows: Sequence[Mapping[str, Any]], texts: Sequence[str], dense: Mapping[str, float]) -> str:
    """Rows {label, ratio: {text: ppl ÷ dense}, sanity?} as a fixed-width table (dense perplexity in the header)."""
    head = f"{'run':<44} " + " ".join(f"{t + ' ' + format(dense[t], '.1f'):>12}" for t in texts)
    head += f" {'worstOOD':>8} {'artif':>5} {'rep%':>5}"
    lines = [head, "-" * len(head)]
    for row in rows:
        ratio = row.get("ratio") or {}
        cells = " ".join(f"{ratio[t]:>12.3f}" if t in ratio else f"{'-':>12}" for t in texts)
        worst = worst_ood(ratio)
        sanity = row.get("sanity") or {}
        artif = sanity.get("artifacts", {}).get("total", "-")
        rep = sanity.get("repetition")
        worst_cell = "-" if worst is None else format(worst, ".3f")
        lines.append(f"{row['label'][:44]:<44} {cells} {worst_cell:>8} "
                     f"{artif!s:>5} {'-' if rep is None else format(rep, '.1f'):>5}")
    return "\n".join(lines)
