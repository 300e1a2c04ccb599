"""The runner's job against the real reference server: follow, claim, handle, ack."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from runner import SUSPEND, Batch, CommandHandler, Runner, Suspend
from runner._fleet.ring import ranked
from tests.support import Overlap, Recorder, World, captured_logs, eventually, running

ROOT = Path(__file__).resolve().parent.parent


def numbers(recorder: Recorder, stream: str) -> list[int]:
    return [message["n"] for message in recorder.messages(stream)]


async def fully_acked(world: World, *names: str) -> bool:
    acked = await world.acked_offsets()
    tails = {world.stream(name): await world.client.tail(world.stream(name)) for name in names}
    return all(acked.get(stream) == tail for stream, tail in tails.items())


async def test_every_event_is_handled_once_in_order_and_acknowledged(world: World) -> None:
    await world.create("a", "b", "c")
    recorder = Recorder()
    runner = Runner(world.settings(), handlers={world.sub: recorder})
    async with running(runner):
        for n in range(90):
            await world.append("abc"[n % 3], {"n": n})
        await eventually(lambda: recorder.count >= 90, what="90 events handled")
        await eventually(lambda: not runner.health().in_flight, what="the last claim to finish")

        async def offset_at_tail() -> bool:
            return runner.health().offset == await world.client.tail(world.wake)

        await eventually(offset_at_tail, what="the health offset to reach the wake stream's tail")
    for index, name in enumerate("abc"):
        assert numbers(recorder, world.stream(name)) == list(range(index, 90, 3)), f"stream {name} out of order"
    assert recorder.count == 90, "every event exactly once"
    assert await fully_acked(world, "a", "b", "c")
    health = runner.health()
    assert health.claims_failed == 0
    assert health.events_received >= 1


async def test_two_runners_share_the_work_and_never_overlap(world: World) -> None:
    """Each subscription's wakes go to the runner first in line for it (rendezvous hashing over the
    runners' ids): the three subscriptions are picked so that each runner is first for one at least."""
    ids = [f"runner-{world.uid}-a", f"runner-{world.uid}-b"]
    candidates = (f"{world.sub}-{i}" for i in range(100))
    subscriptions = [next(sub for sub in candidates if ranked(sub, ids)[0] == first) for first in ids]
    subscriptions.append(next(candidates))
    specs = tuple(world.spec(sub, pattern=f"jobs-{world.uid}/{i}/*") for i, sub in enumerate(subscriptions))
    overlap = Overlap()
    recorders = [Recorder(f"r{i}", delay=0.01, overlap=overlap) for i in range(2)]
    runners = [
        Runner(
            world.settings(subscriptions=specs, runner_id=runner_id), handlers=dict.fromkeys(subscriptions, recorder)
        )
        for runner_id, recorder in zip(ids, recorders, strict=True)
    ]
    streams = [f"{i}/{letter}" for i in range(3) for letter in "xy"]
    await world.create(*streams)
    async with running(runners[0]), running(runners[1]):
        for n in range(120):
            await world.append(streams[n % len(streams)], {"n": n})
            if n % 10 == 0:
                # A holder claims again at once while the server says more is pending: pauses
                # let holds end, so every burst is a fresh race between the two runners.
                await trio.sleep(0.1)
        await eventually(lambda: sum(r.count for r in recorders) >= 120, timeout=30, what="120 events handled")
    handled = sorted(message["n"] for recorder in recorders for message in recorder.messages())
    assert handled == list(range(120)), "together they handle every event, once"
    assert overlap.seen == 0, "a subscription was handled by two runners at the same moment"
    assert all(recorder.count > 0 for recorder in recorders), "both runners took part"


async def test_lease_takeover_fences_the_old_holder(world: World) -> None:
    """A's lease keeper cannot get through (its ack is held 4 s at the server) while its handler
    outlives the 2 s lease. The server gives the subscription to B with a higher generation; A's
    held ack comes back FENCED and A's handler is cancelled at once; no batch is acked twice."""
    await world.create("a")
    spec = world.spec(lease_ttl_ms=2_000)
    a_started = trio.Event()

    class SlowOnSecond(Recorder):
        async def __call__(self, batch: Batch) -> None:
            if batch.messages[0]["n"] == 2:
                a_started.set()
                self.delay = 30
            await super().__call__(batch)

    a, b = SlowOnSecond("A"), Recorder("B")
    runner_a = Runner(world.settings(subscriptions=(spec,), request_timeout=8), handlers={world.sub: a})
    runner_b = Runner(world.settings(subscriptions=(spec,)), handlers={world.sub: b})
    async with running(runner_a):
        await world.append("a", {"n": 1})
        await eventually(lambda: a.count == 1, what="A to handle the first event")
        await world.append("a", {"n": 2})
        with trio.fail_after(10):
            await a_started.wait()
        await world.inject(world.subscription_path("ack"), delayMs=4_000, count=1)
        async with running(runner_b):
            await eventually(lambda: b.count == 1, timeout=20, what="B to take over the second event")
            await eventually(lambda: bool(a.cancelled), timeout=10, what="A's handler to be cancelled")
            await eventually(lambda: fully_acked(world, "a"), timeout=10, what="acks to land")
    [lost] = a.cancelled
    [taken] = b.batches
    assert taken.messages == [{"n": 2}]
    assert taken.generation > lost.generation, "the new holder works under a higher generation"
    assert [batch.messages for batch in a.batches] == [[{"n": 1}]], "A never finished the batch it lost"
    assert runner_a.health().claims["fenced"] == 1
    assert await fully_acked(world, "a")


async def test_a_failing_batch_is_retried_then_dead_lettered_and_the_subscription_moves_on(world: World) -> None:
    await world.create("a")
    dead_letters = f"dead-{world.uid}/letters"
    attempts: list[int] = []

    async def handler(batch: Batch) -> None:
        if any(message.get("poison") for message in batch.messages):
            attempts.append(batch.attempt)
            raise ValueError("cannot digest this")
        good.extend(batch.messages)

    good: list[Any] = []
    settings = world.settings(dead_letter_stream=dead_letters, handler_max_attempts=3)
    runner = Runner(settings, handlers={world.sub: handler})
    async with running(runner):
        await world.append("a", {"n": 1})
        await eventually(lambda: good == [{"n": 1}])
        await world.append("a", {"poison": True})
        await eventually(lambda: runner.health().batches.get("dead_lettered") == 1, what="the dead letter")
        await world.append("a", {"n": 2})
        await eventually(lambda: good == [{"n": 1}, {"n": 2}], what="the subscription to move on")
    assert attempts == [1, 2, 3], "three attempts before giving up"
    letters = await world.read_all(dead_letters)
    assert len(letters) == 1
    assert letters[0]["error"] == "ValueError: cannot digest this"
    assert letters[0]["batch"]["messages"] == [{"poison": True}]
    assert letters[0]["batch"]["stream"] == world.stream("a")
    assert await fully_acked(world, "a")


async def test_without_a_dead_letter_stream_a_failing_batch_is_released_and_cooled_down(world: World) -> None:
    await world.create("a")
    calls: list[float] = []

    async def handler(batch: Batch) -> None:
        calls.append(trio.current_time())
        raise RuntimeError("down for maintenance")

    runner = Runner(world.settings(handler_max_attempts=2, cooldown=1.0), handlers={world.sub: handler})
    async with running(runner):
        await world.append("a", {"n": 1})
        await eventually(lambda: len(calls) >= 4, timeout=10, what="a retry after the cooldown")
    assert calls[2] - calls[1] >= 0.9, "the subscription cools down before it is claimed again"
    assert runner.health().claims["failed"] >= 2
    assert (await world.acked_offsets())[world.stream("a")] == "0000000000000000_0000000000000000"


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


async def test_command_handlers_succeed_retry_fail_and_are_cancelled(world: World, record_file: Path) -> None:
    await world.create("ok", "temp", "fail", "hang")
    dead_letters = f"dead-{world.uid}/letters"
    command = CommandHandler([sys.executable, str(ROOT / "tests" / "command_handler.py")], kill_grace=2)
    runner = Runner(world.settings(dead_letter_stream=dead_letters), handlers={world.sub: command})
    async with running(runner):
        await world.append("ok", {"do": "ok", "n": 1})
        await eventually(lambda: any('"ok"' in line for line in lines(record_file)), what="the command to succeed")

        await world.append("temp", {"do": "tempfail"})
        await eventually(lambda: any('"attempt": 2' in line for line in lines(record_file)), what="a retry after 75")

        await world.append("fail", {"do": "fail"})
        await eventually(lambda: runner.health().batches.get("dead_lettered") == 1, what="the failed batch")

        await world.append("hang", {"do": "hang"})
        await eventually(lambda: "hanging" in lines(record_file), what="the command to start hanging")
        assert runner.abort(world.sub)
        await eventually(lambda: "terminated" in lines(record_file), what="SIGTERM to reach the command")
        await eventually(lambda: runner.health().claims["aborted"] == 1, what="the aborted outcome")
    record = lines(record_file)
    assert "tempfail attempt=1" in record
    assert record.count("fail attempt=1") == 1, "exit 3 is a permanent failure: no retries"
    letters = await world.read_all(dead_letters)
    assert "exited with 3" in letters[0]["error"]
    assert "hopeless" in letters[0]["error"], "the command's stderr explains the failure"


async def test_suspend_finishes_the_claim_and_a_new_event_resumes(world: World) -> None:
    await world.create("a")
    seen: list[Batch] = []

    async def handler(batch: Batch) -> Suspend | None:
        seen.append(batch)
        return SUSPEND if len(seen) == 1 else None

    runner = Runner(world.settings(), handlers={world.sub: handler})
    async with running(runner):
        await world.append("a", {"n": 1})
        await eventually(lambda: runner.health().claims["suspended"] == 1, what="the suspended claim")
        assert not runner.health().in_flight, "suspend ends the claim"
        await trio.sleep(0.5)
        assert len(seen) == 1, "nothing is redelivered while suspended"
        await world.append("a", {"n": 2})
        await eventually(lambda: len(seen) == 2, what="the new event to resume the subscription")
    assert seen[1].messages == [{"n": 2}]
    assert seen[1].start_offset == seen[0].next_offset, "the suspended batch was acknowledged"


async def test_wake_stream_garbage_and_non_json_streams_are_logged_and_survived(world: World) -> None:
    recorder = Recorder()
    runner = Runner(world.settings(), handlers={world.sub: recorder})
    with captured_logs() as logs:
        async with running(runner):
            for junk in (
                {"type": "wake", "subscription_id": "someone-else", "stream": "x", "generation": 1, "ts": 1},
                {"type": "wake", "stream": "x"},
                "not an object",
                {"type": "from-the-future", "subscription_id": world.sub},
            ):
                await world.client.append(world.wake, junk)
            await world.client.create_stream(world.stream("text"), content_type="text/plain")
            response = await world.http.post(
                world.stream_path(world.stream("text")), content=b"hello", headers={"content-type": "text/plain"}
            )
            assert response.status_code == 204
            await eventually(lambda: recorder.count == 1, what="the text stream's batch")
            await world.create("a")
            await world.append("a", {"n": 1})
            await eventually(lambda: {"n": 1} in recorder.messages(), what="a normal event after all that")
    events = {entry["event"] for entry in logs}
    assert {"wake.not_served", "wake.ignored", "stream.not_json"} <= events
    assert recorder.messages(world.stream("text")) == [b"hello"]
    assert runner.health().claims_failed == 0


def write_config(path: Path, world: World, state_dir: Path, **extra: Any) -> Path:
    spec = world.spec(lease_ttl_ms=2_000)
    body = [
        f'server_url = "{world.url}"',
        f'runner_id = "killable-{world.uid}"',
        f'wake_stream = "{world.wake}"',
        f'state_dir = "{state_dir}"',
        "heartbeat_interval = 0.5",
        "heartbeat_timeout = 0.5",
        "checkpoint_interval = 0.1",
        *(f"{key} = {json.dumps(value)}" for key, value in extra.items()),
        "[[subscriptions]]",
        f'id = "{spec.id}"',
        f'pattern = "{spec.pattern}"',
        f"lease_ttl_ms = {spec.lease_ttl_ms}",
        'handler = "tests.file_handlers:record"',
    ]
    path.write_text("\n".join(body) + "\n")
    return path


def start_runner_process(config: Path, log: Path, **env: str) -> subprocess.Popen[bytes]:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    with log.open("ab") as output:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "runner", "run", "--config", str(config), "--log-format", "json"],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=environment,
        )


async def test_a_killed_runner_resumes_from_its_checkpoint_and_loses_nothing(
    world: World, record_file: Path, tmp_path: Path
) -> None:
    await world.create("a", "b")
    state_dir = tmp_path / "state"
    config = write_config(tmp_path / "runner.toml", world, state_dir)
    log = tmp_path / "runner.log"

    first = start_runner_process(config, log, PULLWAKE_TEST_DELAY="0.02")
    try:
        await eventually(lambda: '"target": "streaming"' in log.read_text(), what="the first runner to stream")
        for n in range(60):
            await world.append("ab"[n % 2], {"n": n})
        await eventually(lambda: len(lines(record_file)) >= 10, what="the first runner to get going")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    handled_before = len(lines(record_file))
    for n in range(60, 100):
        await world.append("ab"[n % 2], {"n": n})
    assert (state_dir / "wake-checkpoint.json").exists()

    second = start_runner_process(config, log)
    try:
        await eventually(
            lambda: {json.loads(line)["message"]["n"] for line in lines(record_file)} >= set(range(100)),
            timeout=30,
            what="every event handled after the restart",
        )
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(15)
    starts = [json.loads(line) for line in log.read_text().splitlines() if '"runner.starting"' in line]
    assert starts[0]["offset"] is None, "the first start had no checkpoint"
    assert starts[1]["offset"] is not None, "the second start resumed from the checkpoint"
    assert handled_before < 100
    assert second.returncode == 0
