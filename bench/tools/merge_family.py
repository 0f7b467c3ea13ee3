"""Merge methods measured in separate ``bench.quality.family_quality`` runs into one result file.

A 10-minute device call fits one or two methods of a second family, so a family's table is measured over
several calls, sometimes on different GPUs. This tool copies each source file's methods (and refusals) into
the target file, after checking that both runs measured the same thing: the same model, windows, prefix
and calibration, and dense perplexities that agree on every text within ``--dense-tolerance``. Each method
keeps the ``env`` (GPU, versions, commit) of the run that measured it, and the target gets a note saying
where the method came from and how the two dense scores compared.

    python -m bench.tools.merge_family bench/results/family_quality_gemma3_text_h200.json \\
        /tmp/out/family_quality_gemma3_text_h100.json --methods acip,surgeon
    ... --methods acip --rename acip=acip-any    a variant, beside the method's row under its own name
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from compress.timing import write_result

# Protocol fields that must agree for the paired, per-window comparisons of two runs to mean the same thing.
SAME_PROTOCOL = ("bos", "window_prefix", "seq_len", "scored_tokens_per_window", "calibration", "eval")
# Not the source string: runs name the same weights differently (a path on the device, a description
# written into the file afterwards). The dense perplexities on every text are what tie the two runs together.
SAME_MODEL = ("model_type", "params", "target_params")


class MergeError(ValueError):
    """The source run measured something other than the target run."""


def _dense_perplexities(results: dict[str, Any]) -> dict[str, float]:
    return {name: float(v["perplexity"]) for name, v in (results.get("dense") or {}).items()}


def merge_family(target: dict[str, Any], source: dict[str, Any], *, methods: list[str] | None = None,
                 dense_tolerance: float = 0.005, replace: bool = False, label: str = "source",
                 rename: dict[str, str] | None = None) -> list[str]:
    """Copy `methods` (default: all) of `source` into `target` in place; returns the names merged (as renamed).

    `rename` maps a source method to the name it takes in the target (a variant run of a method the
    target already has, e.g. ``{"acip": "acip-any"}``).

    Raises MergeError when the two runs differ in model, protocol or dense perplexity (relative difference
    above `dense_tolerance` on any text), or when a method is already in `target` and `replace` is False.
    """
    for key in SAME_MODEL:
        if (target.get("model") or {}).get(key) != (source.get("model") or {}).get(key):
            raise MergeError(f"model {key} differs: {target.get('model', {}).get(key)!r} in the target, "
                             f"{source.get('model', {}).get(key)!r} in {label}")
    for key in SAME_PROTOCOL:
        if (target.get("protocol") or {}).get(key) != (source.get("protocol") or {}).get(key):
            raise MergeError(f"protocol {key} differs: {target.get('protocol', {}).get(key)!r} in the target, "
                             f"{source.get('protocol', {}).get(key)!r} in {label}")
    dense_t, dense_s = _dense_perplexities(target), _dense_perplexities(source)
    if set(dense_t) != set(dense_s):
        raise MergeError(f"dense texts differ: {sorted(dense_t)} in the target, {sorted(dense_s)} in {label}")
    for name, value in dense_t.items():
        rel = abs(dense_s[name] / value - 1.0)
        if rel > dense_tolerance:
            raise MergeError(f"dense perplexity on {name} differs by {rel:.2%} ({value:.3f} in the target, "
                             f"{dense_s[name]:.3f} in {label}), more than --dense-tolerance {dense_tolerance:.2%}")
    available = list(source.get("methods") or {}) + list(source.get("refused") or {})
    wanted = methods if methods is not None else available
    missing = [m for m in wanted if m not in available]
    if missing:
        raise MergeError(f"{label} has no result for {', '.join(missing)} (it has: {', '.join(available) or 'none'})")
    rename = dict(rename or {})
    unknown = [m for m in rename if m not in wanted]
    if unknown:
        raise MergeError(f"--rename names {', '.join(unknown)}, which is not among the methods merged "
                         f"({', '.join(wanted)})")
    names = {m: rename.get(m, m) for m in wanted}
    if len(set(names.values())) != len(names):
        raise MergeError(f"two methods would merge under one name: {names}")
    clash = [names[m] for m in wanted
             if names[m] in (target.get("methods") or {}) or names[m] in (target.get("refused") or {})]
    if clash and not replace:
        raise MergeError(f"the target already has {', '.join(clash)}; pass --replace to overwrite")
    target.setdefault("methods", {})
    target.setdefault("refused", {})
    target.setdefault("notes", [])
    dense_pairs = ", ".join(f"{n} {dense_s[n]:.3f} (target {dense_t[n]:.3f})" for n in dense_t)
    for method in wanted:
        name = names[method]
        target["methods"].pop(name, None)
        target["refused"].pop(name, None)
        if method in (source.get("methods") or {}):
            entry = source["methods"][method]
            target["methods"][name] = entry
            env = entry.get("env") or source.get("env") or {}
        else:
            target["refused"][name] = source["refused"][method]
            env = source.get("env") or {}
        origin = f" (the source's {method})" if name != method else ""
        target["notes"].append(
            f"{name}{origin}: measured on {env.get('gpu', 'an unrecorded device')} on "
            f"{str(env.get('timestamp_utc', '?'))[:10]} (commit {str(env.get('git_commit', '?'))[:12]}) in a "
            f"separate run with the same protocol, merged by bench.tools.merge_family; that run's dense "
            f"perplexity: {dense_pairs}")
    return [names[m] for m in wanted]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", type=Path, help="family_quality JSON to merge into (rewritten atomically)")
    p.add_argument("sources", type=Path, nargs="+", help="family_quality JSON files to take methods from")
    p.add_argument("--methods", default=None, help="comma list of methods to take (default: all a source has)")
    p.add_argument("--dense-tolerance", type=float, default=0.005,
                   help="largest relative difference of dense perplexity per text (default 0.005)")
    p.add_argument("--replace", action="store_true", help="overwrite methods the target already has")
    p.add_argument("--rename", action="append", default=[], metavar="OLD=NEW",
                   help="merge the source's method OLD under the name NEW (repeatable)")
    args = p.parse_args(argv)
    if args.target.suffix != ".json":
        print(f"merge_family: error: the target must be a family_quality .json file, got {args.target}",
              file=sys.stderr)
        return 2
    try:
        target = json.loads(args.target.read_text())
        methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
        rename = {}
        for item in args.rename:
            old, sep, new = item.partition("=")
            if not sep or not old.strip() or not new.strip():
                raise MergeError(f"--rename takes OLD=NEW, got {item!r}")
            rename[old.strip()] = new.strip()
        for source_path in args.sources:
            source = json.loads(source_path.read_text())
            merged = merge_family(target, source, methods=methods, dense_tolerance=args.dense_tolerance,
                                  replace=args.replace, label=str(source_path), rename=rename)
            print(f"{source_path}: merged {', '.join(merged)}")
    except (OSError, json.JSONDecodeError, MergeError) as exc:
        print(f"merge_family: error: {exc}", file=sys.stderr)
        return 2
    write_result(args.target.stem, target, args.target.parent)  # atomic, as family_quality writes the file
    print(f"wrote {args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
