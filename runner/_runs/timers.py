"""Waking runs whose wait has a deadline: the runner's only memory of a suspended run.

One small entry per suspended run with a timeout (its deadline and the timer key), learnt
from the deliveries this runner makes and, at start, from the deadlines index of each
workflow subscription (so a restarted runner, or another one, still wakes them).

The index, `__runs/~deadlines/<subscription>`, is a stream of `{"run", "deadline", "timer"}`
entries, the newest per run wins: a delivery appends one only when it changes the run's
deadline (it suspends in a wait with a timeout, or leaves one: `deadline` null). So waits
without a timeout cost nothing, and learning at start costs the index's reads (a few
requests per megabyte of entries), not one read per run's journal. An entry left stale (a
delivery cut before it could append) costs at most one timer event that wakes nothing new.
When a deadline passes, `{"type": "timer", "key": ...}` is appended to the run stream: the
server's wake brings the run to whichever runner claims it, and its replay raises
`WaitTimeout` at that wait (runner/_runs/run.py). Two runners that both know a deadline
append two timer events; the second is never consumed and only costs one more replay.
"""

from __future__ import annotations

import functools
import heapq
import time
from collections.abc import Callable, Sequence
from typing import Any

import structlog
import trio

from .._wire.protocol import Wire
from .._wire.retrying import retrying
from ..errors import ClientError, StreamNotFound
from .journal import deadlines_path, read_all
from .run import TIMER

log = structlog.get_logger("pullwake.runs")

RETRY_AFTER = 5.0
"""Seconds before a timer event that could not be appended is tried again."""


class Timers:
    """The earliest deadline per run, and a task that wakes each run when its deadline passes."""

    def __init__(self, now: Callable[[], float] = time.time) -> None:
        self._now = now
        self._due: dict[str, tuple[float, str]] = {}
        self._heap: list[tuple[float, str, str]] = []
        self._changed = trio.Event()
        self.fired = 0

    def __len__(self) -> int:
        return len(self._due)

    def due(self, run_path: str) -> tuple[float, str] | None:
        return self._due.get(run_path)

    def set(self, run_path: str, deadline: float, key: str) -> None:
        if self._due.get(run_path) == (deadline, key):
            return
        self._due[run_path] = (deadline, key)
        heapq.heappush(self._heap, (deadline, run_path, key))
        self._changed.set()

    def clear(self, run_path: str) -> None:
        self._due.pop(run_path, None)  # its heap item is skipped when it comes up

    async def serve(self, wire: Wire) -> None:
        """Append each timer event when its deadline passes; runs until cancelled."""
        while True:
            while self._heap and self._due.get(self._heap[0][1]) != (self._heap[0][0], self._heap[0][2]):
                heapq.heappop(self._heap)  # cleared or replaced
            if not self._heap:
                await self._wait_for_change(None)
                continue
            deadline, run_path, key = self._heap[0]
            delay = deadline - self._now()
            if delay > 0:
                await self._wait_for_change(delay)
                continue
            heapq.heappop(self._heap)
            del self._due[run_path]
            try:
                event = {"type": TIMER, "key": key}
                await retrying(functools.partial(wire.append, run_path, event), what=f"timer {run_path}")
            except ClientError as exc:
                log.warning("run.timer_failed", run=run_path, key=key, error=str(exc), retry_in=RETRY_AFTER)
                self.set(run_path, self._now() + RETRY_AFTER, key)
                continue
            self.fired += 1
            log.info("run.timer_fired", run=run_path, key=key, late=round(self._now() - deadline, 3))

    async def _wait_for_change(self, timeout: float | None) -> None:
        with trio.move_on_after(timeout if timeout is not None else float("inf")):
            await self._changed.wait()
        self._changed = trio.Event()


Due = tuple[float, str] | None
"""(deadline, timer key) of a run's wait, or None."""


async def index_deadline(wire: Wire, subscription: str, run_path: str, before: Due, after: Due) -> None:
    """Append the run's new deadline to the subscription's index, if this delivery changed it."""
    if before == after:
        return
    entry = {"run": run_path, "deadline": after[0] if after else None, "timer": after[1] if after else None}
    path = deadlines_path(subscription)
    try:
        await retrying(functools.partial(wire.append, path, entry), what=f"index {path}")
    except StreamNotFound:  # the subscription's first run with a timeout
        await retrying(functools.partial(wire.create_stream, path), what=f"create {path}")
        await retrying(functools.partial(wire.append, path, entry), what=f"index {path}")


async def learn_deadlines(wire: Wire, subscriptions: Sequence[str], timers: Timers) -> int:
    """Read the subscriptions' deadlines indexes into `timers`; returns how many runs have one."""
    learnt = 0
    for subscription in subscriptions:
        newest: dict[str, dict[str, Any]] = {}
        for entry in await read_all(wire, deadlines_path(subscription)) or []:
            if isinstance(entry, dict) and isinstance(entry.get("run"), str):
                newest[entry["run"]] = entry
        for run_path, entry in newest.items():
            if isinstance(entry.get("deadline"), int | float):
                timers.set(run_path, float(entry["deadline"]), str(entry.get("timer")))
                learnt += 1
    return learnt
