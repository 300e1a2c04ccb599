"""What this runner saw of durable runs: `pullwake_runs{status}`, `pullwake_runs_ended_total{status}`,
step counters, `Runner.health().runs`.

Runs that have not ended are kept by path (their last status, a short string); ended runs
only count. Labels are the statuses and step results: bounded, never a run's path.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client import Counter as PromCounter

from .journal import STATUSES, TERMINAL

STEP_RESULTS = ("executed", "replayed", "failed")


class RunStats:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._live: dict[str, str] = {}
        self._ended: Counter[str] = Counter()
        self.steps: Counter[str] = Counter()
        self._gauge = Gauge(
            "pullwake_runs",
            "Durable runs this runner has seen, by their last status (ended ones since the runner started)",
            ["status"],
            registry=registry,
        )
        self._ended_total = PromCounter(
            "pullwake_runs_ended",
            "Durable runs that ended on this runner, by how (a counter: alerts survive a runner restart)",
            ["status"],
            registry=registry,
        )
        self._steps = PromCounter(
            "pullwake_run_steps",
            "Steps of durable runs: executed (and journaled), replayed from the journal, failed for good",
            ["result"],
            registry=registry,
        )
        for status in STATUSES:
            self._gauge.labels(status).set(0)
        for status in sorted(TERMINAL):
            self._ended_total.labels(status)
        for result in STEP_RESULTS:
            self._steps.labels(result)

    def seen(self, run_path: str, status: str) -> None:
        before = self._live.pop(run_path, None)
        if before is not None:
            self._gauge.labels(before).dec()
        if status in TERMINAL:
            self._ended[status] += 1  # called once per run that ends here
            self._ended_total.labels(status).inc()
        else:
            self._live[run_path] = status
        self._gauge.labels(status).inc()

    def step(self, result: str, count: int = 1) -> None:
        if count:
            self.steps[result] += count
            self._steps.labels(result).inc(count)

    def snapshot(self, timers_fired: int = 0) -> dict[str, Any]:
        by_status = Counter(self._live.values()) + self._ended
        return {
            "by_status": {status: by_status.get(status, 0) for status in STATUSES},
            "steps": {result: self.steps.get(result, 0) for result in STEP_RESULTS},
            "timers_fired": timers_fired,
        }
