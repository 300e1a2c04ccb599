"""A workflow made into an ordinary handler: each batch of a run stream replays the run.

The batch only says which run to look at: the handler reads the whole run stream (input and
events) and the journal, runs the workflow from the top in a `Run`, and journals what
changed. It returns SUSPEND when the run waits for an event it does not have (the claim
acknowledges the stream and lets go: nothing is held), None when the run has ended.
Errors of the wire propagate: the batch is delivered again and the replay is cheap.

Every delivery journals `running` first (it takes the delivery's epoch: journal.py, Epochs).
A cancel event in the run stream ends the run `cancelled`; while a step runs, the run stream
is watched (one long-poll) so a cancel that arrives meanwhile cuts the step. A stop, an abort
or a lost lease that cuts a step journals `interrupted` (bounded, best effort): the step runs
again at the next claim, the journal keeps every step that finished.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Any

import structlog
import trio

from .._handlers.batch import SUSPEND, Batch, HandlerResult
from .._tracing import OFF, Tracing
from .._wire.protocol import Wire
from .._wire.retrying import retrying
from ..errors import ClientError, ConfigError, RunnerError
from .journal import JournalState, JournalWriter, journal_path, read_all, read_stream
from .run import CANCEL, Run, RunCancelled, Suspended
from .stats import RunStats
from .timers import Due, Timers, index_deadline

log = structlog.get_logger("pullwake.runs")

Workflow = Callable[[Run], Awaitable[Any]]

INTERRUPTED_RECORD_TIMEOUT = 2.0
"""How long a cut delivery may take to journal `interrupted` (shielded from the cancellation)."""
HOLD = 30.0
"""Seconds a delivery says it holds its run for (the subscription's lease, set by the runner)."""
WATCH_HOLD = 20.0
"""Seconds one long-poll of a run stream is held while a step runs (the server may answer sooner)."""


class WorkflowHandler:
    """The handler of a workflow subscription; `bind` gives it the wire of each runner run."""

    def __init__(self, subscription: str, workflow: Workflow) -> None:
        if not callable(workflow):
            raise ConfigError(f"the workflow of {subscription!r} is not callable")
        self.subscription = subscription
        self.workflow = workflow
        self.__name__ = getattr(workflow, "__name__", "workflow")
        self._wire: Wire | None = None
        self.timers = Timers()
        self.stats = RunStats()
        self.tracing = OFF
        self.now: Callable[[], float] = time.time
        self.hold = HOLD

    def bind(
        self,
        wire: Wire,
        *,
        timers: Timers | None = None,
        stats: RunStats | None = None,
        tracing: Tracing = OFF,
        now: Callable[[], float] = time.time,
    ) -> None:
        self._wire = wire
        self.timers = timers if timers is not None else self.timers
        self.stats = stats if stats is not None else self.stats
        self.tracing = tracing
        self.now = now

    async def __call__(self, batch: Batch) -> HandlerResult:
        wire = self._wire
        if wire is None:
            raise RunnerError("a workflow handler was called outside a running runner")
        run_path = batch.stream
        read = await read_stream(wire, run_path)
        if read is None or not read[0]:
            return None  # nothing to run yet (the input is the run stream's first message)
        messages, offset = read
        entries = await read_all(wire, journal_path(run_path))
        if entries is None:
            await retrying(lambda: wire.create_stream(journal_path(run_path)), what="create run journal")
            entries = []
        state = JournalState.of(entries)
        deadline = state.deadline
        if state.finished:
            self.timers.clear(run_path)
            log.debug("run.already_ended", run=run_path, status=state.status)
            return None  # a late event resumes nothing
        journal = JournalWriter(wire, run_path, state, batch.generation)
        await journal.record(
            {
                "kind": "status",
                "status": "running",
                "generation": batch.generation,
                "at": self.now(),
                "held_for": self.hold,
            }
        )
        self.stats.seen(run_path, "running")
        if (cancel := _cancel_event(messages[1:])) is not None:
            return await self._end(journal, deadline, "cancelled", reason=cancel.get("reason"))
        run = Run(run_path, messages, journal, subscription=self.subscription, now=self.now, tracing=self.tracing)
        try:
            outcome, value = await self._play(wire, run, offset, journal)
        except BaseException:
            if run.in_flight is not None:
                await self._interrupted(journal, run.in_flight)
            raise
        finally:
            self.stats.step("executed", len(run.executed))
            self.stats.step("replayed", run.replayed)
            self.stats.step("failed", run.failed)
        if outcome == "suspended":
            await journal.record({"kind": "status", "status": "suspended", "waiting_for": value})
            self.stats.seen(run_path, "suspended")
            if (due := journal.state.deadline) is not None:
                self.timers.set(run_path, *due)
            else:
                self.timers.clear(run_path)
            await index_deadline(wire, self.subscription, run_path, deadline, due)
            log.info("run.suspended", run=run_path, waiting_for=value, executed=run.executed)
            return SUSPEND
        if outcome == "cancelled":
            return await self._end(journal, deadline, "cancelled", reason=value.event.get("reason"), step=value.step)
        if outcome == "error":
            return await self._end(journal, deadline, "failed", error=f"{type(value).__name__}: {value}")
        try:
            json.dumps(value)
        except (TypeError, ValueError) as exc:
            return await self._end(journal, deadline, "failed", error=f"the run's result is not JSON: {exc}")
        log.info("run.completed", run=run_path, executed=run.executed)
        return await self._end(journal, deadline, "completed", result=value)

    async def _play(self, wire: Wire, run: Run, offset: str, journal: JournalWriter) -> tuple[str, Any]:
        """Run the workflow once: ("result" | "suspended" | "cancelled" | "error", what it came to)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._say_held, journal)
            watching = False

            def executing() -> None:  # a step is about to run: from now on a cancel must reach it
                nonlocal watching
                if not watching:
                    watching = True
                    nursery.start_soon(_watch_for_cancel, wire, run, offset)

            run._executing = executing
            try:
                result: tuple[str, Any] = ("result", await self.workflow(run))
            except Suspended as suspended:
                result = ("suspended", suspended.waiting_for)
            except RunCancelled as cancelled:
                result = ("cancelled", cancelled)
            except ClientError as exc:
                result = ("ours", exc)  # the wire or the claim failed, not the workflow: raised below
            except Exception as exc:
                result = ("error", exc)
            nursery.cancel_scope.cancel()  # the watcher and the `held` entries
        if result[0] == "ours":
            raise result[1]
        return result

    async def _say_held(self, journal: JournalWriter) -> None:
        """While the delivery goes on, a `held` entry every third of its hold: readers tell a live
        holder from a killed one by it (journal.py, Holding). Best effort: a delivery that cannot
        write is fenced or cut off, and its claim machinery finds out on its own."""
        while True:
            await trio.sleep(self.hold / 3)
            with suppress(ClientError):
                await journal.record({"kind": "held", "at": self.now()})

    async def _end(self, journal: JournalWriter, deadline: Due, status: str, **detail: Any) -> HandlerResult:
        await journal.record({"kind": "status", "status": status, **detail})
        await index_deadline(journal.wire, self.subscription, journal.run_path, deadline, None)
        self.stats.seen(journal.run_path, status)
        self.timers.clear(journal.run_path)
        if status != "completed":
            log.warning(f"run.{status}", run=journal.run_path, **detail)
        return None

    async def _interrupted(self, journal: JournalWriter, step: str) -> None:
        """A stop, an abort or a lost lease cut `step`: say so in the journal, if it can be said quickly."""
        with trio.CancelScope(shield=True), trio.move_on_after(INTERRUPTED_RECORD_TIMEOUT), suppress(ClientError):
            await journal.record({"kind": "status", "status": "interrupted", "step": step})
            self.stats.seen(journal.run_path, "interrupted")
        log.warning("run.interrupted", run=journal.run_path, step=step)


def _cancel_event(events: list[Any]) -> dict[str, Any] | None:
    return next((m for m in events if isinstance(m, dict) and m.get("type") == CANCEL), None)


async def _watch_for_cancel(wire: Wire, run: Run, offset: str) -> None:
    """Long-poll the run stream while the workflow runs; a cancel event cuts the step in flight."""
    while True:
        try:
            result = await wire.long_poll(run.id, offset, hold=WATCH_HOLD)
        except ClientError as exc:
            log.debug("run.watch_failed", run=run.id, error=str(exc))
            await trio.sleep(1.0)  # a backoff, not a synchronisation: the watch is best effort
            continue
        if (cancel := _cancel_event(result.messages)) is not None:
            run.cancel(cancel)
            return
        if result.next_offset:
            offset = result.next_offset
