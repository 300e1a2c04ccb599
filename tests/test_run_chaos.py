"""Durable runs under kill -9: runner processes killed at random, between and inside steps.

Two `pullwake run` processes serve one workflow subscription; every few hundred
milliseconds one of them is killed with SIGKILL and started again. Every run completes,
none is lost, a step runs again only when the process running it was killed meanwhile,
and at most once per such kill.
"""

from __future__ import annotations

import contextlib
import json
import random
import signal
import subprocess
from collections import defaultdict
from pathlib import Path

import trio

from runner._runs.listing import list_runs, start_run
from tests.run_workflows import STEPS
from tests.support import World, eventually
from tests.test_end_to_end import start_runner_process

RUNS = 20


def executions(record: Path) -> dict[tuple[str, int], list[int]]:
    """(run, step) -> the pids that started it, in order."""
    starts: dict[tuple[str, int], list[int]] = defaultdict(list)
    for line in record.read_text().splitlines():
        entry = json.loads(line)
        if entry["phase"] == "start":
            starts[(entry["run"], entry["step"])].append(entry["pid"])
    return starts


def config_for(world: World, tmp: Path, name: str) -> Path:
    body = [
        f'server_url = "{world.url}"',
        f'runner_id = "chaos-{name}-{world.uid}"',
        f'wake_stream = "{world.wake}"',
        f'state_dir = "{tmp / name}"',
        "heartbeat_interval = 0.5",
        "heartbeat_timeout = 0.5",
        "sweep_interval = 1.0",
        "[[subscriptions]]",
        f'id = "{world.sub}"',
        f'pattern = "runs-{world.uid}/*"',
        "lease_ttl_ms = 1500",
        'workflow = "tests.run_workflows:chaos"',
    ]
    path = tmp / f"{name}.toml"
    path.write_text("\n".join(body) + "\n")
    return path


async def test_runs_survive_random_kill_9_with_no_journaled_step_run_again(
    world: World, tmp_path: Path, record_file: Path
) -> None:
    settings = world.settings(subscriptions=(world.spec(pattern=f"runs-{world.uid}/*"),))
    configs = [config_for(world, tmp_path, name) for name in ("a", "b")]
    log = tmp_path / "runners.log"
    processes = [start_runner_process(config, log) for config in configs]
    killed: set[int] = set()
    rng = random.Random(24)
    try:
        await eventually(lambda: log.read_text().count('"target": "streaming"') >= 2, what="both runners to stream")
        for n in range(RUNS):
            await start_run(settings, world.sub, f"runs-{world.uid}/{n}", {"n": n})

        async def all_completed() -> bool:
            runs = await list_runs(settings, [world.sub])
            return len(runs) == RUNS and all(run["status"] == "completed" for run in runs)

        with trio.fail_after(120):
            for _ in range(8):  # the kills, while the runs go on
                await trio.sleep(rng.uniform(0.2, 0.6))  # when to strike: chaos, not synchronisation
                victim = rng.randrange(len(processes))
                processes[victim].send_signal(signal.SIGKILL)
                processes[victim].wait(10)
                killed.add(processes[victim].pid)
                processes[victim] = start_runner_process(configs[victim], log)
            await eventually(all_completed, timeout=90, what="every run to complete")
    finally:
        for process in processes:
            process.send_signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(10)

    runs = await list_runs(settings, [world.sub])
    assert sorted(run["id"] for run in runs) == sorted(f"runs-{world.uid}/{n}" for n in range(RUNS)), "no run lost"
    assert all(run["result"] == sum(range(STEPS)) for run in runs)
    starts = executions(record_file)
    assert len(starts) == RUNS * STEPS, "every step ran"
    reruns = {step: pids for step, pids in starts.items() if len(pids) > 1}
    for step, pids in reruns.items():
        # Every execution but the last was cut by a kill of its process: a step journaled (or
        # run to its end by a live process) never runs again, and one kill costs one re-run.
        assert all(pid in killed for pid in pids[:-1]), f"{step} ran again without a kill: {pids}"
        assert len(set(pids[:-1])) == len(pids) - 1, f"{step} ran twice in one killed process: {pids}"
    print(f"{RUNS} runs, {len(killed)} kills, {sum(len(p) - 1 for p in reruns.values())} steps re-run after a kill")
