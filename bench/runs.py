"""Durable runs (issue 24's goals): what a journaled step costs, how fast a suspended run resumes,
how long replaying 1,000 journaled steps takes; in-process runners against the real server.

- step: p50/p99 of one `run.step` with a trivial function that runs (its journal append included);
- resume: append of an event -> the workflow past its `wait_for`, beside a plain handler's
  append -> handler on the same server (the goal: resume p50 <= 2x the plain p50);
- replay: one delivery of a run whose journal holds 1,000 steps (read, replay, journal), and the
  workflow's replay alone;
- start: requests a starting runner makes to learn the deadlines of 200 runs (one in ten
  suspended with a timeout) from the deadlines index, beside reading every run's journal
  (what start-up did before, and what `pullwake runs` does);
- chaos: 100 runs served by two `pullwake run` processes killed with SIGKILL at random, between
  and inside steps (bench/run_chaos.py): runs lost or not completed, journaled steps run again,
  re-runs beyond one per step in flight at a kill (the goal: all 0).
"""

from __future__ import annotations

import functools
import operator
import statistics
import time
from typing import Any, cast

import trio

from bench.core import Bench, percentiles, running, until
from bench.run_chaos import Chaos, met
from runner import Batch, Run, Runner, SubscriptionSpec
from runner._runs.journal import journal_path, read_all
from runner._runs.listing import open_wire, run_paths, start_run
from runner._runs.timers import Timers, learn_deadlines
from runner._runs.workflow import WorkflowHandler
from runner._wire.protocol import Wire


async def runs(bench: Bench) -> None:
    small = bench.scale.latency_events < 100
    bench.results["runs"] = {
        "step": await _step_cost(bench, 50 if small else 500),
        "resume": await _resume(bench, 10 if small else 50),
        "replay_1000": await _replay(bench, 1000),
        "start": await _start(bench, 20 if small else 200),
        "chaos": await _chaos(bench, 10 if small else 100, 3 if small else 30),
    }


def _spec(uid: str) -> SubscriptionSpec:
    return SubscriptionSpec(id=f"sub-{uid}", pattern=f"{uid}/*")


async def _step_cost(bench: Bench, steps: int) -> dict[str, Any]:
    uid, wake = bench.names("rstep")
    spec = _spec(uid)
    took: list[float] = []
    done = trio.Event()

    async def trivial(i: int) -> int:
        return i

    async def workflow(run: Run) -> object:
        for i in range(steps):
            started = time.perf_counter()
            await run.step(f"s{i}", trivial, i)
            took.append(time.perf_counter() - started)
        done.set()
        return steps

    settings = bench.settings(wake, (spec,))
    runner = Runner(settings)
    runner.workflow(spec.id)(workflow)
    async with running(runner):
        await start_run(settings, spec.id, f"{uid}/1", {})
        with trio.fail_after(120):
            await done.wait()
    return {"steps": steps, **percentiles(took[5:])}  # the first few pay for connections


async def _resume(bench: Bench, events: int) -> dict[str, Any]:
    uid, wake = bench.names("rres")
    spec = _spec(uid)
    resumed: dict[int, float] = {}

    async def workflow(run: Run) -> object:
        for i in range(events):
            await run.wait_for("go", key=str(i))
            resumed.setdefault(i, time.perf_counter())
        return events

    plain_uid, plain_wake = bench.names("rplain")
    plain_spec = _spec(plain_uid)
    handled: dict[int, float] = {}

    async def plain(batch: Batch) -> None:
        for message in batch.messages:
            handled.setdefault(message["i"], time.perf_counter())

    settings = bench.settings(wake, (spec,))
    runner = Runner(settings)
    runner.workflow(spec.id)(workflow)
    plain_runner = Runner(bench.settings(plain_wake, (plain_spec,)), handlers={plain_spec.id: plain})
    run_path, plain_stream = f"{uid}/1", f"{plain_uid}/a"
    await bench.producer.create_stream(plain_stream)
    to_resume: list[float] = []
    to_handler: list[float] = []
    async with running(runner), running(plain_runner):
        await start_run(settings, spec.id, run_path, {})
        for i in range(events):  # alternate: drift on a shared machine hits both alike
            await until(lambda: runner.health().in_flight == [], 30, "the run to let go")
            await trio.sleep(0.05)
            sent = time.perf_counter()
            await bench.producer.append(run_path, {"type": "go", "key": str(i)})
            await until(functools.partial(operator.contains, resumed, i), 30, "the run to resume")
            to_resume.append(resumed[i] - sent)
            await trio.sleep(0.05)
            sent = time.perf_counter()
            await bench.producer.append(plain_stream, {"i": i})
            await until(functools.partial(operator.contains, handled, i), 30, "the plain handler")
            to_handler.append(handled[i] - sent)
    resume, plain_latency = percentiles(to_resume), percentiles(to_handler)
    ratio = resume["p50_ms"] / plain_latency["p50_ms"]
    return {"events": events, "resume": resume, "plain": plain_latency, "ratio_p50": ratio}


async def _replay(bench: Bench, steps: int) -> dict[str, Any]:
    uid, wake = bench.names("rrep")
    spec = _spec(uid)
    settings = bench.settings(wake, (spec,))
    run_path = f"{uid}/1"
    replayed: list[float] = []

    async def workflow(run: Run) -> object:
        started = time.perf_counter()
        for i in range(steps):
            await run.step(f"s{i}", _same, i)
        replayed.append(time.perf_counter() - started)
        return await run.wait_for("never")

    handler = WorkflowHandler(spec.id, workflow)
    deliveries: list[float] = []
    async with open_wire(settings) as wire:
        await wire.create_stream(run_path)
        await wire.append(run_path, {})
        handler.bind(wire)
        for generation in range(1, 7):  # the first journals the steps; the others replay them
            started = time.perf_counter()
            await handler(Batch(spec.id, run_path, [], "-1", "-1", "bench", generation, 1))
            deliveries.append(time.perf_counter() - started)
    return {
        "steps": steps,
        "first_delivery_s": deliveries[0],
        "delivery_ms_median": statistics.median(deliveries[1:]) * 1000,
        "workflow_replay_ms_median": statistics.median(replayed[1:]) * 1000,
    }


async def _start(bench: Bench, runs: int) -> dict[str, Any]:
    uid, wake = bench.names("rstart")
    spec = _spec(uid)
    settings = bench.settings(wake, (spec,))
    await bench.producer.create_stream(wake)
    await bench.producer.ensure_subscription(spec.id, wake_stream=wake, pattern=spec.pattern)

    async def workflow(run: Run) -> object:
        if run.input["n"] % 10 == 0:
            await run.wait_for("approval", timeout=3600)
        return "done"

    handler = WorkflowHandler(spec.id, workflow)
    async with open_wire(settings) as wire:
        handler.bind(wire)
        for n in range(runs):
            await wire.create_stream(f"{uid}/{n}")
            await wire.append(f"{uid}/{n}", {"n": n})
            await handler(Batch(spec.id, f"{uid}/{n}", [], "-1", "-1", "bench", 1, 1))
        counted = Counted(wire)
        started = time.perf_counter()
        learnt = await learn_deadlines(cast(Wire, counted), [spec.id], Timers())
        index = {"requests": counted.requests, "ms": (time.perf_counter() - started) * 1000, "deadlines": learnt}
        counted.requests, started = 0, time.perf_counter()
        for path in await run_paths(cast(Wire, counted), settings, spec.id):  # start-up before the index
            await read_all(cast(Wire, counted), journal_path(path))
        journals = {"requests": counted.requests, "ms": (time.perf_counter() - started) * 1000}
    return {"runs": runs, "index": index, "every_journal": journals}


class Counted:
    """A wire that counts the requests made through it."""

    def __init__(self, wire: Wire) -> None:
        self.wire = wire
        self.requests = 0

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.wire, name)

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.requests += 1
            return await method(*args, **kwargs)

        return counted


async def _chaos(bench: Bench, runs: int, kills: int) -> dict[str, Any]:
    uid, _ = bench.names("rchaos")
    scratch = bench.scratch / uid
    scratch.mkdir()
    chaos = Chaos(bench.url, uid, scratch, runs=runs, kills=kills)
    started = time.perf_counter()
    figures = chaos.judge(await chaos.run_and_kill())
    return {**figures, "seconds": time.perf_counter() - started, "met": met(figures)}


async def _same(i: int) -> int:
    return i


def render(results: dict[str, Any]) -> str:
    found = results.get("runs")
    if not found:
        return ""
    step, resume, replay = found["step"], found["resume"], found["replay_1000"]
    lines = [
        "",
        "Durable runs (goals: step p50 <= 1.5 ms; resume p50 <= 2x plain; 1,000-step replay <= 50 ms;",
        "  kill -9 chaos: 0 runs lost, every run completed, 0 journaled steps run again, <= 1 re-run per kill)",
        f"  journaled step ({step['steps']}):   p50 {step['p50_ms']:.2f} ms   p99 {step['p99_ms']:.2f} ms",
        f"  resume after event ({resume['events']}): p50 {resume['resume']['p50_ms']:.1f} ms   "
        f"p99 {resume['resume']['p99_ms']:.1f} ms   plain batch p50 {resume['plain']['p50_ms']:.1f} ms   "
        f"ratio {resume['ratio_p50']:.2f}x",
        f"  replay of {replay['steps']} steps: delivery {replay['delivery_ms_median']:.1f} ms "
        f"(workflow alone {replay['workflow_replay_ms_median']:.1f} ms); first run journaling them "
        f"{replay['first_delivery_s']:.2f} s",
    ]
    if start := found.get("start"):
        index, journals = start["index"], start["every_journal"]
        lines.append(
            f"  runner start, {start['runs']} runs ({index['deadlines']} with a deadline): deadlines index "
            f"{index['requests']} requests {index['ms']:.1f} ms; every journal (before) "
            f"{journals['requests']} requests {journals['ms']:.0f} ms"
        )
    if chaos := found.get("chaos"):
        lines += [
            f"  kill -9 chaos ({chaos['runs']} runs, {chaos['kills']} kills, {chaos['kills_inside_a_step']} inside "
            f"a step, {chaos['seconds']:.0f} s): {'met' if chaos['met'] else 'MISSED'}: "
            f"{chaos['runs_completed']}/{chaos['runs']} completed, {chaos['runs_lost']} lost, "
            f"{chaos['journaled_steps_run_again']} journaled steps run again, "
            f"{chaos['steps_rerun_after_a_kill']} steps re-run after a kill, "
            f"{chaos['reruns_beyond_one_per_kill']} beyond one per kill",
        ]
    lines.append("")
    return "\n".join(lines)
