"""`pullwake run`: a `Runner` as a service.

Around the runner's own work, the daemon serves the control socket and the
metrics listener (the only users of the HTTP server stack), speaks sd_notify
and keeps the systemd watchdog fed while the runner makes progress, and turns
SIGTERM/SIGINT into a drain (a second signal skips the wait, never the finalizers).
SIGHUP (`systemctl reload`) and `pullwake reload` re-read the configuration and apply
its subscriptions (`Runner.reload`), between RELOADING=1 and READY=1.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
import trio

from machine import State

from .._config import Settings
from .._runner import Runner
from .._wake.reload import Reloaded
from ..errors import ConfigError, RunnerError, StopError, WakeStreamClosed
from .systemd import Notifier, keep_watchdog, watchdog_interval

if TYPE_CHECKING:
    from .control import Controlled

EX_OK = 0
EX_FAILURE = 1

log = structlog.get_logger("pullwake.cli")

Reload = Callable[[], Awaitable[Reloaded]]
"""Re-read the configuration and apply it: what SIGHUP and `pullwake reload` do."""


async def serve_surfaces(
    runner: Controlled,
    settings: Settings,
    reload: Reload | None = None,
    *,
    task_status: trio.TaskStatus[str | None] = trio.TASK_STATUS_IGNORED,
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
                partial(
                    serve_control,
                    runner,
                    Path(settings.control_socket),
                    stuck_after=settings.stuck_after,
                    reload=reload,
                )
            )
        metrics_url: str | None = None
        if settings.metrics_listen is not None:
            metrics_url = await nursery.start(
                partial(serve_metrics, runner, settings.metrics_listen, stuck_after=settings.stuck_after)
            )
        task_status.started(metrics_url)


async def serve(runner: Runner, reread: Callable[[], Settings] | None = None) -> int:
    """Run `runner` as the service until it stops; returns the process exit status.

    `reread` loads the configuration again (raising `ConfigError`), for SIGHUP and `pullwake reload`.
    """
    with structlog.contextvars.bound_contextvars(runner_id=runner.settings.runner_id):
        return await _serve_bound(runner, reread)


async def _serve_bound(runner: Runner, reread: Callable[[], Settings] | None) -> int:
    notifier = Notifier.from_environment(redact=runner.redactor.redact)
    ready = trio.Event()
    reload = partial(_reload, runner, reread, notifier, ready) if reread is not None else None
    problems: list[BaseException] = []
    fatal = False
    try:
        async with trio.open_nursery() as surfaces:
            # Bound before the runner starts: a socket or port that cannot be had (ConfigError) ends
            # the start here, before this runner claims any work.
            await surfaces.start(serve_surfaces, runner, runner.settings, reload)
            async with trio.open_nursery() as nursery:
                await runner.start(nursery)
                async with trio.open_nursery() as helpers:
                    helpers.start_soon(_watch_signals, runner, nursery, problems, notifier, reload)
                    # READY=1 once it follows its wake stream, or once its first attempt failed (STATUS
                    # says why): `systemctl start` then returns to a runner that is really at work.
                    await runner.wait_until(State.STREAMING, State.RECONNECTING, State.STOPPING, State.STOPPED)
                    notifier.send("READY=1", f"STATUS={_status_line(runner, runner.state)}", f"MAINPID={os.getpid()}")
                    ready.set()
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


async def _reload(runner: Runner, reread: Callable[[], Settings], notifier: Notifier, ready: trio.Event) -> Reloaded:
    """Re-read the configuration and apply it; a `ConfigError` or `RunnerError` says why nothing changed.

    systemd hears RELOADING=1 before and READY=1 after, once the daemon has said READY=1 at all:
    `systemctl reload` then returns when the reload is done.
    """
    if ready.is_set():
        notifier.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}", "STATUS=reloading")
    try:
        return await runner.reload(reread())
    except (ConfigError, RunnerError) as error:
        log.error("reload.failed", error=str(error), detail="nothing changed: the configuration in force stays")
        raise
    finally:
        if ready.is_set():
            notifier.send("READY=1", f"STATUS={_status_line(runner, runner.state)}")


async def _reload_on_signal(reload: Reload) -> None:
    with suppress(ConfigError, RunnerError):  # logged by the reload: the configuration in force stays
        await reload()


async def _watch_signals(
    runner: Runner, nursery: trio.Nursery, problems: list[BaseException], notifier: Notifier, reload: Reload | None
) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        stopping = False
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                if reload is None or stopping:
                    log.info("signal.ignored", signal=name, detail="no configuration to re-read now")
                else:
                    log.info("signal.reload", signal=name, detail="re-reading the configuration")
                    nursery.start_soon(_reload_on_signal, reload)
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
