"""Cancelling a run, and a step cut by a stop: `cancelled` for good, `interrupted` until the next claim."""

from __future__ import annotations

import functools

import pytest
import trio
import trio.testing

from runner import SUSPEND, Run, Runner
from runner._runs.listing import cancel_run, list_runs, send_event, start_run
from runner._runs.workflow import WorkflowHandler
from tests.fake_wire import FakeWire
from tests.support import World, eventually, running
from tests.test_agent_run import pullwake
from tests.test_runs import RUN, Agent, batch, journal, statuses


async def test_a_cancel_event_ends_a_suspended_run_and_no_later_event_resumes_it() -> None:
    wire, agent = FakeWire(), Agent()
    wire.add_stream(RUN, [{"calls": 1}])
    handler = WorkflowHandler("agent-runs", agent)
    handler.bind(wire)
    assert await handler(batch(1)) is SUSPEND
    wire.streams[RUN].append({"type": "cancel", "reason": "not needed"})
    assert await handler(batch(2)) is None
    wire.streams[RUN].append({"type": "approval", "key": "call-0", "approved": True})
    assert await handler(batch(3)) is None
    assert statuses(wire) == ["running", "suspended", "running", "cancelled"]
    assert journal(wire)[-1]["reason"] == "not needed"
    assert agent.ran == ["plan"]


async def test_a_cancel_that_arrives_during_a_step_cuts_it_and_journals_nothing_of_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire = FakeWire()
    wire.add_stream(RUN, ["input"])
    entered, cut = trio.Event(), trio.Event()

    async def forever() -> None:
        entered.set()
        try:
            await trio.sleep_forever()
        finally:
            cut.set()

    async def workflow(run: Run) -> object:
        await run.step("quick", lambda: 1)
        return await run.step("slow", forever)

    handler = WorkflowHandler("agent-runs", workflow)
    handler.bind(wire)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handler, batch(1))
        await entered.wait()
        await wire.append(RUN, {"type": "cancel"})
        with trio.fail_after(5):
            await cut.wait()
    assert statuses(wire) == ["running", "cancelled"]
    assert journal(wire)[-1]["step"] == "slow"
    assert [entry.get("name") for entry in journal(wire) if entry["kind"] == "step"] == ["quick"]


async def test_a_step_cut_by_a_stop_is_interrupted_and_runs_again_at_the_next_claim(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire = FakeWire()
    wire.add_stream(RUN, ["input"])
    calls: list[int] = []
    release = trio.Event()

    async def tool() -> str:
        calls.append(1)
        await release.wait()
        return "done"

    async def workflow(run: Run) -> object:
        return await run.step("tool", tool)

    handler = WorkflowHandler("agent-runs", workflow)
    handler.bind(wire)
    with trio.move_on_after(10):  # the stop, an abort or a lost lease
        await handler(batch(1))
    assert journal(wire)[-1] == {**journal(wire)[-1], "status": "interrupted", "step": "tool"}
    release.set()
    assert await handler(batch(2)) is None
    assert statuses(wire) == ["running", "interrupted", "running", "completed"]
    assert len(calls) == 2


async def test_pullwake_runs_cancel_cuts_the_step_a_runner_is_in(world: World) -> None:
    settings = world.settings(subscriptions=(world.spec(pattern=f"runs-{world.uid}/*"),))
    run_path = f"runs-{world.uid}/1"
    entered, cut = trio.Event(), trio.Event()

    async def long_tool() -> None:
        entered.set()
        try:
            await trio.sleep_forever()
        finally:
            cut.set()

    async def workflow(run: Run) -> object:
        return await run.step("long", long_tool)

    runner = Runner(settings)
    runner.workflow(world.sub)(workflow)
    config = world.tmp / "runner.toml"
    config.write_text(f'server_url = "{world.url}"\nwake_stream = "{world.wake}"\n')
    async with running(runner):
        await start_run(settings, world.sub, run_path, {})
        with trio.fail_after(15):
            await entered.wait()
        await trio.to_thread.run_sync(functools.partial(pullwake, "runs", "cancel", run_path, "--config", str(config)))
        with trio.fail_after(15):
            await cut.wait()

        async def cancelled() -> bool:
            return any(run["status"] == "cancelled" for run in await list_runs(settings, [world.sub]))

        await eventually(cancelled, what="the run to end cancelled")
        await send_event(settings, run_path, {"type": "anything"})
        await eventually(lambda: not runner.health().in_flight, what="the late event's claim to end")
        assert runner.health().runs["by_status"]["cancelled"] == 1
    [listed] = await list_runs(settings, [world.sub])
    assert listed["status"] == "cancelled"
    assert listed["steps"] == []


async def test_cancelling_a_run_that_does_not_exist_is_refused(world: World) -> None:
    from runner.errors import ConfigError

    with pytest.raises(ConfigError, match="no run"):
        await cancel_run(world.settings(), f"runs-{world.uid}/missing")
