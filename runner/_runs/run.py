"""`Run`: what a workflow is given. Steps replay from the journal; waits read the run stream.

A workflow runs from the top on every delivery. `step` at position n returns the journaled
result of step n if there is one (and checks it is the same step), else runs the function
and journals its result before returning it. `wait_for` looks for the event in the run
stream; without one the run suspends: `Suspended` unwinds the workflow (a BaseException,
so a workflow's own `except Exception` cannot swallow it) and nothing of it is kept.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable
from typing import Any

import structlog
import trio

from ..errors import NondeterministicRun, StepFailed
from .journal import JournalWriter

log = structlog.get_logger("pullwake.runs")


class Suspended(BaseException):  # a signal that unwinds the workflow, not an error
    """The run waits for an event the run stream does not have yet."""

    def __init__(self, waiting_for: dict[str, Any]) -> None:
        super().__init__(f"waiting for {waiting_for}")
        self.waiting_for = waiting_for


class Run:
    """One durable run, as its workflow sees it: `input`, `step`, `wait_for`."""

    def __init__(self, path: str, messages: list[Any], journal: JournalWriter) -> None:
        self.id = path
        """The run stream's path."""
        self.input: Any = messages[0]
        """The run stream's first message."""
        self._events = [message for message in messages[1:] if isinstance(message, dict)]
        self._journal = journal
        self._position = 0
        self.executed: list[str] = []
        """Steps that ran in this delivery (the others returned their journaled result)."""

    def __repr__(self) -> str:
        return f"<Run {self.id!r}>"

    async def step(self, name: str, function: Callable[..., Any], *args: Any, attempts: int = 1) -> Any:
        """Run `function(*args)` once for this run and return its (JSON-serialisable) result.

        Journaled: a replay returns the recorded result without calling it. A function that
        raises on every one of its `attempts` fails the step for good: `StepFailed`, now and
        on every replay.
        """
        position, self._position = self._position, self._position + 1
        recorded = self._journal.state.steps
        if position < len(recorded):
            entry = recorded[position]
            if entry.get("name") != name:
                raise NondeterministicRun(
                    f"run {self.id}: step {position} is {name!r} now, but the journal holds {entry.get('name')!r} "
                    "there: the code between steps must be deterministic"
                )
            if "error" in entry:
                raise StepFailed(name, str(entry["error"]))
            return entry.get("result")
        error: str | None = None
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
            self.executed.append(name)
            await self._journal.record({"kind": "step", "at": position, "name": name, "result": result})
            return result
        assert error is not None
        self.executed.append(name)
        await self._journal.record({"kind": "step", "at": position, "name": name, "error": error})
        raise StepFailed(name, error)

    async def wait_for(self, type: str, key: str | None = None, timeout: float | None = None) -> dict[str, Any]:
        """The first event of the run stream with this `type` (and `key`); suspend the run until there is one.

        Later duplicates are ignored: the first one wins.
        """
        if timeout is not None:
            raise NotImplementedError("wait_for(timeout=...) is not implemented yet")
        matching = [
            event for event in self._events if event.get("type") == type and (key is None or event.get("key") == key)
        ]
        if not matching:
            raise Suspended({"type": type, "key": key})
        if len(matching) > 1:
            log.debug("run.duplicate_event_ignored", run=self.id, type=type, key=key, duplicates=len(matching) - 1)
        return matching[0]


async def _call(function: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    if inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(getattr(function, "__call__", None)):  # noqa: B004
        return await function(*args)
    # A sync step runs in a thread: it must not block the runner's other claims.
    result = await trio.to_thread.run_sync(functools.partial(function, *args), abandon_on_cancel=True)
    return await result if inspect.isawaitable(result) else result
