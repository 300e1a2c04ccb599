"""Hosting a `Runner` in programs that are not written with trio."""

from __future__ import annotations

import contextlib
import threading

import trio

from ._exceptions import AlreadyRunning, RunnerError
from ._health import Health
from ._runner import Runner


class BackgroundRunner:
    """Runs a `Runner` on a thread of its own, with its own trio event loop.

    For desktop apps (Qt, Tk), asyncio programs, or plain threaded code::

        background = BackgroundRunner(runner)
        background.start()          # returns once the runner is under way
        ...                         # your program; handlers run on the runner's thread
        background.stop()           # drains, then returns; raises StopError like Runner.stop()

    `start()` and `stop()` may be repeated. Handlers run on the runner's thread: hand
    results to a GUI through the toolkit's thread-safe queue or signal mechanism.
    """

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = 30.0) -> None:
        if self.running:
            raise AlreadyRunning(f"{self.runner!r} is already running in the background")
        self._ready.clear()
        self._failure = None
        self._thread = threading.Thread(
            target=self._main, name=f"pullwake-{self.runner.settings.runner_id}", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RunnerError(f"the runner did not start within {timeout:g} s")
        if self._failure is not None:
            raise self._failure

    def stop(self, timeout: float | None = None) -> None:
        """Drain and stop; blocks until the runner's thread has finished."""
        thread, token = self._thread, self._token
        if thread is None:
            return
        try:
            if token is not None and thread.is_alive():
                with contextlib.suppress(trio.RunFinishedError):  # it stopped by itself meanwhile
                    trio.from_thread.run(self.runner.stop, trio_token=token)
        finally:
            thread.join(timeout)
            if not thread.is_alive():
                self._thread, self._token = None, None
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure

    def health(self) -> Health:
        if self._token is None or not self.running:
            return self.runner.health()
        return trio.from_thread.run_sync(self.runner.health, trio_token=self._token)

    def abort(self, subscription_id: str) -> bool:
        if self._token is None or not self.running:
            return False
        return trio.from_thread.run_sync(self.runner.abort, subscription_id, trio_token=self._token)

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as failure:  # reported to whoever calls start() or stop()
            self._failure = failure
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            await self.runner.start(nursery)
            self._ready.set()
