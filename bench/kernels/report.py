"""What the per-op benchmarks share in reporting: a panel plot of time against one swept value, and a table.

Rows are the benchmark's result dicts (one per case and contender); a row without ``us`` (a contender that
failed) is left out of the plot and shows as ``error`` in the table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def plot_panels(rows: Sequence[dict[str, Any]], path: Path, *, panel_keys: tuple[str, ...], x_key: str,
                contenders: Sequence[str], title: Callable[[tuple], str], xlabel: str, ylabel: str,
                suptitle: str, log2_x: bool = False) -> None:
    """µs (``us``) against ``x_key``, one panel per distinct ``panel_keys`` values, one line per contender.

    Without matplotlib nothing is drawn: the JSON is the result, the plot a convenience.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    timed = [r for r in rows if "us" in r]
    panels = sorted({tuple(r[k] for k in panel_keys) for r in timed})
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for name in contenders:
            pts = sorted((r[x_key], r["us"]) for r in timed
                         if tuple(r[k] for k in panel_keys) == panel and r["contender"] == name)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_title(title(panel), fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if log2_x:
            ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rows: Sequence[dict[str, Any]], cases: Sequence[tuple], *, case_keys: tuple[str, ...],
          contenders: Sequence[str], width: int = 17) -> list[str]:
    """Lines of a text table: one line per case (its ``case_keys`` values), one µs column per contender."""
    lines = [" ".join(f"{k:>8}" for k in case_keys) + " " + " ".join(f"{c:>{width}}" for c in contenders)]
    for case in cases:
        cells = []
        for name in contenders:
            hit = [r for r in rows if tuple(r[k] for k in case_keys) == tuple(case) and r["contender"] == name]
            cells.append(f"{hit[0]['us']:>{width - 3}.2f} µs" if hit and "us" in hit[0] else f"{'error':>{width}}")
        lines.append(" ".join(f"{v:>8}" for v in case) + " " + " ".join(cells))
    return lines
