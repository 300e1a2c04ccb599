"""What a runner costs when little happens: idle and peak RSS, idle CPU, start() and stop() times.

The footprint process is `pullwake run` with no control socket and no metrics listener (the
configuration issue 15's RSS goal is about); the bench learns that it streams from its log's
`"target": "streaming"` line and what it handled from the file its handler writes.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import psutil
import trio

from bench.core import (
    Bench,
    cpu_seconds,
    logged_streaming,
    peak_rss,
    recorded,
    start_runner_process,
    stop_process,
    until,
)
from bench.throughput import produce_flat_out
from machine import State
from runner import Batch, Runner, SubscriptionSpec


async def footprint(bench: Bench) -> None:
    uid, wake = bench.names("idle")
    stream = f"{uid}/a"
    await bench.producer.create_stream(stream)
    spec = SubscriptionSpec(id=f"sub-{uid}", pattern=f"{uid}/*")
    config = bench.runner_config(uid, wake, (spec,), handler="bench.handlers:record")
    record, log = bench.scratch / f"{uid}.jsonl", bench.scratch / f"{uid}.log"
    process = await start_runner_process(config, log, BENCH_RECORD=str(record))
    usage = psutil.Process(process.pid)
    try:
        await until(lambda: logged_streaming(log), 60, "the idle runner to stream")
        await trio.sleep(1.0)  # let the start-up sweep finish
        cpu0, switches0, t0 = cpu_seconds(usage), sum(usage.num_ctx_switches()), time.perf_counter()
        await trio.sleep(bench.scale.idle_seconds)
        cpu1, switches1, t1 = cpu_seconds(usage), sum(usage.num_ctx_switches()), time.perf_counter()
        rss = usage.memory_info().rss
        # Then some work, for the high-water mark.
        events = await produce_flat_out(bench, [stream], bench.scale.peak_events)
        await until(lambda: len(recorded(record)) >= events, 300, f"{events} events handled")
        peak = peak_rss(process.pid)
        rss_after = usage.memory_info().rss
    finally:
        await stop_process(process)
    seconds = t1 - t0
    bench.results["footprint"] = {
        "idle_seconds": seconds,
        "rss_mb": rss / 2**20,
        "peak_rss_mb": peak / 2**20,
        "rss_after_work_mb": rss_after / 2**20,
        "peak_after_events": events,
        "cpu_percent": (cpu1 - cpu0) / seconds * 100,
        "wakeups_per_s": (switches1 - switches0) / seconds,
    }


async def start(bench: Bench) -> None:
    """One Runner started and stopped `starts` times in this process: how long `start()` takes
    to return, and to STREAMING; the median of every start after the first."""
    uid, wake = bench.names("start")
    spec = SubscriptionSpec(id=f"sub-{uid}", pattern=f"{uid}/*")
    await bench.producer.create_stream(f"{uid}/a")

    async def handler(batch: Batch) -> None:
        pass

    runner = Runner(bench.settings(wake, (spec,)), handlers={spec.id: handler})
    returned, streaming = [], []
    for _ in range(bench.scale.starts):
        async with trio.open_nursery() as nursery:
            before = time.perf_counter()
            await runner.start(nursery)
            returned.append(time.perf_counter() - before)
            await runner.wait_until(State.STREAMING)
            streaming.append(time.perf_counter() - before)
            await runner.stop()
    bench.results["start"] = {
        "starts": len(returned),
        "first_return_ms": returned[0] * 1000,
        "first_streaming_ms": streaming[0] * 1000,
        "return_ms": statistics.median(returned[1:]) * 1000,
        "streaming_ms": statistics.median(streaming[1:]) * 1000,
    }


async def stop(bench: Bench) -> None:
    bench.results["stop"] = {
        "idle_ms": await _stop_time(bench, None),
        "claim_finishing_ms": await _stop_time(bench, 0.2),
        "claim_interrupted_ms": await _stop_time(bench, 30.0, drain_timeout=2.0),
    }


async def _stop_time(bench: Bench, handler_seconds: float | None, **overrides: Any) -> float:
    uid, wake = bench.names("stop")
    spec = SubscriptionSpec(id=f"sub-{uid}", pattern=f"{uid}/*")
    await bench.producer.create_stream(f"{uid}/a")
    started = trio.Event()

    async def handler(batch: Batch) -> None:
        started.set()
        if handler_seconds:
            await trio.sleep(handler_seconds)

    runner = Runner(bench.settings(wake, (spec,), **overrides), handlers={spec.id: handler})
    async with trio.open_nursery() as nursery:
        await runner.start(nursery)
        await runner.wait_until(State.STREAMING)
        if handler_seconds is not None:
            await bench.producer.append(f"{uid}/a", {"n": 1})
            await started.wait()
        before = time.perf_counter()
        await runner.stop()
        return (time.perf_counter() - before) * 1000
