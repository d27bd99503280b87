"""The flash-sale benchmark: drives a running service over HTTP and reports rates as ratios.

``python -m bench --help`` lists the scenarios and options; docs/BENCHMARKS.md explains the
method. Pure pieces (statistics, aggregation, report formatting) live in ``bench.stats`` and
``bench.report`` and are unit-tested; everything that does I/O is in the other modules.
"""

from __future__ import annotations

__all__ = ["BENCH_VERSION"]

BENCH_VERSION = 1  # bumped when the JSON line changes shape
