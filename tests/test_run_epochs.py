"""Epochs that never go down: a run suspended across a reference-server restart completes.

The restarted server forgets its subscriptions, so claim generations start over below the
epochs the run's journal already holds; each delivery writes above the journal's newest
epoch (runner/_runs/journal.py, Epochs), so the run is never stuck behind them.
"""

from __future__ import annotations

import functools
from typing import Any

import trio

from runner import Runner
from runner._runs.journal import journal_path
from runner._runs.listing import list_runs, send_event, start_run
from tests.support import World, eventually, running
from tests.test_runs import Agent


async def status_of(settings: Any, subscription: str, run_path: str) -> dict[str, Any]:
    return next((run for run in await list_runs(settings, [subscription]) if run["id"] == run_path), {})


async def test_a_run_suspended_across_a_server_restart_completes_after_its_event(own_world: World) -> None:
    world = own_world
    settings = world.settings(subscriptions=(world.spec(pattern=f"runs-{world.uid}/*"),))
    run_path = f"runs-{world.uid}/1"
    agent = Agent()

    async def suspended_at(key: str) -> bool:
        run = await status_of(settings, world.sub, run_path)
        return run.get("status") == "suspended" and (run.get("waiting_for") or {}).get("key") == key

    runner = Runner(settings)
    runner.workflow(world.sub)(agent)
    async with running(runner):
        await start_run(settings, world.sub, run_path, {"calls": 3})
        await eventually(lambda: suspended_at("call-0"), what="the run to wait for call-0")
        for call, then in (("call-0", "call-1"), ("call-1", "call-2")):
            await send_event(settings, run_path, {"type": "approval", "key": call, "approved": True})
            await eventually(functools.partial(suspended_at, then), what=f"the run to wait for {then}")
        await eventually(lambda: not runner.health().in_flight, what="the last claim to end")
    before = await world.read_all(journal_path(run_path))
    newest = max(entry["epoch"] for entry in before)
    assert newest >= 3, f"three deliveries before the restart: epochs {[e['epoch'] for e in before]}"

    await trio.to_thread.run_sync(world.server.restart)

    restarted = Runner(world.settings(subscriptions=settings.subscriptions))
    restarted.workflow(world.sub)(agent)
    async with running(restarted):
        await send_event(settings, run_path, {"type": "approval", "key": "call-2", "approved": True})
        await eventually(
            lambda: _status(settings, world.sub, run_path, "completed"), timeout=20, what="the run to complete"
        )
    after = await world.read_all(journal_path(run_path))
    written = after[len(before) :]
    assert written[0]["generation"] < newest, "generations started over after the restart"
    assert all(entry["epoch"] > newest for entry in written), "every new entry is above the journal's newest epoch"
    assert agent.ran == ["plan", "call-0", "call-1", "call-2"], "no journaled step ran again"


async def _status(settings: Any, subscription: str, run_path: str, expected: str) -> bool:
    return (await status_of(settings, subscription, run_path)).get("status") == expected
