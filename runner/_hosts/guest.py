"""The shared core of the hosts: one run of a `Runner`, told apart from the host's code.

`GuestRun` runs a runner as a trio *guest* on another event loop (asyncio, Qt):
`trio.lowlevel.start_guest_run` interleaves trio's scheduler with the host loop on
the host's own thread, so there is no second thread to lock against and no copy of
state to keep: `health()` and `abort()` are plain calls, the runner's callbacks
arrive on the host's thread. While a trio step runs the host loop waits, and the
other way round; the runner's steps are short (parsing one response, one
transition), so the host stays responsive. A sync handler runs in a worker thread;
only blocking code inside an *async* handler would hold the host loop.

Everything a host needs to report comes through `GuestHooks`: the runner is under
way, it entered a state, a handler finished or failed a batch, the run ended (and
how: `Ended`). Errors reach the host as `PullwakeError`s only (`as_pullwake_error`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import outcome
import structlog
import trio

from machine import State

from .._handlers.bridge import observing
from .._health import Health
from ..errors import AlreadyRunning, PullwakeError, RunnerError, StopError

if TYPE_CHECKING:
    from .._config import Settings
    from .._handlers.batch import Batch
    from .._runner import Runner
    from .._wake.reload import Reloaded

log = structlog.get_logger("pullwake.hosts")


@dataclass(frozen=True)
class Ended:
    """How one hosted run of a runner ended."""

    requested: bool
    """True if the host was asked to stop; False if the runner ended on its own
    (the wake stream was closed for good, or it failed)."""
    error: PullwakeError | None
    """None for a clean end; else what went wrong: `StopError` (the drain had trouble),
    `WakeStreamClosed`, `ConfigError` (it could not start), or a `RunnerError`."""

    @property
    def clean(self) -> bool:
        """A requested stop without errors."""
        return self.requested and self.error is None


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


def as_pullwake_error(error: BaseException) -> PullwakeError:
    """The one `PullwakeError` that stands for `error` (trio wraps errors in ExceptionGroups).

    A single `PullwakeError` inside groups is returned as it is; anything else becomes a
    `RunnerError` whose `__cause__` is the original.
    """
    leaves = [leaf for leaf in _leaves(error) if not isinstance(leaf, trio.Cancelled)]
    if len(leaves) == 1 and isinstance(leaves[0], PullwakeError):
        return leaves[0]
    if isinstance(error, PullwakeError):
        return error
    summary = "; ".join(f"{type(leaf).__name__}: {leaf}" for leaf in leaves[:3]) or "cancelled"
    wrapped = RunnerError(f"the runner failed: {summary}")
    wrapped.__cause__ = error
    return wrapped


def send(token: trio.lowlevel.TrioToken | None, function: Callable[..., object], *args: object) -> bool:
    """Run `function(*args)` at the trio run's next step, from any thread; False if it is over."""
    if token is None:
        return False
    try:
        token.run_sync_soon(function, *args)
    except trio.RunFinishedError:
        return False
    return True


def keyboard_interrupted(error: BaseException | None) -> bool:
    """Did a KeyboardInterrupt end the run (trio delivers Ctrl-C to a guest on the main thread)?"""
    cause = error.__cause__ if error is not None else None
    return cause is not None and any(isinstance(leaf, KeyboardInterrupt) for leaf in _leaves(cause))


class GuestHooks:
    """What a host hears from a run; every method is called on the host loop's thread.

    Override what you need; the defaults do nothing. They must not block.
    """

    def started(self) -> None:
        """The runner is under way (state `connecting`)."""

    def state_changed(self, state: State) -> None:
        """The runner entered `state`."""

    def batch_started(self, batch: Batch) -> None:
        """A handler was called with `batch`."""

    def batch_handled(self, batch: Batch) -> None:
        """A handler finished `batch` successfully (it will be acknowledged)."""

    def batch_failed(self, batch: Batch, error: BaseException) -> None:
        """A handler raised on `batch` (it may be retried)."""

    def ended(self, ended: Ended) -> None:
        """The run is over; the runner is `stopped` and may be started again."""


class Phase(enum.Enum):
    """Where a `GuestRun` is."""

    IDLE = "idle"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"


class GuestRun:
    """Runs `runner` as a trio guest on a host loop, one guest run per start.

    `start()` and `stop()` never block: they schedule work on the host loop and return.
    A `stop()` during a start stops the runner as soon as it is under way. Call every
    method from the host loop's thread.
    """

    def __init__(
        self,
        runner: Runner,
        hooks: GuestHooks,
        *,
        run_sync_soon_threadsafe: Callable[[Callable[[], object]], object],
        run_sync_soon_not_threadsafe: Callable[[Callable[[], object]], object] | None = None,
        host_uses_signal_set_wakeup_fd: bool = False,
    ) -> None:
        self.runner = runner
        self._hooks = hooks
        self._threadsafe = run_sync_soon_threadsafe
        self._not_threadsafe = run_sync_soon_not_threadsafe
        self._wakeup_fd = host_uses_signal_set_wakeup_fd
        self.phase = Phase.IDLE
        self.last_ended: Ended | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop_event: trio.Event | None = None
        self._stop_requested = False
        self._stop_error: PullwakeError | None = None

    @property
    def running(self) -> bool:
        """A guest run exists (starting, running or stopping)."""
        return self.phase is not Phase.IDLE

    @property
    def stop_requested(self) -> bool:
        """The current run was asked to stop."""
        return self.running and self._stop_requested

    def start(self) -> None:
        """Begin a run; `hooks.started()` follows once the runner is under way."""
        if self.phase is not Phase.IDLE:
            raise AlreadyRunning(f"{self.runner!r} is already hosted ({self.phase.value})")
        self.runner.check()
        self.phase = Phase.STARTING
        self._stop_requested = False
        self._stop_error = None
        self._token, self._stop_event = None, None
        trio.lowlevel.start_guest_run(
            self._main,
            run_sync_soon_threadsafe=self._threadsafe,
            run_sync_soon_not_threadsafe=self._not_threadsafe,
            done_callback=self._done,
            host_uses_signal_set_wakeup_fd=self._wakeup_fd,
            # Ctrl-C (where trio handles it: main thread, default SIGINT handler) goes to the
            # run's main task at a checkpoint, never into the host's code or a finalizer.
            restrict_keyboard_interrupt_to_checkpoints=True,
        )

    def stop(self) -> None:
        """Ask the runner to drain and stop; `hooks.ended()` follows. Idle: does nothing."""
        if self.phase is Phase.IDLE or self._stop_requested:
            return
        self._stop_requested = True
        if self.phase is Phase.RUNNING:
            self.phase = Phase.STOPPING
        self._signal_stop()

    def interrupt(self) -> None:
        """Cut a running drain short (in-flight claims are cancelled; finalizers still run)."""
        self._call_in_trio(self.runner.interrupt)

    def abort(self, subscription_id: str, *, cooldown: float | None = None) -> bool:
        """Abort the subscription's in-flight claim; True if one was in flight.

        The answer is read now (the host's thread owns the runner between trio steps);
        the abort itself happens at the runner's next step.
        """
        if self.phase is Phase.IDLE:
            return False
        in_flight = any(claim.subscription == subscription_id for claim in self.runner.health().in_flight)
        if in_flight:
            self._call_in_trio(partial(self.runner.abort, subscription_id, cooldown=cooldown))
        return in_flight

    def health(self) -> Health:
        """The runner's health, read directly: trio is not running while host code runs."""
        return self.runner.health()

    def reload(self, settings: Settings, done: Callable[[outcome.Outcome[Reloaded]], object]) -> None:
        """Apply `settings` to the running runner (`Runner.reload`); `done(outcome)` follows on the host's thread.

        Not running: `done` gets a `RunnerError` at once.
        """
        if self.phase is Phase.IDLE or not self._call_in_trio(partial(reload_in_trio, self.runner, settings, done)):
            done(outcome.Error(RunnerError("the runner is not running: there is nothing to reload")))

    # -- inside the guest run ---------------------------------------------------------------

    def _call_in_trio(self, function: Callable[..., object], *args: object) -> bool:
        return send(self._token, function, *args)

    def _signal_stop(self) -> None:
        event = self._stop_event
        if event is not None:
            self._call_in_trio(event.set)

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop_event = stop_event = trio.Event()
        if self._stop_requested:
            return  # stopped before it started: nothing to undo
        self._stop_error = await hosted_run(self.runner, self._hooks, stop_event, under_way=self._under_way)

    def _under_way(self) -> None:
        self.phase = Phase.STOPPING if self._stop_requested else Phase.RUNNING

    def _done(self, result: outcome.Outcome[None]) -> None:
        error: PullwakeError | None = self._stop_error
        if isinstance(result, outcome.Error):
            error = as_pullwake_error(result.error)
            if not isinstance(result.error, Exception) or keyboard_interrupted(error):
                log.warning("guest_run.interrupted", error=repr(result.error))
        ended = Ended(requested=self._stop_requested, error=error)
        self.phase = Phase.IDLE
        self._token, self._stop_event = None, None
        self.last_ended = ended
        if error is not None:
            log.warning("hosted_run.ended", requested=ended.requested, error=f"{type(error).__name__}: {error}")
        _call_hook(self._hooks.ended, ended)


async def hosted_run(
    runner: Runner, hooks: GuestHooks, stop: trio.Event, *, under_way: Callable[[], object] = lambda: None
) -> StopError | None:
    """One run of `runner` for a host; every host runs its runner through this.

    Starts the runner, calls `under_way()` and then `hooks.started()` once it is under way,
    reports states and batches to `hooks`, and stops the runner when `stop` is set. A runner
    that ends on its own sets `stop` itself, so the same stop collects what it left behind.
    Returns what that stop raised, if anything.
    """
    stop_error: StopError | None = None

    async def stopper() -> None:
        nonlocal stop_error
        await stop.wait()
        try:
            with trio.CancelScope(shield=True):  # a drain is never cut short by the host's own shutdown
                await runner.stop()
        except StopError as error:
            stop_error = error

    runner.add_state_listener(hooks.state_changed)  # the runner logs a listener's errors
    try:
        with observing(hooks):
            async with trio.open_nursery() as nursery:
                await runner.start(nursery)
                under_way()
                _call_hook(hooks.started)
                nursery.start_soon(stopper)
                await runner.wait_stopped()
                stop.set()  # ended on its own: collect what stop() would raise
    finally:
        runner.remove_state_listener(hooks.state_changed)
    return stop_error


def reload_in_trio(runner: Runner, settings: Settings, done: Callable[[outcome.Outcome[Reloaded]], object]) -> None:
    """Start `runner.reload(settings)` from a host's callback; `done` gets its outcome, whatever it is.

    A system task: it needs no nursery of the host's, and is cancelled if the run ends
    first (`done` then gets a `RunnerError`), so it never outlives the run.
    """

    async def reload() -> None:
        try:
            reloaded = await runner.reload(settings)
        except Exception as error:  # a system task must not raise: that would end the run
            _call_hook(done, outcome.Error(as_pullwake_error(error)))
        except BaseException:
            _call_hook(done, outcome.Error(RunnerError("the run ended before the reload was applied")))
            raise
        else:
            _call_hook(done, outcome.Value(reloaded))

    trio.lowlevel.spawn_system_task(reload, name="host:reload")


def _call_hook(hook: Callable[..., object], *args: object) -> None:
    """The host's code must not break the run (or the host loop's callback)."""
    try:
        hook(*args)
    except Exception:
        log.exception("host_callback.failed", callback=repr(hook))
