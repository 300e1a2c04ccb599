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
from runner._wire.client import StreamsClient
from runner._wire.protocol import AckAnswer, Claim


async def latency(bench: Bench) -> None:
    events, gap = bench.scale.latency_events, bench.scale.latency_gap
    runner_times = await _in_process_runner(bench, events, gap)
    baseline_times = await _in_process_baseline(bench, events, gap)
    processes = await _in_own_processes(bench, events, gap)
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

    async def observed_ack(client: StreamsClient, claim: Claim, acks: Any, *, done: bool = False) -> AckAnswer:
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


ROUNDS = 4
"""Process mode alternates runner and baseline this many times each (drift on a shared machine
then hits both alike); both processes live throughout, only one gets events at a time."""


class Worker:
    """A runner (`pullwake run`) or baseline (`python -m bench.baseline`) process following its
    own wake stream, whose handler writes down when it got each event."""

    def __init__(self, bench: Bench, *, use_baseline: bool) -> None:
        self.bench, self.use_baseline = bench, use_baseline
        uid, self.wake = bench.names("lpb" if use_baseline else "lp")
        self.stream = f"{uid}/a"
        self.spec = SubscriptionSpec(id=f"sub-{uid}", pattern=f"{uid}/*")
        self.record = bench.scratch / f"{uid}.jsonl"
        self.log = bench.scratch / f"{uid}.log"
        self.uid = uid
        self.process: trio.Process | None = None
        self.appended: dict[str, tuple[int, float]] = {}
        self.cpu = 0.0
        self.events = 0

    async def start(self) -> None:
        bench, record, log = self.bench, self.record, self.log
        if self.use_baseline:
            await bench.prepare(self.wake, [self.stream], (self.spec,))
            argv = [sys.executable, "-m", "bench.baseline", bench.url, self.wake, self.spec.id]
            with log.open("ab") as output:
                self.process = await trio.lowlevel.open_process(
                    argv, stdout=output, stderr=output, env={**ENV, "BENCH_RECORD": str(record)}
                )
            # It reports once it follows the wake stream; a wake written before that it never sees.
            await until(lambda: log.exists() and '{"handled"' in log.read_text(), 60, "the baseline to follow")
        else:
            await bench.producer.create_stream(self.stream)
            config = bench.runner_config(self.uid, self.wake, (self.spec,), handler="bench.handlers:record")
            self.process = await start_runner_process(config, log, level="warning", BENCH_RECORD=str(record))

        # Warm up until an event goes through: the process follows its wake stream, and the
        # first claim's one-off costs (imports, connections) are paid before the measurement.
        async def warmed_up() -> bool:
            if any(entry.get("i") == -1 for entry in recorded(record)):
                return True
            await bench.producer.append(self.stream, {"i": -1})
            await trio.sleep(0.3)
            return False

        await until(warmed_up, 60, "a warm-up event to be handled")

    async def round(self, first: int, events: int, gap: float) -> None:
        """`events` appends `gap` apart (numbered from `first`); this process's CPU time for them."""
        assert self.process is not None
        usage = psutil.Process(self.process.pid)
        await trio.sleep(0.3)  # settle
        cpu_before = cpu_seconds(usage)
        appended = await self.bench.produce_spaced(self.stream, events, gap, first=first)
        total = first + events
        await until(lambda: len(_handled_times(self.record)) >= total, 60, f"{total} events handled")
        self.cpu += cpu_seconds(usage) - cpu_before
        self.events += events
        self.appended |= appended

    async def stop(self) -> None:
        if self.process is not None:
            await stop_process(self.process)

    def summary(self) -> dict[str, Any]:
        handled_at = _handled_times(self.record)
        return {
            "append_to_handler": percentiles([handled_at[i] - at for i, at in self.appended.values()]),
            "cpu_ms_per_event": self.cpu / self.events * 1000,
            "events": self.events,
        }


async def _in_own_processes(bench: Bench, events: int, gap: float) -> dict[str, Any]:
    """The same spaced appends to a runner process and a baseline process, in alternating rounds."""
    runner, raw = Worker(bench, use_baseline=False), Worker(bench, use_baseline=True)
    per_round = max(1, events // ROUNDS)
    try:
        await runner.start()
        await raw.start()
        for number in range(ROUNDS):
            for worker in (runner, raw) if number % 2 == 0 else (raw, runner):
                await worker.round(number * per_round, per_round, gap)
    finally:
        await runner.stop()
        await raw.stop()
    return {"rounds": ROUNDS, "runner": runner.summary(), "baseline": raw.summary()}


def _handled_times(record: Path) -> dict[int, float]:
    handled: dict[int, float] = {}
    for entry in recorded(record):
        if isinstance(entry.get("i"), int) and entry["i"] >= 0:
            handled.setdefault(entry["i"], entry["t"])
    return handled
