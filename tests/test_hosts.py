"""BackgroundRunner: a runner on its own thread, driven from plain (non-trio) code."""

from __future__ import annotations

import threading
import uuid

import httpx

from machine import State
from runner import BackgroundRunner, Batch, Runner, Settings, SubscriptionSpec
from runner._devserver import DevServer


def test_a_background_runner_starts_handles_and_stops_from_plain_threads(shared_server: DevServer) -> None:
    assert shared_server.url is not None
    uid = uuid.uuid4().hex[:8]
    stream = f"bg-{uid}/a"
    handled: list[int] = []
    threads: set[str] = set()
    arrived = threading.Condition()

    async def handler(batch: Batch) -> None:
        threads.add(threading.current_thread().name)
        with arrived:
            handled.extend(message["n"] for message in batch.messages)
            arrived.notify_all()

    settings = Settings(
        server_url=shared_server.url,
        runner_id=f"bg-{uid}",
        wake_stream=f"wake-bg-{uid}/pool",
        subscriptions=(SubscriptionSpec(id=f"sub-bg-{uid}", pattern=f"bg-{uid}/*"),),
    )
    runner = Runner(settings, handlers={f"sub-bg-{uid}": handler})
    states: list[State] = []

    def entered(state: State) -> None:
        with arrived:
            states.append(state)
            arrived.notify_all()

    runner.add_state_listener(entered)
    background = BackgroundRunner(runner)
    with httpx.Client(base_url=shared_server.url, timeout=10) as http:
        http.put(f"/v1/stream/{stream}", headers={"content-type": "application/json"}).raise_for_status()
        for cycle in range(3):
            background.start()
            assert background.running
            with arrived:
                assert arrived.wait_for(lambda: states[-1] is State.STREAMING, timeout=15)
            http.post(f"/v1/stream/{stream}", json={"n": cycle}).raise_for_status()
            expected = cycle + 1
            with arrived:
                assert arrived.wait_for(lambda: len(handled) == expected, timeout=15), handled  # noqa: B023
            assert background.health().state == "streaming"
            assert background.abort("nothing-in-flight") is False
            background.stop()
            assert not background.running
            assert background.health().state == "stopped"
    assert handled == [0, 1, 2]
    assert threads == {f"pullwake-bg-{uid}"}, "handlers run on the runner's own thread"
