"""`python -m bench`: what users feel, measured the same way every time.

Starts the pinned reference server on loopback and measures, in one run:
wake-to-handler latency, throughput with 1/10/200 subscriptions, recovery from
faults (default settings), idle footprint, and stop time. Latency and throughput
are also measured for a bare-httpx baseline (bench/baseline.py) and printed as
ratios. Writes a table to stdout and JSON to bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import trio

from bench import baseline
from faults.proxy import Proxy
from machine import State
from runner import Batch, Runner, Settings, SubscriptionSpec
from runner._client import StreamsClient, build_http
from runner._devserver import VERSION, DevServer
from runner._wire import Claim

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


@dataclass(frozen=True)
class Scale:
    latency_events: int = 2000
    latency_gap: float = 0.01
    throughput_events: int = 20_000
    subscriptions: tuple[int, ...] = (1, 10, 200)
    idle_seconds: float = 60.0
    fast_recovery: bool = False
    """Smoke runs shorten liveness timings so the recovery section finishes quickly."""


FULL = Scale()
SMOKE = Scale(
    latency_events=20, throughput_events=300, subscriptions=(1, 10, 200), idle_seconds=1.0, fast_recovery=True
)


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {"p50_ms": at(0.50), "p90_ms": at(0.90), "p99_ms": at(0.99), "n": len(ordered)}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def until(predicate: Callable[[], bool | Awaitable[bool]], timeout: float, what: str) -> None:
    with trio.move_on_after(timeout):
        while True:
            result = predicate()
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            await trio.sleep(0.01)
    raise TimeoutError(f"gave up after {timeout:g} s waiting for {what}")


ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


async def streaming(port: int) -> bool:
    """Is the runner process with a metrics listener on `port` following its wake stream?"""
    try:
        async with httpx.AsyncClient(timeout=1) as probe:
            return bool((await probe.get(f"http://127.0.0.1:{port}/healthz")).json()["state"] == "streaming")
    except (httpx.HTTPError, ValueError, KeyError):
        return False


async def stop_process(process: trio.Process) -> None:
    process.terminate()
    with trio.move_on_after(15):
        await process.wait()
    if process.returncode is None:
        process.kill()
        await process.wait()


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


@asynccontextmanager
async def running(runner: Runner) -> AsyncIterator[Runner]:
    async with trio.open_nursery() as nursery:
        await runner.start(nursery)
        await runner.wait_until(State.STREAMING)
        try:
            yield runner
        finally:
            with trio.CancelScope(shield=True):
                await runner.stop()


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


@dataclass
class Bench:
    server: DevServer
    scale: Scale
    scratch: Path
    producer: StreamsClient
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        assert self.server.url is not None
        return self.server.url

    def names(self, prefix: str) -> tuple[str, str]:
        uid = f"{prefix}{uuid.uuid4().hex[:6]}"
        return uid, f"wake-{uid}/pool"

    def settings(self, wake: str, specs: tuple[SubscriptionSpec, ...], **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "server_url": self.url,
            "wake_stream": wake,
            "subscriptions": specs,
            "runner_id": f"bench-{uuid.uuid4().hex[:6]}",
            "control_stream_enabled": False,
        }
        return Settings(**(values | overrides))

    # -- latency ---------------------------------------------------------------------------

    async def latency(self) -> None:
        events, gap = self.scale.latency_events, self.scale.latency_gap
        runner_times = await self._latency_runner(events, gap)
        baseline_times = await self._latency_baseline(events, gap)
        self.results["latency"] = {"events": events, "gap_s": gap, "runner": runner_times, "baseline": baseline_times}

    async def _produce_spaced(self, stream: str, events: int, gap: float) -> dict[str, tuple[int, float]]:
        """Append one event every `gap`; returns offset -> (event, time the append returned)."""
        appended: dict[str, tuple[int, float]] = {}
        for i in range(events):
            offset = await self.producer.append(stream, {"i": i})
            appended[offset] = (i, time.perf_counter())
            await trio.sleep(gap)
        return appended

    @staticmethod
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

    async def _latency_runner(self, events: int, gap: float) -> dict[str, Any]:
        uid, wake = self.names("lat")
        stream = f"{uid}/a"
        await self.producer.create_stream(stream)
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
        runner = Runner(self.settings(wake, (spec,)), handlers={spec.id: handler})
        StreamsClient.ack = observed_ack  # type: ignore[method-assign,assignment]
        try:
            async with running(runner):
                appended = await self._produce_spaced(stream, events, gap)
                await until(lambda: max(appended) in acked_at, 60, "every event acknowledged")
        finally:
            StreamsClient.ack = original  # type: ignore[method-assign]
        return self._summarize(appended, handled_at, acked_at, batch_sizes)

    async def _latency_baseline(self, events: int, gap: float) -> dict[str, Any]:
        uid, wake = self.names("latb")
        stream = f"{uid}/a"
        subscription = f"sub-{uid}"
        await self.producer.create_stream(wake)
        await self.producer.create_stream(stream)
        await self.producer.ensure_subscription(subscription, wake_stream=wake, pattern=f"{uid}/*")
        handled_at: dict[int, float] = {}
        batch_sizes: list[int] = []
        acked_at: dict[str, float] = {}
        pending: list[str] = []

        async def on_batch(path: str, messages: list[Any]) -> None:
            now = time.perf_counter()
            batch_sizes.append(len(messages))
            for message in messages:
                handled_at.setdefault(message["i"], now)

        def on_done(offsets: list[str]) -> None:
            now = time.perf_counter()
            for offset in offsets:
                acked_at[offset] = now
            pending.clear()

        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: baseline.follow(
                    self.url, wake, {subscription}, on_batch, on_done=on_done, task_status=task_status
                )
            )
            appended = await self._produce_spaced(stream, events, gap)
            # The baseline acks the last offset of a claim: earlier events of a shared claim count at that time.
            await until(lambda: max(appended) in acked_at, 60, "the baseline to acknowledge everything")
            nursery.cancel_scope.cancel()
        return self._summarize(appended, handled_at, acked_at, batch_sizes)

    # -- throughput ------------------------------------------------------------------------

    async def throughput(self) -> None:
        rows = []
        for count in self.scale.subscriptions:
            runner_row = await self._throughput_process(count, use_baseline=False)
            baseline_row = await self._throughput_process(count, use_baseline=True)
            rows.append({"subscriptions": count, "runner": runner_row, "baseline": baseline_row})
        self.results["throughput"] = {"events": self.scale.throughput_events, "rows": rows}

    def _runner_config(self, uid: str, wake: str, specs: tuple[SubscriptionSpec, ...], port: int) -> Path:
        """A TOML file for a `pullwake run` process with no-op handlers and a metrics listener."""
        lines = [
            f'server_url = "{self.url}"',
            f'runner_id = "bench-{uid}"',
            f'wake_stream = "{wake}"',
            f'metrics_listen = "127.0.0.1:{port}"',
            "control_stream_enabled = false",
        ]
        for spec in specs:
            lines += ["[[subscriptions]]", f'id = "{spec.id}"', f'pattern = "{spec.pattern}"']
            lines += ['handler = "bench.handlers:noop"']
        config = self.scratch / f"{uid}.toml"
        config.write_text("\n".join(lines) + "\n")
        return config

    async def _throughput_process(self, count: int, *, use_baseline: bool) -> dict[str, Any]:
        uid, wake = self.names("tpb" if use_baseline else "tp")
        specs = tuple(SubscriptionSpec(id=f"sub-{uid}-{i}", pattern=f"{uid}/s{i}/*") for i in range(count))
        streams = [f"{uid}/s{i}/x" for i in range(count)]
        await self.producer.create_stream(wake)
        for stream in streams:
            await self.producer.create_stream(stream)
        for spec in specs:
            await self.producer.ensure_subscription(spec.id, wake_stream=wake, pattern=spec.pattern)
        progress = Progress()
        with (self.scratch / f"{uid}.log").open("wb") as log:
            if use_baseline:
                argv = [sys.executable, "-m", "bench.baseline", self.url, wake, ",".join(spec.id for spec in specs)]
                process = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, stderr=log, env=ENV)
            else:
                port = free_port()
                config = self._runner_config(uid, wake, specs, port)
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
                    await nursery.start(progress.scrape_runner, port)
                cpu_before = sum(usage.cpu_times()[:2])
                started = time.perf_counter()
                produced = await self._produce_flat_out(streams, self.scale.throughput_events)
                produced_at = time.perf_counter()
                await until(lambda: progress.handled >= produced, 300, f"{produced} events handled")
                finished = time.perf_counter()
                cpu = sum(usage.cpu_times()[:2]) - cpu_before
                nursery.cancel_scope.cancel()
        finally:
            await stop_process(process)
        elapsed = finished - started
        row = {
            "events": produced,
            "seconds": elapsed,
            "events_per_s": produced / elapsed,
            "producer_events_per_s": produced / (produced_at - started),
            "cpu_s_per_1000_events": cpu / produced * 1000,
        }
        if not use_baseline:
            row["batches_per_s"] = progress.batches / elapsed
        return row

    async def _produce_flat_out(self, streams: list[str], events: int, concurrency: int = 32) -> int:
        sent = 0

        async def producer(index: int) -> None:
            nonlocal sent
            n = index
            while n < events:
                await self.producer.append(streams[n % len(streams)], {"n": n, "pad": "x" * 64})
                sent += 1
                n += concurrency

        async with trio.open_nursery() as nursery:
            for index in range(concurrency):
                nursery.start_soon(producer, index)
        return sent

    # -- recovery --------------------------------------------------------------------------

    def _recovery_settings(self, wake: str, spec: SubscriptionSpec, **overrides: Any) -> Settings:
        fast = {"heartbeat_interval": 0.5, "heartbeat_timeout": 0.4, "connect_timeout": 2.0, "backoff_max": 1.0}
        return self.settings(wake, (spec,), **({**fast, **overrides} if self.scale.fast_recovery else overrides))

    async def recovery(self) -> None:
        self.results["recovery"] = {
            "settings": "test-fast" if self.scale.fast_recovery else "defaults",
            "hung_connect": await self._recover_hung_connect(),
            "frozen_stream": await self._recover_frozen_stream(),
            "server_restart": await self._recover_server_restart(),
        }

    def _feed(self, stream: str, nursery: trio.Nursery) -> None:
        """Append an event every 100 ms for as long as `nursery` lives, through any fault."""

        async def feed() -> None:
            n = 0
            while True:
                try:
                    await self.producer.append(stream, {"n": n})
                    n += 1
                except Exception:  # the server may be the fault
                    pass
                await trio.sleep(0.1)

        nursery.start_soon(feed)

    @asynccontextmanager
    async def _behind_a_proxy(self, prefix: str) -> AsyncIterator[Proxied]:
        """A runner that reaches the server through a proxy, with events flowing (one per 100 ms)."""
        uid, wake = self.names(prefix)
        spec = SubscriptionSpec(id=f"sub-{uid}", pattern=f"{uid}/*")
        await self.producer.create_stream(f"{uid}/a")
        seen: list[float] = []

        async def handler(batch: Batch) -> None:
            seen.append(time.perf_counter())

        async with trio.open_nursery() as nursery:
            proxy = Proxy(self.server.port)
            await nursery.start(proxy.run)
            runner = Runner(self._recovery_settings(wake, spec, server_url=proxy.url), handlers={spec.id: handler})
            entered: list[tuple[State, float]] = []
            runner.add_state_listener(lambda state: entered.append((state, time.perf_counter())))
            async with running(runner):
                self._feed(f"{uid}/a", nursery)
                await until(lambda: bool(seen), 30, "events flowing")
                yield Proxied(runner, proxy, wake, seen, entered)
            nursery.cancel_scope.cancel()

    async def _server_faults(self, method: str, body: dict[str, Any] | None = None) -> None:
        """Set (POST) or clear (DELETE) the reference server's own fault injection."""
        async with httpx.AsyncClient(base_url=str(self.server.url), timeout=10) as http:
            (await http.request(method, "/_test/inject-error", json=body)).raise_for_status()

    async def _recover_hung_connect(self) -> dict[str, float]:
        async with self._behind_a_proxy("rh") as setup:
            await self._server_faults(
                "POST", {"path": f"/v1/stream/{setup.wake}", "delayMs": 600_000, "count": 1_000_000}
            )
            fault = time.perf_counter()
            setup.proxy.cut()
            # The cut itself is noticed at once; detection is the runner giving up on the hung connect.
            await until(lambda: len(setup.reconnects_since(fault)) >= 2, 120, "the hung connect to be abandoned")
            detected = setup.reconnects_since(fault)[1] - fault
            await trio.sleep(2)
            await self._server_faults("DELETE")
            cleared, count = time.perf_counter(), len(setup.seen)
            await until(lambda: len(setup.seen) > count, 120, "events after the fault")
            return {
                "detect_s": detected,
                "recover_s": setup.seen[count] - cleared,
                "liveness_resets": setup.runner.health().liveness_resets,
            }

    async def _recover_frozen_stream(self) -> dict[str, float]:
        async with self._behind_a_proxy("rf") as setup:
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

    async def _recover_server_restart(self) -> dict[str, float]:
        uid, wake = self.names("rr")
        spec = SubscriptionSpec(id=f"sub-{uid}", pattern=f"{uid}/*")
        seen: list[float] = []
        own = DevServer(data_dir=self.scratch / f"data-{uid}", log_file=self.scratch / f"server-{uid}.log")
        await trio.to_thread.run_sync(own.start)
        try:
            assert own.url is not None
            async with build_http(own.url, timeout=10) as http:
                client = StreamsClient(http)
                await client.create_stream(f"{uid}/a")

                async def handler(batch: Batch) -> None:
                    seen.append(time.perf_counter())

                settings = self._recovery_settings(wake, spec, server_url=own.url, state_dir=self.scratch / uid)
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

    # -- footprint -------------------------------------------------------------------------

    async def footprint(self) -> None:
        uid, wake = self.names("idle")
        port = free_port()
        config = self._runner_config(uid, wake, (SubscriptionSpec(id=f"sub-{uid}", pattern=f"{uid}/*"),), port)
        argv = [sys.executable, "-m", "runner", "run", "--config", str(config), "--log-level", "warning"]
        with (self.scratch / f"{uid}.log").open("wb") as log:
            process = await trio.lowlevel.open_process(argv, stdout=log, stderr=log, env=ENV)
        usage = psutil.Process(process.pid)
        try:
            await until(lambda: streaming(port), 60, "the idle runner to stream")
            await trio.sleep(1.0)  # let the start-up sweep finish
            cpu0, switches0, t0 = sum(usage.cpu_times()[:2]), sum(usage.num_ctx_switches()), time.perf_counter()
            await trio.sleep(self.scale.idle_seconds)
            cpu1, switches1, t1 = sum(usage.cpu_times()[:2]), sum(usage.num_ctx_switches()), time.perf_counter()
            rss = usage.memory_info().rss
        finally:
            await stop_process(process)
        seconds = t1 - t0
        self.results["footprint"] = {
            "idle_seconds": seconds,
            "rss_mb": rss / 2**20,
            "cpu_percent": (cpu1 - cpu0) / seconds * 100,
            "wakeups_per_s": (switches1 - switches0) / seconds,
        }

    # -- stop ------------------------------------------------------------------------------

    async def stop(self) -> None:
        self.results["stop"] = {
            "idle_ms": await self._stop_time(None),
            "claim_finishing_ms": await self._stop_time(0.2),
            "claim_interrupted_ms": await self._stop_time(30.0, drain_timeout=2.0),
        }

    async def _stop_time(self, handler_seconds: float | None, **overrides: Any) -> float:
        uid, wake = self.names("stop")
        spec = SubscriptionSpec(id=f"sub-{uid}", pattern=f"{uid}/*")
        await self.producer.create_stream(f"{uid}/a")
        started = trio.Event()

        async def handler(batch: Batch) -> None:
            started.set()
            if handler_seconds:
                await trio.sleep(handler_seconds)

        runner = Runner(self.settings(wake, (spec,), **overrides), handlers={spec.id: handler})
        async with trio.open_nursery() as nursery:
            await runner.start(nursery)
            await runner.wait_until(State.STREAMING)
            if handler_seconds is not None:
                await self.producer.append(f"{uid}/a", {"n": 1})
                await started.wait()
            before = time.perf_counter()
            await runner.stop()
            return (time.perf_counter() - before) * 1000


def _sample(exposition: str, series: str) -> float:
    """The value of one series (name plus labels, exactly as exposed) in a Prometheus exposition."""
    for line in exposition.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def machine_info() -> dict[str, Any]:
    node = subprocess.run(["node", "--version"], capture_output=True, text=True, check=False).stdout.strip()
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": psutil.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "node": node,
        "server": f"@durable-streams/server {VERSION}",
    }


def ratio(runner: float, baseline: float) -> str:
    return f"{runner / baseline:.2f}x" if baseline else "-"


def table(title: str, header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  " + "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        )

    return ["", title, line(header), *(line(row) for row in rows)]


def render(results: dict[str, Any]) -> str:
    info = results["machine"]
    out = [
        f"pullwake-runner benchmarks: {info['cores']} cores, {info['memory_gb']} GiB, Python {info['python']}, "
        f"Node {info['node']}, {info['server']}"
    ]
    if latency := results.get("latency"):
        rows = []
        for key, label in (
            ("append_to_handler", "append -> handler called"),
            ("append_to_final_ack", "append -> final ack"),
        ):
            r, b = latency["runner"][key], latency["baseline"][key]
            rows.append(
                [label]
                + [f"{r[p]:.2f}" for p in ("p50_ms", "p90_ms", "p99_ms")]
                + [f"{b[p]:.2f}" for p in ("p50_ms", "p90_ms", "p99_ms")]
                + [ratio(r["p50_ms"], b["p50_ms"])]
            )
        out += table(
            f"Latency, ms ({latency['events']} appends, {latency['gap_s'] * 1000:.0f} ms apart; events that shared a "
            f"batch: runner {latency['runner']['events_in_shared_batches']}, "
            f"baseline {latency['baseline']['events_in_shared_batches']})",
            ["", "p50", "p90", "p99", "base p50", "base p90", "base p99", "p50 ratio"],
            rows,
        )
    if throughput := results.get("throughput"):
        rows = []
        for row in throughput["rows"]:
            r, b = row["runner"], row["baseline"]
            rows.append(
                [
                    f"{row['subscriptions']} subscription(s)",
                    f"{r['events_per_s']:.0f}",
                    f"{r['batches_per_s']:.0f}",
                    f"{r['cpu_s_per_1000_events']:.3f}",
                    f"{b['events_per_s']:.0f}",
                    f"{b['cpu_s_per_1000_events']:.3f}",
                    ratio(r["events_per_s"], b["events_per_s"]),
                    ratio(r["cpu_s_per_1000_events"], b["cpu_s_per_1000_events"]),
                    f"{r['producer_events_per_s']:.0f}",
                ]
            )
        out += table(
            f"Throughput ({throughput['events']} events from 32 concurrent appenders)",
            [
                "",
                "events/s",
                "batches/s",
                "CPU s/1k ev",
                "base ev/s",
                "base CPU",
                "ev/s ratio",
                "CPU ratio",
                "producer/s",
            ],
            rows,
        )
    if recovery := results.get("recovery"):
        labels = {
            "hung_connect": "wake-stream connect hangs",
            "frozen_stream": "live stream freezes",
            "server_restart": "server stopped, restarted",
        }
        rows = [
            [label, f"{recovery[key]['detect_s']:.2f}", f"{recovery[key]['recover_s']:.2f}"]
            for key, label in labels.items()
        ]
        out += table(
            f"Recovery, s ({recovery['settings']} settings)",
            ["", "fault -> detected", "cleared -> event handled"],
            rows,
        )
    if footprint := results.get("footprint"):
        out += [
            "",
            f"Idle footprint over {footprint['idle_seconds']:.0f} s: RSS {footprint['rss_mb']:.1f} MiB, "
            f"CPU {footprint['cpu_percent']:.2f} %, {footprint['wakeups_per_s']:.1f} wakeups/s",
        ]
    if stop := results.get("stop"):
        out += [
            f"stop(): idle {stop['idle_ms']:.0f} ms; a claim finishing in 200 ms {stop['claim_finishing_ms']:.0f} ms; "
            f"a claim interrupted at a 2 s drain {stop['claim_interrupted_ms']:.0f} ms"
        ]
    return "\n".join(out) + "\n"


SECTIONS = ("latency", "throughput", "recovery", "footprint", "stop")


async def main(scale: Scale, sections: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="pullwake-bench-") as scratch:
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
                    await getattr(bench, section)()
                    print(f"    {section} took {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
        finally:
            server.stop()
    results = bench.results
    results["scale"] = scale.__dict__ | {"subscriptions": list(scale.subscriptions)}
    return results


def cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny configuration, to check the bench runs")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    parser.add_argument("--out", type=Path, default=RESULTS / "latest.json", help="where the JSON goes")
    options = parser.parse_args()
    sections = [name.strip() for name in options.only.split(",") if name.strip()]
    if unknown := set(sections) - set(SECTIONS):
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    results = trio.run(main, SMOKE if options.smoke else FULL, sections)
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(results, indent=2))
    print(render(results), end="")
    print(f"(JSON: {options.out})", file=sys.stderr)


if __name__ == "__main__":
    cli()
