"""``flashsale bench --driver wrk`` against a started service: real wrk, real processes.

The sellout and the many runs must end because the stock ran out (each wrk thread stops
once it has seen enough refusals, and the benchmark then interrupts wrk), not at wrk's
``-d`` bound; every unit must be granted exactly once to what wrk saw.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tests.services import missing_service, require_mysql, require_redis

pytestmark = pytest.mark.integration

BOUND_S = 120  # --timeout: a run that ignored its stop rule would last this long


def test_wrk_driver_sells_out_and_stops_on_its_own(tmp_path: Path) -> None:
    if shutil.which("wrk") is None:
        missing_service("no wrk (Debian package wrk; .ci/run installs it)")
    mysql = require_mysql().rsplit("/", 1)[0] + "/"
    out = tmp_path / "result.json"
    # A process of its own: the benchmark installs uvloop and raises its file limit.
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--start", "--quick", "--driver", "wrk",
         "--scenario", "sellout,soldout,read,many", "--products", "1,10",
         "--timeout", str(BOUND_S), "--mysql-url", mysql, "--redis-url", require_redis(),
         "--log-dir", str(tmp_path / "logs"), "--json-out", str(out)],
        capture_output=True, text=True, timeout=4 * BOUND_S, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = orjson.loads(out.read_bytes())
    assert summary["settings"]["driver"] == "wrk"
    assert summary["correct"] is True
    found = summary["targets"]["service"]

    sellout = found["sellout c=200"]
    assert sellout["driver"] == "wrk"
    assert sellout["ok"] == sellout["unique_hold_ids"] == sellout["stock"] == 1000
    assert sellout["available_after"] == 0
    assert sellout["refused_409"] >= 1
    assert sellout["holds_per_s"] > 0 and sellout["latency_ms"]["p99_ms"] > 0
    assert sellout["elapsed_s"] < BOUND_S / 2 and not sellout["timed_out"]

    soldout = found["soldout c=200"]
    assert soldout["granted_after_soldout"] == 0
    assert soldout["refused_409"] == soldout["requests"] > 0

    read = found["read c=200"]
    assert read["ok"] == read["requests"] > 0 and read["reads_per_s"] > 0

    for k in (1, 10):
        many = found[f"many k={k} c=200"]
        assert many["correct"] is True, many
        assert many["granted"] == many["unique_hold_ids"] == many["stock"]
        assert many["elapsed_s"] < BOUND_S / 2 and not many["timed_out"]
    for result in found.values():
        assert result["transport_errors"] == result["server_5xx"] == 0
