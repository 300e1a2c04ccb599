"""`QtHost`: a runner on the Qt event loop (PySide6), for desktop apps.

Install with the extra: ``pip install 'pullwake-runner[qt]'``. Importing `runner`
does not import Qt; only ``import runner.qt`` does.
"""

from __future__ import annotations

from collections.abc import Callable

import outcome
from PySide6.QtCore import QCoreApplication, QEventLoop, QObject, Qt, QTimer, Signal, Slot

from machine import State

from ._config import Settings
from ._handlers.batch import Batch
from ._health import Health
from ._hosts.guest import Ended, GuestHooks, GuestRun, keyboard_interrupted
from ._runner import Runner
from ._wake.reload import Reloaded
from .errors import PullwakeError

__all__ = ["QtHost"]


class QtHost(QObject):
    """Runs a `Runner` on the Qt event loop as a trio guest: no extra thread, no freezes.

    Create it on the GUI thread, after the `QApplication`. Trio's steps interleave with
    Qt's events on the GUI thread, so handlers (trio ``async def`` code) may touch
    widgets directly; sync handlers run in a worker thread (use signals from there).
    Keep async handlers free of blocking calls: they hold the window while they run.

    Signals (all emitted on the GUI thread):
      `stateChanged(str)` on each lifecycle state entered; `started()` once under way;
      `batchHandled(Batch)` after a handler succeeded (the batch will be acknowledged;
      at least once: a redelivered batch is emitted again); `batchFailed(Batch, str)`
      when a handler raised (it may be retried); `healthChanged(Health)` on each state
      change and every `health_interval` s; `failed(PullwakeError)` when a run ends
      with an error, on its own or at a stop; `ended(Ended)` when a run is over;
      `reloaded(Reloaded)` / `reloadFailed(PullwakeError)` after a `reload(settings)`.

    Slots: `start()` and `stop()` return at once (a `stop()` during a start stops it
    once under way; a `start()` during a stop starts again after it); `abort(id)`,
    `interrupt()`, `health()`; `reload(settings)` returns at once too.

    Ctrl-C: while a run is active on the main thread and SIGINT has Python's default
    handler, trio handles Ctrl-C for the run (and restores the handler after it): the run
    is interrupted (claims' finalizers still ack progress and release), then the app quits.

    Closing: when the app quits with the runner still running, `aboutToQuit` drains it
    in a nested event loop (the window keeps painting). Better, let the window wait::

        def closeEvent(self, event):
            if self.host.running:
                event.ignore()
                self.host.ended.connect(self.close)
                self.host.stop()
    """

    stateChanged = Signal(str)
    started = Signal()
    batchHandled = Signal(object)
    batchFailed = Signal(object, str)
    healthChanged = Signal(object)
    failed = Signal(object)
    ended = Signal(object)
    reloaded = Signal(object)
    reloadFailed = Signal(object)
    _reenter = Signal(object)

    def __init__(self, runner: Runner, parent: QObject | None = None, *, health_interval: float = 1.0) -> None:
        super().__init__(parent)
        self.runner = runner
        self._reenter.connect(self._call, Qt.ConnectionType.QueuedConnection)
        self._guest = GuestRun(
            runner,
            _Hooks(self, emit_health=self._emit_health, ended=self._ended),
            run_sync_soon_threadsafe=self._reenter.emit,
            run_sync_soon_not_threadsafe=self._reenter.emit,
        )
        self._restart = False
        self._health_timer = QTimer(self)
        self._health_timer.setInterval(max(1, round(health_interval * 1000)))
        self._health_timer.timeout.connect(self._emit_health)
        app = QCoreApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self._drain_before_quit)

    @property
    def running(self) -> bool:
        """A run is in progress (starting, running or stopping)."""
        return self._guest.running

    @property
    def last_ended(self) -> Ended | None:
        """How the last run ended (None before the first ended)."""
        return self._guest.last_ended

    @Slot(result=bool)
    def start(self) -> bool:
        """Start the runner; returns at once (True if a run was started or queued).

        A configuration error is emitted as `failed` (and `ended`), never raised.
        """
        if self._guest.running:
            if self._guest.stop_requested:
                self._restart = True
                return True
            return False
        try:
            self._guest.start()
        except PullwakeError as error:
            ended = Ended(requested=False, error=error)
            self.failed.emit(error)
            self.ended.emit(ended)
            return False
        self._health_timer.start()
        return True

    @Slot()
    def stop(self) -> None:
        """Drain and stop; returns at once. `ended` follows (and `failed` if it went wrong)."""
        self._restart = False
        self._guest.stop()

    @Slot()
    def interrupt(self) -> None:
        """Cut a running drain short (in-flight claims are cancelled; finalizers still run)."""
        self._guest.interrupt()

    @Slot(str, result=bool)
    def abort(self, subscription_id: str) -> bool:
        """Abort one subscription's in-flight claim (acked progress is kept); True if there was one."""
        return self._guest.abort(subscription_id)

    def health(self) -> Health:
        """The runner's `Health`, right now; never waits."""
        return self._guest.health()

    def reload(self, settings: Settings) -> None:
        """Apply `settings` to the running runner (`Runner.reload`); returns at once.

        `reloaded(Reloaded)` follows with what changed, or `reloadFailed(PullwakeError)`
        (`ConfigError`: nothing changed; `RunnerError`: not running).
        """
        self._guest.reload(settings, self._reload_done)

    def wait_drained(self, timeout: float | None = None) -> bool:
        """Run a nested event loop until the current run has ended (the window keeps painting).

        For the end of an app; True if it ended within `timeout` (default: the runner's
        own stop deadline). Does not stop the runner: call `stop()` first.
        """
        if not self._guest.running:
            return True
        settings = self.runner.settings
        if timeout is None:
            timeout = settings.drain_timeout + settings.finalizer_timeout + settings.command_kill_grace + 5
        loop = QEventLoop()
        deadline = QTimer()
        deadline.setSingleShot(True)
        deadline.timeout.connect(loop.quit)
        deadline.start(round(timeout * 1000))
        self.ended.connect(loop.quit)
        try:
            if self._guest.running:
                loop.exec()
        finally:
            self.ended.disconnect(loop.quit)
            deadline.stop()
        return not self._guest.running

    # -- plumbing --------------------------------------------------------------------------

    @Slot(object)
    def _call(self, function: Callable[[], object]) -> None:
        function()

    def _reload_done(self, result: outcome.Outcome[Reloaded]) -> None:
        if isinstance(result, outcome.Error):
            self.reloadFailed.emit(result.error)
        else:
            self.reloaded.emit(result.unwrap())

    def _emit_health(self) -> None:
        self.healthChanged.emit(self._guest.health())

    def _drain_before_quit(self) -> None:
        if self._guest.running:
            self.stop()
            self.wait_drained()

    def _ended(self, ended: Ended) -> None:
        self._health_timer.stop()
        self._emit_health()
        if ended.error is not None:
            self.failed.emit(ended.error)
        self.ended.emit(ended)
        if keyboard_interrupted(ended.error):
            QCoreApplication.quit()  # Ctrl-C reached the runner (trio's guest on the main thread)
        elif self._restart:
            self._restart = False
            self.start()


class _Hooks(GuestHooks):
    """Turns what the host hears from a run into the host's signals."""

    def __init__(self, host: QtHost, *, emit_health: Callable[[], None], ended: Callable[[Ended], None]) -> None:
        self.host = host
        self.emit_health = emit_health
        self.on_ended = ended

    def started(self) -> None:
        self.host.started.emit()

    def state_changed(self, state: State) -> None:
        self.host.stateChanged.emit(state.value)
        self.emit_health()

    def batch_handled(self, batch: Batch) -> None:
        self.host.batchHandled.emit(batch)

    def batch_failed(self, batch: Batch, error: BaseException) -> None:
        self.host.batchFailed.emit(batch, f"{type(error).__name__}: {error}")

    def ended(self, ended: Ended) -> None:
        self.on_ended(ended)
