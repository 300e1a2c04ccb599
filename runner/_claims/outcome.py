"""How a claim ended (docs/design.md §5.7), and what claims report as they go.

Claims report to a `Reports` (the runner's `runner._health.Vitals` is one); they know
nothing of health rules or metrics, so health can count claims without claims knowing it.
"""

from __future__ import annotations

import enum
from typing import Protocol


class Outcome(enum.StrEnum):
    """How one claim ended."""

    COMPLETED = "completed"
    SKIPPED = "skipped"
    SUSPENDED = "suspended"
    FAILED = "failed"
    DEAD_LETTERED = "dead_lettered"
    INTERRUPTED = "interrupted"
    ABORTED = "aborted"
    FENCED = "fenced"
    ERROR = "error"


# Outcomes that count as the claim's work done, and as the claim's work not done.
SUCCEEDED = frozenset({Outcome.COMPLETED, Outcome.SUSPENDED, Outcome.DEAD_LETTERED})
FAILED = frozenset({Outcome.FAILED, Outcome.FENCED, Outcome.ERROR, Outcome.INTERRUPTED, Outcome.ABORTED})


# Why a claim leaves its subscription degraded (`Reports.problem`), until `resolved`.
HANDLER_FAILING = "handler_failing"
"""The handler failed every attempt at a batch and there is no dead-letter stream: the subscription is stuck."""
GAP_REPLAY_FAILED = "gap_replay_failed"
"""A gap the server skipped could not be replayed (it is retried with backoff, new events go on)."""


class Reports(Protocol):
    """What a claim tells the runner's records while it works."""

    def error(self, error: BaseException | str) -> None: ...
    def batch(self, outcome: str) -> None: ...
    def handler_ran(self, seconds: float) -> None: ...
    def events_handled(self, count: int) -> None: ...
    def wake_latency(self, seconds: float) -> None: ...
    def lease_renewal(self, result: str) -> None: ...
    def gap(self, action: str) -> None: ...
    def pending(self, subscription: str, streams: int) -> None: ...
    def claim_race_lost(self) -> None: ...
    def problem(self, reason: str, subject: str) -> None: ...
    def resolved(self, reason: str, subject: str) -> None: ...
