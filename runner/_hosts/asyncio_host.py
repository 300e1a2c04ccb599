"""`AsyncioHost`: a runner inside an asyncio program, on the program's own loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import TracebackType

import outcome
import structlog

from machine import State

from .._config import Settings
from .._handlers.batch import Batch
from .._health import Health
from .._runner import Runner
from .._wake.reload import Reloaded
from ..errors import RunnerError
from .guest import Ended, GuestHooks, GuestRun

log = structlog.get_logger("pullwake.hosts")


class AsyncioHost:
    """Runs a `Runner` on the running asyncio loop, as a trio guest (no extra thread).

    ::

        host = AsyncioHost(runner, on_ended=lambda ended: print(ended))
        await host.start()     # returns once the runner is under way
        ...                    # the loop stays free: trio's steps interleave with yours
        await host.stop()      # drains without blocking the loop; raises like Runner.stop()

    or ``async with AsyncioHost(runner) as host: ...`` (stops on exit).

    Handlers may be trio code (plain ``async def``), asyncio code (mark it with
    `runner.asyncio_handler`: it is awaited as a task on this loop), or sync functions
    (run in a worker thread). Callbacks (`on_state`, `on_batch`, `on_ended`) run on the
    loop's thread and must not block. If the runner ends on its own (the wake stream
    was closed for good, or it failed), `on_ended` is called, `ended` is set and
    `wait_ended()` returns; nothing is raised into your tasks.

    The loop must be the one that calls `start()`; use every method from that loop.
    """

    def __init__(
        self,
        runner: Runner,
        *,
        on_state: Callable[[State], object] | None = None,
        on_batch: Callable[[Batch], object] | None = None,
        on_ended: Callable[[Ended], object] | None = None,
    ) -> None:
        self.runner = runner
        self._hooks = _Hooks(on_state, on_batch, on_ended)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._guest: GuestRun | None = None

    # -- control ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the runner on this loop; returns once it is under way (state `connecting`).

        Raises `AlreadyRunning` if it is hosted already, `ConfigError` if it cannot start.
        If a `stop()` came first, returns with the runner stopped. During a stop's drain,
        waits for it to end, then starts a new run.
        """
        loop = asyncio.get_running_loop()
        hooks = self._hooks
        if self._guest is not None and self._guest.stop_requested and hooks.ended_future is not None:
            await asyncio.shield(hooks.ended_future)  # a stop is draining: start anew after it
        guest = self._guest_for(loop)
        started, ended = loop.create_future(), loop.create_future()
        guest.start()  # raises before anything is scheduled
        hooks.started_future, hooks.ended_future = started, ended
        await asyncio.wait({started, ended}, return_when=asyncio.FIRST_COMPLETED)
        if not started.done() and (error := ended.result().error) is not None:
            raise error

    async def stop(self) -> None:
        """Drain and stop; returns when the runner is `stopped`. The loop runs on meanwhile.

        Raises the run's `PullwakeError` if it had one (`StopError` for a drain in trouble,
        `WakeStreamClosed` if it had ended on its own). Not running: returns at once.
        """
        ended = self._hooks.ended_future
        if ended is None:
            return
        if self._guest is not None:
            self._guest.stop()
        # shield: a caller cancelled while waiting does not cancel the drain itself.
        result = await asyncio.shield(ended)
        if result.error is not None:
            raise result.error

    def interrupt(self) -> None:
        """Cut a running drain short: in-flight claims are cancelled now (finalizers still run)."""
        if self._guest is not None:
            self._guest.interrupt()

    def abort(self, subscription_id: str, *, cooldown: float | None = None) -> bool:
        """Abort one subscription's in-flight claim (acked progress is kept); True if there was one."""
        return self._guest is not None and self._guest.abort(subscription_id, cooldown=cooldown)

    def health(self) -> Health:
        """The runner's `Health`, right now; never waits."""
        return self.runner.health()

    async def reload(self, settings: Settings) -> Reloaded:
        """Apply `settings` to the running runner (`Runner.reload`) and return what changed.

        Raises `ConfigError` having changed nothing if the new handlers cannot be had,
        `RunnerError` if the runner is not running. The loop runs on meanwhile.
        """
        applied: asyncio.Future[Reloaded] = asyncio.get_running_loop().create_future()

        def done(result: outcome.Outcome[Reloaded]) -> None:
            if applied.done():
                return  # the caller was cancelled: nobody waits for this answer
            if isinstance(result, outcome.Error):
                applied.set_exception(result.error)
            else:
                applied.set_result(result.unwrap())

        if self._guest is None:
            raise RunnerError("the runner is not running: there is nothing to reload")
        self._guest.reload(settings, done)
        return await applied

    # -- observation -----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """A run is in progress (starting, running or stopping)."""
        return self._guest is not None and self._guest.running

    @property
    def ended(self) -> Ended | None:
        """How the last run ended; None while one is in progress or before the first."""
        ended = self._hooks.ended_future
        return ended.result() if ended is not None and ended.done() else None

    async def wait_ended(self) -> Ended:
        """Wait until the current (or last) run is over, however it ended."""
        ended = self._hooks.ended_future
        if ended is None:
            raise RunnerError("the runner was never started by this host")
        return await asyncio.shield(ended)

    async def __aenter__(self) -> AsyncioHost:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.stop()

    # -- plumbing --------------------------------------------------------------------------

    def _guest_for(self, loop: asyncio.AbstractEventLoop) -> GuestRun:
        if self._guest is not None and self._loop is loop:
            return self._guest
        if self._guest is not None and self._guest.running:
            raise RunnerError("the runner is hosted on another asyncio loop")

        def threadsafe(function: Callable[[], object]) -> None:
            try:
                loop.call_soon_threadsafe(function)
            except RuntimeError:  # the loop was closed under a run: nothing is left to step it
                log.warning("asyncio_host.loop_closed", runner_id=self.runner.settings.runner_id)

        self._loop = loop
        self._guest = GuestRun(
            self.runner,
            self._hooks,
            run_sync_soon_threadsafe=threadsafe,
            run_sync_soon_not_threadsafe=loop.call_soon,
            host_uses_signal_set_wakeup_fd=True,
        )
        return self._guest


class _Hooks(GuestHooks):
    """What the host hears from its runs: the callbacks it was given, and the futures of the current run."""

    def __init__(
        self,
        on_state: Callable[[State], object] | None,
        on_batch: Callable[[Batch], object] | None,
        on_ended: Callable[[Ended], object] | None,
    ) -> None:
        self.on_state = on_state
        self.on_batch = on_batch
        self.on_ended = on_ended
        self.started_future: asyncio.Future[None] | None = None
        self.ended_future: asyncio.Future[Ended] | None = None

    def started(self) -> None:
        if self.started_future is not None and not self.started_future.done():
            self.started_future.set_result(None)

    def state_changed(self, state: State) -> None:
        if self.on_state is not None:
            self.on_state(state)

    def batch_handled(self, batch: Batch) -> None:
        if self.on_batch is not None:
            self.on_batch(batch)

    def ended(self, ended: Ended) -> None:
        if self.ended_future is not None and not self.ended_future.done():
            self.ended_future.set_result(ended)
        if self.on_ended is not None:
            self.on_ended(ended)
