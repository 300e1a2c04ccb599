"""Durable runs under kill -9: runner processes killed at random, between and inside steps.

Two `pullwake run` processes serve one workflow subscription; every few hundred
milliseconds one of them is killed with SIGKILL and started again (bench/run_chaos.py,
which `python -m bench --only runs` runs with 100 runs). Every run completes, none is lost,
no journaled step runs again, and a step runs again only when the process running it was
killed meanwhile, at most once per such kill.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import trio

from bench.core import ENV, start_runner_process
from bench.run_chaos import Chaos, met
from runner._runs.listing import list_runs, start_run
from tests.support import World, eventually

RUNS = 20


async def test_runs_survive_random_kill_9_with_no_journaled_step_run_again(world: World, tmp_path: Path) -> None:
    chaos = Chaos(world.url, world.uid, tmp_path, runs=RUNS, kills=8)
    figures = chaos.judge(await chaos.run_and_kill(timeout=120))

    assert figures["runs_lost"] == 0
    assert figures["runs_completed"] == RUNS
    assert figures["wrong_results"] == 0
    assert figures["steps_run"] == figures["steps_expected"], "every step ran"
    assert figures["journaled_steps_run_again"] == 0
    assert figures["reruns_beyond_one_per_kill"] == 0, figures["unexplained"]
    assert figures["kills"] == 8
    assert met(figures)
    print(figures)


def test_the_judge_counts_a_journaled_step_run_again_and_a_rerun_no_kill_explains(tmp_path: Path) -> None:
    chaos = Chaos("http://127.0.0.1:1", "u", tmp_path, runs=1, kills=0)
    lines = [
        {"run": "runs-u/0", "step": 0, "phase": "start", "pid": 1},
        {"run": "runs-u/0", "step": 0, "phase": "end", "pid": 1},
        {"run": "runs-u/0", "step": 0, "phase": "journaled", "pid": 1},
        {"run": "runs-u/0", "step": 0, "phase": "start", "pid": 2},  # journaled, and nobody was killed
    ]
    chaos.record.write_text("".join(json.dumps(line) + "\n" for line in lines))
    figures = chaos.judge([{"id": "runs-u/0", "status": "completed", "result": 10}])

    assert figures["journaled_steps_run_again"] == 1
    assert figures["reruns_beyond_one_per_kill"] == 1
    assert not met(figures)


async def test_a_run_whose_runner_was_killed_mid_step_is_listed_interrupted_once_its_hold_lapses(
    world: World, tmp_path: Path
) -> None:
    chaos = Chaos(world.url, world.uid, tmp_path, runs=1, kills=1, workflow="tests.run_workflows:stuck")
    chaos.record.touch()
    log = tmp_path / "runner.log"
    config = chaos.config("a")
    process = await start_runner_process(config, log, PULLWAKE_CHAOS_RECORD=str(chaos.record))
    run_path = f"runs-{world.uid}/0"
    try:
        await eventually(lambda: '"target": "streaming"' in log.read_text(), what="the runner to stream")
        await start_run(chaos.settings, chaos.subscription, run_path, {})
        await eventually(lambda: '"start"' in chaos.record.read_text(), what="the step to start")
        [held] = await list_runs(chaos.settings, [chaos.subscription])
        assert held["status"] == "running"
    finally:
        process.send_signal(signal.SIGKILL)
        with trio.move_on_after(10):
            await process.wait()

    async def listed_interrupted() -> bool:
        [run] = await list_runs(chaos.settings, [chaos.subscription])
        return bool(run["status"] == "interrupted")

    # No runner is up: nothing will claim the run, so only the journal can tell its holder is gone.
    await eventually(listed_interrupted, timeout=10, what="the run to be listed interrupted")
    [run] = await list_runs(chaos.settings, [chaos.subscription])
    assert run["holder_lost"] is True
    assert run["last_held"] <= time.time()
    with trio.fail_after(60):
        shown = await trio.run_process(
            [sys.executable, "-m", "runner", "runs", "--config", str(config)], capture_stdout=True, env=ENV
        )
    assert "interrupted" in shown.stdout.decode()
    assert "no holder since" in shown.stdout.decode()
