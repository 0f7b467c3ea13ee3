"""The multi-domain section of docs/results.md, from ``bench/results/domain_quality_*_part*.json``.

Rendered by `bench.tools.results_table` (which calls `domain_sections`); the parts of one GPU run
(``--part 1/2``, ``2/2``, or ``--jobs``) are merged, later files winning for a row of the same label.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PATTERN = "domain_quality_*.json"  # one per --part (…_part1of2_<gpu>) or one merged file (…_<gpu>)
COMMAND = ("LOWRANK_CORPORA=<exported corpora> python -m bench.quality.domain_quality --out $OUT --part 1/2 "
           "(then --part 2/2)")


def domain_files(results: Path) -> dict[str, list[dict[str, Any]]]:
    """{gpu slug: [part payloads]} of the non-smoke domain_quality results in `results`, in file-name order."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(results.glob(PATTERN)):
        data = json.loads(path.read_text())
        if data.get("smoke"):
            continue
        slug = path.stem[len("domain_quality_"):].split("_part")[0]
        runs.setdefault(slug, []).append({**data, "_file": path.name})
    return runs


def cut_note(job: dict[str, Any]) -> str | None:
    """Why a job's rows are not a result of their variant, or None: an ACIP run cut before its schedule ended
    (domain_quality cuts a run at twice its estimate) scores a score map that stops early and a LoRA that
    never post-tuned, whatever its label says."""
    if not job.get("cut_short"):
        return None
    where = f", covering sizes from {job['covered_from']:.3f}" if job.get("covered_from") is not None else ""
    post = job.get("post_tune_steps")
    return (f"cut short at {job['cut_short']}{where}"
            + (f", {post} post-tuning steps" if post is not None else "") + ": not a result of this variant")


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One run's parts as one table: a later part's row replaces an earlier row of the same label, and the
    targets follow the rows shown (a row's targets come from the part it is shown from; none for a cut row)."""
    rows: dict[str, dict[str, Any]] = {}
    targets: dict[tuple[str, str], dict[str, Any]] = {}
    for part in parts:
        jobs = part.get("jobs") or {}
        part_labels, cut_labels = set(), set()
        for row in part.get("rows", []):
            note = cut_note(jobs.get(row.get("job"), {}))
            rows[row["label"]] = {**row, "cut": note} if note else row
            part_labels.add(row["label"])
            if note:
                cut_labels.add(row["label"])
        targets = {key: t for key, t in targets.items() if key[1] not in part_labels}  # superseded rows
        for t in part.get("targets", []):
            if t.get("row") not in cut_labels and not t["target"].startswith("no artifacts"):
                targets[(t["target"], t.get("row"))] = t
    first = parts[0]
    return {"dense": first["dense"], "texts": first["texts"], "rows": list(rows.values()),
            "files": [p["_file"] for p in parts], "device": first.get("device"),
            "selection": first.get("selection_text"), "report": first.get("report_texts", []),
            "ood": first.get("ood_texts", []), "calibrations": first.get("calibrations", {}),
            "skipped": sorted({k for p in parts for k in p.get("skipped", [])} - {r["job"] for r in rows.values()}),
            "targets": list(targets.values())}


def _cell(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def domain_section(slug: str, run: dict[str, Any]) -> list[str]:
    texts = list(run["dense"]["ppl"])
    dense = run["dense"]
    md = [f"### `{slug}` ({run['device']}; {', '.join(f'`{f}`' for f in run['files'])})", "",
          "Perplexity ÷ the dense model's on the same text (lower is better); dense row: the perplexities. "
          f"Out of domain: {', '.join(run['ood'])} (options chosen on **{run['selection']}**, reported on "
          f"**{', '.join(run['report'])}**); *worst OOD* is the larger of those ratios. *artifacts*: WikiText-2 "
          "markup in the greedy samples of 8 fixed prompts (target 0); *rep*: repeated 4-gram rate in % "
          f"(target ≤ dense + 5 = {dense['sanity']['repetition'] + 5:.1f}).", ""]
    header = ["model", *texts, "worst OOD", "artifacts", "rep %"]
    body = [["dense", *[f"{dense['ppl'][t]:.2f}" for t in texts], "1.00",
             str(dense["sanity"]["artifacts"]["total"]), f"{dense['sanity']['repetition']:.1f}"]]
    for row in run["rows"]:
        ratio = row["ratio"]
        label = f"{row['label']} (**{row['cut']}**)" if row.get("cut") else row["label"]
        body.append([label, *[_cell(ratio.get(t)) for t in texts], _cell(row.get("worst_ood")),
                     str(row["sanity"]["artifacts"]["total"]), f"{row['sanity']['repetition']:.1f}"])
    md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in body]
    calib = "; ".join(f"`{k}` = {' + '.join(v)}" for k, v in run["calibrations"].items())
    md += ["", f"Calibration sets (in brackets in each row): {calib}.", ""]
    if run["targets"]:
        met = [t for t in run["targets"] if t["met"]]
        md.append(f"Targets of issue #16 met: {len(met)} of {len(run['targets'])}.")
        for t in run["targets"]:
            if not t["met"]:
                md.append(f"- missed: {t['target']} — {t['row']} ({t['value']})")
        md.append("")
    if run["skipped"]:
        md += [f"Not run (budget): {', '.join(run['skipped'])}.", ""]
    return md


def domain_sections(results: Path) -> list[str]:
    md = ["## Quality off the calibration domain (issue #16)", "",
          "Every number in the tables above is measured on WikiText-2 test after calibrating on WikiText-2 "
          "valid: in domain. `bench.quality.domain_quality` scores the same methods on held-out CPython docs, legal "
          "text and standard-library code too (docs/domains.md), calibrated on WikiText-2 valid alone or on "
          "a mixture.", ""]
    runs = domain_files(results)
    if not runs:
        return md + [f"Pending: no `{PATTERN}` in `bench/results/` yet. Command: `{COMMAND}`.", ""]
    for slug, parts in runs.items():
        md += domain_section(slug, merge(parts))
    return md
