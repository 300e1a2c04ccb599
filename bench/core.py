"""What every benchmark section shares: the scale, the running server, helpers for processes."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from machine import State
from runner import Runner, Settings, SubscriptionSpec
from runner._service.devserver import DevServer
from runner._wire.client import StreamsClient

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
RUNNER_PYTHON = [sys.executable]
"""The interpreter of `pullwake run` processes (`--runner-python`: e.g. a production install's venv)."""


@dataclass(frozen=True)
class Scale:
    latency_events: int = 2000
    latency_gap: float = 0.01
    throughput_events: int = 20_000
    subscriptions: tuple[int, ...] = (1, 10, 200)
    backlog_subscriptions: int = 200
    idle_seconds: float = 60.0
    peak_events: int = 5_000
    """Events handled after the idle phase, for the peak RSS."""
    fast_recovery: bool = False
    """Smoke runs shorten liveness timings so the fault-detection rows finish quickly."""
    lease_ttl_ms: int = 30_000
    """The lease of the rows that compare against it (kill -9 mid-claim)."""
    storm_seconds: float = 30.0
    gap_events: int = 40
    """Events appended while the server is back but the runner cannot reach it yet."""
    starts: int = 10
    repeats: int = 3
    """Runs of the quick after-fault rows (kill -9, server restart gap); the table shows median and worst."""
    fleet_runners: tuple[int, ...] = (1, 4, 12)
    fleet_subscriptions: tuple[int, ...] = (200, 1000)
    fleet_rate: float = 40.0
    """Events per second the fleet section's producer appends, to random subscriptions."""
    fleet_seconds: float = 20.0
    """How long the steady phase of each fleet row appends."""
    fleet_down_seconds: float = 5.0
    """How long the server is down in each fleet row's restart under load."""
    fleet_after_seconds: float = 8.0
    """How long the producer goes on after the restarted server answers."""
    fleet_partitioned: bool = False
    """Each runner its own wake stream and M/N of the subscriptions (by configuration, no failover):
    the floor of what runners that do not read every wake would cost (docs/design.md §5.9)."""


FULL = Scale()
SMOKE = Scale(
    latency_events=20,
    throughput_events=100,
    subscriptions=(1, 10, 200),
    backlog_subscriptions=10,
    idle_seconds=1.0,
    peak_events=50,
    fast_recovery=True,
    lease_ttl_ms=5_000,
    storm_seconds=2.0,
    gap_events=6,
    starts=3,
    repeats=1,
    fleet_runners=(1, 2),
    fleet_subscriptions=(20,),
    fleet_rate=20.0,
    fleet_seconds=2.0,
    fleet_down_seconds=1.0,
    fleet_after_seconds=2.0,
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


async def until(
    predicate: Callable[[], bool | Awaitable[bool]], timeout: float, what: str, *, every: float = 0.01
) -> None:
    with trio.move_on_after(timeout):
        while True:
            result = predicate()
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            await trio.sleep(every)
    raise TimeoutError(f"gave up after {timeout:g} s waiting for {what}")


async def streaming(port: int) -> bool:
    """Is the runner process with a metrics listener on `port` following its wake stream?"""
    try:
        async with httpx.AsyncClient(timeout=1) as probe:
            return bool((await probe.get(f"http://127.0.0.1:{port}/healthz")).json()["state"] == "streaming")
    except (httpx.HTTPError, ValueError, KeyError):
        return False


def logged_streaming(log: Path) -> bool:
    """Has the runner process logging JSON lines to `log` entered `streaming`?"""
    try:
        return '"target": "streaming"' in log.read_text()
    except OSError:
        return False


def recorded(path: Path) -> list[dict[str, Any]]:
    """The JSON lines a bench handler (bench/handlers.py) or the baseline wrote to `path`."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.endswith("}")]


async def stop_process(process: trio.Process) -> None:
    if process.returncode is None:
        process.terminate()
    with trio.move_on_after(15):
        await process.wait()
    if process.returncode is None:
        process.kill()
        await process.wait()


async def start_runner_process(config: Path, log: Path, *, level: str = "info", **env: str) -> trio.Process:
    """`pullwake run --config CONFIG` with JSON log lines appended to `log`."""
    argv = [RUNNER_PYTHON[0], "-m", "runner", "run", "--config", str(config), "--log-format", "json"]
    with log.open("ab") as output:  # the child keeps its own copy of the descriptor
        return await trio.lowlevel.open_process(
            [*argv, "--log-level", level], stdout=output, stderr=output, env={**ENV, **env}
        )


def cpu_seconds(process: Any) -> float:
    """User plus system CPU time of a psutil.Process."""
    times = process.cpu_times()
    return float(times.user + times.system)


def peak_rss(pid: int) -> int:
    """The process's resident-set high-water mark (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


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

    def runner_config(
        self,
        uid: str,
        wake: str,
        specs: tuple[SubscriptionSpec, ...],
        *,
        port: int | None = None,
        handler: str = "bench.handlers:noop",
        server_url: str | None = None,
        state_dir: Path | None = None,
        lease_ttl_ms: int | None = None,
    ) -> Path:
        """A TOML file for a `pullwake run` process; a metrics listener only if `port` is given."""
        lines = [
            f'server_url = "{server_url or self.url}"',
            f'runner_id = "bench-{uid}"',
            f'wake_stream = "{wake}"',
            "control_stream_enabled = false",
        ]
        if port is not None:
            lines.append(f'metrics_listen = "127.0.0.1:{port}"')
        if state_dir is not None:
            lines.append(f'state_dir = "{state_dir}"')
        for spec in specs:
            lines += ["[[subscriptions]]", f'id = "{spec.id}"', f'pattern = "{spec.pattern}"', f'handler = "{handler}"']
            if lease_ttl_ms is not None:
                lines.append(f"lease_ttl_ms = {lease_ttl_ms}")
        config = self.scratch / f"{uid}.toml"
        config.write_text("\n".join(lines) + "\n")
        return config

    async def prepare(self, wake: str, streams: list[str], specs: tuple[SubscriptionSpec, ...]) -> None:
        """Create the wake stream, the streams and the subscriptions (as a baseline process needs)."""
        await self.producer.create_stream(wake)
        for stream in streams:
            await self.producer.create_stream(stream)
        for spec in specs:
            await self.producer.ensure_subscription(spec.id, wake_stream=wake, pattern=spec.pattern)

    async def produce_spaced(
        self, stream: str, events: int, gap: float, *, first: int = 0
    ) -> dict[str, tuple[int, float]]:
        """Append one event every `gap`; returns offset -> (event, time the append returned)."""
        appended: dict[str, tuple[int, float]] = {}
        for i in range(first, first + events):
            offset = await self.producer.append(stream, {"i": i})
            appended[offset] = (i, time.perf_counter())
            await trio.sleep(gap)
        return appended
