"""Append → handler latency, and CPU per event in that mode, beside the bare-httpx baseline.

Two measurements of the same workload (one append every `latency_gap`):
- in-process: the runner and the baseline in the bench's own trio loop, observed closely
  (handler call and final ack of every event);
- in a process of its own each (`pullwake run` with no control socket or metrics listener,
  and `python -m bench.baseline`): the process's CPU time divided by the events, and the
  append → handler latency again, from the times the handler wrote down.
"""

from __future__ import annotations

import bisect
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import trio

from bench import baseline
from bench.core import (
    ENV,
    Bench,
    cpu_seconds,
    percentiles,
    recorded,
    running,
    start_runner_process,
    stop_process,
    until,
)
from runner import Batch, Runner, SubscriptionSpec
from runner._client import StreamsClient
from runner._wire import Claim


async def latency(bench: Bench) -> None:
    events, gap = bench.scale.latency_events, bench.scale.latency_gap
    runner_times = await _in_process_runner(bench, events, gap)
    baseline_times = await _in_process_baseline(bench, events, gap)
    processes = {
        "runner": await _in_own_process(bench, events, gap, use_baseline=False),
        "baseline": await _in_own_process(bench, events, gap, use_baseline=True),
    }
    bench.results["latency"] = {
        "events": events,
        "gap_s": gap,
        "runner": runner_times,
        "baseline": baseline_times,
        "processes": processes,
    }


def _summarize(
    appended: dict[str, tuple[int, float]],
    handled_at: dict[int, float],
    acked_at: dict[str, float],
    batch_sizes: list[int],
) -> dict[str, Any]:
    to_handler = [handled_at[i] - at for i, at in appended.values()]
    # An event is acknowledged by the first ack at or past its offset (a shared batch acks its last one).
    acked = sorted(acked_at)
    to_ack = [acked_at[acked[bisect.bisect_left(acked, offset)]] - at for offset, (_, at) in appended.items()]
    return {
        "append_to_handler": percentiles(to_handler),
        "append_to_final_ack": percentiles(to_ack),
        "events_in_shared_batches": sum(size for size in batch_sizes if size > 1),
    }


async def _in_process_runner(bench: Bench, events: int, gap: float) -> dict[str, Any]:
    uid, wake = bench.names("lat")
    stream = f"{uid}/a"
    await bench.producer.create_stream(stream)
    handled_at: dict[int, float] = {}
    batch_sizes: list[int] = []
    offsets_by_wake: dict[str, list[str]] = {}
    acked_at: dict[str, float] = {}

    async def handler(batch: Batch) -> None:
        now = time.perf_counter()
        batch_sizes.append(len(batch.messages))
        for message in batch.messages:
            handled_at.setdefault(message["i"], now)

    # Observe the runner's acks from outside: which offsets each claim acked, and
    # when its final (done) ack returned.
    original = StreamsClient.ack

    async def observed_ack(client: StreamsClient, claim: Claim, acks: Any, *, done: bool = False) -> bool:
        answer = await original(client, claim, acks, done=done)
        offsets_by_wake.setdefault(claim.wake_id, []).extend(ack.offset for ack in acks)
        if done:
            for offset in offsets_by_wake.pop(claim.wake_id, []):
                acked_at[offset] = time.perf_counter()
        return answer

    spec = SubscriptionSpec(id=f"sub-{uid}", pattern=f"{uid}/*")
    runner = Runner(bench.settings(wake, (spec,)), handlers={spec.id: handler})
    StreamsClient.ack = observed_ack  # type: ignore[method-assign,assignment]
    try:
        async with running(runner):
            appended = await bench.produce_spaced(stream, events, gap)
            await until(lambda: max(appended) in acked_at, 60, "every event acknowledged")
    finally:
        StreamsClient.ack = original  # type: ignore[method-assign]
    return _summarize(appended, handled_at, acked_at, batch_sizes)


async def _in_process_baseline(bench: Bench, events: int, gap: float) -> dict[str, Any]:
    uid, wake = bench.names("latb")
    stream = f"{uid}/a"
    subscription = f"sub-{uid}"
    await bench.prepare(wake, [stream], (SubscriptionSpec(id=subscription, pattern=f"{uid}/*"),))
    handled_at: dict[int, float] = {}
    batch_sizes: list[int] = []
    acked_at: dict[str, float] = {}

    async def on_batch(path: str, messages: list[Any]) -> None:
        now = time.perf_counter()
        batch_sizes.append(len(messages))
        for message in messages:
            handled_at.setdefault(message["i"], now)

    def on_done(offsets: list[str]) -> None:
        now = time.perf_counter()
        for offset in offsets:
            acked_at[offset] = now

    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: baseline.follow(
                bench.url, wake, {subscription}, on_batch, on_done=on_done, task_status=task_status
            )
        )
        appended = await bench.produce_spaced(stream, events, gap)
        # The baseline acks the last offset of a claim: earlier events of a shared claim count at that time.
        await until(lambda: max(appended) in acked_at, 60, "the baseline to acknowledge everything")
        nursery.cancel_scope.cancel()
    return _summarize(appended, handled_at, acked_at, batch_sizes)


async def _in_own_process(bench: Bench, events: int, gap: float, *, use_baseline: bool) -> dict[str, Any]:
    """The same spaced appends to a runner (or baseline) process; its CPU time per event."""
    uid, wake = bench.names("lpb" if use_baseline else "lp")
    stream = f"{uid}/a"
    spec = SubscriptionSpec(id=f"sub-{uid}", pattern=f"{uid}/*")
    record = bench.scratch / f"{uid}.jsonl"
    log = bench.scratch / f"{uid}.log"
    if use_baseline:
        await bench.prepare(wake, [stream], (spec,))
        argv = [sys.executable, "-m", "bench.baseline", bench.url, wake, spec.id]
        with log.open("ab") as output:
            process = await trio.lowlevel.open_process(
                argv, stdout=output, stderr=output, env={**ENV, "BENCH_RECORD": str(record)}
            )
        # It reports once it follows the wake stream; a wake written before that it never sees.
        await until(lambda: log.exists() and '{"handled"' in log.read_text(), 60, "the baseline to follow")
    else:
        await bench.producer.create_stream(stream)
        config = bench.runner_config(uid, wake, (spec,), handler="bench.handlers:record")
        process = await start_runner_process(config, log, level="warning", BENCH_RECORD=str(record))
    usage = psutil.Process(process.pid)
    try:
        # Warm up until an event goes through: the process follows its wake stream, and the
        # first claim's one-off costs (imports, connections) are paid before the measurement.
        async def warmed_up() -> bool:
            if any(entry.get("i") == -1 for entry in recorded(record)):
                return True
            await bench.producer.append(stream, {"i": -1})
            await trio.sleep(0.3)
            return False

        await until(warmed_up, 60, "a warm-up event to be handled")
        await trio.sleep(0.5)
        cpu_before = cpu_seconds(usage)
        appended = await bench.produce_spaced(stream, events, gap)
        await until(lambda: len(_handled_times(record)) >= events, 60, f"{events} events handled")
        cpu = cpu_seconds(usage) - cpu_before
    finally:
        await stop_process(process)
    handled_at = _handled_times(record)
    return {
        "append_to_handler": percentiles([handled_at[i] - at for i, at in appended.values()]),
        "cpu_ms_per_event": cpu / events * 1000,
    }


def _handled_times(record: Path) -> dict[int, float]:
    handled: dict[int, float] = {}
    for entry in recorded(record):
        if isinstance(entry.get("i"), int) and entry["i"] >= 0:
            handled.setdefault(entry["i"], entry["t"])
    return handled
