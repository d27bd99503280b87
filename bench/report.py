"""Pure report pieces: combining repeated runs, the issue's goals, the table, the JSON line.

Runs are combined per scenario: rates and latencies by their median, error counts and
oversold / leaked units by their worst run, correctness only when every run was correct.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import orjson

from bench.stats import median, ratio, worst

SERVICE, LOCKSERVER, HELLO = "service", "lockserver", "hello"
RATE_FIELDS = {"sellout": "holds_per_s", "many": "holds_per_s", "soldout": "refusals_per_s",
               "read": "reads_per_s"}
RATE_NAMES = {"holds_per_s": "holds/s", "refusals_per_s": "refusals/s", "reads_per_s": "reads/s"}
MEDIAN_FIELDS = frozenset({"holds_per_s", "refusals_per_s", "reads_per_s", "elapsed_s",
                           "requests", "client_cpu_pct", "server_cpu_pct",
                           "server_cpu_ms_per_request", "gateway_cpu_ms_per_request"})
WORST_FIELDS = frozenset({"server_5xx", "shed_503", "transport_errors", "other_status",
                          "oversold", "leaked",
                          "duplicate_hold_ids", "granted_after_soldout", "accepted_202"})
# Issue 7's bars: one hot product, and 100 hot products against the peer and against the
# service's own one-product rate measured in the same run.
SELLOUT_RATE_BAR, SELLOUT_P99_BAR, SOLDOUT_BAR, READ_BAR = 6.0, 0.15, 6.0, 0.5
MANY_PRODUCTS, MANY_PEER_BAR, MANY_FLAT_BAR = 100, 4.0, 0.7
MEMORY_BAR_MB = 100.0


def scenario_key(scenario: str, clients: int, products: int | None = None) -> str:
    """``sellout c=200``, or ``many k=10 c=200``: how results are filed and shown."""
    return f"many k={products} c={clients}" if scenario == "many" else f"{scenario} c={clients}"


def combine(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One result out of the same scenario's repeated runs."""
    if not runs:
        return {}
    combined: dict[str, Any] = dict(runs[0])
    for name in runs[0]:
        values = [run.get(name) for run in runs]
        if name in MEDIAN_FIELDS:
            combined[name] = median(values)
        elif name in WORST_FIELDS:
            combined[name] = worst(values)
        elif name == "latency_ms":
            combined[name] = {pct: median(v.get(pct) for v in values if isinstance(v, dict))
                              for pct in runs[0][name]}
        elif name in ("correct", "timed_out"):
            combined[name] = (all(bool(v) for v in values) if name == "correct"
                              else any(bool(v) for v in values))
    combined["runs"] = len(runs)
    return combined


def combine_target(repeats: Sequence[Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """Per scenario key, the combination of every repeat that ran it."""
    keys: list[str] = []
    for repeat in repeats:
        keys += [k for k in repeat if k not in keys]
    return {key: combine([r[key] for r in repeats if key in r]) for key in keys}


def combine_reference(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    names = [n for n in (runs[0] if runs else {}) if n != "seconds"]
    return {name: median(run.get(name) for run in runs) for name in names}


@dataclass(frozen=True)
class Goal:
    """One bar of the issue, as measured."""

    name: str
    measured: float | None
    bar: str
    met: bool | None  # None: not measured in this run

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _at_least(value: float | None, bar: float) -> bool | None:
    return None if value is None else value >= bar


def _at_most(value: float | None, bar: float) -> bool | None:
    return None if value is None else value <= bar


def _p99(result: Mapping[str, Any] | None) -> float | None:
    if not result:
        return None
    value = result.get("latency_ms", {}).get("p99_ms")
    return None if value is None else float(value)


def _bar_ratio(numerator: float | None, denominator: float | None) -> float | None:
    """A ratio held against a bar: to 3 places, so that 0.696 is not met as 0.70."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return round(numerator / denominator, 3)


def _rate(result: Mapping[str, Any] | None) -> float | None:
    if not result:
        return None
    value = result.get(RATE_FIELDS.get(str(result.get("scenario")), ""), None)
    return None if value is None else float(value)


def goals(targets: Mapping[str, Mapping[str, Any]],
          memory: Mapping[str, Sequence[Mapping[str, Any]]] | None = None) -> list[Goal]:
    """The issue's bars for every concurrency measured on the service."""
    ours = targets.get(SERVICE, {})
    peer = targets.get(LOCKSERVER, {})
    hello = targets.get(HELLO, {})
    found: list[Goal] = []
    for key, result in ours.items():
        scenario, clients = result.get("scenario"), result.get("clients")
        if scenario == "sellout" and key in peer:
            value = _bar_ratio(_rate(result), _rate(peer[key]))
            found.append(Goal(f"{key}: holds/s vs lock-per-request", value,
                              f">= {SELLOUT_RATE_BAR:g}x", _at_least(value, SELLOUT_RATE_BAR)))
            value = _bar_ratio(_p99(result), _p99(peer[key]))
            found.append(Goal(f"{key}: p99 vs lock-per-request", value,
                              f"<= {SELLOUT_P99_BAR:g}x", _at_most(value, SELLOUT_P99_BAR)))
        if scenario == "soldout" and key in peer:
            value = _bar_ratio(_rate(result), _rate(peer[key]))
            found.append(Goal(f"{key}: refusals/s vs lock-per-request", value,
                              f">= {SOLDOUT_BAR:g}x", _at_least(value, SOLDOUT_BAR)))
        if scenario == "read" and key in hello:
            value = _bar_ratio(_rate(result), _rate(hello[key]))
            found.append(Goal(f"{key}: reads/s vs bare aiohttp", value,
                              f">= {READ_BAR:g}x", _at_least(value, READ_BAR)))
            # When the client saturates first, gateway CPU per read still tells them apart.
            value = _bar_ratio(hello[key].get("server_cpu_ms_per_request"),
                               result.get("server_cpu_ms_per_request"))
            found.append(Goal(f"{key}: gateway CPU per read, bare aiohttp / ours "
                              "(Redis CPU not counted)", value, f">= {READ_BAR:g}x",
                              _at_least(value, READ_BAR)))
        if scenario == "many" and result.get("products") == MANY_PRODUCTS:
            if key in peer:
                value = _bar_ratio(_rate(result), _rate(peer[key]))
                found.append(Goal(f"{key}: holds/s vs lock-per-request", value,
                                  f">= {MANY_PEER_BAR:g}x", _at_least(value, MANY_PEER_BAR)))
            one = ours.get(scenario_key("many", int(clients or 0), 1))
            if one:
                value = _bar_ratio(_rate(result), _rate(one))
                found.append(Goal(f"{key}: holds/s vs the service's own on one product", value,
                                  f">= {MANY_FLAT_BAR:g}x", _at_least(value, MANY_FLAT_BAR)))
        if scenario in ("sellout", "many"):
            bad = sum(int(result.get(n) or 0) for n in ("oversold", "leaked",
                                                         "duplicate_hold_ids"))
            found.append(Goal(f"{key}: oversold + leaked + duplicate units", bad, "== 0",
                              bad == 0 and bool(result.get("correct"))))
        if scenario in ("sellout", "soldout") and clients is not None and clients >= 2000:
            errors = errors_of(result)
            found.append(Goal(f"{key}: errors (5xx but shed 503s, transport, other)", errors,
                              "== 0", errors == 0))
    for proc in (memory or {}).get(SERVICE, []):
        peak = float(proc.get("peak_rss_mb") or 0)
        found.append(Goal(f"gateway pid {proc.get('pid')}: peak RSS MB", peak,
                          f"< {MEMORY_BAR_MB:g}", peak < MEMORY_BAR_MB))
    return found


def errors_of(result: Mapping[str, Any]) -> int:
    return sum(int(result.get(n) or 0) for n in ("server_5xx", "transport_errors",
                                                  "other_status"))


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _grid(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    rows = [list(header), *[list(r) for r in rows]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def scenario_rows(targets: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    """One row per (scenario, target): rate, latency percentiles, errors, check."""
    keys: list[str] = []
    for results in targets.values():
        keys += [k for k in results if k not in keys]
    rows = []
    for key in keys:
        for name, results in targets.items():
            result = results.get(key)
            if not result:
                continue
            latency = result.get("latency_ms", {})
            check = result.get("correct")
            if result.get("scenario") == "soldout":
                check = int(result.get("granted_after_soldout") or 0) == 0
            field = RATE_FIELDS.get(str(result.get("scenario")), "?")
            rows.append([key, name, RATE_NAMES.get(field, field),
                         _fmt(_rate(result)), _fmt(latency.get("p50_ms")),
                         _fmt(latency.get("p95_ms")), _fmt(latency.get("p99_ms")),
                         _fmt(latency.get("max_ms")), _fmt(errors_of(result)),
                         _fmt(result.get("shed_503")), _fmt(result.get("accepted_202")),
                         _fmt(result.get("client_cpu_pct"), 0),
                         _fmt(result.get("server_cpu_ms_per_request"), 3),
                         _fmt(result.get("gateway_cpu_ms_per_request"), 3),
                         "-" if check is None else _fmt(bool(check))])
    return rows


def render(summary: Mapping[str, Any]) -> str:
    """The human-readable report printed before the JSON line."""
    targets = summary.get("targets", {})
    lines = [f"flash-sale benchmark: medians of {summary.get('repeat')} run(s); "
             "errors and oversold/leaked units are the worst run", ""]
    lines += _grid(["scenario", "target", "rate of", "rate", "p50 ms", "p95 ms", "p99 ms",
                    "max ms", "errors", "shed 503s", "202s", "client cpu%", "server cpu ms/req",
                    "gateway cpu ms/req", "correct"],
                   scenario_rows(targets))
    reference = summary.get("reference") or {}
    if reference:
        lines += ["", "database reference (same MariaDB, pymysql, one connection):"]
        lines += _grid(["measure", "holds/s"], [[k, _fmt(v)] for k, v in reference.items()])
    memory = summary.get("memory") or {}
    if memory:
        lines += ["", "gateway memory at the end of the run (largest process of each group):"]
        lines += _grid(["target", "pid", "rss MB", "peak rss MB"],
                       [[name, str(p.get("pid")), _fmt(p.get("rss_mb")),
                         _fmt(p.get("peak_rss_mb"))]
                        for name, procs in memory.items() for p in procs])
    exited = summary.get("exited") or {}
    if exited:
        lines += ["", "PROCESSES THAT EXITED DURING THE RUN (name: exit status; see log_dir):"]
        lines += [f"  {name}: {code}" for name, code in exited.items()]
    footprint = summary.get("soldout_footprint") or {}
    if footprint:
        lines += ["", "while the service refused a sold-out product:"]
        lines += _grid(["measure", "value"], [[k, _fmt(v, 2)] for k, v in footprint.items()])
    found = summary.get("goals") or []
    if found:
        lines += ["", "the issue's bars:"]
        lines += _grid(["goal", "measured", "bar", "met"],
                       [[g["name"], _fmt(g["measured"], 3 if g["bar"].endswith("x") else 2),
                         g["bar"],
                         "-" if g["met"] is None else _fmt(bool(g["met"]))] for g in found])
    return "\n".join(lines)


TARGET_NAMES = {SERVICE: "service", LOCKSERVER: "lock-per-request", HELLO: "bare aiohttp"}


def _spread(runs: Sequence[Mapping[str, Any]], field: str) -> str:
    values = [float(r[field]) for r in runs if r.get(field) is not None]
    return f"{min(values):,.0f}-{max(values):,.0f}" if values else "-"


def markdown(summary: Mapping[str, Any]) -> str:
    """The scenario table as Markdown, for docs/BENCHMARKS.md: medians, the spread of
    the runs' rates, and for each 100-product or one-product row its ratio to the peer."""
    targets = summary.get("targets", {})
    runs = summary.get("runs", {})
    lines = ["| scenario | target | rate (median) | runs min-max | p50 ms | p99 ms | max ms | "
             "errors | shed 503s | 202s | gateway CPU ms/req | service CPU ms/req | "
             "x peer |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
             "---: | ---: |"]
    keys: list[str] = []
    for results in targets.values():
        keys += [k for k in results if k not in keys]
    for key in keys:
        for name, results in targets.items():
            result = results.get(key)
            if not result:
                continue
            field = RATE_FIELDS.get(str(result.get("scenario")), "")
            latency = result.get("latency_ms", {})
            mine = [r[key] for r in runs.get(name, []) if key in r]
            peer = targets.get(LOCKSERVER, {}).get(key)
            versus = ratio(_rate(result), _rate(peer)) if name == SERVICE and peer else None
            lines.append(
                f"| {key} | {TARGET_NAMES.get(name, name)} | {_fmt(_rate(result), 0)} "
                f"{RATE_NAMES.get(field, '')} | {_spread(mine, field)} | "
                f"{_fmt(latency.get('p50_ms'), 0)} | {_fmt(latency.get('p99_ms'), 0)} | "
                f"{_fmt(latency.get('max_ms'), 0)} | {errors_of(result)} | "
                f"{_fmt(result.get('shed_503'))} | {_fmt(result.get('accepted_202'))} | "
                f"{_fmt(result.get('gateway_cpu_ms_per_request'), 3)} | "
                f"{_fmt(result.get('server_cpu_ms_per_request'), 3)} | "
                f"{'' if versus is None else f'{versus:.2f}x'} |")
    return "\n".join(lines)


def json_line(summary: Mapping[str, Any]) -> str:
    """The whole summary as one line of JSON."""
    return orjson.dumps(summary, option=orjson.OPT_NON_STR_KEYS).decode()
