"""Carries out the lifecycle (docs/design.md §4.4): the machine decides *when*, this decides nothing.

One trio task owns the `Lifecycle`. Every event reaches it through one memory
channel, so transitions are serialized. Each entry into a state gets a new
epoch and runs the state's activity in a nursery of its own; entering the next
state cancels that nursery and waits for it to finish before anything new
starts. Events carry the epoch of the activity that produced them, and an
event from an older epoch is dropped: a CONNECTED from a connect attempt that
was already abandoned can never resurrect it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import structlog
import trio

from machine import ACTIVITIES, Activity, Effect, Event, Lifecycle, State, Step

log = structlog.get_logger("pullwake.driver")

# How long disposing of an unclaimed payload (an open connection) may take.
DISPOSE_TIMEOUT = 2.0


@runtime_checkable
class Disposable(Protocol):
    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class Envelope:
    """An event on its way to the machine, with where it came from."""

    event: Event
    epoch: int | None = None
    """The epoch of the state whose activity sent it; None for runner-lifetime senders."""
    payload: object = None
    """Handed to the next state's activity (e.g. the open wake stream on CONNECTED)."""
    error: BaseException | None = None


class StateContext:
    """What a state's activity gets: its epoch, its trigger, its nursery, and a way to speak."""

    def __init__(self, driver: Driver, state: State, epoch: int, trigger: Envelope, nursery: trio.Nursery) -> None:
        self._driver = driver
        self.state = state
        self.epoch = epoch
        self.trigger = trigger
        self.nursery = nursery

    async def emit(self, event: Event, *, payload: object = None, error: BaseException | None = None) -> None:
        await self._driver.send(event, epoch=self.epoch, payload=payload, error=error)


ActivityFn = Callable[[StateContext], Awaitable[None]]
EffectFn = Callable[[Envelope], None]
StepObserver = Callable[[Step, Envelope, int], None]


async def dispose(payload: object) -> None:
    """Close a payload nobody took over; never raises, never hangs."""
    # Most payloads are wakes (one per event): a plain attribute look-up, not a protocol check.
    if payload is not None and getattr(payload, "aclose", None) is not None and isinstance(payload, Disposable):
        with trio.move_on_after(DISPOSE_TIMEOUT, shield=True):
            try:
                await payload.aclose()
            except Exception as exc:  # cleanup must not mask what is happening
                log.warning("payload.dispose_failed", error=repr(exc))


@dataclass
class _Entered:
    state: State
    epoch: int
    scope: trio.CancelScope
    done: trio.Event


class Driver:
    """Runs the lifecycle machine and the activity of whichever state it is in."""

    def __init__(
        self,
        activities: Mapping[str, ActivityFn],
        effects: Mapping[Effect, EffectFn],
        *,
        on_step: StepObserver | None = None,
        buffer: int = 256,
    ) -> None:
        needed = {activity.name for activity in ACTIVITIES.values() if activity is not None}
        if missing := needed - set(activities):
            raise ValueError(f"no implementation for activities {sorted(missing)}")
        if missing_effects := set(Effect) - set(effects):
            raise ValueError(f"no implementation for effects {sorted(missing_effects)}")
        self._activities = dict(activities)
        self._effects = dict(effects)
        self._on_step = on_step
        self._buffer = buffer
        self._lifecycle = Lifecycle()
        self._epoch = 0
        self._current: _Entered | None = None
        self._states: trio.Nursery | None = None
        self._inbox: trio.MemorySendChannel[Envelope] | None = None
        self._changed = trio.Event()
        self._busy_since: float | None = None

    @property
    def state(self) -> State:
        return self._lifecycle.current

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def running(self) -> bool:
        return self._inbox is not None

    def busy_for(self) -> float:
        """How long the driver has been inside one transition (0 when waiting for events).

        A transition waits for the previous state's activity to finish cancelling;
        an activity that refuses to end leaves the driver wedged here.
        """
        return 0.0 if self._busy_since is None else trio.current_time() - self._busy_since

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Process events until the lifecycle comes back to `stopped`.

        Ready (for `nursery.start`) as soon as events can be sent. The run starts
        in `stopped`; send START to get going.
        """
        if self._inbox is not None:
            raise RuntimeError("this driver is already running")
        inbox, outbox = trio.open_memory_channel[Envelope](self._buffer)
        self._inbox = inbox
        try:
            async with trio.open_nursery() as states:
                self._states = states
                task_status.started()
                async for envelope in outbox:
                    self._busy_since = trio.current_time()
                    try:
                        step = await self._handle(envelope)
                    finally:
                        self._busy_since = None
                    if step is not None and step.entered and step.target is State.STOPPED:
                        break
        finally:
            inbox.close()
            # Whatever is still queued belongs to a run that is over, ended or cancelled from
            # outside (`dispose` is shielded): a queued connection is closed, not leaked.
            with outbox:
                while True:
                    try:
                        await dispose(outbox.receive_nowait().payload)
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
            self._inbox = None
            self._states = None
            self._current = None
            if self._lifecycle.current is not State.STOPPED:
                # Cancelled from outside: the states' nursery is gone, so is the state.
                self._lifecycle = Lifecycle()
                self._notify_changed()

    async def send(
        self,
        event: Event,
        *,
        epoch: int | None = None,
        payload: object = None,
        error: BaseException | None = None,
    ) -> None:
        """Queue an event for the machine. Without a running driver it is dropped."""
        envelope = Envelope(event, epoch, payload, error)
        inbox = self._inbox
        if inbox is None:
            await dispose(payload)
            return
        try:
            await inbox.send(envelope)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            await dispose(payload)

    async def stop(self) -> None:
        """Ask for STOP and wait until the lifecycle reaches `stopped`; safe from any state."""
        if self.running:
            await self.send(Event.STOP)
        await self.wait_until(State.STOPPED)

    async def wait_until(self, *states: State) -> None:
        while self.state not in states:
            await self._changed.wait()

    async def _handle(self, envelope: Envelope) -> Step | None:
        if envelope.epoch is not None and envelope.epoch != self._epoch:
            log.debug("event.stale", lifecycle_event=envelope.event.value, epoch=envelope.epoch, current=self._epoch)
            await dispose(envelope.payload)
            return None
        step = self._lifecycle.fire(envelope.event)
        for effect in step.effects:
            self._effects[effect](envelope)
        if step.entered:
            await self._leave()
            self._epoch += 1
            self._enter(step.target, envelope)
        else:
            await dispose(envelope.payload)
        if self._on_step is not None:
            self._on_step(step, envelope, self._epoch)
        if step.entered:
            self._notify_changed()
        return step

    def _notify_changed(self) -> None:
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    async def _leave(self) -> None:
        current, self._current = self._current, None
        if current is not None:
            current.scope.cancel()
            await current.done.wait()

    def _enter(self, state: State, trigger: Envelope) -> None:
        assert self._states is not None
        entered = _Entered(state, self._epoch, trio.CancelScope(), trio.Event())
        self._current = entered
        self._states.start_soon(self._run_state, entered, trigger, ACTIVITIES[state], name=f"state:{state.value}")

    async def _run_state(self, entered: _Entered, trigger: Envelope, activity: Activity | None) -> None:
        try:
            with entered.scope:
                try:
                    async with trio.open_nursery() as nursery:
                        if activity is not None:
                            context = StateContext(self, entered.state, entered.epoch, trigger, nursery)
                            nursery.start_soon(
                                self._activities[activity.name], context, name=f"activity:{activity.name}"
                            )
                except Exception as exc:
                    assert activity is not None
                    log.exception("activity.crashed", activity=activity.name, state=entered.state.value)
                    await self.send(activity.on_crash, epoch=entered.epoch, error=exc)
        finally:
            await dispose(trigger.payload)
            entered.done.set()
