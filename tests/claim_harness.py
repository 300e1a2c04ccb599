"""Claims against the in-memory wire: a recording handler and a `ClaimContext` builder."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

from runner._claims.claim import ClaimContext
from runner._claims.delivery import DeadLetters, Delivery
from runner._config import Settings
from runner._handlers.batch import Batch, HandlerResult
from runner._health import Vitals
from runner._secrets import Redactor
from runner._state.journal import Journal
from runner._tracing import OFF, Tracing
from tests.fake_wire import FakeWire

SUB = "s1"
JOBS = "jobs/a"

Behaviour = Callable[[Batch], Awaitable[HandlerResult]]


async def succeed(batch: Batch) -> HandlerResult:
    return None


class Recorder:
    """A handler that records every batch it is given (and when), then does what it is told."""

    def __init__(self, behave: Behaviour = succeed) -> None:
        self.behave = behave
        self.seen: list[Batch] = []
        self.at: list[float] = []
        self.cancelled_at: float | None = None
        self.running = 0
        self.most_running = 0
        self.called = trio.Event()

    async def __call__(self, batch: Batch) -> HandlerResult:
        self.seen.append(batch)
        self.at.append(trio.current_time())
        self.called.set()
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            return await self.behave(batch)
        except trio.Cancelled:
            self.cancelled_at = trio.current_time()
            raise
        finally:
            self.running -= 1

    @property
    def messages(self) -> list[list[Any]]:
        return [batch.messages for batch in self.seen]


def sleep_for(seconds: float) -> Behaviour:
    async def slow(batch: Batch) -> HandlerResult:
        await trio.sleep(seconds)
        return None

    return slow


async def forever(batch: Batch) -> HandlerResult:
    await trio.sleep_forever()


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"runner_id": "runner-1", "cooldown": 30.0, "handler_retry_initial": 1.0}
    values.update(overrides)
    return Settings(**values)


def make_context(
    wire: FakeWire,
    handler: Callable[[Batch], Awaitable[HandlerResult]],
    *,
    vitals: Vitals | None = None,
    recreate: Callable[[str], Awaitable[bool]] | None = None,
    tracing: Tracing = OFF,
    **overrides: Any,
) -> ClaimContext:
    async def ensure(subscription: str) -> bool:
        await wire.ensure_subscription(subscription, wake_stream="wake/pool", pattern="jobs/*")
        return True

    chosen = settings(**overrides)
    recorder = vitals if vitals is not None else Vitals("test")
    return ClaimContext(
        wire=wire,
        settings=chosen,
        vitals=recorder,
        journal=Journal(None, server_url=chosen.server_url),
        deliver=Delivery(SUB, handler, chosen, recorder, DeadLetters(wire), tracing),
        recreate=recreate if recreate is not None else ensure,
        redactor=Redactor(),
        tracing=tracing,
    )


def jobs(count: int, stream: str = JOBS) -> list[dict[str, Any]]:
    return [{"job": f"{stream}#{n}"} for n in range(count)]
