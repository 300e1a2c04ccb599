"""Handlers for runner processes the benchmarks start."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import trio

from runner import Batch


async def noop(batch: Batch) -> None:
    """Accept every batch at once: the benchmark measures the runner, not the work."""


def write_times(path: str, messages: list[Any]) -> None:
    """One line per message: its "i" (if any) and when the handler got it (perf_counter, system-wide
    CLOCK_MONOTONIC on Linux, so comparable with the bench process's clock). The baseline writes the
    same lines the same way, so both pay the same for being observed."""
    now = time.perf_counter()
    lines = "".join(
        json.dumps({"i": message.get("i") if isinstance(message, dict) else None, "t": now}) + "\n"
        for message in messages
    )
    with open(path, "a") as out:
        out.write(lines)


async def record(batch: Batch) -> None:
    """Write when each message was handled to $BENCH_RECORD.

    $BENCH_DELAY (seconds) makes every batch take that long, after a {"started": ...} line:
    a claim to kill the process in the middle of.
    """
    path = os.environ["BENCH_RECORD"]
    if delay := float(os.environ.get("BENCH_DELAY", "0")):
        with open(path, "a") as out:  # noqa: ASYNC230
            out.write(json.dumps({"started": batch.next_offset, "pid": os.getpid()}) + "\n")
        await trio.sleep(delay)
    write_times(path, list(batch.messages))
