"""The results table's sanity check (issue #20): a compressed model better than its dense model on the same text
by more than the noise is flagged and withheld, never published as a result; within the noise it is shown.

    python -m pytest -q tests/bench/test_results_sanity.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from bench.tools import results_table as rt

DENSE = 20.0


def _point(ppl: float, tf: float = 0.8, noise: float | None = None) -> rt.Point:
    return rt.Point(tf, ppl, str(tf), noise=noise)


def test_beats_dense_margin():
    margin = rt.DEFAULT_NOISE
    assert 0 < margin <= 0.02
    assert rt.beats_dense(_point(DENSE * (1 - 2.5 * margin)), DENSE)  # clearly better than dense: flagged
    assert not rt.beats_dense(_point(DENSE * (1 - 0.5 * margin)), DENSE)  # within the noise
    assert not rt.beats_dense(_point(DENSE * 1.3), DENSE)  # worse: an ordinary result
    assert not rt.beats_dense(_point(DENSE * 0.5, tf=1.0), DENSE)  # the dense point itself is not compressed
    assert not rt.beats_dense(_point(DENSE * 0.5), None)  # no dense number: nothing to compare with
    # a recorded paired noise replaces the default
    assert not rt.beats_dense(_point(DENSE * 0.95, noise=0.1), DENSE)
    assert rt.beats_dense(_point(DENSE * 0.95, noise=0.01), DENSE)
    assert rt.beats_dense(_point(DENSE * math.exp(-0.011), noise=0.01), DENSE)


def test_flagged_value_withheld_from_table_and_listed(tmp_path: Path):
    margin = rt.DEFAULT_NOISE
    flagged, close, worse = DENSE * (1 - 3 * margin), DENSE * (1 - 0.3 * margin), 31.25
    results = tmp_path / "results"
    results.mkdir()
    svd = {"env": {"gpu": "FAKE", "git_commit": "deadbee", "timestamp_utc": "2000"}, "dense": {"1024": DENSE},
           "svd": {"perplexity": {"0.9": flagged, "0.8": close, "0.7": worse}}}
    (results / rt.FILES["svd"]).write_text(json.dumps(svd))
    text, _ = rt.generate(results, tmp_path / "results.md", None)
    row = next(line for line in text.splitlines() if line.startswith("| svd (whitened SVD"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    header = next(line for line in text.splitlines() if line.startswith("| method (variant)"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    by_column = dict(zip(columns, cells, strict=True))
    assert by_column["90%"] == rt.WITHHELD  # not published as a result
    assert by_column["80%"] == rt.fmt_ppl(close)  # within the noise: shown
    assert by_column["70%"] == rt.fmt_ppl(worse)
    assert rt.fmt_ppl(flagged) not in row
    # ...but listed with the reason, under the anomalies section
    listed = [line for line in text.splitlines() if line.startswith("- **svd (whitened SVD") and "dense" in line]
    assert listed and rt.fmt_ppl(flagged) in listed[0] and "withheld" in listed[0]
    assert "within the noise" in listed[0]  # the close one is listed as a finding, not withheld


def test_shipped_results_withhold_what_beats_dense(tmp_path: Path):
    """On the real result files every compressed number more than the noise below dense is withheld."""
    rows, data = rt.build_rows(rt.RESULTS_DIR)
    dense, _ = rt.dense_perplexity(data)
    text, _ = rt.generate(rt.RESULTS_DIR, tmp_path / "results.md", None)
    table = [line for line in text.splitlines() if line.startswith("| ")]
    for r in rows:
        for p in r.points:
            if rt.beats_dense(p, dense):
                line = next(t for t in table if t.startswith(f"| {r.name} |"))
                assert rt.fmt_ppl(p.perplexity) not in line.split("|")[1:-3], (r.name, p)
