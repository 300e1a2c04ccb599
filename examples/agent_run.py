"""A durable agent run: a fake model plans tool calls, a person approves each, the tool runs.

Configure a workflow subscription with it (`workflow = "examples.agent_run:agent"`), then:

    pullwake runs start agent-runs runs/42 --input '{"task": "tidy the logs"}'
    pullwake runs                     # runs/42  suspended  waiting for approval call-1
    pullwake runs send runs/42 approval --key call-1 --data '{"approved": true}'

Each step's result is journaled once: a runner killed at any point, or a run suspended for
days, goes on where it was without redoing a finished step. AGENT_RUN_RECORD names a file
that gets one line per step actually executed (the tests count them).
"""

from __future__ import annotations

import json
import os
from typing import Any

from runner import Run


def _executed(step: str) -> None:
    if path := os.environ.get("AGENT_RUN_RECORD"):
        with open(path, "a") as record:
            record.write(json.dumps({"step": step, "pid": os.getpid()}) + "\n")


def fake_model(task: str) -> dict[str, Any]:
    """Stands in for a model call: slow, costly, and not to be repeated."""
    _executed("plan")
    return {"calls": [{"id": "call-1", "tool": "delete_logs", "args": {"older_than_days": 30}}], "task": task}


async def delete_logs(call: dict[str, Any]) -> dict[str, Any]:
    """The tool that needs a person's approval first."""
    _executed(f"tool:{call['id']}")
    return {"deleted": 12, "older_than_days": call["args"]["older_than_days"]}


def summarise(results: list[Any]) -> str:
    _executed("summary")
    return f"{len(results)} tool call(s) done"


async def agent(run: Run) -> object:
    plan = await run.step("plan", fake_model, run.input["task"])
    results = []
    for call in plan["calls"]:
        # Keyed by the call's id, not the tool's name: two calls of one tool need two approvals.
        decision = await run.wait_for("approval", key=call["id"])
        if decision.get("approved"):
            results.append(await run.step(f"tool:{call['id']}", delete_logs, call))
    summary = await run.step("summary", summarise, results)
    return {"summary": summary, "results": results}
