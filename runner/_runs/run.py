"""`Run`: what a workflow is given. Steps replay from the journal; waits read the run stream.

A workflow runs from the top on every delivery. `step` at position n returns the journaled
result of step n if there is one (and checks it is the same step), else runs the function
and journals its result before returning it. `wait_for` takes the first event of the run
stream that matches and that no earlier wait took (events are consumed in stream order, so
two waits for one type and key get two events); without one the run suspends: `Suspended`
unwinds the workflow (a BaseException, so a workflow's own `except Exception` cannot swallow
it) and nothing of it is kept.

A wait with a `timeout` journals its deadline the first time it suspends. Whether it ends
with an event or with `WaitTimeout` is decided by the run stream alone, never by a clock:
when the deadline passes, a runner appends `{"type": "timer", "key": "wait-<n>"}` (n = the
wait's position among the run's waits) to the run stream, which wakes the run; the replay
then finds the timer event, or a matching event before it. Every replay decides the same.
"""

from __future__ import annotations

import functools
import inspect
import json
import time
from collections.abc import Callable
from typing import Any

import structlog
import trio

from .._tracing import OFF, Tracing
from ..errors import NondeterministicRun, StepFailed, WaitTimeout
from .journal import JournalWriter

log = structlog.get_logger("pullwake.runs")

TIMER = "timer"
"""The type of the events a runner appends when a wait's deadline passes."""
CANCEL = "cancel"
"""The type of the event that cancels a run (`pullwake runs cancel`)."""
RESERVED = frozenset({TIMER, CANCEL})


def timer_key(wait: int) -> str:
    return f"wait-{wait}"


class Suspended(BaseException):  # a signal that unwinds the workflow, not an error
    """The run waits for an event the run stream does not have yet."""

    def __init__(self, waiting_for: dict[str, Any]) -> None:
        super().__init__(f"waiting for {waiting_for}")
        self.waiting_for = waiting_for


class RunCancelled(BaseException):  # like Suspended: unwinds the workflow, whatever it catches
    """A cancel event arrived for the run: it ends `cancelled` (the step in flight, if any, was cut)."""

    def __init__(self, event: dict[str, Any], step: str | None) -> None:
        super().__init__(f"cancelled by {event}")
        self.event = event
        self.step = step


class Run:
    """One durable run, as its workflow sees it: `input`, `step`, `wait_for`."""

    def __init__(
        self,
        path: str,
        messages: list[Any],
        journal: JournalWriter,
        *,
        subscription: str = "",
        now: Callable[[], float] = time.time,
        tracing: Tracing = OFF,
        executing: Callable[[], None] | None = None,
    ) -> None:
        self.id = path
        """The run stream's path."""
        self.input: Any = messages[0]
        """The run stream's first message."""
        self._events: list[dict[str, Any] | None] = [m if isinstance(m, dict) else None for m in messages[1:]]
        self._consumed: set[int] = set()
        self._journal = journal
        self._subscription = subscription
        self._now = now
        self._tracing = tracing
        self._executing = executing
        self._position = 0
        self._waits = 0
        self.executed: list[str] = []
        """Steps that ran in this delivery (the others returned their journaled result)."""
        self.replayed = 0
        """Steps that returned their journaled result in this delivery."""
        self.failed = 0
        """Steps that ran in this delivery and failed for good."""
        self.in_flight: str | None = None
        """The step whose function is running now (left set when a cancellation cuts it)."""
        self.cancel_event: dict[str, Any] | None = None
        self._step_scope: trio.CancelScope | None = None

    def __repr__(self) -> str:
        return f"<Run {self.id!r}>"

    def cancel(self, event: dict[str, Any]) -> None:
        """A cancel event arrived: cut the step in flight, and end the run at its next step or wait."""
        self.cancel_event = event
        if self._step_scope is not None:
            self._step_scope.cancel()

    def _check_cancelled(self, step: str | None = None) -> None:
        if self.cancel_event is not None:
            raise RunCancelled(self.cancel_event, step)

    async def step(self, name: str, function: Callable[..., Any], *args: Any, attempts: int = 1) -> Any:
        """Run `function(*args)` once for this run and return its (JSON-serialisable) result.

        Journaled: a replay returns the recorded result without calling it. A function that
        raises on every one of its `attempts` fails the step for good: `StepFailed`, now and
        on every replay.
        """
        self._check_cancelled()
        position, self._position = self._position, self._position + 1
        recorded = self._journal.state.steps
        if position < len(recorded):
            entry = recorded[position]
            if entry.get("name") != name:
                raise NondeterministicRun(
                    f"run {self.id}: step {position} is {name!r} now, but the journal holds {entry.get('name')!r} "
                    "there: the code between steps must be deterministic"
                )
            self.replayed += 1
            if "error" in entry:
                raise StepFailed(name, str(entry["error"]))
            return entry.get("result")
        if self._executing is not None:
            self._executing()
        with self._tracing.internal(
            f"step {self._subscription}",
            {"pullwake.run.id": self.id, "pullwake.step.name": name, "pullwake.step.position": position},
        ) as span:
            self.in_flight = name
            with trio.CancelScope() as self._step_scope:
                entry = await self._execute(name, position, function, args, attempts)
            self._step_scope = None
            self._check_cancelled(name)  # cut (or finished just as the cancel came): not journaled
            self.in_flight = None
            self.executed.append(name)
            await self._journal.record(entry)
            if "error" in entry:
                self.failed += 1
                raise StepFailed(name, str(entry["error"]))  # the span says error.type = StepFailed
            span.set_attribute("pullwake.step.outcome", "journaled")
            return entry["result"]

    async def _execute(
        self, name: str, position: int, function: Callable[..., Any], args: tuple[Any, ...], attempts: int
    ) -> dict[str, Any]:
        error = "never ran"
        for attempt in range(1, max(1, attempts) + 1):
            try:
                result = await _call(function, args)
                json.dumps(result)  # what cannot be journaled cannot be replayed
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                log.warning("run.step_failed", run=self.id, step=name, attempt=attempt, error=error)
                if attempt < attempts:
                    await trio.sleep(min(0.5 * 2 ** (attempt - 1), 30.0))
                continue
            return {"kind": "step", "at": position, "name": name, "result": result}
        return {"kind": "step", "at": position, "name": name, "error": error}

    async def wait_for(self, type: str, key: str | None = None, timeout: float | None = None) -> dict[str, Any]:
        """The first event of the run stream with this `type` (and `key`) that no earlier wait took.

        Without one, the run suspends until one arrives. With `timeout` (seconds), `WaitTimeout`
        is raised here once the deadline passes first (a runner serving the subscription wakes
        the run for it, even if nothing arrives).
        """
        if type in RESERVED:
            raise ValueError(f"wait_for({type!r}): {sorted(RESERVED)} are the runner's own event types")
        self._check_cancelled()
        wait, self._waits = self._waits, self._waits + 1
        timer = self._journal.state.timers.get(wait)
        with self._tracing.internal(
            f"wait {self._subscription}",
            {"pullwake.run.id": self.id, "pullwake.wait.type": type, "pullwake.wait.position": wait},
        ) as span:
            found = self._take(type, key, timer_key(wait) if timer is not None else None)
            span.set_attribute("pullwake.wait.outcome", "event" if found else "timeout" if found == {} else "suspended")
            if found is None:
                waiting: dict[str, Any] = {"type": type, "key": key}
                if timeout is not None:
                    if timer is None:
                        deadline = self._now() + timeout
                        await self._journal.record(
                            {"kind": "timer", "wait": wait, "type": type, "key": key, "deadline": deadline}
                        )
                    else:
                        deadline = float(timer["deadline"])
                    waiting |= {"deadline": deadline, "timer": timer_key(wait)}
        if found is None:
            raise Suspended(waiting)
        if not found:
            raise WaitTimeout(type, key, timeout)
        return found

    def _take(self, type: str, key: str | None, timer: str | None) -> dict[str, Any] | None:
        """Consume the first event that answers the wait: a match (returned), its timer ({}), or none (None)."""
        for index, event in enumerate(self._events):
            if event is None or index in self._consumed:
                continue
            if timer is not None and event.get("type") == TIMER and event.get("key") == timer:
                self._consumed.add(index)
                return {}
            if event.get("type") == type and (key is None or event.get("key") == key):
                self._consumed.add(index)
                return event
        return None


async def _call(function: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    if inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(getattr(function, "__call__", None)):  # noqa: B004
        return await function(*args)
    # A sync step runs in a thread: it must not block the runner's other claims.
    result = await trio.to_thread.run_sync(functools.partial(function, *args), abandon_on_cancel=True)
    return await result if inspect.isawaitable(result) else result
