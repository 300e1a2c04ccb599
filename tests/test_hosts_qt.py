"""QtHost and examples/qt_app.py on a real Qt event loop (offscreen) against the reference server.

The tests drive the window as a user would (buttons, closing it) and measure the longest
the Qt event loop was held, with a 2 ms precise timer, during start, stop, stop with a
claim in flight, abort, and close.
"""

from __future__ import annotations

import os

os.environ["QT_QPA_PLATFORM"] = "offscreen"  # before Qt loads: no display in tests

import concurrent.futures
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("PySide6", reason="the qt extra is not installed")

from PySide6.QtCore import QCoreApplication, QEventLoop, Qt, QTimer
from PySide6.QtWidgets import QApplication

from examples.qt_app import JobsWindow
from runner import Batch, ConfigError, Ended, PullwakeError, Reloaded, Runner, RunnerError, State, SubscriptionSpec
from runner._service.devserver import DevServer
from runner.qt import QtHost
from tests.children import Lines, child
from tests.reload_handlers import HANDLED
from tests.test_hosts_asyncio import budget, fast_settings, footprint

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def app() -> QCoreApplication:
    return QApplication.instance() or QApplication([])


def spin_until(predicate: Callable[[], bool], *, timeout: float = 15.0, what: str = "the condition") -> None:
    """Run the Qt event loop until `predicate()` holds."""
    if predicate():
        return
    loop = QEventLoop()
    deadline = time.monotonic() + timeout
    poll = QTimer()
    poll.setInterval(5)

    def check() -> None:
        if predicate() or time.monotonic() > deadline:
            loop.quit()

    poll.timeout.connect(check)
    poll.start()
    loop.exec()
    poll.stop()
    if not predicate():
        raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


class UiGaps:
    """The longest time between two ticks of a 2 ms precise Qt timer, per named phase."""

    def __init__(self) -> None:
        self.worst: dict[str, float] = {}
        self._current, self._measuring, self._last = 0.0, False, time.monotonic()
        self._timer = QTimer()
        self._timer.setTimerType(Qt.TimerType.PreciseTimer)
        self._timer.setInterval(2)
        self._timer.timeout.connect(self._tick)
        self._timer.start()

    def _tick(self) -> None:
        now = time.monotonic()
        if self._measuring:
            self._current = max(self._current, now - self._last)
        self._last = now

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._last, self._current, self._measuring = time.monotonic(), 0.0, True
        try:
            yield
            settled = time.monotonic() + 0.02  # real-time: let a gap that ends after the phase be seen
            spin_until(lambda: time.monotonic() > settled)
        finally:
            self._measuring = False
            self.worst[name] = max(self.worst.get(name, 0.0), self._current)

    def report(self, host: str) -> str:
        return f"{host} worst UI block, ms: " + ", ".join(f"{k} {v * 1000:.1f}" for k, v in self.worst.items())


class Producer:
    """Appends from a worker thread, so the GUI thread's measurements see only the runner."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=10)
        self.pool = concurrent.futures.ThreadPoolExecutor(1)
        self.created: set[str] = set()

    def _append(self, stream: str, message: Any) -> None:
        if stream not in self.created:
            self.http.put(f"/v1/stream/{stream}", headers={"content-type": "application/json"}).raise_for_status()
            self.created.add(stream)
        self.http.post(f"/v1/stream/{stream}", json=message).raise_for_status()

    def append(self, stream: str, *messages: Any) -> None:
        def append_all() -> None:
            for message in messages:
                self._append(stream, message)

        future = self.pool.submit(append_all)
        spin_until(future.done, what="the appends")
        future.result()

    def close(self) -> None:
        self.pool.shutdown()
        self.http.close()


@pytest.fixture
def producer(shared_server: DevServer) -> Iterator[Producer]:
    assert shared_server.url is not None
    made = Producer(shared_server.url)
    yield made
    made.close()


def streaming(window: JobsWindow) -> Callable[[], bool]:
    return lambda: window.host.health().state == "streaming"


def test_the_qt_app_shows_jobs_in_order_and_never_freezes(
    app: QCoreApplication, shared_server: DevServer, producer: Producer
) -> None:
    assert shared_server.url is not None
    uid = f"qt{uuid.uuid4().hex[:8]}"
    window = JobsWindow(fast_settings(shared_server.url, uid))
    signalled: list[Batch] = []
    window.host.batchHandled.connect(signalled.append)
    window.show()
    gaps = UiGaps()

    with gaps.phase("start"):
        window.start_button.click()
        spin_until(streaming(window), what="streaming")
    assert window.states[:2] == ["connecting", "streaming"]
    spin_until(lambda: window.status.text().startswith("streaming"), what="the status line")
    sent = {"a": list(range(20)), "b": list(range(10))}
    producer.append(f"jobs-{uid}/a", *({"n": n, "title": f"a{n}"} for n in sent["a"]))
    producer.append(f"jobs-{uid}/b", *({"n": n, "title": f"b{n}"} for n in sent["b"]))
    spin_until(lambda: len(window.handled) == 30, what="30 jobs shown")
    for name, numbers in sent.items():
        assert [m["n"] for m in window.handled if m["title"].startswith(name)] == numbers, "in order per stream"
    assert window.jobs.count() == 30
    assert sum(len(batch.messages) for batch in signalled) == 30, "batchHandled for each batch"
    with gaps.phase("stop"):
        window.stop_button.click()
        spin_until(lambda: not window.host.running, what="stopped")
    assert window.states[-1] == "stopped"
    assert window.host.last_ended == Ended(requested=True, error=None)

    # Stop with a claim in flight: the drain lets the job finish; the window keeps painting.
    window.work_delay = 0.5
    window.start_button.click()
    spin_until(streaming(window), what="streaming")
    producer.append(f"jobs-{uid}/a", {"n": 20, "title": "a20"})
    spin_until(lambda: window.in_handler, what="a job at work")
    with gaps.phase("stop, claim in flight"):
        window.stop_button.click()
        spin_until(lambda: not window.host.running, what="stopped")
    assert window.handled[-1]["n"] == 20, "the drain let the job finish"

    # Abort the job at work: progress is kept, the job comes back once; the list shows it once.
    window.work_delay = 1.0
    window.start_button.click()
    spin_until(streaming(window), what="streaming")
    producer.append(f"jobs-{uid}/b", {"n": 10, "title": "b10"})
    spin_until(lambda: window.in_handler, what="a job at work")
    with gaps.phase("abort"):
        window.abort_button.click()
        spin_until(lambda: window.host.health().claims["aborted"] == 1, what="the abort")
    window.work_delay = 0.0
    spin_until(lambda: window.handled[-1]["n"] == 10, what="the aborted job handled after the cooldown")
    assert window.jobs.count() == 32

    # Close mid-work: the window waits for the drain without freezing, then closes itself.
    window.work_delay = 0.5
    producer.append(f"jobs-{uid}/a", {"n": 21, "title": "a21"})
    spin_until(lambda: window.in_handler, what="a job at work")
    with gaps.phase("close mid-work"):
        window.close()
        assert window.isVisible(), "still open while draining"
        spin_until(lambda: not window.isVisible(), what="the window closed")
    assert not window.host.running
    assert window.handled[-1]["n"] == 21
    print(gaps.report("Qt"))
    for phase, worst in gaps.worst.items():
        assert worst < budget(phase), f"the window was frozen {worst * 1000:.0f} ms during {phase}"


def test_twenty_qt_start_stop_cycles_leave_threads_fds_and_memory_flat(
    app: QCoreApplication, shared_server: DevServer, producer: Producer
) -> None:
    assert shared_server.url is not None
    uid = f"qc{uuid.uuid4().hex[:8]}"
    window = JobsWindow(fast_settings(shared_server.url, uid))
    gaps = UiGaps()
    marks: list[tuple[int, int, float]] = []
    for cycle in range(20):
        with gaps.phase("start (1st)" if cycle == 0 else "start (2nd-20th)"):
            window.host.start()
        spin_until(streaming(window), what="streaming")
        producer.append(f"jobs-{uid}/a", {"n": cycle})
        spin_until(lambda: len(window.handled) == cycle + 1, what=f"job {cycle}")  # noqa: B023
        with gaps.phase("stop"):
            window.host.stop()
            spin_until(lambda: not window.host.running, what="stopped")
        if cycle in (4, 19):
            marks.append(footprint())
    assert [m["n"] for m in window.handled] == list(range(20))
    (threads_5, fds_5, rss_5), (threads_20, fds_20, rss_20) = marks
    print(
        f"Qt 20 cycles: threads {threads_5}->{threads_20}, fds {fds_5}->{fds_20}, "
        f"RSS {rss_5:.1f}->{rss_20:.1f} MiB; {gaps.report('Qt')}"
    )
    for phase, worst in gaps.worst.items():
        assert worst < budget(phase), f"the window was frozen {worst * 1000:.0f} ms during {phase}"
    assert threads_20 <= threads_5 + 1
    assert fds_20 <= fds_5
    assert rss_20 - rss_5 < 10


def test_the_qt_app_shows_a_reconnect_after_a_server_restart(app: QCoreApplication, own_server: DevServer) -> None:
    assert own_server.url is not None
    uid = f"qr{uuid.uuid4().hex[:8]}"
    producer = Producer(own_server.url)
    window = JobsWindow(fast_settings(own_server.url, uid))
    statuses: list[str] = []
    window.host.healthChanged.connect(lambda health: statuses.append(window.status.text()))
    try:
        window.host.start()
        spin_until(streaming(window), what="streaming")
        producer.append(f"jobs-{uid}/a", {"n": 0})
        spin_until(lambda: len(window.handled) == 1, what="the first job")
        own_server.stop()
        spin_until(lambda: "reconnecting" in window.states, what="reconnecting")
        own_server.start()
        spin_until(lambda: window.states[-1] == "streaming", timeout=20, what="streaming again")
        producer.append(f"jobs-{uid}/a", {"n": 1})
        spin_until(lambda: len(window.handled) == 2, timeout=20, what="the job after the restart")
        assert any(text.startswith("reconnecting") for text in statuses), statuses
        assert "reconnects 1" in window.status.text() or window.host.health().reconnect_count >= 1
        window.host.stop()
        spin_until(lambda: not window.host.running, what="stopped")
    finally:
        producer.close()


def test_qt_host_slots_never_raise_and_quitting_the_app_drains(
    app: QCoreApplication, shared_server: DevServer, producer: Producer
) -> None:
    assert shared_server.url is not None
    uid = f"qs{uuid.uuid4().hex[:8]}"
    failures: list[PullwakeError] = []
    bare = QtHost(Runner(fast_settings(shared_server.url, uid)))
    bare.failed.connect(failures.append)
    assert bare.start() is False
    assert len(failures) == 1
    assert isinstance(failures[0], ConfigError), failures

    # A failing handler shows up as batchFailed, its retry as batchHandled; health is signalled.
    attempts: list[int] = []

    async def flaky(batch: Batch) -> None:
        attempts.append(batch.attempt)
        if batch.attempt == 1:
            raise RuntimeError("the printer is out of paper")

    flaky_host = QtHost(Runner(fast_settings(shared_server.url, f"{uid}f"), handlers={f"sub-{uid}f": flaky}))
    failed: list[str] = []
    handled: list[Batch] = []
    healths: list[Any] = []
    flaky_host.batchFailed.connect(lambda batch, message: failed.append(message))
    flaky_host.batchHandled.connect(handled.append)
    flaky_host.healthChanged.connect(healths.append)
    flaky_host.start()
    spin_until(lambda: flaky_host.health().state == "streaming", what="streaming")
    producer.append(f"jobs-{uid}f/a", {"n": 0})
    spin_until(lambda: len(handled) == 1, what="the retried batch handled")
    assert failed == ["RuntimeError: the printer is out of paper"]
    assert attempts == [1, 2]
    assert {health.state for health in healths} >= {"connecting", "streaming"}
    flaky_host.stop()
    spin_until(lambda: not flaky_host.running, what="stopped")

    window = JobsWindow(fast_settings(shared_server.url, f"{uid}w"))
    endings: list[Ended] = []
    window.host.ended.connect(endings.append)
    # A stop during the start stops it once under way; a start during the stop starts again after it.
    assert window.host.start()
    window.host.stop()
    spin_until(lambda: not window.host.running, what="stopped")
    assert endings == [Ended(requested=True, error=None)]
    assert window.runner.state is State.STOPPED
    window.host.start()
    spin_until(streaming(window), what="streaming")
    window.host.stop()
    assert window.host.start(), "queued behind the stop"
    spin_until(lambda: len(endings) == 2 and window.host.running, what="restarted")
    spin_until(streaming(window), what="streaming again")

    # The app quits with a job at work: aboutToQuit drains it in a nested loop.
    gaps = UiGaps()
    window.work_delay = 0.5
    producer.append(f"jobs-{uid}w/a", {"n": 0})
    spin_until(lambda: window.in_handler, what="a job at work")
    with gaps.phase("quit mid-work"):
        app.aboutToQuit.emit()
    assert not window.host.running
    assert window.handled == [{"n": 0}]
    print(gaps.report("Qt"))
    assert gaps.worst["quit mid-work"] < budget("quit")


def test_a_qt_host_reloads_and_signals_what_changed_or_why_not(
    app: QCoreApplication, shared_server: DevServer, producer: Producer
) -> None:
    assert shared_server.url is not None
    uid = f"qr{uuid.uuid4().hex[:8]}"
    HANDLED.clear()
    record = "tests.reload_handlers:record"
    a = SubscriptionSpec(id=f"sub-{uid}-a", pattern=f"jobs-{uid}/a/*", lease_ttl_ms=5_000, handler=record)
    b = SubscriptionSpec(id=f"sub-{uid}-b", pattern=f"jobs-{uid}/b/*", lease_ttl_ms=5_000, handler=record)
    settings = fast_settings(shared_server.url, uid, subscriptions=(a,))
    host = QtHost(Runner(settings))
    reloaded: list[Reloaded] = []
    refused: list[PullwakeError] = []
    host.reloaded.connect(reloaded.append)
    host.reloadFailed.connect(refused.append)
    host.reload(settings)
    assert [type(error) for error in refused] == [RunnerError], "not running: said at once"
    host.start()
    try:
        spin_until(lambda: host.health().state == "streaming", what="streaming")
        host.reload(settings.model_copy(update={"subscriptions": (a, b)}))
        spin_until(lambda: len(reloaded) == 1, what="the reload applied")
        assert reloaded[0].added == [b.id]
        broken = b.model_copy(update={"handler": "tests.nowhere:nothing"})
        host.reload(settings.model_copy(update={"subscriptions": (a, broken)}))
        spin_until(lambda: len(refused) == 2, what="the bad reload refused")
        assert isinstance(refused[1], ConfigError)
        producer.append(f"jobs-{uid}/b/1", {"n": 1})
        spin_until(lambda: HANDLED[b.id] == [{"n": 1}], what="the added subscription served")
    finally:
        host.stop()
        spin_until(lambda: not host.running, what="stopped")


CTRL_C_APP = """
import os, signal, sys
# The test is about Ctrl-C: a suite run with SIGINT ignored (`make test &`) passes that on to its
# children, and Python then leaves it ignored. Put back what Python installs otherwise.
signal.signal(signal.SIGINT, signal.default_int_handler)
os.environ["QT_QPA_PLATFORM"] = "offscreen"
import structlog
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
import trio
from PySide6.QtWidgets import QApplication
from runner import Runner
from runner.qt import QtHost
from tests.test_hosts_asyncio import fast_settings

url, uid = sys.argv[1], sys.argv[2]
app = QApplication([])

async def handler(batch):
    print("at work", flush=True)
    await trio.sleep(30)

host = QtHost(Runner(fast_settings(url, uid), handlers={f"sub-{uid}": handler}))
host.stateChanged.connect(lambda state: state == "streaming" and print("streaming", flush=True))
host.ended.connect(lambda ended: print("ended", ended.requested, type(ended.error).__name__, flush=True))
host.start()
sys.exit(app.exec())
"""


def test_ctrl_c_interrupts_a_qt_hosted_run_and_quits_the_app(shared_server: DevServer, tmp_path: Path) -> None:
    assert shared_server.url is not None
    uid = f"qi{uuid.uuid4().hex[:8]}"
    script = tmp_path / "app.py"
    script.write_text(CTRL_C_APP)
    root = Path(__file__).resolve().parent.parent
    with (
        httpx.Client(base_url=shared_server.url, timeout=10) as http,
        child(
            [sys.executable, str(script), shared_server.url, uid],
            cwd=root,
            env={**os.environ, "PYTHONPATH": str(root)},
            stdout=subprocess.PIPE,
        ) as app,
    ):
        lines = Lines(app.stdout)
        assert lines.next() == "streaming"
        http.put(f"/v1/stream/jobs-{uid}/a", headers={"content-type": "application/json"}).raise_for_status()
        http.post(f"/v1/stream/jobs-{uid}/a", json={"n": 0}).raise_for_status()
        assert lines.next() == "at work"
        app.send_signal(signal.SIGINT)
        assert app.wait(15) == 0, "the app quit"
        assert " ".join(lines.rest()).split() == ["ended", "False", "RunnerError"]
        # Released, not left to its 5 s lease: another worker can claim the pending event now.
        probe = http.post(f"/v1/stream/__ds/subscriptions/sub-{uid}/claim", json={"worker": "probe"})
    assert probe.status_code == 200, probe.text
