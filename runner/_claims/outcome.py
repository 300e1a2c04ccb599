"""How a claim ended (docs/design.md §5.7): the vocabulary claims, the dispatcher and health reports share."""

from __future__ import annotations

import enum


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
