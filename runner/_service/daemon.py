"""`pullwake run`: a `Runner` as a service.

Around the runner's own work, the daemon serves the control socket and the
metrics listener (the only users of the HTTP server stack), speaks sd_notify
and keeps the systemd watchdog fed while the runner makes progress, and turns
SIGTERM/SIGINT into a drain (a second signal skips the wait, never the finalizers).
SIGHUP (a closed terminal, `systemctl kill -s HUP`, a reload habit) is logged and
otherwise ignored: its default action would kill the daemon with no drain.
"""

from __future__ import annotations

import os
import signal
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
import trio

from machine import State

from .._config import Settings
from .._runner import Runner
from ..errors import StopError, WakeStreamClosed
from .systemd import Notifier, keep_watchdog, watchdog_interval

if TYPE_CHECKING:
    from .control import Controlled

EX_OK = 0
EX_FAILURE = 1

log = structlog.get_logger("pullwake.cli")


async def serve_surfaces(
    runner: Controlled, settings: Settings, *, task_status: trio.TaskStatus[str | None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve the control socket and the metrics listener that `settings` ask for, until cancelled.

    Reports where the metrics listener ended up (useful with port 0), or None.
    """
    if settings.control_socket is None and settings.metrics_listen is None:
        task_status.started(None)
        return
    # The HTTP server stack (hypercorn, starlette, anyio: ~3.6 MiB) loads only for a surface.
    from .control import serve_control, serve_metrics

    async with trio.open_nursery() as nursery:
        if settings.control_socket is not None:
            await nursery.start(
                partial(serve_control, runner, Path(settings.control_socket), stuck_after=settings.stuck_after)
            )
        metrics_url: str | None = None
        if settings.metrics_listen is not None:
            metrics_url = await nursery.start(
                partial(serve_metrics, runner, settings.metrics_listen, stuck_after=settings.stuck_after)
            )
        task_status.started(metrics_url)


async def serve(runner: Runner) -> int:
    """Run `runner` as the service until it stops; returns the process exit status."""
    with structlog.contextvars.bound_contextvars(runner_id=runner.settings.runner_id):
        return await _serve_bound(runner)


async def _serve_bound(runner: Runner) -> int:
    notifier = Notifier.from_environment(redact=runner.redactor.redact)
    problems: list[BaseException] = []
    fatal = False
    try:
        async with trio.open_nursery() as surfaces:
            # Bound before the runner starts: a socket or port that cannot be had (ConfigError) ends
            # the start here, before this runner claims any work.
            await surfaces.start(serve_surfaces, runner, runner.settings)
            async with trio.open_nursery() as nursery:
                await runner.start(nursery)
                async with trio.open_nursery() as helpers:
                    helpers.start_soon(_watch_signals, runner, nursery, problems, notifier)
                    # READY=1 once it follows its wake stream, or once its first attempt failed (STATUS
                    # says why): `systemctl start` then returns to a runner that is really at work.
                    await runner.wait_until(State.STREAMING, State.RECONNECTING, State.STOPPING, State.STOPPED)
                    notifier.send("READY=1", f"STATUS={_status_line(runner, runner.state)}", f"MAINPID={os.getpid()}")
                    runner.add_state_listener(partial(_notify_state, notifier, runner))
                    if (interval := watchdog_interval()) is not None:
                        helpers.start_soon(keep_watchdog, notifier, runner.progressing, interval)
                    await runner.wait_stopped()
                    helpers.cancel_scope.cancel()
            surfaces.cancel_scope.cancel()  # the control surfaces end with the runner
    except* WakeStreamClosed as group:
        log.error("runner.fatal", error=str(group.exceptions[0]))
        fatal = True
    finally:
        notifier.close()
    return EX_FAILURE if fatal or problems else EX_OK


def _status_line(runner: Runner, state: State) -> str:
    health = runner.health()
    if state is State.STREAMING:
        return f"streaming: following {runner.settings.wake_stream}, {len(health.in_flight)} claim(s) in flight"
    if state is State.STOPPING:
        return f"stopping: draining {len(health.in_flight)} claim(s)"
    if state in (State.CONNECTING, State.RECONNECTING) and health.last_error:
        return f"{state.value}: {health.last_error}"[:200]
    return state.value


def _notify_state(notifier: Notifier, runner: Runner, state: State) -> None:
    lines = [f"STATUS={_status_line(runner, state)}"]
    if state is State.STOPPING:
        lines.insert(0, "STOPPING=1")
    notifier.send(*lines)


async def _watch_signals(
    runner: Runner, nursery: trio.Nursery, problems: list[BaseException], notifier: Notifier
) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        stopping = False
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                log.info("signal.ignored", signal=name, detail="SIGHUP does not stop the runner (no reload yet)")
            elif not stopping:
                stopping = True
                log.info("signal.stop", signal=name, detail="draining in-flight claims")
                notifier.send("STOPPING=1")
                nursery.start_soon(_stop, runner, problems)
            else:
                log.warning("signal.again", signal=name, detail="skipping the drain wait; finalizers still run")
                runner.interrupt()


async def _stop(runner: Runner, problems: list[BaseException]) -> None:
    try:
        await runner.stop()
    except StopError as error:
        problems.extend(error.errors)
        for problem in error.errors:
            log.error("stop.problem", error=str(problem))
