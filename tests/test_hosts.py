"""BackgroundRunner: a runner on its own thread, driven from plain (non-trio) code."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from runner import (
    AlreadyRunning,
    BackgroundRunner,
    Batch,
    ConfigError,
    Ended,
    PullwakeError,
    Runner,
    Settings,
    State,
    SubscriptionSpec,
    WakeStreamClosed,
)
from runner._service.devserver import DevServer
from tests.children import Lines, child
from tests.reload_handlers import HANDLED
from tests.test_hosts_asyncio import fast_settings, footprint

pytestmark = pytest.mark.server

RECORD = "tests.reload_handlers:record"


def wait_for(predicate: Any, *, timeout: float = 15.0, what: str = "the condition") -> None:
    """Poll a condition that another thread makes true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.005)  # real-time: another thread changes the condition; this is the poll interval


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
            wait_for(lambda: background.health().state == "streaming", what="the snapshot")
            assert background.abort("nothing-in-flight") is False
            background.stop()
            assert not background.running
            assert background.health().state == "stopped"
            assert background.ended == Ended(requested=True, error=None)
    assert handled == [0, 1, 2]
    assert threads == {f"pullwake-bg-{uid}"}, "handlers run on the runner's own thread"


def test_request_stop_returns_at_once_and_health_and_abort_never_wait(shared_server: DevServer) -> None:
    assert shared_server.url is not None
    uid = f"bs{uuid.uuid4().hex[:8]}"
    started = threading.Event()
    release = threading.Event()
    finished: list[int] = []

    async def slow(batch: Batch) -> None:
        started.set()
        await trio.sleep(0.5)
        finished.extend(message["n"] for message in batch.messages)

    async def hogging(batch: Batch) -> None:
        # A badly written async handler that holds the runner's loop (a blocking call).
        started.set()
        release.wait(5)
        finished.extend(message["n"] for message in batch.messages)

    handler: dict[str, Any] = {"now": slow}

    async def dispatch(batch: Batch) -> None:
        await handler["now"](batch)

    runner = Runner(fast_settings(shared_server.url, uid), handlers={f"sub-{uid}": dispatch})
    background = BackgroundRunner(runner)
    timings: dict[str, float] = {}
    with httpx.Client(base_url=shared_server.url, timeout=10) as http:
        http.put(f"/v1/stream/jobs-{uid}/a", headers={"content-type": "application/json"}).raise_for_status()
        began = time.perf_counter()
        background.start()
        timings["start()"] = time.perf_counter() - began
        wait_for(lambda: background.health().state == "streaming", what="streaming")
        http.post(f"/v1/stream/jobs-{uid}/a", json={"n": 0}).raise_for_status()
        assert started.wait(15)
        began = time.perf_counter()
        stopping = background.request_stop()
        timings["request_stop()"] = time.perf_counter() - began
        assert not stopping.done(), "a claim is in flight: the drain is still going"
        assert stopping.result(15) is None
        assert finished == [0], "the drain let the handler finish"
        assert not background.running

        handler["now"] = hogging
        started.clear()
        background.start()
        wait_for(lambda: background.health().state == "streaming", what="streaming")
        http.post(f"/v1/stream/jobs-{uid}/a", json={"n": 1}).raise_for_status()
        assert started.wait(15)
        began = time.perf_counter()
        health = background.health()
        timings["health(), loop held"] = time.perf_counter() - began
        assert [claim.subscription for claim in health.in_flight] == [f"sub-{uid}"]
        began = time.perf_counter()
        assert background.abort(f"sub-{uid}") is True
        timings["abort(), loop held"] = time.perf_counter() - began
        release.set()
        wait_for(lambda: background.health().claims["aborted"] + background.health().claims["completed"] >= 1)
        background.stop()
    print("BackgroundRunner caller blocked, ms: " + ", ".join(f"{k} {v * 1000:.1f}" for k, v in timings.items()))
    assert timings["request_stop()"] < 0.05
    assert timings["health(), loop held"] < 0.05
    assert timings["abort(), loop held"] < 0.05


def test_only_pullwake_errors_come_out_and_an_end_on_its_own_is_reported(shared_server: DevServer) -> None:
    assert shared_server.url is not None
    uid = f"be{uuid.uuid4().hex[:8]}"
    with pytest.raises(ConfigError, match="no handler"):
        BackgroundRunner(Runner(fast_settings(shared_server.url, uid))).start()

    endings: list[Ended] = []
    runner = Runner(fast_settings(shared_server.url, uid), handlers={f"sub-{uid}": lambda batch: None})
    background = BackgroundRunner(runner, on_ended=endings.append)
    background.start()
    wait_for(lambda: background.health().state == "streaming", what="streaming")
    with httpx.Client(base_url=shared_server.url) as http:
        http.post(f"/v1/stream/wake-{uid}/pool", headers={"Stream-Closed": "true"}).raise_for_status()
    ended = background.wait(15)
    assert ended is not None
    assert not ended.requested
    assert isinstance(ended.error, WakeStreamClosed), "unwrapped from trio's ExceptionGroup"
    assert endings == [ended]
    assert not background.running
    with pytest.raises(WakeStreamClosed):
        background.stop()


def test_a_stop_racing_a_start_on_another_thread_leaves_it_stopped(shared_server: DevServer) -> None:
    assert shared_server.url is not None
    uid = f"br{uuid.uuid4().hex[:8]}"
    runner = Runner(fast_settings(shared_server.url, uid), handlers={f"sub-{uid}": lambda batch: None})
    background = BackgroundRunner(runner)
    for attempt in range(8):
        errors: list[BaseException] = []

        def start(errors: list[BaseException]) -> None:
            try:
                background.start()
            except PullwakeError as error:
                errors.append(error)

        starter = threading.Thread(target=start, args=(errors,))
        starter.start()
        wait_for(lambda: background.running, what="the start under way")
        if attempt % 2:
            time.sleep(0.002 * attempt)  # real-time: land the stop at different points of the start
        background.stop(timeout=15)
        starter.join(15)
        assert not starter.is_alive()
        assert errors == []
        assert not background.running
        assert runner.state is State.STOPPED
        assert background.ended == Ended(requested=True, error=None)


def test_twenty_background_cycles_leave_threads_fds_and_memory_flat(shared_server: DevServer) -> None:
    assert shared_server.url is not None
    uid = f"bc{uuid.uuid4().hex[:8]}"
    runner = Runner(fast_settings(shared_server.url, uid), handlers={f"sub-{uid}": lambda batch: None})
    background = BackgroundRunner(runner)
    marks: list[tuple[int, int, float]] = []
    for cycle in range(20):
        background.start()
        wait_for(lambda: background.health().state == "streaming", what="streaming")
        background.stop()
        if cycle in (4, 19):
            marks.append(footprint())
    (threads_5, fds_5, rss_5), (threads_20, fds_20, rss_20) = marks
    print(
        f"BackgroundRunner 20 cycles: threads {threads_5}->{threads_20}, fds {fds_5}->{fds_20}, "
        f"RSS {rss_5:.1f}->{rss_20:.1f} MiB"
    )
    assert threads_20 <= threads_5 + 1
    assert fds_20 <= fds_5
    assert rss_20 - rss_5 < 10


EXIT_SCRIPT = textwrap.dedent(
    """
    import sys, threading, structlog, trio
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout is the test's
    from runner import BackgroundRunner, Batch, Runner
    from tests.test_hosts_asyncio import fast_settings

    url, uid, record, drain = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "drain"

    async def handler(batch: Batch) -> None:
        with open(record, "a") as out:
            out.write("started\\n")
        await trio.sleep(1.0)
        with open(record, "a") as out:
            out.write("finished\\n")

    runner = Runner(fast_settings(url, uid), handlers={f"sub-{uid}": handler})
    streaming = threading.Event()
    runner.add_state_listener(lambda state: state.value == "streaming" and streaming.set())
    BackgroundRunner(runner, drain_at_exit=drain).start()
    streaming.wait(15)
    print("started", flush=True)
    sys.stdin.readline()  # the test appends an event, waits for the handler, then closes stdin
    # The app returns without stop().
    """
)


@pytest.mark.parametrize("drain", [True, False], ids=["drains", "opted-out"])
def test_the_interpreter_exit_drains_a_running_background_runner(
    shared_server: DevServer, tmp_path: Path, drain: bool
) -> None:
    assert shared_server.url is not None
    uid = f"bx{uuid.uuid4().hex[:8]}"
    record = tmp_path / "record.txt"
    record.touch()
    script = tmp_path / "app.py"
    script.write_text(EXIT_SCRIPT)
    root = Path(__file__).resolve().parent.parent
    with (
        httpx.Client(base_url=shared_server.url, timeout=10) as http,
        child(
            [sys.executable, str(script), shared_server.url, uid, str(record), "drain" if drain else "no"],
            cwd=root,
            env={**os.environ, "PYTHONPATH": str(root)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        ) as app,
    ):
        assert app.stdin is not None
        assert Lines(app.stdout).next() == "started"
        http.put(f"/v1/stream/jobs-{uid}/a", headers={"content-type": "application/json"}).raise_for_status()
        http.post(f"/v1/stream/jobs-{uid}/a", json={"n": 0}).raise_for_status()
        wait_for(lambda: "started" in record.read_text(), what="the handler at work")
        app.stdin.close()
        assert app.wait(15) == 0
        subscription = http.get(f"/v1/stream/__ds/subscriptions/sub-{uid}").json()
        tail = http.head(f"/v1/stream/jobs-{uid}/a").headers["Stream-Next-Offset"]
    acked = {stream["path"]: stream["acked_offset"] for stream in subscription["streams"]}
    if drain:
        assert record.read_text().split() == ["started", "finished"], "the exit waited for the drain"
        assert acked[f"jobs-{uid}/a"] == tail, "and the batch was acknowledged"
    else:
        assert record.read_text().split() == ["started"], "opted out: no drain at exit"
        assert acked[f"jobs-{uid}/a"] != tail


def test_a_handler_may_stop_its_background_runner(shared_server: DevServer) -> None:
    assert shared_server.url is not None
    uid = f"bh{uuid.uuid4().hex[:8]}"
    returned = threading.Event()
    holder: list[BackgroundRunner] = []

    def handler(batch: Batch) -> None:
        holder[0].stop()  # on the runner's (worker) thread: asks, does not wait for itself
        returned.set()

    async def on_runner_thread(batch: Batch) -> None:
        handler(batch)

    runner = Runner(fast_settings(shared_server.url, uid), handlers={f"sub-{uid}": on_runner_thread})
    background = BackgroundRunner(runner)
    holder.append(background)
    background.start()
    wait_for(lambda: background.health().state == "streaming", what="streaming")
    with httpx.Client(base_url=shared_server.url, timeout=10) as http:
        http.put(f"/v1/stream/jobs-{uid}/a", headers={"content-type": "application/json"}).raise_for_status()
        http.post(f"/v1/stream/jobs-{uid}/a", json={"n": 0}).raise_for_status()
    assert returned.wait(15)
    ended = background.wait(15)
    assert ended == Ended(requested=True, error=None)


def test_importing_runner_does_not_import_qt() -> None:
    code = "import sys, runner; assert 'PySide6' not in sys.modules, 'runner imported Qt'; import runner.qt"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_no_http_server_stack_is_loaded_unless_a_control_socket_or_metrics_listener_is_asked_for() -> None:
    """Embedding programs, and `pullwake run` without those surfaces, do not pay for hypercorn and
    starlette (about 3.6 MiB of RSS and a second of import time on a small machine)."""
    code = (
        "import sys, trio, runner, runner._service.cli, runner._service.daemon\n"
        "from runner import Settings\n"
        "server = {'hypercorn', 'starlette'}\n"
        "assert not server & set(sys.modules), 'loaded at import'\n"
        "trio.run(runner._service.daemon.serve_surfaces, None, Settings(control_stream_enabled=False))\n"
        "assert not server & set(sys.modules), 'loaded by serve_surfaces without surfaces'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_start_during_a_drain_waits_for_it_then_starts_again(shared_server: DevServer) -> None:
    assert shared_server.url is not None
    uid = f"bd{uuid.uuid4().hex[:8]}"
    started = threading.Event()

    async def slow(batch: Batch) -> None:
        started.set()
        await trio.sleep(0.5)

    runner = Runner(fast_settings(shared_server.url, uid), handlers={f"sub-{uid}": slow})
    background = BackgroundRunner(runner)
    background.start()
    wait_for(lambda: background.health().state == "streaming", what="streaming")
    with pytest.raises(AlreadyRunning):
        background.start()
    with httpx.Client(base_url=shared_server.url, timeout=10) as http:
        http.put(f"/v1/stream/jobs-{uid}/a", headers={"content-type": "application/json"}).raise_for_status()
        http.post(f"/v1/stream/jobs-{uid}/a", json={"n": 0}).raise_for_status()
    assert started.wait(15)
    draining = background.request_stop()
    background.start()  # waits for the drain, then starts anew
    assert draining.done()
    assert background.running
    wait_for(lambda: background.health().state == "streaming", what="streaming again")
    background.stop()
    assert background.health().claims["completed"] == 0, "counters describe the current run"


def test_a_background_runner_reloads_from_another_thread_and_says_what_changed(shared_server: DevServer) -> None:
    assert shared_server.url is not None
    uid = f"rl{uuid.uuid4().hex[:8]}"
    HANDLED.clear()
    a = SubscriptionSpec(id=f"sub-{uid}-a", pattern=f"jobs-{uid}/a/*", lease_ttl_ms=5_000, handler=RECORD)
    b = SubscriptionSpec(id=f"sub-{uid}-b", pattern=f"jobs-{uid}/b/*", lease_ttl_ms=5_000, handler=RECORD)
    settings = fast_settings(shared_server.url, uid, subscriptions=(a,))
    runner = Runner(settings)
    background = BackgroundRunner(runner)
    with pytest.raises(PullwakeError, match="not running"):
        background.reload(settings)
    background.start()
    try:
        wait_for(lambda: background.health().state == "streaming", what="streaming")
        reloaded = background.reload(settings.model_copy(update={"subscriptions": (a, b)}), timeout=15)
        assert (reloaded.added, reloaded.removed) == ([b.id], [])
        broken = SubscriptionSpec(id=f"sub-{uid}-c", pattern=f"jobs-{uid}/c/*", handler="tests.nowhere:nothing")
        with pytest.raises(ConfigError):
            background.reload(settings.model_copy(update={"subscriptions": (a, b, broken)}), timeout=15)
        assert [spec.id for spec in runner.settings.subscriptions] == [a.id, b.id], "a failed reload changes nothing"
        with httpx.Client(base_url=shared_server.url, timeout=10) as http:
            for name, n in (("b", 1), ("a", 2)):
                stream = f"/v1/stream/jobs-{uid}/{name}/1"
                http.put(stream, headers={"content-type": "application/json"}).raise_for_status()
                http.post(stream, json={"n": n}).raise_for_status()
        wait_for(lambda: len(HANDLED[a.id]) + len(HANDLED[b.id]) == 2, what="both subscriptions served")
        assert (HANDLED[a.id], HANDLED[b.id]) == ([{"n": 2}], [{"n": 1}])
    finally:
        background.stop(timeout=30)
    with pytest.raises(PullwakeError, match="not running"):
        background.reload(settings)
