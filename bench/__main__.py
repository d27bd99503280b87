"""``python -m bench``: load-test a flash-sale deployment over HTTP, next to its peers.

Drives an already running service (``--url``), or starts one itself (``--start``: a fresh
database and Redis database, the Procfile's release, web, worker and scheduler), runs the
scenarios, prints a line of progress every second on stderr, then a table and one JSON
line on stdout. ``--compare`` runs the same scenarios against the lock-per-request peer
(``bench.lockserver``) and the read scenario against a bare aiohttp server
(``bench.hello``), both started here unless their URLs are given.

Exit status: 0 when every correctness check held (nothing oversold, leaked or duplicated,
no grant on a sold-out product), 1 when one did not, 2 when a target could not be started
or reached. Unmet performance bars are reported, never a failure.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import resource
import shutil
import sys
from pathlib import Path

import aiohttp

from bench import report
from bench.procs import StartError
from bench.runner import ALL_SCENARIOS, DRIVERS, Bench, Options, log

QUICK = {"stock": 1000, "repeat": 1, "soldout_seconds": 2.0, "read_seconds": 2.0,
         "reference_seconds": 1.0}


def int_list(value: str) -> tuple[int, ...]:
    try:
        found = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 50,200,800: {value!r}") from None
    if not found or min(found) < 1:
        raise argparse.ArgumentTypeError(f"expected positive numbers: {value!r}")
    return found


def scenario_list(value: str) -> tuple[str, ...]:
    if value.strip() == "all":
        return ALL_SCENARIOS
    found = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [v for v in found if v not in ALL_SCENARIOS]
    if unknown or not found:
        raise argparse.ArgumentTypeError(
            f"unknown scenario {unknown}; choose from {', '.join(ALL_SCENARIOS)} or all")
    return found


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    target = p.add_argument_group("what to measure")
    target.add_argument("--url", default=Options.url,
                        help="gateway URL(s), comma-separated, used in turn (default %(default)s)")
    target.add_argument("--admin-token", default=os.environ.get("ADMIN_TOKEN"),
                        help="bearer token for creating products (default $ADMIN_TOKEN)")
    target.add_argument("--target", choices=("service", "lockserver"), default="service",
                        help="what --url (or --start) is: the service or the peer")
    target.add_argument("--start", action="store_true",
                        help="start the target here (fresh database + Redis db), stop it after")
    target.add_argument("--compare", action="store_true",
                        help="also measure the lock-per-request peer and a bare aiohttp server")
    target.add_argument("--lock-mode", choices=("queued", "spin"), default="queued",
                        help="a started peer's waiting: an in-process queue in front of the "
                             "Redis lock (default), or every request spinning on it")
    target.add_argument("--lockserver-url", help="a running peer instead of starting one")
    target.add_argument("--lockserver-token", help="its admin token")
    target.add_argument("--hello-url", help="a running bare aiohttp server for the read ratio")
    load = p.add_argument_group("load")
    load.add_argument("--scenario", type=scenario_list, default=ALL_SCENARIOS,
                      help=f"comma-separated: {','.join(ALL_SCENARIOS)} or all (default all)")
    load.add_argument("--clients", type=int_list, default=Options.clients,
                      help="concurrent clients; a list (50,200,800) repeats sellout, soldout "
                           "and read at each (default 200)")
    load.add_argument("--stock", type=int,
                      help="units of the sellout product; many splits it over its products "
                           f"(default {Options.stock})")
    load.add_argument("--products", type=int_list, default=Options.products,
                      help="hot products of the many scenario (default 1,10,100; the issue's "
                           "curve: 1,10,100,1000)")
    load.add_argument("--many-stock", type=int,
                      help="units the many scenario splits over its products (default: "
                           "--stock)")
    load.add_argument("--many-clients", type=int, default=Options.many_clients,
                      help="clients of the many scenario (default %(default)s)")
    load.add_argument("--soldout-seconds", type=float,
                      help=f"(default {Options.soldout_seconds:g})")
    load.add_argument("--read-seconds", type=float, help=f"(default {Options.read_seconds:g})")
    load.add_argument("--reference-seconds", type=float,
                      help="each of the two database measurements "
                           f"(default {Options.reference_seconds:g})")
    load.add_argument("--repeat", type=int,
                      help=f"runs of everything; the report shows medians (default "
                           f"{Options.repeat})")
    load.add_argument("--timeout", type=float, default=Options.timeout,
                      help="bound on each sellout / many run, seconds (default %(default)s)")
    load.add_argument("--request-timeout", type=float, default=Options.request_timeout,
                      help="bound on one request, job polling included (default %(default)s)")
    load.add_argument("--driver", choices=sorted(DRIVERS), default=Options.driver,
                      help="who sends the load: this Python client (default), or wrk, a "
                           "load generator in C (Debian package wrk; see bench/wrk.py for "
                           "how its runs differ)")
    load.add_argument("--quick", action="store_true",
                      help="stock 1000, one run, 2 s soldout/read, 1 s reference")
    where = p.add_argument_group("where things run")
    where.add_argument("--webs", type=int, default=Options.webs,
                       help="gateway processes of started targets (default %(default)s)")
    where.add_argument("--workers", type=int, default=Options.workers,
                       help="worker processes of a started service (default %(default)s)")
    where.add_argument("--mysql-url", default=os.environ.get("BENCH_MYSQL_URL", Options.mysql_url),
                       help="MariaDB server for --start, the peer and the reference")
    where.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", Options.redis_url),
                       help="Redis server for --start and the peer (a free db index is used)")
    where.add_argument("--procfile", help="the service's Procfile for --start "
                                          "(default ./Procfile, else the checkout's)")
    where.add_argument("--log-dir", help="where started processes log (default a temp dir)")
    out = p.add_argument_group("output")
    out.add_argument("--json-out", type=Path, help="also write the JSON line to this file")
    out.add_argument("--plot", type=Path, help="write a PNG of holds/s and p99 (needs matplotlib)")
    out.add_argument("--replot", type=Path, metavar="JSON",
                     help="only redraw --plot (and print --markdown) from a saved JSON "
                          "line, run nothing")
    out.add_argument("--markdown", action="store_true",
                     help="also print the scenario table as Markdown (for the docs)")
    return p


def options_from(args: argparse.Namespace) -> Options:
    chosen = {name: getattr(args, name) for name in (
        "url", "admin_token", "target", "start", "compare", "lockserver_url",
        "lockserver_token", "hello_url", "clients", "products", "many_clients", "many_stock",
        "timeout",
        "request_timeout", "lock_mode", "webs", "workers", "mysql_url", "redis_url", "log_dir",
        "procfile", "driver")}
    chosen["scenarios"] = args.scenario
    presets = QUICK if args.quick else {}
    for name in QUICK:  # given explicitly > --quick > the Options default
        value = getattr(args, name)
        chosen[name] = value if value is not None else presets.get(name,
                                                                   getattr(Options, name))
    return Options(**chosen)


def raise_file_limit() -> None:
    """Thousands of client connections need thousands of descriptors (started servers too)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - optional off Linux
        return
    uvloop.install()


def can_plot() -> bool:
    """Whether ``--plot`` can draw: matplotlib is an extra (``pip install -e '.[bench]'``)."""
    return importlib.util.find_spec("matplotlib") is not None


def main(argv: list[str] | None = None) -> int:
    """The ``python -m bench`` / ``flashsale bench`` entry point; returns the exit status."""
    args = parser().parse_args(argv)
    if args.plot and not can_plot():  # said before a run of minutes, not after it
        log("--plot needs matplotlib: .venv/bin/pip install -e '.[bench]'")
        return 2
    if args.replot:
        import orjson

        from bench.plot import draw

        if not args.plot and not args.markdown:
            log("--replot needs --plot PATH or --markdown")
            return 2
        saved = orjson.loads(args.replot.read_bytes())
        if args.markdown:
            print(report.markdown(saved))
        if args.plot:
            draw(saved, args.plot)
            log(f"wrote {args.plot}")
        return 0
    options = options_from(args)
    if options.repeat < 1 or options.stock < 1:
        log("--repeat and --stock must be at least 1")
        return 2
    if options.driver == "wrk" and shutil.which("wrk") is None:
        log("--driver wrk needs wrk on the PATH (Debian: apt-get install wrk)")
        return 2
    raise_file_limit()
    install_uvloop()
    bench = Bench(options)
    try:
        bench.prepare()
        summary = asyncio.run(bench.run())
    except StartError as exc:
        log(f"could not start a target: {exc}")
        return 2
    except (aiohttp.ClientError, OSError, RuntimeError) as exc:
        log(f"the benchmark stopped: {type(exc).__name__}: {exc}")
        return 2
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        bench.close()
    print(report.render(summary))
    if args.markdown:
        print(report.markdown(summary))
    line = report.json_line(summary)
    print(line, flush=True)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(line + "\n")
    if args.plot:
        from bench.plot import draw

        log(f"wrote {draw(summary, args.plot)}")
    return 0 if summary["correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
