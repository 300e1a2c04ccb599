"""examples/agent_run.py end to end with real processes: start, suspend, kill -9, approve, resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from tests.support import World, eventually
from tests.test_end_to_end import ROOT, start_runner_process


def write_workflow_config(path: Path, world: World, state_dir: Path) -> Path:
    body = [
        f'server_url = "{world.url}"',
        f'runner_id = "agent-{world.uid}"',
        f'wake_stream = "{world.wake}"',
        f'state_dir = "{state_dir}"',
        "heartbeat_interval = 0.5",
        "heartbeat_timeout = 0.5",
        "[[subscriptions]]",
        f'id = "{world.sub}"',
        f'pattern = "runs-{world.uid}/*"',
        "lease_ttl_ms = 2000",
        'workflow = "examples.agent_run:agent"',
    ]
    path.write_text("\n".join(body) + "\n")
    return path


def pullwake(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "runner", *args], capture_output=True, text=True, timeout=30, cwd=ROOT, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


async def runs(config: Path) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] = json.loads(
        await trio.to_thread.run_sync(pullwake, "runs", "--config", str(config), "--json")
    )
    return listed


async def test_an_agent_run_survives_kill_9_while_suspended_and_no_step_runs_twice(
    world: World, tmp_path: Path
) -> None:
    config = write_workflow_config(tmp_path / "runner.toml", world, tmp_path / "state")
    record = tmp_path / "steps.txt"
    record.touch()
    log = tmp_path / "runner.log"
    run_path = f"runs-{world.uid}/42"

    async def status() -> dict[str, Any]:
        return next((run for run in await runs(config) if run["id"] == run_path), {})

    first = start_runner_process(config, log, AGENT_RUN_RECORD=str(record))
    try:
        await eventually(lambda: '"target": "streaming"' in log.read_text(), what="the first runner to stream")
        await trio.to_thread.run_sync(
            pullwake, "runs", "start", world.sub, run_path, "--input", '{"task": "tidy"}', "--config", str(config)
        )
        await eventually(lambda: _status_is(status, "suspended"), timeout=20, what="the run to suspend for an approval")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    suspended = await status()
    assert suspended["waiting_for"] == {"type": "approval", "key": "call-1"}
    assert suspended["steps"] == ["plan"]

    await trio.to_thread.run_sync(
        pullwake,
        "runs",
        "send",
        run_path,
        "approval",
        "--key",
        "call-1",
        "--data",
        '{"approved": true}',
        "--config",
        str(config),
    )
    second = start_runner_process(config, log, AGENT_RUN_RECORD=str(record))
    try:
        await eventually(lambda: _status_is(status, "completed"), timeout=25, what="another runner to finish the run")
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(15)
    done = await status()
    assert done["steps"] == ["plan", "tool:call-1", "summary"]
    assert done["result"]["summary"] == "1 tool call(s) done"
    executed = [json.loads(line) for line in record.read_text().splitlines()]
    assert [entry["step"] for entry in executed] == ["plan", "tool:call-1", "summary"], "no step ran twice"
    assert executed[0]["pid"] == first.pid
    assert {entry["pid"] for entry in executed[1:]} == {second.pid}


async def _status_is(status: Any, expected: str) -> bool:
    return bool((await status()).get("status") == expected)
