"""Workflows for runner processes started by tests (`workflow = "tests.run_workflows:NAME"`)."""

from __future__ import annotations

import trio

from bench.run_chaos import record_line
from runner import Run


async def stuck(run: Run) -> object:
    """One step that says it started, then takes far longer than any test waits."""

    async def forever() -> None:
        record_line({"run": run.id, "step": 0, "phase": "start"})
        await trio.sleep_forever()

    return await run.step("forever", forever)
