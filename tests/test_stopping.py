"""Stop on time, lose nothing: drain, interrupt, abort, and restart in-process."""

from __future__ import annotations

import gc
import json
import logging
import signal
import sys
import threading
import time
from functools import partial
from pathlib import Path

import prometheus_client
import psutil
import trio

from machine import State
from runner import Batch, CommandHandler, Runner, StopError
from tests.support import Recorder, World, eventually, running, serving
from tests.test_end_to_end import ROOT, lines, start_runner_process, write_config


async def sigterm_mid_batch(world: World, record_file: Path, tmp_path: Path, *, twice: bool) -> float:
    """Start `pullwake run`, get a batch in flight, SIGTERM it; returns how long it took to exit."""
    await world.create("a")
    drain = 20.0 if twice else 2.0
    config = write_config(tmp_path / "runner.toml", world, tmp_path / "state", drain_timeout=drain)
    config.write_text(config.read_text().replace("lease_ttl_ms = 2000", "lease_ttl_ms = 30000"))
    log = tmp_path / "runner.log"
    process = start_runner_process(config, log)
    try:
        await eventually(lambda: '"target": "streaming"' in log.read_text(), what="the runner to stream")
        finished_offset = await world.append("a", {"n": 1})
        await eventually(lambda: any('"n": 1' in line for line in lines(record_file)), what="the first batch")
        await world.append("a", {"n": 2, "slow": True})
        await eventually(lambda: any('"started"' in line for line in lines(record_file)), what="the slow batch")
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        if twice:
            await trio.sleep(0.5)
            process.send_signal(signal.SIGTERM)
        await trio.to_thread.run_sync(process.wait, 30)
        took = time.monotonic() - signalled
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0
    # The server kept exactly the finished batch and nobody holds the subscription.
    assert (await world.acked_offsets())[world.stream("a")] == finished_offset
    taken_over = Recorder()
    successor = Runner(
        world.settings(subscriptions=(world.spec(lease_ttl_ms=30_000),)), handlers={world.sub: taken_over}
    )
    claimed_from = trio.current_time()
    async with running(successor):
        await eventually(lambda: taken_over.count == 1, timeout=10, what="a second runner to take over")
    assert trio.current_time() - claimed_from < 5, "taken over at once, not after the 30 s lease"
    assert taken_over.messages() == [{"n": 2, "slow": True}]
    outcomes = [json.loads(line) for line in log.read_text().splitlines() if '"claim.outcome"' in line]
    assert outcomes[-1]["outcome"] == "interrupted"
    return took


async def test_sigterm_mid_batch_interrupts_hands_back_and_exits_within_the_drain(
    world: World, record_file: Path, tmp_path: Path
) -> None:
    took = await sigterm_mid_batch(world, record_file, tmp_path, twice=False)
    assert took < 2.0 + 3.0, f"exited {took:.1f} s after SIGTERM with a 2 s drain"
    print(f"stop with a claim in flight (process, drain 2 s): {took:.2f} s")


async def test_a_second_sigterm_skips_the_drain_wait_but_not_the_finalizer(
    world: World, record_file: Path, tmp_path: Path
) -> None:
    took = await sigterm_mid_batch(world, record_file, tmp_path, twice=True)
    assert took < 5.0, f"exited {took:.1f} s after two SIGTERMs, with a 20 s drain"
    print(f"stop with a second SIGTERM (process, drain 20 s): {took:.2f} s")


async def test_a_handler_that_finishes_inside_the_drain_window_completes(world: World) -> None:
    await world.create("a")
    started = trio.Event()

    async def handler(batch: Batch) -> None:
        started.set()
        await trio.sleep(1.0)
        finished.append(batch)

    finished: list[Batch] = []
    runner = Runner(world.settings(drain_timeout=5.0), handlers={world.sub: handler})
    async with trio.open_nursery() as nursery:
        await runner.start(nursery)
        await runner.wait_until(State.STREAMING)
        await world.append("a", {"n": 1})
        await started.wait()
        before = trio.current_time()
        await runner.stop()
        took = trio.current_time() - before
    assert len(finished) == 1
    assert 0.5 < took < 3, "stop waited for the handler, and no longer"
    assert runner.health().claims["completed"] == 1
    assert runner.health().claims["interrupted"] == 0
    assert (await world.acked_offsets())[world.stream("a")] == await world.client.tail(world.stream("a"))


async def test_abort_by_control_api_and_by_control_stream(world: World, tmp_path: Path) -> None:
    await world.create("a", "b")
    other = f"{world.sub}-other"
    specs = (world.spec(pattern=f"jobs-{world.uid}/a"), world.spec(other, pattern=f"jobs-{world.uid}/b"))
    blocked: list[Batch] = []
    others = Recorder()

    async def stubborn(batch: Batch) -> None:
        blocked.append(batch)
        await trio.sleep_forever()

    socket = tmp_path / "control.sock"
    settings = world.settings(subscriptions=specs, control_socket=socket, cooldown=1.0)
    runner = Runner(settings, handlers={world.sub: stubborn, other: others})
    async with serving(runner):
        assert oct(socket.stat().st_mode & 0o777) == "0o600", "the control socket is owner-only"
        await world.append("a", {"n": 1})
        await eventually(lambda: len(blocked) == 1, what="the stubborn claim to start")

        with trio.fail_after(60):
            result = await trio.run_process(
                [sys.executable, "-m", "runner", "abort", world.sub, "--socket", str(socket)],
                capture_stderr=True,
                check=False,
            )
        assert result.returncode == 0, result.stderr
        await eventually(lambda: runner.health().claims["aborted"] == 1, what="the abort over the socket")
        # Handed back at once: another worker can claim it now, long before the 5 s lease would end.
        inspector = await world.client.claim(world.sub, "inspector")
        await world.client.release(inspector)

        await world.append("b", {"n": 2})
        await eventually(lambda: others.count == 1, what="the other subscription to keep being served")

        await eventually(lambda: len(blocked) == 2, what="the aborted work to come back after the cooldown")
        await world.client.append(settings.control_stream_path, {"type": "abort", "subscription_id": world.sub})
        await eventually(lambda: runner.health().claims["aborted"] == 2, what="the abort over the control stream")

        await world.append("b", {"n": 3})
        await eventually(lambda: others.count == 2, what="the other subscription, still served")
        with trio.fail_after(60):
            nothing = await trio.run_process(
                [sys.executable, "-m", "runner", "abort", "nobody", "--socket", str(socket)],
                capture_stderr=True,
                check=False,
            )
        assert nothing.returncode == 1, "aborting nothing is an error the operator sees"
        assert b"no claim" in nothing.stderr
    assert (await world.acked_offsets())[world.stream("a")] == "0000000000000000_0000000000000000"
    assert not socket.exists(), "the socket goes away with the runner"


async def test_concurrent_stops_share_one_drain_and_a_drain_error_reaches_every_caller(world: World) -> None:
    await world.create("a")

    async def forever(batch: Batch) -> None:
        await trio.sleep_forever()

    runner = Runner(world.settings(drain_timeout=0.5), handlers={world.sub: forever})
    errors: list[BaseException] = []

    async def stop() -> None:
        try:
            await runner.stop()
        except StopError as error:
            errors.append(error)

    async with trio.open_nursery() as nursery:
        await runner.start(nursery)
        await runner.wait_until(State.STREAMING)
        await world.append("a", {"n": 1})
        await eventually(lambda: bool(runner.health().in_flight))
        # The finalizer's release will fail: the stop must still complete, and say so.
        await world.inject(world.subscription_path("release"), status=500, count=5)
        async with trio.open_nursery() as stoppers:
            for _ in range(3):
                stoppers.start_soon(stop)
    assert runner.state is State.STOPPED
    assert len(errors) == 3, "every caller hears about the drain error"
    assert all("release" in str(error.errors[0]) for error in errors if isinstance(error, StopError))
    assert runner.health().claims["interrupted"] == 1


def _task_count() -> int:
    def count(task: trio.lowlevel.Task) -> int:
        return 1 + sum(count(child) for nursery in task.child_nurseries for child in nursery.child_tasks)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return count(root)


def _log_handlers() -> int:
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in logging.Logger.manager.loggerDict)]
    return sum(len(logger.handlers) for logger in loggers)


def _footprint() -> dict[str, int]:
    gc.collect()
    process = psutil.Process()
    return {
        "threads": threading.active_count(),
        "tasks": _task_count(),
        "fds": process.num_fds(),
        "sockets": len(process.net_connections(kind="all")),
        "log handlers": _log_handlers(),
        "global metric collectors": len(prometheus_client.REGISTRY._collector_to_names),
    }


async def test_fifty_start_stop_cycles_leave_nothing_behind(world: World, tmp_path: Path) -> None:
    await world.create("a")
    recorder = Recorder()
    settings = world.settings(control_socket=tmp_path / "control.sock", metrics_listen="127.0.0.1:0")
    runner = Runner(settings, handlers={world.sub: recorder})
    baseline: dict[str, int] = {}
    for cycle in range(50):
        async with serving(runner):
            await world.append("a", {"n": cycle})
            expected = cycle + 1
            await eventually(lambda: recorder.count == expected, what=f"the event of cycle {cycle}")  # noqa: B023
        assert runner.state is State.STOPPED
        if cycle == 4:
            baseline = _footprint()  # after the first few cycles have warmed every cache
    final = _footprint()
    assert final["threads"] <= baseline.pop("threads"), "no extra threads"
    assert {k: v for k, v in final.items() if k != "threads"} == baseline
    assert [message["n"] for message in recorder.messages()] == list(range(50))
    assert (await world.acked_offsets())[world.stream("a")] == await world.client.tail(world.stream("a"))


async def test_a_stuck_sync_handler_cannot_hold_the_stop(world: World) -> None:
    await world.create("a")
    release, entered = threading.Event(), threading.Event()

    def stuck(batch: Batch) -> None:
        entered.set()
        release.wait(120)  # a sync handler that ignores everything

    runner = Runner(world.settings(drain_timeout=1.0, finalizer_timeout=1.0), handlers={world.sub: stuck})
    try:
        async with trio.open_nursery() as nursery:
            await runner.start(nursery)
            await runner.wait_until(State.STREAMING)
            await world.append("a", {"n": 1})
            # The handler itself, not just a worker (a sweep's worker is in flight before any claim).
            await eventually(entered.is_set, what="the handler to be stuck")
            before = trio.current_time()
            await runner.stop()
            took = trio.current_time() - before
    finally:
        release.set()
    assert took < 1.0 + 1.0 + 1.0, f"stop took {took:.1f} s"
    assert runner.health().claims["interrupted"] == 1


async def test_a_command_that_ignores_sigterm_cannot_hold_the_stop(world: World, record_file: Path) -> None:
    record = record_file
    await world.create("a")
    command = CommandHandler([sys.executable, str(ROOT / "tests" / "command_handler.py")], kill_grace=1.0)
    runner = Runner(world.settings(drain_timeout=1.0, finalizer_timeout=1.0), handlers={world.sub: command})
    async with trio.open_nursery() as nursery:
        await runner.start(nursery)
        await runner.wait_until(State.STREAMING)
        await world.append("a", {"do": "stubborn"})
        await eventually(lambda: "stubborn" in lines(record), what="the command to start")
        process = next(child for child in psutil.Process().children() if "command_handler" in " ".join(child.cmdline()))
        before = trio.current_time()
        await runner.stop()
        took = trio.current_time() - before
    # drain (1 s) + SIGTERM-to-SIGKILL grace (1 s) + finalizer bound (1 s)
    assert took < 3.5, f"stop took {took:.1f} s"
    assert "ignored SIGTERM" in lines(record)
    assert not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    assert runner.health().claims["interrupted"] == 1


async def test_an_abort_rests_the_subscription_as_long_as_asked_and_health_says_until_when(world: World) -> None:
    await world.create("a")
    started: list[Batch] = []

    async def stubborn(batch: Batch) -> None:
        started.append(batch)
        await trio.sleep_forever()

    runner = Runner(world.settings(cooldown=30.0), handlers={world.sub: stubborn})
    async with running(runner):
        await world.append("a", {"n": 1})
        await eventually(lambda: len(started) == 1, what="the first claim")
        assert runner.abort(world.sub, cooldown=0)
        await eventually(lambda: len(started) == 2, timeout=5, what="the work again at once, not after 30 s")
        assert runner.health().cooldowns == {}
        assert runner.abort(world.sub)
        await eventually(lambda: world.sub in runner.health().cooldowns, what="the default rest to show")
        rests_for = runner.health().cooldowns[world.sub] - time.time()
        assert 25 < rests_for <= 30
    assert [batch.messages for batch in started] == [[{"n": 1}], [{"n": 1}]], "aborted work is redelivered"


async def test_a_stop_while_the_runner_is_still_starting_stops_it(world: World, nursery: trio.Nursery) -> None:
    """The server accepts connections and never answers, so the start is still in progress
    (connecting, opening its control stream) when stop() is called: stop() must not be lost."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    held: list[trio.SocketStream] = []

    async def never_answer(stream: trio.SocketStream) -> None:
        held.append(stream)
        await trio.sleep_forever()

    nursery.start_soon(partial(trio.serve_listeners, never_answer, listeners))
    port = listeners[0].socket.getsockname()[1]
    runner = Runner(world.settings(server_url=f"http://127.0.0.1:{port}"), handlers={world.sub: Recorder()})
    async with trio.open_nursery() as runs:
        runs.start_soon(runner.start, runs)
        await eventually(lambda: bool(held), what="the runner to reach the silent server")
        with trio.fail_after(10):
            await runner.stop()
    assert runner.state is State.STOPPED
    for stream in held:
        await stream.aclose()
