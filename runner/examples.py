"""Handlers to point a configuration at while setting things up.

handler = "runner.examples:log_batch"
"""

from __future__ import annotations

import structlog

from ._handlers.batch import Batch

log = structlog.get_logger("pullwake.examples")


async def log_batch(batch: Batch) -> None:
    """Log what arrived and acknowledge it: proves the pipeline end to end."""
    log.info(
        "example.batch",
        subscription=batch.subscription,
        stream=batch.stream,
        messages=len(batch.messages),
        start_offset=batch.start_offset,
        next_offset=batch.next_offset,
        attempt=batch.attempt,
    )
