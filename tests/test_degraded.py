"""Degraded is visible, and a failing gap replay never stalls a subscription (issue 21, items 3-4).

Against the reference server, with real failures: a gap offset the server refuses (a
hand-written journal), a handler that raises, and journal writes the OS refuses (the
journal's path turned into a directory: rename(2) onto it fails with EISDIR, also as root,
where chmod would not stop a write).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx

from runner import Batch, Runner
from tests.support import Recorder, World, captured_logs, eventually, serving


def degraded_gauge(runner: Runner, reason: str) -> float:
    value = runner.metrics_registry.get_sample_value("pullwake_degraded", {"reason": reason})
    assert value is not None
    return value


async def healthz(url: str | None) -> httpx.Response:
    assert url is not None
    async with httpx.AsyncClient() as client:
        return await client.get(f"{url}/healthz")


async def test_a_gap_the_server_refuses_is_dropped_and_new_events_are_served(world: World, tmp_path: Path) -> None:
    await world.create("a")
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    bad_gap = {"stream": world.stream("a"), "start": "not-an-offset", "end": "9999999999999999_9999999999999999"}
    (state_dir / "journal.json").write_text(
        json.dumps(
            {
                "version": 1,
                "server_url": world.url,
                "stream_root": "/v1/stream",
                "claims": {},
                "acked": {},
                "gaps": {world.sub: [bad_gap]},
            }
        )
    )
    recorder = Recorder()
    runner = Runner(world.settings(state_dir=state_dir), handlers={world.sub: recorder})
    with captured_logs() as logs:
        async with serving(runner):
            await world.append("a", {"n": 1})
            await eventually(lambda: recorder.count == 1, what="the new event, past the refused gap")
            await world.append("a", {"n": 2})
            await eventually(lambda: recorder.count == 2, what="the subscription, still claimed")
            assert runner.health().status == "ok", "a dropped gap is not a lasting problem"
    assert recorder.messages() == [{"n": 1}, {"n": 2}]
    [dropped] = [entry for entry in logs if entry["event"] == "subscription.gap_dropped"]
    assert dropped["start"] == "not-an-offset"
    assert runner.metrics_registry.get_sample_value("pullwake_subscription_gaps_total", {"action": "dropped"}) == 1
    assert json.loads((state_dir / "journal.json").read_text())["gaps"] == {}, "not tried again at the next start"


async def test_a_handler_failing_every_batch_is_degraded_until_a_batch_succeeds(world: World) -> None:
    await world.create("a")
    failing = True
    handled: list[Batch] = []

    async def handler(batch: Batch) -> None:
        if failing:
            raise RuntimeError("the database is down")
        handled.append(batch)

    settings = world.settings(handler_max_attempts=1, cooldown=0.2, metrics_listen="127.0.0.1:0")
    runner = Runner(settings, handlers={world.sub: handler})
    async with serving(runner) as metrics_url:
        await world.append("a", {"n": 1})
        await eventually(lambda: runner.health().status == "degraded", what="the failing handler to show")
        health = runner.health()
        assert health.state == "streaming"
        assert health.problems == {"handler_failing": [world.sub]}
        assert world.sub in (health.reason or "")
        assert degraded_gauge(runner, "handler_failing") == 1
        answer = await healthz(metrics_url)
        assert answer.status_code == 200, "the runner works on: a restart would not cure the handler"
        assert answer.json()["status"] == "degraded"
        assert world.sub in answer.json()["reason"]

        failing = False
        await eventually(lambda: len(handled) == 1, what="the batch, once the handler succeeds")
        await eventually(lambda: runner.health().status == "ok", what="the problem to clear")
        assert degraded_gauge(runner, "handler_failing") == 0
        assert (await healthz(metrics_url)).json()["status"] == "ok"


async def test_failing_state_writes_are_degraded_counted_and_clear_when_writes_succeed(
    world: World, tmp_path: Path
) -> None:
    await world.create("a")
    state_dir = tmp_path / "state"
    recorder = Recorder()
    runner = Runner(world.settings(state_dir=state_dir, checkpoint_interval=0.05), handlers={world.sub: recorder})
    journal = state_dir / "journal.json"
    async with serving(runner):
        await world.append("a", {"n": 1})
        await eventually(
            lambda: recorder.count == 1 and any(state_dir.glob("journal.*.log")), what="a first journal write"
        )
        shutil.rmtree(state_dir)
        state_dir.write_text("in the way")  # the log is gone, and no file can be created in its place
        await world.append("a", {"n": 2})
        await eventually(lambda: runner.health().status == "degraded", what="the failed write to show")
        assert "journal" in runner.health().problems["state_write_failed"]
        assert degraded_gauge(runner, "state_write_failed") == 1
        failures = runner.metrics_registry.get_sample_value("pullwake_state_write_failures_total")
        assert failures is not None
        assert failures >= 1
        await eventually(lambda: recorder.count == 2, what="the work to go on")

        state_dir.unlink()
        await world.append("a", {"n": 3})
        await eventually(lambda: runner.health().status == "ok", what="later writes to succeed")
        assert degraded_gauge(runner, "state_write_failed") == 0
    assert journal.is_file()
