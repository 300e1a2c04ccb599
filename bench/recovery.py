"""Recovery from faults, with the reference server and real processes.

Detection rows (test-fast settings in smoke runs, defaults otherwise): a hung wake-stream
connect, a frozen live stream, a server stopped and restarted.

After-fault rows (issue 12; default settings except the lease): seconds from the moment the
fault ends to every remaining event handled, each beside the lease TTL and the backoff cap:
- a `pullwake run` process killed (SIGKILL) mid-claim and restarted at once, same state_dir;
- the server restarted with a data directory (it forgets its subscriptions), events appended
  while it is back but before the runner can re-create its subscription (a proxy holds the
  runner off): how many of those gap events were handled;
- every request answered 503 for `storm_seconds`.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from bench.core import Bench, logged_streaming, recorded, running, start_runner_process, stop_process, until
from faults.proxy import Proxy
from machine import State
from runner import Batch, Runner, Settings, SubscriptionSpec
from runner._service.devserver import DevServer
from runner._wire.client import StreamsClient, build_http

DEFAULT_LEASE_MS = int(SubscriptionSpec.model_fields["lease_ttl_ms"].default)


@dataclass
class Proxied:
    """A runner behind a proxy, what it handled, and when it entered each state."""

    runner: Runner
    proxy: Proxy
    wake: str
    seen: list[float]
    entered: list[tuple[State, float]]

    def reconnects_since(self, moment: float) -> list[float]:
        return [at for state, at in self.entered if state is State.RECONNECTING and at > moment]


def _recovery_settings(bench: Bench, wake: str, spec: SubscriptionSpec, **overrides: Any) -> Settings:
    fast = {"heartbeat_interval": 0.5, "heartbeat_timeout": 0.4, "connect_timeout": 2.0, "backoff_max": 1.0}
    return bench.settings(wake, (spec,), **({**fast, **overrides} if bench.scale.fast_recovery else overrides))


async def recovery(bench: Bench) -> None:
    bench.results["recovery"] = {
        "settings": "test-fast" if bench.scale.fast_recovery else "defaults",
        "hung_connect": await _recover_hung_connect(bench),
        "frozen_stream": await _recover_frozen_stream(bench),
        "server_restart": await _recover_server_restart(bench),
        # Issue 12: default settings (lease as given), real processes and a real server restart.
        "after_fault": {
            "kill9_mid_claim": await _repeated(bench, _kill9_mid_claim, bench.scale.repeats),
            "server_restart_gap": await _repeated(bench, _server_restart_gap, bench.scale.repeats),
            "storm_503": await _repeated(bench, _storm_503, 1),
        },
    }


def _feed(bench: Bench, stream: str, nursery: trio.Nursery) -> None:
    """Append an event every 100 ms for as long as `nursery` lives, through any fault."""

    async def feed() -> None:
        n = 0
        while True:
            try:
                await bench.producer.append(stream, {"n": n})
                n += 1
            except Exception:  # the server may be the fault
                pass
            await trio.sleep(0.1)

    nursery.start_soon(feed)


@asynccontextmanager
async def _behind_a_proxy(bench: Bench, prefix: str) -> AsyncIterator[Proxied]:
    """A runner that reaches the server through a proxy, with events flowing (one per 100 ms)."""
    uid, wake = bench.names(prefix)
    spec = SubscriptionSpec(id=f"sub-{uid}", pattern=f"{uid}/*")
    await bench.producer.create_stream(f"{uid}/a")
    seen: list[float] = []

    async def handler(batch: Batch) -> None:
        seen.append(time.perf_counter())

    async with trio.open_nursery() as nursery:
        proxy = Proxy(bench.server.port)
        await nursery.start(proxy.run)
        runner = Runner(_recovery_settings(bench, wake, spec, server_url=proxy.url), handlers={spec.id: handler})
        entered: list[tuple[State, float]] = []
        runner.add_state_listener(lambda state: entered.append((state, time.perf_counter())))
        async with running(runner):
            _feed(bench, f"{uid}/a", nursery)
            await until(lambda: bool(seen), 30, "events flowing")
            yield Proxied(runner, proxy, wake, seen, entered)
        nursery.cancel_scope.cancel()


async def _server_faults(bench: Bench, method: str, body: dict[str, Any] | None = None) -> None:
    """Set (POST) or clear (DELETE) the reference server's own fault injection."""
    async with httpx.AsyncClient(base_url=str(bench.server.url), timeout=10) as http:
        (await http.request(method, "/_test/inject-error", json=body)).raise_for_status()


async def _recover_hung_connect(bench: Bench) -> dict[str, float]:
    async with _behind_a_proxy(bench, "rh") as setup:
        await _server_faults(
            bench, "POST", {"path": f"/v1/stream/{setup.wake}", "delayMs": 600_000, "count": 1_000_000}
        )
        fault = time.perf_counter()
        setup.proxy.cut()
        # The cut itself is noticed at once; detection is the runner giving up on the hung connect.
        await until(lambda: len(setup.reconnects_since(fault)) >= 2, 120, "the hung connect to be abandoned")
        detected = setup.reconnects_since(fault)[1] - fault
        await trio.sleep(2)
        await _server_faults(bench, "DELETE")
        cleared, count = time.perf_counter(), len(setup.seen)
        await until(lambda: len(setup.seen) > count, 120, "events after the fault")
        return {
            "detect_s": detected,
            "recover_s": setup.seen[count] - cleared,
            "liveness_resets": setup.runner.health().liveness_resets,
        }


async def _recover_frozen_stream(bench: Bench) -> dict[str, float]:
    async with _behind_a_proxy(bench, "rf") as setup:
        frozen = time.perf_counter()
        setup.proxy.freeze(existing_only=True)
        await until(lambda: bool(setup.reconnects_since(frozen)), 180, "the frozen stream to be noticed")
        noticed = setup.reconnects_since(frozen)[0]
        count = len(setup.seen)
        await until(lambda: len(setup.seen) > count, 180, "events after the freeze")
        return {
            "detect_s": noticed - frozen,
            "recover_s": setup.seen[count] - noticed,
            "liveness_resets": setup.runner.health().liveness_resets,
        }


async def _recover_server_restart(bench: Bench) -> dict[str, float]:
    uid, wake = bench.names("rr")
    spec = SubscriptionSpec(id=f"sub-{uid}", pattern=f"{uid}/*")
    seen: list[float] = []
    own = DevServer(data_dir=bench.scratch / f"data-{uid}", log_file=bench.scratch / f"server-{uid}.log")
    await trio.to_thread.run_sync(own.start)
    try:
        assert own.url is not None
        async with build_http(own.url, timeout=10) as http:
            client = StreamsClient(http)
            await client.create_stream(f"{uid}/a")

            async def handler(batch: Batch) -> None:
                seen.append(time.perf_counter())

            settings = _recovery_settings(bench, wake, spec, server_url=own.url, state_dir=bench.scratch / uid)
            runner = Runner(settings, handlers={spec.id: handler})
            async with running(runner):
                await client.append(f"{uid}/a", {"n": 0})
                await until(lambda: bool(seen), 30, "the first event")
                stopped = time.perf_counter()
                await trio.to_thread.run_sync(own.stop)
                await until(lambda: runner.state is not State.STREAMING, 60, "the runner to notice")
                detected = time.perf_counter() - stopped
                await trio.sleep(2)
                await trio.to_thread.run_sync(own.start)
                back = time.perf_counter()
                await until(lambda: runner.state is State.STREAMING, 120, "the runner to reconnect")
                streaming = time.perf_counter() - back
                count = len(seen)
                await client.append(f"{uid}/a", {"n": 1})
                await until(lambda: len(seen) > count, 60, "an event after the restart")
                handled = seen[count] - back
    finally:
        own.stop()
    return {"detect_s": detected, "streaming_again_s": streaming, "recover_s": handled}


# -- after the fault ends (issue 12) --------------------------------------------------------


class Handled:
    """An in-process handler that notes when each message's "i" was first handled."""

    def __init__(self) -> None:
        self.at: dict[int, float] = {}
        self.replayed: set[int] = set()
        """Events handed over in a replayed batch (a gap the server's subscription skipped)."""

    async def __call__(self, batch: Batch) -> None:
        now = time.perf_counter()
        for message in batch.messages:
            if isinstance(message, dict) and isinstance(message.get("i"), int):
                self.at.setdefault(message["i"], now)
                if batch.replayed:
                    self.replayed.add(message["i"])

    def all_of(self, numbers: range) -> bool:
        return all(i in self.at for i in numbers)


async def _repeated(bench: Bench, measure: Callable[[Bench], Awaitable[dict[str, Any]]], times: int) -> dict[str, Any]:
    """`measure` run `times` times: the median and the worst of "all_handled_s" (None when some
    run never handled everything), event counts summed, every run kept."""
    runs = [await measure(bench) for _ in range(times)]
    handled = [run["all_handled_s"] for run in runs if run["all_handled_s"] is not None]
    summary = runs[0] | {
        "runs": runs,
        "repeats": len(runs),
        "all_handled_s": statistics.median(handled) if len(handled) == len(runs) else None,
        "max_s": max(handled) if len(handled) == len(runs) else None,
    }
    for key in ("events", "gap_events", "gap_handled", "gap_replayed", "refused", "reconnects"):
        if key in summary:
            summary[key] = sum(run[key] for run in runs)
    return summary


def _caps(settings: Settings, lease_ttl_ms: int) -> dict[str, float]:
    return {"lease_ttl_s": lease_ttl_ms / 1000, "backoff_max_s": settings.backoff_max}


async def _kill9_mid_claim(bench: Bench) -> dict[str, Any]:
    """SIGKILL a runner process while its handler works on a claim; start it again at once."""
    uid, wake = bench.names("k9")
    stream, events = f"{uid}/a", range(5)
    spec = SubscriptionSpec(id=f"sub-{uid}", pattern=f"{uid}/*")
    lease = bench.scale.lease_ttl_ms
    await bench.producer.create_stream(stream)
    config = bench.runner_config(
        uid,
        wake,
        (spec,),
        handler="bench.handlers:record",
        state_dir=bench.scratch / f"state-{uid}",
        lease_ttl_ms=lease,
    )
    record, log = bench.scratch / f"{uid}.jsonl", bench.scratch / f"{uid}.log"
    first = await start_runner_process(config, log, BENCH_RECORD=str(record), BENCH_DELAY="600")
    try:
        await until(lambda: logged_streaming(log), 60, "the first runner to stream")
        for i in events:
            await bench.producer.append(stream, {"i": i})
        await until(
            lambda: any(entry.get("pid") == first.pid for entry in recorded(record)), 30, "its handler to start"
        )
    finally:
        first.kill()
        await first.wait()
    restarted = time.perf_counter()
    second = await start_runner_process(config, log, BENCH_RECORD=str(record))
    try:
        handled: dict[int, float] = {}

        def everything() -> bool:
            handled.update({entry["i"]: entry["t"] for entry in recorded(record) if "i" in entry})
            return all(i in handled for i in events)

        await until(everything, lease / 1000 * 3 + 30, "the rest of the work after the restart")
    finally:
        await stop_process(second)
    return {
        "all_handled_s": max(handled[i] for i in events) - restarted,
        "events": len(events),
        "lease_ttl_s": lease / 1000,
        "backoff_max_s": float(Settings.model_fields["backoff_max"].default),
        "claim_returned": '"claim.returned"' in log.read_text(),
    }


async def _server_restart_gap(bench: Bench) -> dict[str, Any]:
    """The server restarts (keeping its streams, forgetting its subscriptions); events arrive
    before the runner, held off by a frozen proxy, can re-create its subscription."""
    uid, wake = bench.names("rg")
    spec = SubscriptionSpec(id=f"sub-{uid}", pattern=f"{uid}/*")
    streams = [f"{uid}/a", f"{uid}/b"]
    gap = range(100, 100 + bench.scale.gap_events)
    own = DevServer(data_dir=bench.scratch / f"data-{uid}", log_file=bench.scratch / f"server-{uid}.log")
    await trio.to_thread.run_sync(own.start)
    handler = Handled()
    try:
        assert own.url is not None
        async with build_http(own.url, timeout=10) as http:
            client = StreamsClient(http)
            for stream in streams:
                await client.create_stream(stream)
            async with trio.open_nursery() as nursery:
                proxy = Proxy(own.port)
                await nursery.start(proxy.run)
                settings = bench.settings(wake, (spec,), server_url=proxy.url)
                async with running(Runner(settings, handlers={spec.id: handler})):
                    for i in range(4):
                        await client.append(streams[i % 2], {"i": i})
                    await until(lambda: handler.all_of(range(4)), 30, "the events before the restart")
                    proxy.freeze()  # the runner cannot reach the server until the gap is appended
                    await trio.to_thread.run_sync(own.restart)
                    back = time.perf_counter()
                    async with build_http(own.url, timeout=10) as fresh:  # the old connections died
                        for i in gap:
                            await StreamsClient(fresh).append(streams[i % 2], {"i": i})
                    proxy.thaw()
                    thawed = time.perf_counter()
                    with contextlib.suppress(TimeoutError):  # then report how many were handled
                        await until(lambda: handler.all_of(gap), 90 if bench.scale.gap_events > 10 else 30, "the gap")
                nursery.cancel_scope.cancel()
    finally:
        await trio.to_thread.run_sync(own.stop)
    done = [handler.at[i] for i in gap if i in handler.at]
    complete = len(done) == len(gap)
    return {
        "all_handled_s": max(done) - back if complete else None,
        "from_thaw_s": max(done) - thawed if complete else None,
        "held_off_s": thawed - back,
        "gap_events": len(gap),
        "gap_handled": len(done),
        "gap_replayed": len(handler.replayed & set(gap)),
    } | _caps(settings, DEFAULT_LEASE_MS)


async def _storm_503(bench: Bench) -> dict[str, Any]:
    """Every request through the proxy answers 503 for `storm_seconds`; events pile up behind it."""
    uid, wake = bench.names("st")
    spec = SubscriptionSpec(id=f"sub-{uid}", pattern=f"{uid}/*")
    stream, piled = f"{uid}/a", range(1, 11)
    await bench.producer.create_stream(stream)
    handler = Handled()
    async with trio.open_nursery() as nursery:
        proxy = Proxy(bench.server.port)
        await nursery.start(proxy.run)
        settings = bench.settings(wake, (spec,), server_url=proxy.url)
        runner = Runner(settings, handlers={spec.id: handler})
        async with running(runner):
            await bench.producer.append(stream, {"i": 0})
            await until(lambda: handler.all_of(range(1)), 30, "the first event")
            proxy.refuse()
            began = time.perf_counter()
            for i in piled:
                await bench.producer.append(stream, {"i": i})  # straight to the server
            await trio.sleep(max(0.0, bench.scale.storm_seconds - (time.perf_counter() - began)))
            proxy.thaw()
            ended = time.perf_counter()
            await until(lambda: handler.all_of(piled), 120, "everything after the storm")
            reconnects = runner.health().reconnect_count
        nursery.cancel_scope.cancel()
    return {
        "all_handled_s": max(handler.at[i] for i in piled) - ended,
        "storm_s": ended - began,
        "refused": proxy.refused,
        "reconnects": reconnects,
    } | _caps(settings, DEFAULT_LEASE_MS)
