"""Durable runs under kill -9: `pullwake run` processes killed at random, between and inside steps.

Shared by `python -m bench --only runs` (100 runs, issue 24's goal row) and
tests/test_run_chaos.py (a smaller dose, asserted). Two runner processes serve one workflow
subscription; at random moments one of them is killed with SIGKILL and started again, while
the runs go on. Each step of the `chaos` workflow writes "start" and "end" lines around its
work, and a "journaled" line once `run.step` returned (its result is in the journal by then),
to the file named by $PULLWAKE_CHAOS_RECORD, so executions are counted even in a killed process.

`judge` turns the record into the goal's figures: a "start" after a "journaled" line of the
same step is a journaled step run again; a step that ran more than once must owe every earlier
execution to a different killed process (one kill, at most one re-run per step it had in flight).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from bench.core import start_runner_process, until
from runner import Run, Settings, SubscriptionSpec
from runner._runs.listing import list_runs, start_run

STEPS = 5
RECORD = "PULLWAKE_CHAOS_RECORD"


def record_line(line: dict[str, object]) -> None:
    """Append `line` (with this process's pid) to $PULLWAKE_CHAOS_RECORD."""
    with open(os.environ[RECORD], "a") as out:
        out.write(json.dumps({**line, "pid": os.getpid()}) + "\n")


async def chaos(run: Run) -> object:
    """The workflow of the runner processes (`workflow = "bench.run_chaos:chaos"`)."""
    total = 0
    for index in range(STEPS):

        async def work(index: int = index) -> int:
            record_line({"run": run.id, "step": index, "phase": "start"})
            await trio.sleep(random.uniform(0.0, 0.15))  # spreads the kills over the steps
            record_line({"run": run.id, "step": index, "phase": "end"})
            return index

        total += await run.step(f"s{index}", work)
        record_line({"run": run.id, "step": index, "phase": "journaled"})
    return total


@dataclass
class Chaos:
    """One chaos session's names; `settings` is what a reader (list_runs, start_run) needs."""

    url: str
    uid: str
    scratch: Path
    runs: int
    kills: int
    seed: int = 24
    workflow: str = "bench.run_chaos:chaos"
    killed: set[int] = field(default_factory=set)

    @property
    def subscription(self) -> str:
        return f"sub-chaos-{self.uid}"

    @property
    def record(self) -> Path:
        return self.scratch / "chaos-record.jsonl"

    @property
    def settings(self) -> Settings:
        spec = SubscriptionSpec(id=self.subscription, pattern=f"runs-{self.uid}/*")
        return Settings(server_url=self.url, wake_stream=f"wake-chaos-{self.uid}/pool", subscriptions=(spec,))

    def config(self, name: str) -> Path:
        body = [
            f'server_url = "{self.url}"',
            f'runner_id = "chaos-{name}-{self.uid}"',
            f'wake_stream = "wake-chaos-{self.uid}/pool"',
            f'state_dir = "{self.scratch / name}"',
            "heartbeat_interval = 0.5",
            "heartbeat_timeout = 0.5",
            "sweep_interval = 1.0",
            "[[subscriptions]]",
            f'id = "{self.subscription}"',
            f'pattern = "runs-{self.uid}/*"',
            "lease_ttl_ms = 1500",
            f'workflow = "{self.workflow}"',
        ]
        path = self.scratch / f"chaos-{name}.toml"
        path.write_text("\n".join(body) + "\n")
        return path

    async def run_and_kill(self, timeout: float = 150) -> list[dict[str, Any]]:
        """Start the runs, kill runners meanwhile, wait until every run completed; the runs as listed."""
        self.record.touch()
        log = self.scratch / "chaos-runners.log"
        configs = [self.config(name) for name in ("a", "b")]
        env = {RECORD: str(self.record)}
        processes = [await start_runner_process(config, log, **env) for config in configs]
        rng = random.Random(self.seed)
        try:
            await until(lambda: _streaming_count(log) >= 2, 30, "both runners to stream")
            for n in range(self.runs):
                await start_run(self.settings, self.subscription, f"runs-{self.uid}/{n}", {"n": n})
            with trio.fail_after(timeout):
                for _ in range(self.kills):  # the kills, while the runs go on
                    await trio.sleep(rng.uniform(0.2, 0.6))  # when to strike: chaos, not synchronisation
                    victim = rng.randrange(len(processes))
                    processes[victim].send_signal(signal.SIGKILL)
                    await processes[victim].wait()
                    self.killed.add(processes[victim].pid)
                    processes[victim] = await start_runner_process(configs[victim], log, **env)
                await until(self._all_completed, timeout, "every run to complete")
        finally:
            with trio.CancelScope(shield=True):
                for process in processes:
                    with contextlib.suppress(ProcessLookupError):
                        process.send_signal(signal.SIGKILL)
                    with trio.move_on_after(10):
                        await process.wait()
        return await list_runs(self.settings, [self.subscription])

    async def _all_completed(self) -> bool:
        runs = await list_runs(self.settings, [self.subscription])
        return len(runs) == self.runs and all(run["status"] == "completed" for run in runs)

    def judge(self, runs: list[dict[str, Any]]) -> dict[str, Any]:
        """The goal's figures from the listing and the record (see the module docstring)."""
        expected = {f"runs-{self.uid}/{n}" for n in range(self.runs)}
        listed = {run["id"]: run for run in runs}
        starts: dict[tuple[str, int], list[int]] = defaultdict(list)
        ended: set[tuple[str, int, int]] = set()
        journaled: set[tuple[str, int]] = set()
        journaled_run_again = 0
        for line in self.record.read_text().splitlines():
            entry = json.loads(line)
            step = (entry["run"], entry["step"])
            if entry["phase"] == "start":
                journaled_run_again += step in journaled
                starts[step].append(entry["pid"])
            elif entry["phase"] == "end":
                ended.add((*step, entry["pid"]))
            else:
                journaled.add(step)
        # An execution that is not the last of its step must have been cut by a kill of its
        # process, and each killed process accounts for at most one of them.
        unexplained = [
            (step, pids)
            for step, pids in starts.items()
            if any(pid not in self.killed for pid in pids[:-1]) or len(set(pids[:-1])) != len(pids) - 1
        ]
        inside = {pid for (run, index), pids in starts.items() for pid in pids if (run, index, pid) not in ended}
        return {
            "runs": self.runs,
            "kills": len(self.killed),
            "kills_inside_a_step": len(inside & self.killed),
            "runs_lost": len(expected - listed.keys()),
            "runs_completed": sum(1 for path in expected if listed.get(path, {}).get("status") == "completed"),
            "wrong_results": sum(1 for run in runs if run.get("result") != sum(range(STEPS))),
            "steps_run": len(starts),
            "steps_expected": self.runs * STEPS,
            "journaled_steps_run_again": journaled_run_again,
            "steps_rerun_after_a_kill": sum(len(pids) - 1 for pids in starts.values()),
            "reruns_beyond_one_per_kill": len(unexplained),
            "unexplained": [f"{step}: {pids}" for step, pids in unexplained[:5]],
        }


def met(figures: dict[str, Any]) -> bool:
    """Issue 24's chaos goal."""
    return bool(
        figures["runs_lost"] == 0
        and figures["runs_completed"] == figures["runs"]
        and figures["wrong_results"] == 0
        and figures["steps_run"] == figures["steps_expected"]
        and figures["journaled_steps_run_again"] == 0
        and figures["reruns_beyond_one_per_kill"] == 0
    )


def _streaming_count(log: Path) -> int:
    return log.read_text().count('"target": "streaming"')
