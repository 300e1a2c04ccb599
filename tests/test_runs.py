"""Durable runs: steps journaled once, waits that suspend, the determinism guard, fencing.

The replay rules in virtual time over the in-memory wire (a workflow handler called with
batches as a claim would); then a runner against the real server, driven from outside.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from runner import SUSPEND, Batch, Run, Runner
from runner._runs.journal import JournalState, JournalWriter, check_journal_outside, glob_match, journal_path
from runner._runs.listing import list_runs, send_event, start_run
from runner._runs.workflow import WorkflowHandler
from runner._wire.protocol import Producer
from runner.errors import ConfigError, ProducerFenced
from tests.fake_wire import FakeWire
from tests.support import World, eventually, running

RUN = "runs/1"


def batch(generation: int, stream: str = RUN) -> Batch:
    return Batch("agent-runs", stream, [], "-1", "-1", f"w{generation}", generation, 1)


class Agent:
    """A workflow that plans, waits for an approval per call, and runs the approved tools."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    def plan(self, request: dict[str, Any]) -> dict[str, Any]:
        self.ran.append("plan")
        return {"calls": [{"id": f"call-{n}"} for n in range(request["calls"])]}

    async def tool(self, call: dict[str, Any]) -> str:
        self.ran.append(call["id"])
        return f"did {call['id']}"

    async def __call__(self, run: Run) -> object:
        plan = await run.step("plan", self.plan, run.input)
        done = []
        for call in plan["calls"]:
            decision = await run.wait_for("approval", key=call["id"])
            if decision["approved"]:
                done.append(await run.step(f"tool:{call['id']}", self.tool, call))
        return {"done": done}


def journal(wire: FakeWire) -> list[dict[str, Any]]:
    return wire.streams[journal_path(RUN)]


def statuses(wire: FakeWire) -> list[str]:
    return [entry["status"] for entry in journal(wire) if entry["kind"] == "status"]


async def test_steps_run_once_waits_suspend_and_an_event_resumes_the_run() -> None:
    wire, agent = FakeWire(), Agent()
    wire.add_stream(RUN, [{"calls": 2}])
    handler = WorkflowHandler("agent-runs", agent)
    handler.bind(wire)

    assert await handler(batch(1)) is SUSPEND
    assert agent.ran == ["plan"]
    assert journal(wire)[-1]["waiting_for"] == {"type": "approval", "key": "call-0"}

    wire.streams[RUN].append({"type": "approval", "key": "call-1", "approved": True})  # out of order: waits on
    assert await handler(batch(2)) is SUSPEND
    assert agent.ran == ["plan"], "a replay runs no journaled step"

    wire.streams[RUN].append({"type": "approval", "key": "call-0", "approved": False})
    wire.streams[RUN].append({"type": "approval", "key": "call-0", "approved": True})  # a duplicate: first wins
    assert await handler(batch(3)) is None
    assert agent.ran == ["plan", "call-1"]
    assert statuses(wire)[-1] == "completed"
    assert journal(wire)[-1]["result"] == {"done": ["did call-1"]}

    wire.streams[RUN].append({"type": "approval", "key": "call-9", "approved": True})
    assert await handler(batch(4)) is None, "an ended run is not resumed"
    assert agent.ran == ["plan", "call-1"]
    assert statuses(wire) == ["running", "suspended", "running", "suspended", "running", "completed"]


async def test_a_replay_asking_for_another_step_fails_the_run_naming_both() -> None:
    wire = FakeWire()
    wire.add_stream(RUN, [{"calls": 0}])
    names = iter(["first", "second"])

    async def drifting(run: Run) -> object:
        await run.step(next(names), lambda: 1)
        return await run.wait_for("go")

    handler = WorkflowHandler("agent-runs", drifting)
    handler.bind(wire)
    assert await handler(batch(1)) is SUSPEND
    wire.streams[RUN].append({"type": "go"})
    assert await handler(batch(2)) is None
    failed = journal(wire)[-1]
    assert failed["status"] == "failed"
    assert "'second'" in failed["error"]
    assert "'first'" in failed["error"]
    assert "NondeterministicRun" in failed["error"]


async def test_a_failing_step_fails_the_run_and_is_not_run_again() -> None:
    wire = FakeWire()
    wire.add_stream(RUN, ["input"])
    calls = []

    def broken() -> None:
        calls.append(1)
        raise ValueError("no")

    async def workflow(run: Run) -> object:
        return await run.step("broken", broken, attempts=2)

    handler = WorkflowHandler("agent-runs", workflow)
    handler.bind(wire)
    assert await handler(batch(1)) is None
    assert len(calls) == 2
    assert journal(wire)[-1]["status"] == "failed"
    assert "StepFailed" in journal(wire)[-1]["error"]


async def test_generations_that_start_over_still_write_above_the_journals_newest_epoch() -> None:
    """A restarted server's claims (generation 1 again) and gap replays (generation 0) are not stuck."""
    wire, agent = FakeWire(), Agent()
    wire.add_stream(RUN, [{"calls": 2}])
    handler = WorkflowHandler("agent-runs", agent)
    handler.bind(wire)
    assert await handler(batch(5)) is SUSPEND
    wire.streams[RUN].append({"type": "approval", "key": "call-0", "approved": True})
    assert await handler(batch(1)) is SUSPEND  # the server forgot the subscription: generations start over
    wire.streams[RUN].append({"type": "approval", "key": "call-1", "approved": True})
    assert await handler(batch(0)) is None  # a gap replay
    assert statuses(wire)[-1] == "completed"
    epochs = [entry["epoch"] for entry in journal(wire)]
    assert epochs == sorted(epochs)
    assert epochs[0] == 5
    assert len({entry["epoch"] for entry in journal(wire) if entry.get("status") == "running"}) == 3
    assert agent.ran == ["plan", "call-0", "call-1"]


async def test_two_deliveries_that_read_the_same_journal_never_both_write() -> None:
    """Equal epochs (a zombie and the new holder read the journal before either wrote): seq 0 decides."""
    wire = FakeWire()
    wire.add_stream(RUN, ["input"])
    await wire.create_stream(journal_path(RUN))
    state = JournalState.of([])
    first, second = JournalWriter(wire, RUN, state, 1), JournalWriter(wire, RUN, JournalState.of([]), 1)
    await first.record({"kind": "status", "status": "running"})
    with pytest.raises(ProducerFenced):
        await second.record({"kind": "status", "status": "running"})
    await first.record({"kind": "step", "at": 0, "name": "a", "result": 1})
    assert [entry.get("name") for entry in journal(wire)] == [None, "a"]


def test_a_step_entry_supersedes_what_the_journal_held_from_its_position_on() -> None:
    """A zombie's steps written after the new holder read the journal give way to the new holder's."""
    state = JournalState.of(
        [
            {"kind": "step", "at": 0, "name": "a", "result": 1, "epoch": 1},
            {"kind": "step", "at": 1, "name": "b", "result": "zombie", "epoch": 1},
            {"kind": "step", "at": 2, "name": "c", "result": "zombie", "epoch": 1},
            {"kind": "step", "at": 1, "name": "b", "result": "holder", "epoch": 2},
        ]
    )
    assert [(step["name"], step["result"]) for step in state.steps] == [("a", 1), ("b", "holder")]


async def test_a_zombie_is_fenced_by_the_server_mid_run() -> None:
    """The newer holder writes while the old one is inside a step: the old one's append is refused."""
    wire = FakeWire()
    wire.add_stream(RUN, ["input"])
    handler = WorkflowHandler("agent-runs", lambda run: run.step("slow", slow))
    handler.bind(wire)
    newer_wrote = trio.Event()

    async def slow() -> str:
        await newer_wrote.wait()
        return "late"

    await wire.create_stream(journal_path(RUN))

    async def zombie_and_newer_holder() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(handler, batch(1))
            await trio.testing.wait_all_tasks_blocked()
            # The newer holder (generation 2) wrote meanwhile: the server's newest epoch is 2.
            await wire.append(
                journal_path(RUN),
                {"kind": "status", "status": "running", "epoch": 2, "seq": 0},
                producer=Producer("pullwake-run", 2, 0),
            )
            newer_wrote.set()

    with pytest.raises(ExceptionGroup) as raised:
        await zombie_and_newer_holder()
    assert isinstance(raised.value.exceptions[0], ProducerFenced)
    assert not any(entry.get("name") == "slow" for entry in journal(wire))


def test_the_journal_lies_outside_the_pattern_or_the_configuration_is_refused() -> None:
    assert journal_path("runs/42") == "__runs/runs/42"
    assert glob_match("runs/*", "runs/42")
    assert not glob_match("runs/*", "__runs/runs/42")
    assert glob_match("**", "__runs/runs/42")
    check_journal_outside("ok", "runs/*", ())
    for pattern in ("**", "*/**", "**/runs/*"):
        with pytest.raises(ConfigError, match="journals"):
            check_journal_outside("bad", pattern, ())
    check_journal_outside("ok", "*/*", ())
    with pytest.raises(ConfigError, match="~deadlines/bad"):  # the subscription's deadlines index
        check_journal_outside("bad", "*/*/*", ())


async def test_a_runner_suspends_a_run_and_an_event_sent_from_outside_completes_it(world: World) -> None:
    agent = Agent()
    pattern = f"runs-{world.uid}/*"
    settings = world.settings(subscriptions=(world.spec(pattern=pattern, workflow=None),))
    runner = Runner(settings)
    runner.workflow(world.sub)(agent)
    run_path = f"runs-{world.uid}/1"
    async with running(runner):
        await start_run(settings, world.sub, run_path, {"calls": 1})

        async def status() -> str:
            runs = await runner.runs()
            return str(runs[0]["status"]) if runs else "none"

        await eventually(lambda: _is(status, "suspended"), what="the run to suspend")
        # The journal says suspended just before the claim's done ack lets go.
        await eventually(lambda: not runner.health().in_flight, what="a suspended run to hold no claim")
        await send_event(settings, run_path, {"type": "approval", "key": "call-0", "approved": True})
        await eventually(lambda: _is(status, "completed"), what="the run to complete")
    [listed] = await list_runs(settings, [world.sub])
    assert listed["id"] == run_path
    assert listed["steps"] == ["plan", "tool:call-0"]
    assert listed["result"] == {"done": ["did call-0"]}
    assert agent.ran == ["plan", "call-0"]


async def _is(status: Any, expected: str) -> bool:
    return bool(await status() == expected)
