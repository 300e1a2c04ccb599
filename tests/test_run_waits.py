"""wait_for: events consumed in order, timeouts decided by the run stream, timers that outlive a runner.

Virtual time over the in-memory wire for the rules; then the reference server, with a runner
stopped before the deadline and another one started after it.
"""

from __future__ import annotations

import functools
from typing import Any

import trio
import trio.testing

from runner import SUSPEND, Run, Runner
from runner._runs.keeper import RunKeeper
from runner._runs.listing import list_runs, send_event, start_run
from runner._runs.timers import Timers
from runner._runs.workflow import WorkflowHandler
from runner.errors import WaitTimeout
from tests.fake_wire import FakeWire
from tests.support import World, eventually, running
from tests.test_runs import RUN, batch, journal, statuses


async def approval_or_timeout(run: Run) -> object:
    try:
        decision = await run.wait_for("approval", key="c1", timeout=60)
    except WaitTimeout:
        return "timed out"
    return decision["approved"]


def bound(wire: FakeWire, workflow: Any, timers: Timers | None = None) -> WorkflowHandler:
    handler = WorkflowHandler("agent-runs", workflow)
    handler.bind(wire, timers=timers, now=trio.current_time)
    return handler


async def test_a_deadline_that_passes_wakes_the_run_and_raises_wait_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire = FakeWire()
    wire.add_stream(RUN, ["input"])
    timers = Timers(now=trio.current_time)
    handler = bound(wire, approval_or_timeout, timers)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timers.serve, wire)
        started = trio.current_time()
        assert await handler(batch(1)) is SUSPEND
        [timer] = [entry for entry in journal(wire) if entry["kind"] == "timer"]
        assert timer["deadline"] == started + 60
        assert timers.due(RUN) == (started + 60, "wait-0")
        assert await handler(batch(2)) is SUSPEND, "a replay before the deadline suspends again"
        assert len([entry for entry in journal(wire) if entry["kind"] == "timer"]) == 1, "the deadline stays"
        with trio.fail_after(120):
            while len(wire.streams[RUN]) < 2:
                await wire.long_poll(RUN, str(len(wire.streams[RUN])), hold=120)
        assert trio.current_time() - started >= 60
        assert wire.streams[RUN][-1] == {"type": "timer", "key": "wait-0"}
        assert len(timers) == 0
        assert await handler(batch(3)) is None
        nursery.cancel_scope.cancel()
    assert journal(wire)[-1]["result"] == "timed out"
    wire.streams[RUN].append({"type": "approval", "key": "c1", "approved": True})
    assert await handler(batch(4)) is None, "an approval after the timeout resumes nothing"
    assert statuses(wire)[-1] == "completed"


async def test_an_event_before_the_timer_wins_and_the_timer_after_it_is_ignored() -> None:
    wire = FakeWire()
    wire.add_stream(RUN, ["input"])
    handler = bound(wire, approval_or_timeout)
    assert await handler(batch(1)) is SUSPEND
    wire.streams[RUN].append({"type": "approval", "key": "c1", "approved": True})
    wire.streams[RUN].append({"type": "timer", "key": "wait-0"})  # a runner's timer, too late
    assert await handler(batch(2)) is None
    assert journal(wire)[-1]["result"] is True
    assert len(handler.timers) == 0


async def test_two_waits_for_one_type_and_key_take_two_events_in_order() -> None:
    wire = FakeWire()
    wire.add_stream(RUN, ["input", {"type": "message", "key": "k", "n": 1}])

    async def twice(run: Run) -> object:
        first = await run.wait_for("message", key="k")
        second = await run.wait_for("message", key="k")
        return [first["n"], second["n"]]

    handler = bound(wire, twice)
    assert await handler(batch(1)) is SUSPEND
    assert journal(wire)[-1]["waiting_for"] == {"type": "message", "key": "k"}
    wire.streams[RUN].append({"type": "message", "key": "k", "n": 2})
    assert await handler(batch(2)) is None
    assert journal(wire)[-1]["result"] == [1, 2]


async def test_the_runners_own_event_types_cannot_be_waited_for() -> None:
    wire = FakeWire()
    wire.add_stream(RUN, ["input"])

    async def forging(run: Run) -> object:
        return await run.wait_for("timer", key="wait-0")

    assert await bound(wire, forging)(batch(1)) is None
    assert "ValueError" in journal(wire)[-1]["error"]


async def test_a_runner_started_after_another_stopped_wakes_the_run_at_its_deadline(world: World) -> None:
    settings = world.settings(subscriptions=(world.spec(pattern=f"runs-{world.uid}/*"),))
    run_path = f"runs-{world.uid}/1"

    async def short_wait(run: Run) -> object:
        try:
            await run.wait_for("approval", timeout=1.5)
        except WaitTimeout:
            return "timed out"
        return "approved"

    async def status(expected: str) -> bool:
        runs = await list_runs(settings, [world.sub])
        return bool(runs) and runs[0]["status"] == expected

    first = Runner(settings)
    first.workflow(world.sub)(short_wait)
    async with running(first):
        await start_run(settings, world.sub, run_path, {})
        await eventually(functools.partial(status, "suspended"), what="the run to suspend")
        assert first.health().runs["timers"] == 1
    [suspended] = await list_runs(settings, [world.sub])
    assert suspended["waiting_for"]["timer"] == "wait-0"

    second = Runner(world.settings(subscriptions=settings.subscriptions))
    second.workflow(world.sub)(short_wait)
    async with running(second):
        await eventually(functools.partial(status, "completed"), what="the timed-out run to complete")
        await send_event(settings, run_path, {"type": "approval"})  # too late: resumes nothing
        assert second.health().runs["timers_fired"] == 1
    [completed] = await list_runs(settings, [world.sub])
    assert completed["result"] == "timed out"


async def waits_with_a_timeout_if_told(run: Run) -> object:
    if run.input["timed"]:
        await run.wait_for("approval", timeout=60 + run.input["n"])
    return "done"


async def test_a_starting_runner_learns_the_deadlines_with_requests_that_do_not_grow_with_the_runs() -> None:
    """Start-up used to read every run's journal (one request or more per run, at every start)."""
    wire = FakeWire(chunk=1000)
    paths = [f"runs/{n}" for n in range(60)]
    wire.subscribe("agent-runs", paths)
    handler = WorkflowHandler("agent-runs", waits_with_a_timeout_if_told)
    handler.bind(wire)  # wall-clock deadlines, as the keeper's timers keep them: none passes here
    for n, path in enumerate(paths):  # one run in four waits with a timeout; the others complete
        wire.add_stream(path, [{"n": n, "timed": n % 4 == 0}])
        await handler(batch(1, path))
    await wire.append(paths[0], {"type": "approval"})  # answered: its deadline no longer counts
    await handler(batch(2, paths[0]))

    keeper = RunKeeper()
    wire.calls.clear()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keeper.serve, wire, ["agent-runs"])
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()

    timed = {path for n, path in enumerate(paths) if n % 4 == 0} - {paths[0]}
    assert {path for path in paths if keeper.timers.due(path)} == timed
    assert keeper.timers.due(paths[4]) == handler.timers.due(paths[4])
    assert len(wire.calls) <= 3, f"{len(wire.calls)} requests to learn {len(paths)} runs' deadlines"
