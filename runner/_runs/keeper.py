"""The runner's side of its durable runs: what it saw (stats), the deadlines it keeps (timers).

`Runner` makes one `RunKeeper`, binds its workflow handlers to it each time it runs, and
starts `serve` in its lifetime: the timer task, and (once, in the background) learning the
deadlines of suspended runs from its workflow subscriptions' deadlines indexes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import structlog
import trio
from prometheus_client import CollectorRegistry

from .._tracing import OFF, Tracing
from .._wire.protocol import Wire
from ..errors import ClientError
from .stats import RunStats
from .timers import Timers, learn_deadlines
from .workflow import WorkflowHandler

log = structlog.get_logger("pullwake.runs")


class RunKeeper:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.stats = RunStats(registry)
        self.timers = Timers()

    def bind(self, wire: Wire, handlers: Iterable[WorkflowHandler], tracing: Tracing = OFF) -> None:
        for handler in handlers:
            handler.bind(wire, timers=self.timers, stats=self.stats, tracing=tracing)

    async def serve(self, wire: Wire, subscriptions: Sequence[str]) -> None:
        """Wake runs whose deadline passed, until cancelled; learn the deadlines there are, once."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.timers.serve, wire)
            try:
                learnt = await learn_deadlines(wire, subscriptions, self.timers)
            except ClientError as exc:
                # Not fatal: deliveries and sweeps teach the same, run by run.
                log.warning("runs.learn_failed", error=str(exc))
                return
            log.info("runs.learnt", deadlines=learnt, timers=len(self.timers))

    def snapshot(self) -> dict[str, Any]:
        return {**self.stats.snapshot(timers_fired=self.timers.fired), "timers": len(self.timers)}
