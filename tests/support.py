"""Helpers for tests against the real reference server."""

from __future__ import annotations

import inspect
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import structlog
import trio

from machine import State
from runner import Batch, Runner, Settings, SubscriptionSpec
from runner._service.daemon import serve_surfaces
from runner._service.devserver import DevServer
from runner._wire.client import StreamsClient, build_http


async def eventually(
    predicate: Callable[[], bool | Awaitable[bool]], *, timeout: float = 15.0, what: str = "the condition"
) -> None:
    """Wait for something the real server and runner do on their own time."""
    with trio.move_on_after(timeout):
        while True:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
            await trio.sleep(0.01)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


@asynccontextmanager
async def running(runner: Runner, *, streaming: bool = True) -> AsyncIterator[Runner]:
    """Run `runner` for the body of the block; stop it (drain included) afterwards."""
    async with trio.open_nursery() as nursery:
        await runner.start(nursery)
        try:
            if streaming:
                with trio.fail_after(15):
                    await runner.wait_until(State.STREAMING)
            yield runner
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(30):
                await runner.stop()


@asynccontextmanager
async def serving(runner: Runner, *, streaming: bool = True) -> AsyncIterator[str | None]:
    """Like `running`, with the control socket and metrics listener that `pullwake run` serves.

    Yields the metrics listener's URL (None without `metrics_listen`).
    """
    async with trio.open_nursery() as nursery, running(runner, streaming=streaming):
        metrics_url = await nursery.start(serve_surfaces, runner, runner.settings)
        try:
            yield metrics_url
        finally:
            nursery.cancel_scope.cancel()


@contextmanager
def captured_logs() -> Iterator[list[MutableMapping[str, Any]]]:
    """Every log entry (all levels) emitted inside the block."""
    previous = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    try:
        with structlog.testing.capture_logs() as logs:
            yield logs
    finally:
        structlog.configure(**previous)


class Overlap:
    """Detects two handlers working on one subscription at the same moment."""

    def __init__(self) -> None:
        self.active: Counter[str] = Counter()
        self.seen = 0

    def enter(self, subscription: str) -> None:
        self.active[subscription] += 1
        if self.active[subscription] > 1:
            self.seen += 1

    def leave(self, subscription: str) -> None:
        self.active[subscription] -= 1


@dataclass
class Recorder:
    """A handler that remembers every batch it finished."""

    name: str = "handler"
    delay: float = 0.0
    overlap: Overlap | None = None
    batches: list[Batch] = field(default_factory=list)
    started: list[Batch] = field(default_factory=list)
    cancelled: list[Batch] = field(default_factory=list)

    async def __call__(self, batch: Batch) -> None:
        self.started.append(batch)
        if self.overlap is not None:
            self.overlap.enter(batch.subscription)
        try:
            if self.delay:
                await trio.sleep(self.delay)
            self.batches.append(batch)
        except trio.Cancelled:
            self.cancelled.append(batch)
            raise
        finally:
            if self.overlap is not None:
                self.overlap.leave(batch.subscription)

    def messages(self, stream: str | None = None) -> list[Any]:
        return [message for batch in self.batches if stream in (None, batch.stream) for message in batch.messages]

    @property
    def count(self) -> int:
        return len(self.messages())


FAST_TIMINGS: dict[str, float] = {
    "heartbeat_interval": 0.5,
    "heartbeat_timeout": 0.5,
    "keepalive_timeout": 5.0,
    "connect_timeout": 3.0,
    "request_timeout": 3.0,
    "long_poll_timeout": 2.0,
    "backoff_initial": 0.1,
    "backoff_max": 1.0,
    "handler_retry_initial": 0.02,
    "handler_retry_max": 0.1,
    "cooldown": 0.5,
    "drain_timeout": 3.0,
    "finalizer_timeout": 2.0,
    "checkpoint_interval": 0.1,
    "fleet_interval": 0.5,
    "fleet_fallback": 0.5,
}
"""Timings that make the tests against the real server quick (the server holds live reads 2 s)."""


@dataclass
class World:
    """One test's names on a (possibly shared) reference server, and a producer client."""

    server: DevServer
    uid: str
    tmp: Path
    http: httpx.AsyncClient
    client: StreamsClient
    _runners: int = 0

    @classmethod
    @asynccontextmanager
    async def open(cls, server: DevServer, uid: str, tmp: Path) -> AsyncIterator[World]:
        assert server.url is not None
        async with build_http(server.url, timeout=10) as http:
            world = cls(server, uid, tmp, http, StreamsClient(http))
            try:
                yield world
            finally:
                if server.running:
                    with trio.CancelScope(shield=True), trio.move_on_after(5):
                        await http.delete("/_test/inject-error")

    @property
    def url(self) -> str:
        assert self.server.url is not None
        return self.server.url

    @property
    def sub(self) -> str:
        return f"sub-{self.uid}"

    @property
    def wake(self) -> str:
        return f"wake-{self.uid}/pool"

    def stream(self, name: str) -> str:
        return f"jobs-{self.uid}/{name}"

    def spec(self, subscription: str | None = None, **fields: Any) -> SubscriptionSpec:
        fields.setdefault("pattern", f"jobs-{self.uid}/*")
        fields.setdefault("lease_ttl_ms", 5_000)
        return SubscriptionSpec(id=subscription or self.sub, **fields)

    def settings(self, **overrides: Any) -> Settings:
        self._runners += 1
        values: dict[str, Any] = {
            "server_url": self.url,
            "runner_id": f"runner-{self.uid}-{self._runners}",
            "wake_stream": self.wake,
            "subscriptions": (self.spec(),),
            **FAST_TIMINGS,
        }
        values.update(overrides)
        return Settings(**values)

    async def create(self, *names: str) -> None:
        for name in names:
            await self.client.create_stream(self.stream(name))

    async def append(self, name: str, *messages: Any) -> str:
        offset = ""
        for message in messages:
            offset = await self.client.append(self.stream(name), message)
        return offset

    async def inject(self, path: str, **fault: Any) -> None:
        response = await self.http.post("/_test/inject-error", json={"path": path, **fault})
        response.raise_for_status()

    async def clear_faults(self) -> None:
        (await self.http.delete("/_test/inject-error")).raise_for_status()

    def subscription_path(self, action: str = "") -> str:
        base = f"/v1/stream/__ds/subscriptions/{self.sub}"
        return f"{base}/{action}" if action else base

    def stream_path(self, name: str) -> str:
        return f"/v1/stream/{name}"

    async def get_subscription(self, subscription: str) -> dict[str, Any]:
        response = await self.http.get(self.client.subscription_url(subscription))
        response.raise_for_status()
        document: dict[str, Any] = response.json()
        return document

    async def delete_subscription(self, subscription: str) -> None:
        response = await self.http.delete(self.client.subscription_url(subscription))
        assert response.status_code in (200, 204, 404), response.text

    async def read_all(self, stream: str) -> list[Any]:
        """Every message of `stream`, following Stream-Next-Offset until the server says up to date."""
        messages: list[Any] = []
        offset = "-1"
        while True:
            result = await self.client.read(stream, offset)
            messages.extend(result.messages)
            if result.up_to_date or not result.messages:
                return messages
            offset = result.next_offset

    async def acked_offsets(self, subscription: str | None = None) -> dict[str, str]:
        document = await self.get_subscription(subscription or self.sub)
        return {stream["path"]: stream["acked_offset"] for stream in document["streams"]}
