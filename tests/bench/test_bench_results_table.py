"""Tests of bench/tools/results_table.py on small synthetic result files (fresh random numbers each run).

    python -m pytest -q tests/bench/test_bench_results_table.py
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from bench.tools import results_table as rt

SEED = random.randrange(2**32)  # printed by pytest on failure through the assertion messages
RNG = random.Random(SEED)


def _ppl(lo: float = 15.0, hi: float = 400.0) -> float:
    return RNG.uniform(lo, hi)


def _env() -> dict:
    return {"gpu": "FAKE GPU", "git_commit": "deadbee", "timestamp_utc": "2000-01-01T00:00:00+00:00"}


def write_fixtures(root: Path) -> dict:
    """A subset of the real schemas. acip plain, surgeon run1 and the compiled e2e run are left out (missing)."""
    root.mkdir(parents=True, exist_ok=True)
    dense = _ppl(10, 14.5)  # below every compressed value (>= 15): no cell is withheld by the sanity check
    svd_sizes = ["0.9", "0.7", "0.5"]  # 0.8 and 0.6 deliberately not measured
    svd = {"env": _env(), "protocol": {"calibration": "synthetic"}, "dense": {"1024": dense},
           "svd": {"seconds_to_score": RNG.uniform(1, 20), "perplexity": {s: _ppl() for s in svd_sizes}}}

    def acip_list(values: list[float]) -> list[dict]:
        sizes = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
        return [{"size": s, "actual_size": round(s - RNG.uniform(0, 0.004), 5), "perplexity": v,
                 "materialize_seconds": RNG.uniform(0.01, 0.5)} for s, v in zip(sizes, values, strict=True)]

    no_reset = sorted(_ppl() for _ in range(7))
    no_reset[5], no_reset[6] = no_reset[6], no_reset[5]  # 40% better than 50%: must be flagged
    acip = {"env": _env(), "calibration": {"windows": 7, "seq_len": 64, "stride": 32},
            "eval": {"dense_perplexity": dense},
            "acip": {"scoring_seconds_this_call_incl_setup": RNG.uniform(50, 300), "train_seconds": RNG.uniform(40, 49),
                     "steps": RNG.randrange(100, 5000)},
            "results": {"acip+reset": acip_list(sorted(_ppl() for _ in range(7))),
                        "acip": acip_list(no_reset),
                        "svd-magnitude": acip_list(sorted(_ppl(2e5, 9e9) for _ in range(7))),
                        "svd": acip_list(sorted(_ppl() for _ in range(7)))},
            "svd_baseline": {"scoring_seconds": RNG.uniform(1, 20), "calib_windows": RNG.randrange(8, 99)}}
    mlp_share = RNG.uniform(0.6, 0.8)  # share of the targeted linears that sits in the MLPs
    main_rows = []
    for ret in (0.9, 0.8, 0.7):
        tf = round(1 - (1 - ret) * mlp_share, 5)
        main_rows.append({"group": "main", "retention": ret, "score": "taylor", "heal": True, "target": "local",
                          "mlp_fraction": ret, "target_fraction": tf, "model_fraction": tf + 0.03,
                          "perplexity": _ppl(), "seconds": {"materialize": RNG.uniform(0.01, 1)}})
    comp_tf = round(RNG.uniform(0.81, 0.89), 5)
    minify = {"env": _env(), "protocol": {"calibration": "synthetic"},
              "timing_seconds": {"calibrate_plus_heal": RNG.uniform(1, 9), "score_total": RNG.uniform(1, 9)},
              "rows": main_rows + [
                  {"group": "compose", "label": "svd alone", "target_fraction": comp_tf, "perplexity": _ppl()},
                  {"group": "compose", "label": "minify + svd", "retention": 0.9, "target_fraction": comp_tf,
                   "perplexity": _ppl(), "seconds": {"svd_score": RNG.uniform(1, 20)}}]}
    surgeon_rows = []
    for model_frac in (0.9, 0.8, 0.7):
        surgeon_rows.append({"group": "main", "method": "surgeon", "requested": model_frac,
                             "model_fraction": model_frac,
                             "target_fraction": round(model_frac - RNG.uniform(0.02, 0.04), 5),
                             "perplexity": _ppl(), "seconds": RNG.uniform(10, 90)})
    surgeon = {"env": _env(), "protocol": {"calibration": "synthetic"}, "rows": surgeon_rows}

    def speed(tf: float) -> dict:
        return {"decode": {"1": {"tokens_per_s": RNG.uniform(50, 900)}, "8": {"tokens_per_s": RNG.uniform(400, 5000)}},
                "prefill": {"tokens_per_s": RNG.uniform(1e4, 2e5)}, "target_fraction": tf,
                "decode_speedup": {"1": RNG.uniform(0.5, 2), "8": RNG.uniform(0.5, 2)},
                "prefill_speedup": RNG.uniform(0.5, 2), "weight_bytes_ratio": RNG.uniform(0.3, 0.9)}

    llama = {"1.0": speed(1.0), "0.5": speed(RNG.uniform(0.48, 0.52))}
    e2e = {"env": _env(), "settings": {}, "models": {"llama7b": llama}}
    files = {"svd": svd, "acip_whitened": acip, "minify": minify, "surgeon": surgeon, "e2e": e2e}
    for key, payload in files.items():
        (root / rt.FILES[key]).write_text(json.dumps(payload))
    return files


def parse_table(md: str, first_header: str) -> tuple[list[str], dict[str, list[str]]]:
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.setdefault(cells[0], cells)  # first cell is the row label
        rows[f"{cells[0]}#{len(rows)}"] = cells
    return header, rows


def numbers_in(obj) -> list[float]:
    out: list[float] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            try:
                out.append(float(k))
            except ValueError:
                pass
            out += numbers_in(v)
    elif isinstance(obj, list):
        for v in obj:
            out += numbers_in(v)
    elif isinstance(obj, bool):
        pass
    elif isinstance(obj, (int, float)):
        out.append(float(obj))
    elif isinstance(obj, str):
        try:
            out.append(float(obj))
        except ValueError:
            pass
    return out


def allowed_strings(files: dict) -> set[str]:
    nums = numbers_in(files)
    fmts = (rt.fmt_ppl, rt.fmt_frac, rt.fmt_sec, rt.fmt_rate, rt.fmt_ratio)
    allowed = {f(x) for f in fmts for x in nums}
    allowed |= {str(int(x)) for x in nums if x == int(x)}
    allowed |= {repr(x) for x in nums}
    return allowed


def expected_cell(ppl: float, tf: float) -> tuple[str, str]:
    """(column header, text) where a measurement must appear: nearest column, ties to the larger size."""
    col = min(rt.COLUMNS, key=lambda c: (round(abs(c - tf), 9), -c))
    text = rt.fmt_ppl(ppl) + ("" if abs(col - tf) <= rt.EXACT_TOL else f" (@{tf:.3f})")
    return rt.fmt_pct(col), text


@pytest.fixture()
def generated(tmp_path: Path):
    files = write_fixtures(tmp_path / "results")
    md_path, png_path = tmp_path / "docs" / "results.md", tmp_path / "docs" / "results.png"
    text, _ = rt.generate(tmp_path / "results", md_path, png_path)
    return files, text, md_path, png_path


def test_nearest_column_rule():
    assert rt.nearest_column(0.874, rt.COLUMNS) == 0.9
    assert rt.nearest_column(0.85, rt.COLUMNS) == 0.9  # tie: the larger size
    assert rt.nearest_column(0.7466, rt.COLUMNS) == 0.7
    assert rt.nearest_column(0.49999, rt.COLUMNS) == 0.5


def test_sizes_converted_to_targeted_linear_fraction(generated):
    files, text, _, _ = generated
    header, rows = parse_table(text, "method (variant)")
    col = {h: i for i, h in enumerate(header)}
    assert "100%" in col and "40%" in col, f"seed {SEED}"  # the ACIP fixture has both ends
    # surgeon: requested as whole-model fractions, shown at its measured targeted-linear fraction
    surg = next(v for k, v in rows.items() if k.startswith("surgeon"))
    for r in files["surgeon"]["rows"]:
        c, want = expected_cell(r["perplexity"], r["target_fraction"])
        assert "(@" in want and want in surg[col[c]].split("; "), f"seed {SEED}"
    # minify: MLP retention converted through the JSON's target_fraction, never through the retention itself
    mini = next(v for k, v in rows.items() if k.startswith("minify (Taylor + ridge, local"))
    for r in files["minify"]["rows"]:
        if r["group"] != "main":
            continue
        c, want = expected_cell(r["perplexity"], r["target_fraction"])
        assert want in mini[col[c]].split("; "), f"seed {SEED}"
    # ACIP: actual sizes within the tolerance of a column are shown without "(@...)"
    acip = next(v for k, v in rows.items() if k.startswith("ACIP, whitened basis (default), no reset"))
    for p in files["acip_whitened"]["results"]["acip"]:
        assert acip[col[rt.fmt_pct(p["size"])]] == rt.fmt_ppl(p["perplexity"]), f"seed {SEED}"


def test_missing_cells_are_dashes(generated):
    files, text, _, _ = generated
    header, rows = parse_table(text, "method (variant)")
    col = {h: i for i, h in enumerate(header)}
    sizes = [h for h in header if h.endswith("%")]
    for name in ("ASVD", "SVD-LLM (whitening + sequential closed-form update)",
                 "ACIP, plain basis (paper), + reset rule", "ACIP, plain basis (paper), no reset",
                 "SVD-magnitude, plain basis (paper)"):
        assert all(rows[name][col[s]] == rt.MISSING for s in sizes), name
    svd = rows["svd (whitened SVD, uniform ranks)"]
    for s in ("100%", "80%", "60%", "40%"):
        assert svd[col[s]] == rt.MISSING
    assert "`acip_quality_plain_h100.json`: missing" in text
    assert "file missing" in text
    assert "- **ASVD**: every size" in text
    assert "- **svd (whitened SVD, uniform ranks)**: 80%, 60% not measured." in text


def test_no_number_that_is_not_in_the_inputs(generated):
    files, text, _, _ = generated
    allowed = allowed_strings(files)
    checked = 0
    for first in ("method (variant)", "model"):
        _, rows = parse_table(text, first)
        for key, cells in rows.items():
            if "#" not in key:
                continue
            body = cells[1:-1] if first == "method (variant)" else cells[2:]  # skip labels and the cmd key
            for cell in body:
                for tok in re.findall(r"\d+(?:\.\d+)?(?:e-?\d+)?", re.sub(r"\d+%", "", cell)):
                    checked += 1
                    assert tok in allowed, f"{tok!r} in {cell!r} is not from the inputs (seed {SEED})"
    flagged = text[text.index("### Where a curve"):text.index("## Speed")]
    for tok in re.findall(r"\b\d+\.\d+(?:e-?\d+)?\b", re.sub(r"\d+%", "", flagged)):
        assert tok in allowed, f"{tok!r} in the flags is not from the inputs (seed {SEED})"
    assert checked > 40


def test_non_monotonic_curve_is_flagged(generated):
    files, text, _, _ = generated
    res = files["acip_whitened"]["results"]["acip"]
    p50, p40 = res[5], res[6]
    line = next(ln for ln in text.splitlines() if ln.startswith("- **ACIP, whitened basis (default), no reset**, not"))
    assert (f"{rt.fmt_ppl(p40['perplexity'])} at {p40['actual_size']:.3f} is better than "
            f"{rt.fmt_ppl(p50['perplexity'])} at {p50['actual_size']:.3f}") in line
    assert "post-tuned at the final 40%" in line  # the explanation recorded in docs/acip.md


def test_speed_table_uses_recorded_ratios(generated):
    files, text, _, _ = generated
    _, rows = parse_table(text, "model")
    body = [v for k, v in rows.items() if "#" in k]
    m = files["e2e"]["models"]["llama7b"]["0.5"]
    comp = next(r for r in body if r[2].startswith("0.5"))
    assert comp[1] == "graphed"
    assert comp[3] == f"{m['decode']['1']['tokens_per_s']:.0f} ({m['decode_speedup']['1']:.2f}×)"
    assert comp[5] == f"{m['prefill']['tokens_per_s']:.0f} ({m['prefill_speedup']:.2f}×)"


def test_deterministic_and_cli(generated, tmp_path: Path):
    _, text, md_path, png_path = generated
    md2 = tmp_path / "again" / "results.md"
    rt.main(["--results", str(tmp_path / "results"), "--md", str(md2), "--png", str(tmp_path / "again" / "r.png")])
    assert md2.read_text() == text.replace("(results.png)", "(r.png)")
    pytest.importorskip("matplotlib")
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "again" / "r.png").read_bytes() == png_path.read_bytes()


def test_quoted_paper_rows_carry_no_numbers(generated):
    _, text, _, _ = generated
    section = text[text.index("## Reference"):text.index("## Sources")]
    assert "quoted, not measured" in section and "Pending" in section
    assert not re.search(r"\b\d+\.\d+\b", section.replace("2502.01717", ""))


@pytest.mark.skipif(not (rt.RESULTS_DIR / rt.FILES["svd"]).is_file(), reason="no real results in this checkout")
def test_real_results_render(tmp_path: Path):
    text, _ = rt.generate(rt.RESULTS_DIR, tmp_path / "results.md", None)
    assert "Dense: **21.00**" in text
    _, rows = parse_table(text, "method (variant)")
    assert rows["ASVD"][1] == rt.MISSING
