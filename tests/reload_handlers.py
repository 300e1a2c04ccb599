"""Handlers named in a configuration (`handler = "tests.reload_handlers:record"`), for reload tests in-process.

A reload resolves handlers from the configuration, so a test cannot hand it a Recorder object:
these record per subscription, and hold a subscription's batches while its gate is closed.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import trio

from runner import Batch

HANDLED: defaultdict[str, list[Any]] = defaultdict(list)
"""Subscription -> every message its handler finished, in order."""
GATES: dict[str, trio.Event] = {}
"""Subscription -> an event its batches wait for (absent: they go through)."""
HELD: defaultdict[str, int] = defaultdict(int)
"""Subscription -> how many batches are waiting at its gate now."""


async def record(batch: Batch) -> None:
    if (gate := GATES.get(batch.subscription)) is not None:
        HELD[batch.subscription] += 1
        try:
            await gate.wait()
        finally:
            HELD[batch.subscription] -= 1
    HANDLED[batch.subscription].extend(batch.messages)
