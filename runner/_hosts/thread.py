"""`BackgroundRunner`: a runner on a thread of its own, for plain threaded programs."""

from __future__ import annotations

import atexit
import concurrent.futures
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import outcome
import structlog
import trio

from machine import State

from .._config import Settings
from .._handlers.batch import Batch
from .._health import Health
from .._runner import Runner
from .._wake.reload import Reloaded
from ..errors import AlreadyRunning, PullwakeError, RunnerError
from .guest import Ended, GuestHooks, as_pullwake_error, hosted_run, reload_in_trio, send

log = structlog.get_logger("pullwake.hosts")


@dataclass(eq=False)
class _Run:
    """One start → end of the runner's thread; fields guarded by `BackgroundRunner._lock`."""

    thread: threading.Thread | None = None
    token: trio.lowlevel.TrioToken | None = None
    stop_event: trio.Event | None = None
    stop_requested: bool = False
    under_way: threading.Event = field(default_factory=threading.Event)
    ended: concurrent.futures.Future[Ended] = field(default_factory=concurrent.futures.Future)
    stop_error: PullwakeError | None = None


class BackgroundRunner:
    """Runs a `Runner` on a thread of its own, with its own trio event loop.

    For threaded programs, and for GUI or asyncio programs that prefer a thread to
    `runner.qt.QtHost` / `runner.AsyncioHost` (there, handlers run on the host's loop)::

        background = BackgroundRunner(runner, on_ended=report)
        background.start()                  # returns once the runner is under way
        ...                                 # handlers run on the runner's thread
        background.stop()                   # drains, then returns
        future = background.request_stop()  # or: returns at once; future.result() waits

    - Every method may be called from any thread, in any order: a stop that races a
      start leaves the runner stopped; `start()` after `stop()` starts a new run.
    - `health()` never waits for the runner's thread: it returns a snapshot the runner
      refreshes on each state change, each handler call and every `health_interval` s.
    - Only `PullwakeError`s come out (never an ExceptionGroup from trio).
    - Ending on its own (the wake stream closed for good, a failure): `on_ended(Ended)`
      is called on the runner's thread, `ended` is set, `wait()` returns; the error is
      also raised by the next `stop()`.
    - At interpreter exit a running runner is drained (`atexit`) unless
      `drain_at_exit=False`; the thread is joined. Handlers run on the runner's thread:
      hand results to a GUI through the toolkit's thread-safe mechanism.
    """

    def __init__(
        self,
        runner: Runner,
        *,
        on_ended: Callable[[Ended], object] | None = None,
        drain_at_exit: bool = True,
        health_interval: float = 0.25,
    ) -> None:
        self.runner = runner
        self.on_ended = on_ended
        self.drain_at_exit = drain_at_exit
        self.health_interval = health_interval
        self._lock = threading.Lock()
        self._run: _Run | None = None
        self._snapshot: Health | None = None

    # -- observation -----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """A run is in progress: starting, running or draining."""
        run = self._run
        return run is not None and not run.ended.done()

    @property
    def ended(self) -> Ended | None:
        """How the last run ended; None while one is in progress or before the first."""
        run = self._run
        return run.ended.result() if run is not None and run.ended.done() else None

    def wait(self, timeout: float | None = None) -> Ended | None:
        """Block until the current run is over (None on timeout, or if never started)."""
        run = self._run
        if run is None:
            return None
        try:
            return run.ended.result(timeout)
        except concurrent.futures.TimeoutError:
            return None

    def health(self) -> Health:
        """The latest snapshot of the runner's health; never waits for the runner's thread."""
        snapshot = self._snapshot
        return snapshot if snapshot is not None else self.runner.health()  # None: never started

    # -- control ---------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Start the runner's thread; returns once the runner is under way (`connecting`).

        Raises `AlreadyRunning`, `ConfigError` (it could not start), or `RunnerError` if it
        did not get under way within `timeout` (it keeps trying; `stop()` ends it). If a
        stop from another thread won the race, returns with the runner stopped. While a
        requested stop is still draining, waits for it to end, then starts a new run.
        """
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                previous = self._run
                if previous is None or previous.ended.done():
                    run = self._launch()
                    break
                if not previous.stop_requested:
                    raise AlreadyRunning(f"{self.runner!r} is already running in the background")
            concurrent.futures.wait([previous.ended], timeout=max(0.0, deadline - time.monotonic()))
            if not previous.ended.done():
                raise RunnerError(f"the previous run did not stop within {timeout:g} s")
        if not run.under_way.wait(max(0.0, deadline - time.monotonic())):
            raise RunnerError(f"the runner did not get under way within {timeout:g} s")
        if run.ended.done() and not run.stop_requested and (error := run.ended.result().error) is not None:
            raise error

    def _launch(self) -> _Run:
        """Start a new run's thread (with the lock held)."""
        self.runner.check()
        run = _Run()
        run.thread = threading.Thread(
            target=self._thread_main,
            args=(run,),
            name=f"pullwake-{self.runner.settings.runner_id}",
            daemon=True,  # joined by stop() or at exit (a non-daemon thread would be joined before atexit)
        )
        self._run = run
        if self.drain_at_exit:
            atexit.register(self._at_exit)
        run.thread.start()
        return run

    def request_stop(self) -> concurrent.futures.Future[None]:
        """Ask the runner to drain and stop; returns at once.

        The future completes when the runner is stopped (its thread is ending); its
        exception is the `PullwakeError` that `stop()` would raise. Safe from any thread,
        including the runner's own (a handler may stop its runner).
        """
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._lock:
            run = self._run
            if run is None:
                done.set_result(None)
                return done
            run.stop_requested = True
            if run.stop_event is not None:
                send(run.token, run.stop_event.set)

        def finished(ended: concurrent.futures.Future[Ended]) -> None:
            error = ended.result().error
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(None)

        run.ended.add_done_callback(finished)
        return done

    def stop(self, timeout: float | None = None) -> None:
        """Drain and stop; blocks until the runner is stopped (at most `timeout` s).

        From the runner's own thread (a handler), only asks for the stop and returns.

        Raises the run's `PullwakeError` (`StopError` for a drain in trouble,
        `WakeStreamClosed` if it had ended on its own), or `RunnerError` on timeout.
        """
        run = self._run
        future = self.request_stop()
        if run is not None and run.thread is threading.current_thread():
            return  # called by a handler: the runner cannot wait for itself; the stop is under way
        try:
            future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise RunnerError(f"the runner did not stop within {timeout:g} s") from None
        finally:
            thread = run.thread if run is not None else None
            if thread is not None and thread is not threading.current_thread() and future.done():
                thread.join()  # it has set its result: only returning is left

    def abort(self, subscription_id: str, *, cooldown: float | None = None) -> bool:
        """Abort one subscription's in-flight claim (rest `cooldown` s after); never waits for the runner's thread.

        Returns whether the latest snapshot shows a claim of it in flight; the abort lands
        at the runner's next step either way (acked progress is kept).
        """
        run = self._run
        if run is None or not send(run.token, partial(self.runner.abort, subscription_id, cooldown=cooldown)):
            return False
        return any(claim.subscription == subscription_id for claim in self.health().in_flight)

    def reload(self, settings: Settings, timeout: float | None = None) -> Reloaded:
        """Apply `settings` to the running runner (`Runner.reload`) and return what changed.

        Waits (up to `timeout` s, then `TimeoutError`; the reload goes on) for the runner's
        thread to apply it. Raises `ConfigError` having changed nothing if the new handlers
        cannot be had, `RunnerError` if the runner is not running. Call it from any thread
        but the runner's own (a handler there awaits `runner.reload` instead).
        """
        run = self._run
        if run is not None and run.thread is threading.current_thread():
            raise RunnerError("reload() waits for the runner's thread: from a handler, await runner.reload()")
        applied: concurrent.futures.Future[Reloaded] = concurrent.futures.Future()

        def done(result: outcome.Outcome[Reloaded]) -> None:
            if isinstance(result, outcome.Error):
                applied.set_exception(result.error)
            else:
                applied.set_result(result.unwrap())

        if run is None or not send(run.token, partial(reload_in_trio, self.runner, settings, done)):
            raise RunnerError("the runner is not running: there is nothing to reload")
        return applied.result(timeout)

    def interrupt(self) -> None:
        """Cut a running drain short (in-flight claims are cancelled; finalizers still run)."""
        run = self._run
        if run is not None:
            send(run.token, self.runner.interrupt)

    # -- the runner's thread ---------------------------------------------------------------

    def _thread_main(self, run: _Run) -> None:
        error: PullwakeError | None = None
        try:
            trio.run(self._serve, run)
            error = run.stop_error
        except BaseException as failure:
            error = as_pullwake_error(failure)
        with self._lock:
            run.token = None
            self._snapshot = self.runner.health()
            ended = Ended(requested=run.stop_requested, error=error)
        if error is not None:
            log.warning("background_run.ended", requested=ended.requested, error=f"{type(error).__name__}: {error}")
        if self.drain_at_exit:
            atexit.unregister(self._at_exit)
        run.ended.set_result(ended)
        run.under_way.set()
        if self.on_ended is not None:
            try:
                self.on_ended(ended)
            except Exception:
                log.exception("on_ended.failed")

    async def _serve(self, run: _Run) -> None:
        with self._lock:
            run.token = trio.lowlevel.current_trio_token()
            run.stop_event = stop_event = trio.Event()
            if run.stop_requested:
                return  # a stop won the race against this start
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keep_fresh)
            run.stop_error = await hosted_run(
                self.runner, _Refresher(self._refresh), stop_event, under_way=partial(self._under_way, run)
            )
            nursery.cancel_scope.cancel()

    def _under_way(self, run: _Run) -> None:
        self._refresh()
        run.under_way.set()

    async def _keep_fresh(self) -> None:
        while True:
            await trio.sleep(self.health_interval)
            self._refresh()

    def _refresh(self) -> None:
        self._snapshot = self.runner.health()

    def _at_exit(self) -> None:
        if self.running:
            log.info("background_run.draining_at_exit", runner_id=self.runner.settings.runner_id)
            try:
                self.stop()
            except PullwakeError as error:
                log.warning("background_run.exit_stop_failed", error=str(error))


class _Refresher(GuestHooks):
    """Keeps the snapshot fresh on each state change and around handler calls, so `abort()` sees claims in flight."""

    def __init__(self, refresh: Callable[[], None]) -> None:
        self.refresh = refresh

    def state_changed(self, state: State) -> None:
        self.refresh()

    def batch_started(self, batch: Batch) -> None:
        self.refresh()

    def batch_handled(self, batch: Batch) -> None:
        self.refresh()

    def batch_failed(self, batch: Batch, error: BaseException) -> None:
        self.refresh()
