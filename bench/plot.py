"""The results as a picture: holds/s and p99 against clients and against hot products.

Needs matplotlib (imported only here, with the Agg backend, so the bench runs without it).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

LABELS = {"service": "service", "lockserver": "lock-per-request peer", "hello": "bare aiohttp"}
Series = dict[str, list[tuple[float, float | None, float | None]]]  # target -> (x, rate, p99)


def series(targets: Mapping[str, Mapping[str, Any]], scenario: str, x_field: str) -> Series:
    """Per target, (x, holds/s, p99 ms) of every run of ``scenario``, sorted by x."""
    found: Series = {}
    for name, results in targets.items():
        points = [(float(r[x_field]), r.get("holds_per_s"), r.get("latency_ms", {}).get("p99_ms"))
                  for r in results.values() if r.get("scenario") == scenario and x_field in r]
        if points:
            found[name] = sorted(points)
    return found


def draw(summary: Mapping[str, Any], path: Path) -> Path:
    """Write a 2x2 PNG: holds/s and p99 by clients (sellout) and by products (many)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    targets = summary.get("targets", {})
    panels = [(series(targets, "sellout", "clients"), "concurrent clients (sellout, one product)"),
              (series(targets, "many", "products"), "hot products at once (many)")]
    # A curve needs two points: a panel of one is left out (both, if neither has two).
    curves = [p for p in panels if any(len(points) > 1 for points in p[0].values())]
    panels = curves or panels
    fig, axes = plt.subplots(2, len(panels), figsize=(5.5 * len(panels) + 0.5, 7.5),
                             squeeze=False)
    for col, (data, xlabel) in enumerate(panels):
        for row, (index, ylabel) in enumerate(((1, "granted holds/s"), (2, "p99 latency, ms"))):
            ax = axes[row][col]
            for name, points in data.items():
                xs = [p[0] for p in points if p[index] is not None]
                ys = [p[index] for p in points if p[index] is not None]
                ax.plot(xs, ys, marker="o", label=LABELS.get(name, name))
            ax.set_xscale("log")  # 50/200/800 clients, 1/10/100 products
            ticks = sorted({p[0] for points in data.values() for p in points})
            if ticks:
                ax.set_xticks(ticks)
            ax.xaxis.set_major_formatter(ScalarFormatter())  # plain numbers, not 10^n
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_ylim(bottom=0)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            if data:
                ax.legend()
    reference = summary.get("reference") or {}
    single = reference.get("commit_per_hold_holds_per_s")
    if single:
        for col in range(len(panels)):
            axes[0][col].axhline(single, color="grey", linestyle="--", linewidth=1,
                                 label="database alone, one commit per hold")
            axes[0][col].legend()
    fig.suptitle(f"flash-sale checkout, {summary.get('started_at', '')}, "
                 f"medians of {summary.get('repeat')} run(s)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
