"""`python -m bench`: what users feel, measured the same way every time.

Starts the pinned reference server on loopback and measures, in one run:
wake-to-handler latency and CPU per event (bench/latency.py), throughput with 1/10/200
subscriptions (bench/throughput.py), recovery from faults (bench/recovery.py), idle and
peak footprint, start() and stop() times (bench/footprint.py), what traces cost
(bench/tracing.py), what a claim costs the journal at 10 and 1,000 subscriptions
(bench/journal.py), a fleet of 1/4/12 runner processes on one wake stream with 200 and 1,000
subscriptions, its start and a server restart under load (bench/fleet.py). Latency, CPU and
throughput are also measured for a bare-httpx baseline (bench/baseline.py) and printed as
ratios, with issue 15's goals (issue 22's for the fleet).
Writes a table to stdout and JSON to bench/results/latest.json.

    python -m bench                      # everything (several minutes)
    python -m bench --smoke              # a tiny configuration, to check the bench runs
    python -m bench --only recovery      # some sections (comma-separated)
    python -m bench --only tracing       # the latency workload with traces off, API only, and an SDK
    python -m bench --only journal       # claimed → fsynced, and event-loop CPU, per claim, old and new
    python -m bench --only runs          # durable runs: a step, resuming, replaying 1,000 steps, kill -9 chaos
    python -m bench --only fleet         # N runner processes x M subscriptions: claims per wake, CPU, restart
    python -m bench --only fleet --fleet-seconds 60 --fleet-rate 40   # a longer steady phase
    python -m bench --only fleet --fleet-runners 1 --fleet-subscriptions 1000 --keep /tmp/b   # one row, logs kept
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from bench import core
from bench.core import FULL, RESULTS, SMOKE, Bench, Scale
from bench.fleet import fleet
from bench.fleet import render as render_fleet
from bench.footprint import footprint, start, stop
from bench.journal import journal
from bench.journal import render as render_journal
from bench.latency import latency
from bench.recovery import recovery
from bench.report import machine_info, render
from bench.runs import render as render_runs
from bench.runs import runs
from bench.throughput import throughput
from bench.tracing import render as render_tracing
from bench.tracing import tracing
from runner._service.devserver import DevServer
from runner._wire.client import StreamsClient, build_http

SECTIONS: dict[str, Callable[[Bench], Awaitable[None]]] = {
    "latency": latency,
    "throughput": throughput,
    "recovery": recovery,
    "footprint": footprint,
    "start": start,
    "stop": stop,
    "tracing": tracing,
    "journal": journal,
    "runs": runs,
    "fleet": fleet,
}


async def main(scale: Scale, sections: list[str], keep: Path | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="pullwake-bench-") as temporary:
        scratch = str(keep) if keep is not None else temporary
        Path(scratch).mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (before anything runs)
        server = DevServer(log_file=Path(scratch) / "server.log")
        await trio.to_thread.run_sync(server.start)
        try:
            assert server.url is not None
            async with build_http(server.url, timeout=30) as http:
                bench = Bench(server, scale, Path(scratch), StreamsClient(http))
                bench.results["machine"] = machine_info()
                for section in sections:
                    print(f"... {section}", file=sys.stderr, flush=True)
                    started = time.perf_counter()
                    await SECTIONS[section](bench)
                    print(f"    {section} took {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
        finally:
            server.stop()
    results = bench.results
    results["scale"] = scale.__dict__ | {"subscriptions": list(scale.subscriptions)}
    return results


def cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny configuration, to check the bench runs")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {tuple(SECTIONS)}")
    parser.add_argument("--out", type=Path, default=RESULTS / "latest.json", help="where the JSON goes")
    parser.add_argument(
        "--runner-python",
        help="the Python that runs `pullwake run` processes, e.g. a venv with `pip install .` and no dev extra "
        "(this source tree comes first on its path)",
    )
    parser.add_argument("--fleet-seconds", type=float, help="steady phase of each fleet row, s (default 20)")
    parser.add_argument("--fleet-rate", type=float, help="events/s the fleet section appends (default 40)")
    parser.add_argument("--fleet-runners", help="comma-separated N of the fleet rows (default 1,4,12)")
    parser.add_argument("--fleet-subscriptions", help="comma-separated M of the fleet rows (default 200,1000)")
    parser.add_argument(
        "--fleet-partitioned",
        action="store_true",
        help="each fleet runner its own wake stream and M/N of the subscriptions (what not reading every wake costs)",
    )
    parser.add_argument("--keep", type=Path, help="keep the scratch files (runner logs, configs) in this directory")
    options = parser.parse_args()
    if options.runner_python:
        core.RUNNER_PYTHON[0] = options.runner_python
    sections = [name.strip() for name in options.only.split(",") if name.strip()]
    if unknown := set(sections) - set(SECTIONS):
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    scale = SMOKE if options.smoke else FULL
    if options.fleet_seconds is not None:
        scale = dataclasses.replace(scale, fleet_seconds=options.fleet_seconds)
    if options.fleet_rate is not None:
        scale = dataclasses.replace(scale, fleet_rate=options.fleet_rate)
    if options.fleet_runners:
        scale = dataclasses.replace(scale, fleet_runners=tuple(int(n) for n in options.fleet_runners.split(",")))
    if options.fleet_partitioned:
        scale = dataclasses.replace(scale, fleet_partitioned=True)
    if options.fleet_subscriptions:
        scale = dataclasses.replace(
            scale, fleet_subscriptions=tuple(int(m) for m in options.fleet_subscriptions.split(","))
        )
    results = trio.run(main, scale, sections, options.keep)
    results["machine"]["load_average_after"] = list(os.getloadavg())
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(results, indent=2))
    print(
        render(results)
        + render_tracing(results)
        + render_journal(results)
        + render_runs(results)
        + render_fleet(results),
        end="",
    )
    print(f"(JSON: {options.out})", file=sys.stderr)


if __name__ == "__main__":
    cli()
