"""Throughput with 1, 10 and 200 subscriptions: a runner process and a baseline process, flat out;
and the CPU the largest spends on a backlog (appended while it was stopped).

CPU per 1,000 events is each process's own CPU time (user + system) over the run.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from typing import Any

import httpx
import psutil
import trio

from bench.core import ENV, Bench, cpu_seconds, free_port, stop_process, streaming, until
from runner import SubscriptionSpec


class Progress:
    """How many events a runner or baseline process has handled, as it reports them."""

    def __init__(self) -> None:
        self.handled = 0
        self.batches = 0

    async def read_baseline(self, stdout: trio.abc.ReceiveStream, *, task_status: trio.TaskStatus[None]) -> None:
        buffer, started = b"", False
        async for chunk in stdout:
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            for line in complete:
                self.handled = json.loads(line)["handled"]
                if not started:
                    started = True
                    task_status.started()  # the baseline reports once it follows the wake stream

    async def scrape_runner(self, port: int, *, task_status: trio.TaskStatus[None]) -> None:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as scraper:
            task_status.started()
            while True:
                try:
                    text = (await scraper.get("/metrics")).text
                except httpx.HTTPError:
                    await trio.sleep(0.1)
                    continue
                self.handled = int(_sample(text, "pullwake_events_handled_total"))
                self.batches = int(_sample(text, 'pullwake_batches_total{outcome="ok"}'))
                await trio.sleep(0.1)


async def throughput(bench: Bench) -> None:
    rows = []
    for count in bench.scale.subscriptions:
        runner_row = await _throughput_process(bench, count, use_baseline=False)
        baseline_row = await _throughput_process(bench, count, use_baseline=True)
        rows.append({"subscriptions": count, "runner": runner_row, "baseline": baseline_row})
    count = bench.scale.backlog_subscriptions
    backlog = {
        "subscriptions": count,
        "runner": await _throughput_process(bench, count, use_baseline=False, backlog=True),
        "baseline": await _throughput_process(bench, count, use_baseline=True, backlog=True),
    }
    bench.results["throughput"] = {"events": bench.scale.throughput_events, "rows": rows, "backlog": backlog}


async def _throughput_process(bench: Bench, count: int, *, use_baseline: bool, backlog: bool = False) -> dict[str, Any]:
    """Events appended flat out while the process works them off; or, with `backlog`, appended
    while the process (already following its wake stream) is stopped with SIGSTOP, then worked
    off after SIGCONT: the CPU it spends on the backlog alone."""
    uid, wake = bench.names("tpb" if use_baseline else "tp")
    specs = tuple(SubscriptionSpec(id=f"sub-{uid}-{i}", pattern=f"{uid}/s{i}/*") for i in range(count))
    streams = [f"{uid}/s{i}/x" for i in range(count)]
    await bench.prepare(wake, streams, specs)
    progress = Progress()
    port = free_port()
    with (bench.scratch / f"{uid}.log").open("wb") as log:
        if use_baseline:
            argv = [sys.executable, "-m", "bench.baseline", bench.url, wake, ",".join(spec.id for spec in specs)]
            process = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, stderr=log, env=ENV)
        else:
            config = bench.runner_config(uid, wake, specs, port=port)
            argv = [sys.executable, "-m", "runner", "run", "--config", str(config), "--log-level", "warning"]
            process = await trio.lowlevel.open_process(argv, stdout=log, stderr=log, env=ENV)
    usage = psutil.Process(process.pid)
    try:
        async with trio.open_nursery() as nursery:
            if use_baseline:
                assert process.stdout is not None
                await nursery.start(progress.read_baseline, process.stdout)
            else:
                await until(lambda: streaming(port), 60, "the runner to stream")
                if not backlog:
                    await nursery.start(progress.scrape_runner, port)
            if backlog:
                await trio.sleep(1.0)  # let the start-up sweep finish
                process.send_signal(signal.SIGSTOP)
                try:
                    produced = await produce_flat_out(bench, streams, bench.scale.throughput_events)
                    cpu_before = cpu_seconds(usage)
                    started = produced_at = time.perf_counter()
                finally:
                    process.send_signal(signal.SIGCONT)
                if not use_baseline:
                    await nursery.start(progress.scrape_runner, port)
            else:
                cpu_before = cpu_seconds(usage)
                started = time.perf_counter()
                produced = await produce_flat_out(bench, streams, bench.scale.throughput_events)
                produced_at = time.perf_counter()
            await until(lambda: progress.handled >= produced, 300, f"{produced} events handled")
            finished = time.perf_counter()
            cpu = cpu_seconds(usage) - cpu_before
            nursery.cancel_scope.cancel()
    finally:
        await stop_process(process)
    elapsed = finished - started
    row = {
        "events": produced,
        "seconds": elapsed,
        "events_per_s": produced / elapsed,
        "cpu_s_per_1000_events": cpu / produced * 1000,
    }
    if not backlog:
        row["producer_events_per_s"] = produced / (produced_at - started)
    if not use_baseline:
        row["batches_per_s"] = progress.batches / elapsed
        # A stop longer than the wake stream's silence limit (75 s) makes the runner reconnect
        # after SIGCONT: that work is then part of the backlog figure.
        row["wake_stream_reconnected"] = "wake.stream_error" in (bench.scratch / f"{uid}.log").read_text()
    return row


async def produce_flat_out(bench: Bench, streams: list[str], events: int, concurrency: int = 32) -> int:
    sent = 0

    async def producer(index: int) -> None:
        nonlocal sent
        n = index
        while n < events:
            await bench.producer.append(streams[n % len(streams)], {"n": n, "pad": "x" * 64})
            sent += 1
            n += concurrency

    async with trio.open_nursery() as nursery:
        for index in range(concurrency):
            nursery.start_soon(producer, index)
    return sent


def _sample(exposition: str, series: str) -> float:
    """The value of one series (name plus labels, exactly as exposed) in a Prometheus exposition."""
    for line in exposition.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
