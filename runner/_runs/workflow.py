"""A workflow made into an ordinary handler: each batch of a run stream replays the run.

The batch only says which run to look at: the handler reads the whole run stream (input and
events) and the journal, runs the workflow from the top in a `Run`, and journals what
changed. It returns SUSPEND when the run waits for an event it does not have (the claim
acknowledges the stream and lets go: nothing is held), None when the run has ended.
Errors of the wire propagate: the batch is delivered again and the replay is cheap.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from .._handlers.batch import SUSPEND, Batch, HandlerResult
from .._wire.protocol import Wire
from .._wire.retrying import retrying
from ..errors import ClientError, ConfigError, RunnerError
from .journal import JournalState, JournalWriter, journal_path, read_all
from .run import Run, Suspended

log = structlog.get_logger("pullwake.runs")

Workflow = Callable[[Run], Awaitable[Any]]


class WorkflowHandler:
    """The handler of a workflow subscription; `bind` gives it the wire of each runner run."""

    def __init__(self, subscription: str, workflow: Workflow) -> None:
        if not callable(workflow):
            raise ConfigError(f"the workflow of {subscription!r} is not callable")
        self.subscription = subscription
        self.workflow = workflow
        self.__name__ = getattr(workflow, "__name__", "workflow")
        self._wire: Wire | None = None

    def bind(self, wire: Wire) -> None:
        self._wire = wire

    async def __call__(self, batch: Batch) -> HandlerResult:
        wire = self._wire
        if wire is None:
            raise RunnerError("a workflow handler was called outside a running runner")
        run_path = batch.stream
        messages = await read_all(wire, run_path)
        if not messages:
            return None  # nothing to run yet (the input is the run stream's first message)
        entries = await read_all(wire, journal_path(run_path))
        if entries is None:
            await retrying(lambda: wire.create_stream(journal_path(run_path)), what="create run journal")
            entries = []
        state = JournalState.of(entries)
        if state.finished:
            log.debug("run.already_ended", run=run_path, status=state.status)
            return None  # a late event resumes nothing
        journal = JournalWriter(wire, run_path, state, epoch=batch.generation)
        if state.status != "running":
            await journal.record({"kind": "status", "status": "running"})
        run = Run(run_path, messages, journal)
        try:
            result = await self.workflow(run)
        except Suspended as suspended:
            await journal.record({"kind": "status", "status": "suspended", "waiting_for": suspended.waiting_for})
            log.info("run.suspended", run=run_path, waiting_for=suspended.waiting_for, executed=run.executed)
            return SUSPEND
        except Exception as exc:
            if _ours(exc):
                raise  # the wire or the claim failed, not the workflow: the batch comes again
            error = f"{type(exc).__name__}: {exc}"
            await journal.record({"kind": "status", "status": "failed", "error": error})
            log.warning("run.failed", run=run_path, error=error)
            return None
        try:
            json.dumps(result)
        except (TypeError, ValueError) as exc:
            error = f"the run's result is not JSON: {exc}"
            await journal.record({"kind": "status", "status": "failed", "error": error})
            log.warning("run.failed", run=run_path, error=error)
            return None
        await journal.record({"kind": "status", "status": "completed", "result": result})
        log.info("run.completed", run=run_path, executed=run.executed)
        return None


def _ours(error: BaseException) -> bool:
    """Errors of the wire (journal appends, reads) and fencing are no verdict on the workflow."""
    return isinstance(error, ClientError)
