"""A real `Driver` wired to fake activities that record their lives."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio
import trio.testing

from machine import Effect, Event, State
from runner._driver import Driver, Envelope, StateContext

# The shortest known way from `stopped` into each state, as (event, from the state's activity?).
PATHS: dict[State, list[Event]] = {
    State.STOPPED: [],
    State.CONNECTING: [Event.START],
    State.STREAMING: [Event.START, Event.CONNECTED],
    State.RECONNECTING: [Event.START, Event.CONNECT_FAILED],
    State.STOPPING: [Event.START, Event.STOP],
}


@dataclass
class Life:
    name: str
    epoch: int
    context: StateContext
    cancelled: bool = False
    finished: bool = False


@dataclass
class Fakes:
    """Activities that block until cancelled, unless a test gives them a script."""

    lives: list[Life] = field(default_factory=list)
    effects: list[tuple[Effect, Envelope]] = field(default_factory=list)
    scripts: dict[str, Callable[[StateContext], Awaitable[None]]] = field(default_factory=dict)

    def activity(self, name: str) -> Callable[[StateContext], Awaitable[None]]:
        async def run(context: StateContext) -> None:
            life = Life(name, context.epoch, context)
            self.lives.append(life)
            try:
                script = self.scripts.get(name)
                if script is not None:
                    await script(context)
                await trio.sleep_forever()
            except trio.Cancelled:
                life.cancelled = True
                raise
            finally:
                life.finished = True

        return run

    def running(self) -> list[Life]:
        return [life for life in self.lives if not life.finished]

    def driver(self, *, buffer: int = 256, **effects: Callable[[Envelope], None]) -> Driver:
        def record(effect: Effect) -> Callable[[Envelope], None]:
            def call(envelope: Envelope) -> None:
                self.effects.append((effect, envelope))
                extra = effects.get(effect.name.lower())
                if extra is not None:
                    extra(envelope)

            return call

        return Driver(
            {name: self.activity(name) for name in ("connect", "consume", "backoff", "drain")},
            {effect: record(effect) for effect in Effect},
            buffer=buffer,
        )


@asynccontextmanager
async def running_driver(fakes: Fakes, state: State = State.STOPPED) -> AsyncIterator[Driver]:
    """A fake-activity driver running in `state` for the body of the block."""
    driver = fakes.driver()
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run)
        await drive_to(driver, state)
        yield driver
        nursery.cancel_scope.cancel()


async def settle() -> None:
    """Let every task run until all of them wait on something outside."""
    await trio.testing.wait_all_tasks_blocked()


async def drive_to(driver: Driver, state: State) -> None:
    for event in PATHS[state]:
        await driver.send(event, epoch=None if event in (Event.START, Event.STOP) else driver.epoch)
        await settle()
    assert driver.state is state
