"""Workflows for runner processes started by tests (`workflow = "tests.run_workflows:chaos"`).

Each executed step writes a "start" line before its work and an "end" line after it to the
file named by PULLWAKE_TEST_RECORD, so a test counts executions even in a process it killed.
"""

from __future__ import annotations

import json
import os
import random

import trio

from runner import Run

STEPS = 5


def _write(line: dict[str, object]) -> None:
    with open(os.environ["PULLWAKE_TEST_RECORD"], "a") as out:
        out.write(json.dumps({**line, "pid": os.getpid()}) + "\n")


async def chaos(run: Run) -> object:
    total = 0
    for index in range(STEPS):

        async def work(index: int = index) -> int:
            _write({"run": run.id, "step": index, "phase": "start"})
            await trio.sleep(random.uniform(0.0, 0.15))  # spreads the kills over the steps
            _write({"run": run.id, "step": index, "phase": "end"})
            return index

        total += await run.step(f"s{index}", work)
    return total
