"""`pullwake demo`: the whole job on one machine, start to finish, in a few seconds.

Starts the pinned reference server on loopback, creates a subscription and a
few streams, runs a runner with an example handler, appends a few hundred jobs
across the streams, waits until every one has been handled, and prints what
happened.
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import trio

from machine import State

from .._config import Settings, SubscriptionSpec
from .._handlers.batch import Batch
from .._runner import Runner
from .._wire.client import StreamsClient, build_http
from .devserver import DevServer

STREAMS = ("jobs/resize", "jobs/encode", "jobs/notify", "jobs/index", "jobs/archive", "jobs/report")


class ExampleHandler:
    """Pretends to work on each job and keeps score, checking order within each stream."""

    def __init__(self, say: Callable[[str], None], expected: int) -> None:
        self.say = say
        self.expected = expected
        self.all_seen = trio.Event()
        self.handled: Counter[str] = Counter()
        self.jobs: Counter[int] = Counter()
        self.out_of_order = 0
        self._next: dict[str, int] = {}

    @property
    def total(self) -> int:
        return sum(self.handled.values())

    async def __call__(self, batch: Batch) -> None:
        numbers = [message["n"] for message in batch.messages]
        for number in numbers:
            if number < self._next.get(batch.stream, 0):
                self.out_of_order += 1
            self._next[batch.stream] = number + 1
        self.jobs.update(message["job"] for message in batch.messages)
        await trio.sleep(0.001 * len(numbers))  # the "work"
        self.handled[batch.stream] += len(numbers)
        if len(self.jobs) >= self.expected:
            self.all_seen.set()
        self.say(f"  {batch.stream:<14} jobs {numbers[0]:>3}..{numbers[-1]:<3} ({len(numbers)} in one batch)")


async def demo(jobs: int = 300, say: Callable[[str], None] = print) -> int:
    """Returns a process exit code: 0 when every job was handled exactly once, in order."""
    with tempfile.TemporaryDirectory(prefix="pullwake-demo-") as scratch:
        server = DevServer(data_dir=Path(scratch) / "data", log_file=Path(scratch) / "server.log")
        say(f"starting the reference server ({server.__class__.__name__}, pinned @durable-streams/server)...")
        await trio.to_thread.run_sync(server.start)
        try:
            return await _run(server, Path(scratch), jobs, say)
        finally:
            server.stop()


async def _run(server: DevServer, scratch: Path, jobs: int, say: Callable[[str], None]) -> int:
    assert server.url is not None
    say(f"server at {server.url}")
    settings = Settings(
        server_url=server.url,
        runner_id="demo-runner",
        wake_stream="demo/wake",
        state_dir=scratch / "state",
        subscriptions=(SubscriptionSpec(id="demo-jobs", pattern="jobs/*", lease_ttl_ms=10_000),),
    )
    handler = ExampleHandler(say, jobs)
    runner = Runner(settings, handlers={"demo-jobs": handler})
    async with build_http(server.url, timeout=10) as http:
        producer = StreamsClient(http)
        for stream in STREAMS:
            await producer.create_stream(stream)
        async with trio.open_nursery() as nursery:
            await runner.start(nursery)
            with trio.fail_after(30):
                await runner.wait_until(State.STREAMING)
            say(f"runner {settings.runner_id!r} is following {settings.wake_stream!r}; appending {jobs} jobs...")
            started = time.perf_counter()
            for n in range(jobs):
                await producer.append(STREAMS[n % len(STREAMS)], {"n": n // len(STREAMS), "job": n})
            with trio.move_on_after(60):
                await handler.all_seen.wait()
            elapsed = time.perf_counter() - started
            health = runner.health()
            await runner.stop()
    say("")
    say(f"handled {handler.total} of {jobs} jobs in {elapsed:.2f} s ({handler.total / elapsed:.0f} jobs/s)")
    for stream in STREAMS:
        say(f"  {stream:<14} {handler.handled[stream]:>4} jobs")
    say(
        f"claims: {health.claims_succeeded} succeeded, {health.claims_skipped} skipped, "
        f"{health.claims_failed} failed; batches: {dict(health.batches)}; reconnects: {health.reconnect_count}"
    )
    ok = set(handler.jobs) == set(range(jobs)) and max(handler.jobs.values()) == 1 and handler.out_of_order == 0
    say("demo OK: every job handled once, in order per stream" if ok else "demo FAILED")
    return 0 if ok else 1
