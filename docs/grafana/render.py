"""Draw the dashboard (flashsale.json) as a PNG, from a real Prometheus.

Grafana is not packaged for the machine this project runs on, so this draws each panel
of the dashboard with matplotlib, at its place in the dashboard's grid, from the panel's
own queries answered by Prometheus' HTTP API (``/api/v1/query_range``). Run it after (or
during) a load run, against the Prometheus that scraped the gateways:

    .venv/bin/pip install -e '.[bench]'     # matplotlib
    .venv/bin/python docs/grafana/render.py --prometheus http://127.0.0.1:9090 --minutes 10
"""

from __future__ import annotations

import argparse
import json
import re
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
UNITS = {"s": "seconds", "reqps": "per second", "ops": "per second", "short": ""}
MAX_LEGEND = 8


def query_range(prometheus: str, expr: str, start: float, end: float, step: float
                ) -> list[dict[str, Any]]:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{prometheus}/api/v1/query_range?{params}", timeout=30) as r:
        answer = json.load(r)
    if answer.get("status") != "success":
        raise SystemExit(f"Prometheus refused {expr!r}: {answer}")
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def gapped(values: list[list[Any]], end: float, step: float
           ) -> tuple[list[float], list[float]]:
    """Minutes before ``end`` and values, with a NaN where the series had a gap (a
    product that left the top 20), so that no line is drawn across it."""
    xs: list[float] = []
    ys: list[float] = []
    last = None
    for t, v in values:
        t = float(t)
        if last is not None and t - last > 1.5 * step:
            xs.append((last + step - end) / 60)
            ys.append(float("nan"))
        xs.append((t - end) / 60)
        ys.append(float(v) if v not in ("+Inf", "-Inf") else float("nan"))
        last = t
    return xs, ys


def legend(template: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template)


def render(dashboard: dict[str, Any], prometheus: str, minutes: float, out: Path,
           rate_interval: str, end: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = dashboard["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    fig = plt.figure(figsize=(20, rows * 0.6), dpi=80)
    grid = fig.add_gridspec(rows, 24, hspace=3.0, wspace=2.0, top=0.96, bottom=0.03)
    start = end - minutes * 60
    step = max(minutes * 60 / 240, 2.0)
    for panel in panels:
        pos = panel["gridPos"]
        top, bottom = pos["y"] + 1, pos["y"] + pos["h"]  # a row of room for the title
        ax = fig.add_subplot(grid[top:bottom, pos["x"]:pos["x"] + pos["w"]])
        ax.set_title(panel["title"], fontsize=11, loc="left")
        unit = panel["fieldConfig"]["defaults"].get("unit", "short")
        lines = []  # (peak, label, minutes, values)
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", rate_interval)
            for series in query_range(prometheus, expr, start, end, step):
                label = legend(target.get("legendFormat", ""), series["metric"])
                xs, ys = gapped(series["values"], end, step)
                finite = [y for y in ys if y == y]
                if finite:
                    lines.append((max(finite), label, xs, ys))
        if panel["type"] == "stat":
            for _, label, _, ys in lines[:1]:
                last = [y for y in ys if y == y][-1]
                ax.text(0.5, 0.45, f"{last:g}", fontsize=40, ha="center", va="center",
                        color="tab:red" if last else "tab:green", transform=ax.transAxes)
                ax.text(0.5, 0.1, label, ha="center", transform=ax.transAxes, fontsize=9)
            ax.set_axis_off()
            continue
        lines.sort(key=lambda line: -line[0])
        for n, (_, label, xs, ys) in enumerate(lines):  # a legend for the biggest only
            shown = label if n < MAX_LEGEND else "_"
            ax.plot(xs, ys, label=shown, linewidth=1.2)
        drawn = len(lines)
        ax.set_xlim(-minutes, 0)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("minutes before the end of the run", fontsize=8)
        ax.set_ylabel(UNITS.get(unit, unit), fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if drawn:
            more = f" (+{drawn - MAX_LEGEND} more)" if drawn > MAX_LEGEND else ""
            ax.legend(fontsize=7, loc="upper left", ncol=2 if drawn > 4 else 1,
                      title=f"{drawn} series{more}" if more else None, title_fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"{dashboard['title']} (panels of docs/grafana/flashsale.json, "
                 f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(end))})", fontsize=14, y=0.985)
    fig.savefig(out, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--minutes", type=float, default=10.0, help="window ending now")
    parser.add_argument("--end", type=float, default=None, help="unix time the window ends")
    parser.add_argument("--rate-interval", default="30s",
                        help="what Grafana's $__rate_interval stands for (4 scrapes)")
    parser.add_argument("--dashboard", type=Path, default=HERE / "flashsale.json")
    parser.add_argument("--out", type=Path, default=HERE / "flashsale.png")
    args = parser.parse_args()
    render(json.loads(args.dashboard.read_text()), args.prometheus.rstrip("/"), args.minutes,
           args.out, args.rate_interval, args.end or time.time())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
