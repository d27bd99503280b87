"""The benchmark's pure pieces: statistics, combining runs, goals, report, argument parsing.

No network and no timing assertions: the numbers here are made up.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from aiohttp import web

import bench.__main__ as bench_main
from bench import report, wrk
from bench.__main__ import int_list, options_from, parser, scenario_list
from bench.client import Http, Target, new_session
from bench.lockserver import take_hold
from bench.scenarios import spread, stock_check
from bench.stats import median, percentile, rate, ratio, summarize, worst


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile(values, 0) == 1.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None


def test_percentile_rejects_out_of_range() -> None:
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summarize_reports_milliseconds() -> None:
    summary = summarize([0.003, 0.001, 0.002, 0.010])
    assert summary.count == 4
    assert summary.p50_ms == 2.0
    assert summary.p99_ms == 10.0
    assert summary.max_ms == 10.0
    assert summarize([]).as_dict() == {"count": 0, "p50_ms": None, "p95_ms": None,
                                       "p99_ms": None, "max_ms": None}


def test_rate_median_worst_ratio() -> None:
    assert rate(500, 10.0, 12.0) == 250.0
    assert rate(0, 10.0, 12.0) is None
    assert rate(5, 12.0, 12.0) is None
    assert rate(5, None, 12.0) is None
    assert median([3.0, None, 1.0, 2.0]) == 2.0
    assert median([None]) is None
    assert worst([0, 3, None, 1]) == 3
    assert ratio(1000.0, 250.0) == 4.0
    assert ratio(1.0, 0) is None
    assert ratio(None, 2.0) is None


def test_stock_check_separates_oversold_from_leaked() -> None:
    exact = stock_check(stock=100, granted=100, unique=100, available=0)
    assert (exact["oversold"], exact["leaked"], exact["duplicate_hold_ids"]) == (0, 0, 0)
    over = stock_check(stock=100, granted=103, unique=102, available=0)
    assert (over["oversold"], over["duplicate_hold_ids"]) == (2, 1)
    leak = stock_check(stock=100, granted=95, unique=95, available=2)
    assert (leak["oversold"], leak["leaked"]) == (0, 3)
    assert stock_check(stock=1, granted=1, unique=1, available=None)["leaked"] is None


def test_spread_gives_every_product_a_client_and_every_client_work() -> None:
    assert spread([1, 2], 5) == [[1], [2], [1], [2], [1]]
    shares = spread(list(range(10)), 3)
    assert sorted(p for share in shares for p in share) == list(range(10))
    assert all(shares)


def sellout_result(rate_: float, p99: float, **extra: Any) -> dict[str, Any]:
    return {"scenario": "sellout", "clients": 200, "holds_per_s": rate_,
            "latency_ms": {"count": 10, "p50_ms": p99 / 2, "p95_ms": p99, "p99_ms": p99,
                           "max_ms": p99}, "server_5xx": 0, "transport_errors": 0,
            "other_status": 0, "oversold": 0, "leaked": 0, "duplicate_hold_ids": 0,
            "correct": True, **extra}


def test_combine_takes_medians_of_rates_and_worst_of_errors() -> None:
    runs = [sellout_result(100.0, 50.0), sellout_result(300.0, 30.0, server_5xx=2),
            sellout_result(200.0, 40.0, correct=False)]
    combined = report.combine(runs)
    assert combined["holds_per_s"] == 200.0
    assert combined["latency_ms"]["p99_ms"] == 40.0
    assert combined["server_5xx"] == 2
    assert combined["correct"] is False
    assert combined["runs"] == 3
    by_key = report.combine_target([{"sellout c=200": runs[0]}, {"sellout c=200": runs[1]}])
    assert by_key["sellout c=200"]["holds_per_s"] == 200.0


def test_goals_compare_service_with_its_peers() -> None:
    key = report.scenario_key("sellout", 200)
    targets = {
        report.SERVICE: {key: sellout_result(2500.0, 100.0),
                         "read c=200": {"scenario": "read", "clients": 200, "reads_per_s": 3000.0,
                                        "server_cpu_ms_per_request": 0.4}},
        report.LOCKSERVER: {key: sellout_result(250.0, 2800.0)},
        report.HELLO: {"read c=200": {"scenario": "read", "clients": 200, "reads_per_s": 5000.0,
                                      "server_cpu_ms_per_request": 0.1}},
    }
    memory = {report.SERVICE: [{"pid": 7, "rss_mb": 80.0, "peak_rss_mb": 160.0}]}
    found = {g.name: g for g in report.goals(targets, memory)}
    assert found["sellout c=200: holds/s vs lock-per-request"].measured == 10.0
    assert found["sellout c=200: holds/s vs lock-per-request"].met is True
    assert found["sellout c=200: p99 vs lock-per-request"].measured == 0.036
    assert found["read c=200: reads/s vs bare aiohttp"].measured == 0.6
    cpu = found["read c=200: gateway CPU per read, bare aiohttp / ours (Redis CPU not counted)"]
    assert (cpu.measured, cpu.met) == (0.25, False)
    assert found["gateway pid 7: peak RSS MB"].met is False


def test_a_bar_is_held_against_the_ratio_to_three_places() -> None:
    """6,244 holds/s on 100 products against 8,971 on one is 0.696: short of 0.7, even
    though it shows as 0.70 to two places."""
    many = {report.scenario_key("many", 200, k): {"scenario": "many", "products": k,
                                                  "clients": 200, "holds_per_s": rate,
                                                  "correct": True}
            for k, rate in ((1, 8971.0), (100, 6244.0))}
    peer = {report.scenario_key("many", 200, 100): {"scenario": "many", "products": 100,
                                                    "clients": 200, "holds_per_s": 1561.0}}
    found = {g.name: g for g in report.goals({report.SERVICE: many, report.LOCKSERVER: peer})}
    flat = found["many k=100 c=200: holds/s vs the service's own on one product"]
    assert (flat.measured, flat.met) == (0.696, False)
    versus = found["many k=100 c=200: holds/s vs lock-per-request"]
    assert (versus.measured, versus.met) == (4.0, True)
    assert "0.696" in report.render({"goals": [flat.as_dict()]})


def test_render_and_json_line() -> None:
    key = report.scenario_key("sellout", 200)
    summary = {"repeat": 3, "targets": {report.SERVICE: {key: sellout_result(2500.0, 100.0)}},
               "reference": {"commit_per_hold_holds_per_s": 600.0},
               "goals": [report.Goal("a goal", 1.5, ">= 5x", False).as_dict()],
               "exited": {"service/web.1": -9}}
    text = report.render(summary)
    assert "sellout c=200" in text and "2,500.0" in text and "holds/s" in text
    assert "commit_per_hold_holds_per_s" in text
    assert "service/web.1: -9" in text
    line = report.json_line(summary)
    assert "\n" not in line
    assert orjson.loads(line)["targets"][report.SERVICE][key]["holds_per_s"] == 2500.0


def test_plot_without_matplotlib_is_refused_before_anything_runs(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(bench_main, "can_plot", lambda: False)
    monkeypatch.setattr(bench_main, "Bench", None)  # running anything would raise

    assert bench_main.main(["--start", "--plot", "out.png"]) == 2

    assert "pip install -e '.[bench]'" in capsys.readouterr().err


def test_argument_parsing() -> None:
    assert int_list("50,200,800") == (50, 200, 800)
    assert scenario_list("all") == ("sellout", "soldout", "read", "many", "reference")
    assert scenario_list("read,sellout") == ("read", "sellout")
    with pytest.raises(Exception, match="unknown scenario"):
        scenario_list("sellout,nope")
    quick = options_from(parser().parse_args(["--quick", "--stock", "300"]))
    assert (quick.repeat, quick.stock, quick.read_seconds) == (1, 300, 2.0)
    explicit = options_from(parser().parse_args(["--quick", "--stock", "5000"]))
    assert (explicit.repeat, explicit.stock) == (1, 5000)
    plain = options_from(parser().parse_args(["--clients", "2000"]))
    assert (plain.repeat, plain.stock, plain.clients) == (3, 5000, (2000,))


class FakeCursor:
    """Just enough of a pymysql cursor for the peer's hold."""

    def __init__(self, row: tuple[int, int] | None) -> None:
        self.row = row
        self.statements: list[str] = []

    def execute(self, sql: str, args: Any = None) -> int:
        self.statements.append(sql.split()[0])
        return 1

    def fetchone(self) -> tuple[int, int] | None:
        return self.row


def test_lockserver_hold_locks_then_writes_or_refuses() -> None:
    granted = FakeCursor((10, 9))
    assert take_hold(granted, 1, 1, "h1")[0] == 201
    assert granted.statements == ["SELECT", "UPDATE", "INSERT"]
    refused = FakeCursor((10, 10))
    assert take_hold(refused, 1, 1, "h2") == (409, 0)
    assert refused.statements == ["SELECT"]
    assert take_hold(FakeCursor(None), 1, 1, "h3") == (404, None)


def test_plot_series_picks_each_targets_points_in_order() -> None:
    from bench.plot import series

    targets = {"service": {"sellout c=800": sellout_result(900.0, 80.0, clients=800),
                           "sellout c=50": sellout_result(1000.0, 10.0, clients=50),
                           "many k=10 c=200": {"scenario": "many", "products": 10}}}
    assert series(targets, "sellout", "clients") == {
        "service": [(50.0, 1000.0, 10.0), (800.0, 900.0, 80.0)]}
    assert series(targets, "read", "clients") == {}


def test_markdown_table_gives_medians_spread_and_the_ratio_to_the_peer() -> None:
    key = report.scenario_key("sellout", 200)
    runs = [sellout_result(r, 100.0) for r in (2000.0, 2600.0, 2500.0)]
    summary = {"targets": {report.SERVICE: {key: report.combine(runs)},
                           report.LOCKSERVER: {key: sellout_result(500.0, 400.0)}},
               "runs": {report.SERVICE: [{key: r} for r in runs],
                        report.LOCKSERVER: [{key: sellout_result(500.0, 400.0)}]}}
    table = report.markdown(summary).splitlines()
    assert len(table) == 4
    assert "| sellout c=200 | service | 2,500 holds/s | 2,000-2,600 |" in table[2]
    assert table[2].endswith("| 5.00x |")
    assert table[3].startswith("| sellout c=200 | lock-per-request | 500 holds/s |")


WRK_OUTPUT = """Running 5s test @ http://127.0.0.1:8001
  2 threads and 200 connections
Requests/sec:  10000.00
BENCH_RESULT {"duration_us":2500000,"requests":5230,"statuses":{"201":5000,"409":200,\
"202":3,"503":20,"500":4,"404":3},"hold_ids":5000,"unique_hold_ids":4999,\
"errors":{"connect":0,"read":1,"write":0,"timeout":2},\
"latency_us":{"count":5230,"p50":41000,"p95":80500,"p99":120250,"max":300000}}
"""


def test_wrk_result_line_becomes_the_python_clients_fields() -> None:
    found = wrk.parse(WRK_OUTPUT)
    assert found.duration_s == 2.5 and found.rate(201) == 2000.0 and found.rate(418) is None
    assert (found.hold_ids, found.unique_hold_ids) == (5000, 4999)
    common = found.common()
    assert (common["ok"], common["refused_409"], common["accepted_202"]) == (5000, 200, 3)
    assert (common["shed_503"], common["server_5xx"], common["other_status"]) == (20, 4, 3)
    assert common["transport_errors"] == 3 and common["errors"] == {"read": 1, "timeout": 2}
    assert common["latency_ms"] == {"count": 5230, "p50_ms": 41.0, "p95_ms": 80.5,
                                    "p99_ms": 120.25, "max_ms": 300.0}
    assert common["driver"] == "wrk"
    with pytest.raises(RuntimeError, match="no result line"):
        wrk.parse("Running 5s test\nunable to connect to 127.0.0.1:8001\n")


def test_wrk_rates_run_from_the_first_request_to_the_last_answer_counted() -> None:
    """As the Python client counts: a sellout's grants over the time until the last
    grant, not until the refusals that end each thread have come back."""
    line = WRK_OUTPUT.replace('{"duration_us":2500000,',
                              '{"duration_us":2500000,"first_us":1000000000,'
                              '"last_us":{"201":1002000000,"409":1002400000},')
    found = wrk.parse(line)
    assert found.duration_s == 2.5  # wrk's start to its last thread's stop
    assert found.rate(201) == 2500.0  # 5,000 grants in the 2 s to the last one
    assert found.rate(409) == 83.3  # 200 refusals in 2.4 s
    assert found.rate(500) == 1.6  # no instant for it: over the whole run


def test_wrk_command_gives_each_gateway_a_thread() -> None:
    urls = ["http://127.0.0.1:8001", "http://localhost:8002"]
    cmd = wrk.command("wrk", urls, 200, 2.2, 60)
    assert cmd[:5] == ["wrk", "-t2", "-c200", "-d3s", "--timeout"]
    assert cmd[-1] == urls[0] and cmd[-2].endswith("wrk.lua")
    assert [wrk.host_port(u) for u in urls] == ["127.0.0.1:8001", "localhost:8002"]
    with pytest.raises(ValueError, match="plain http"):
        wrk.host_port("https://127.0.0.1:8443")
    # A thread stops after more refusals in a row than products it takes in turn, plus its
    # connections' answers still on the way.
    assert wrk.refusal_run(1, 200, 2) == 102 and wrk.refusal_run(100, 200, 2) == 300
    assert options_from(parser().parse_args(["--driver", "wrk"])).driver == "wrk"


async def test_a_product_creation_turned_away_is_sent_again_after_retry_after(
        aiohttp_server: Any) -> None:
    answers = [web.json_response({"status": 503}, status=503, headers={"Retry-After": "0"}),
               web.json_response({"id": 42}, status=201)]
    seen: list[str] = []

    async def create(request: web.Request) -> web.Response:
        seen.append(request.headers["Authorization"])
        return answers.pop(0)

    app = web.Application()
    app.router.add_post("/api/admin/products", create)
    server = await aiohttp_server(app)
    async with new_session(5) as session:
        http = Http(session, Target("service", [str(server.make_url("")).rstrip("/")], "t"), 5)
        assert await http.create_product(10, "retry") == 42
    assert seen == ["Bearer t", "Bearer t"]
