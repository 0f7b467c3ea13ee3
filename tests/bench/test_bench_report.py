"""bench.kernels.report: the shared panel plot and text table of the per-op benchmarks."""

from __future__ import annotations

import pytest

from bench.kernels.report import plot_panels, table


def _rows():
    return [
        {"model": "m", "rows": 1, "contender": "a", "us": 3.25},
        {"model": "m", "rows": 1, "contender": "b", "error": "RuntimeError: boom"},
        {"model": "m", "rows": 4, "contender": "a", "us": 5.5},
        {"model": "m", "rows": 4, "contender": "b", "us": 4.0},
    ]


def test_table_has_one_line_per_case_and_marks_errors():
    lines = table(_rows(), [("m", 1), ("m", 4)], case_keys=("model", "rows"), contenders=("a", "b"))
    assert len(lines) == 3 and lines[0].split() == ["model", "rows", "a", "b"]
    assert lines[1].split() == ["m", "1", "3.25", "µs", "error"]
    assert lines[2].split() == ["m", "4", "5.50", "µs", "4.00", "µs"]


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "p.png"
    plot_panels(_rows(), path, panel_keys=("model",), x_key="rows", contenders=("a", "b"),
                title=lambda p: p[0], xlabel="rows", ylabel="µs", suptitle="t", log2_x=True)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_timed_rows_draws_nothing(tmp_path):
    path = tmp_path / "p.png"
    plot_panels([{"model": "m", "rows": 1, "contender": "a", "error": "x"}], path, panel_keys=("model",),
                x_key="rows", contenders=("a",), title=str, xlabel="", ylabel="", suptitle="")
    assert not path.exists()
