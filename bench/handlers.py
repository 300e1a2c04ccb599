"""Handlers for runner processes the benchmarks start."""

from __future__ import annotations

from runner import Batch


async def noop(batch: Batch) -> None:
    """Accept every batch at once: the benchmark measures the runner, not the work."""
