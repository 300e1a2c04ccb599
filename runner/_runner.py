"""The `Runner`: wires the lifecycle driver to the real activities and runs them.

Nursery layout of one run (outermost first):

    lifetime   heartbeat, checkpoint writer, sweep, control-stream reader
      work     claim workers (never cancelled by a wake-stream reconnect)
        driving   the driver, and inside it one nursery per lifecycle state

The machine decides *when* (machine.TABLE); this module only says *what*.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import structlog
import trio
import trio.lowlevel
from prometheus_client import CollectorRegistry

from machine import Effect, Event, State, Step

from ._backoff import Backoff, BackoffActivity
from ._checkpoint import Checkpoint, WakePosition, keep_checkpoint
from ._claims import Claims
from ._client import StreamsClient, build_http
from ._config import Settings
from ._control import serve_control, serve_metrics
from ._driver import Driver, Envelope, StateContext
from ._exceptions import AlreadyRunning, ConfigError, RunnerError, StopError, WakeStreamClosed
from ._handlers import AsyncHandler, CommandHandler, Handler, as_async, resolve
from ._health import Health, Vitals
from ._liveness import Liveness
from ._remote import follow_control_stream
from ._subscriptions import SubscriptionKeeper
from ._wake import Wake, WakeFollower

log = structlog.get_logger("pullwake.runner")

# A transition that takes longer than this means the driver is wedged: cancelled
# activities finish their (bounded) cleanup within a couple of seconds.
WEDGED_AFTER = 10.0


@dataclass
class _Active:
    """What exists only while a run is in progress."""

    driver: Driver
    claims: Claims
    liveness: Liveness


class Runner:
    """Follows a wake stream, claims subscriptions, feeds batches to handlers, acks progress.

    Embedding in a trio program::

        runner = Runner(settings)

        @runner.handler("jobs")
        async def process(batch: Batch) -> None: ...

        async with trio.open_nursery() as nursery:
            await runner.start(nursery)   # returns once the runner is under way
            ...
            await runner.stop()           # drains, then returns in `stopped`

    `start → stop → start` works on the same object; each run starts from fresh
    counters and a fresh HTTP client.
    """

    def __init__(self, settings: Settings | None = None, *, handlers: Mapping[str, Handler] | None = None) -> None:
        self.settings = settings if settings is not None else Settings()
        self._handlers: dict[str, Handler] = dict(handlers or {})
        self._vitals = Vitals(self.settings.runner_id)
        self._active: _Active | None = None
        self._position: WakePosition | None = None
        """The wake offset of the current (or last) run."""
        self._stop_errors: list[BaseException] = []
        self._fatal: BaseException | None = None
        self._run_done = trio.Event()
        self._run_done.set()
        self._listeners: list[Callable[[State], None]] = []
        self.metrics_url: str | None = None
        """Where `metrics_listen` ended up (useful with port 0), while running."""

    def __repr__(self) -> str:
        return f"<Runner {self.settings.runner_id!r} {self.state.value}>"

    # -- handlers --------------------------------------------------------------------------

    def handler(self, subscription_id: str) -> Callable[[Handler], Handler]:
        """Register the handler of one subscription (decorator)."""

        def register(function: Handler) -> Handler:
            self.add_handler(subscription_id, function)
            return function

        return register

    def add_handler(self, subscription_id: str, handler: Handler) -> None:
        if subscription_id in self._handlers:
            raise ConfigError(f"subscription {subscription_id!r} already has a handler")
        self._handlers[subscription_id] = handler

    def check(self) -> None:
        """Raise `ConfigError` for what can be found wrong without the server.

        Every subscription has a handler that imports, and the service token is readable.
        """
        self._resolved_handlers()
        self.settings.service_token()

    def _resolved_handlers(self) -> dict[str, AsyncHandler]:
        resolved: dict[str, AsyncHandler] = {}
        for spec in self.settings.subscriptions:
            configured: Handler | None = None
            if spec.command:
                configured = CommandHandler(spec.command, kill_grace=self.settings.command_kill_grace)
            elif spec.handler:
                configured = resolve(spec.handler)
            if configured is not None and spec.id in self._handlers:
                raise ConfigError(f"subscription {spec.id!r} has a handler in the configuration and one in code")
            chosen = configured or self._handlers.get(spec.id)
            if chosen is None:
                raise ConfigError(
                    f"subscription {spec.id!r} has no handler: set 'handler' or 'command' in the configuration, "
                    f"or register one with @runner.handler({spec.id!r})"
                )
            resolved[spec.id] = as_async(chosen)
        for subscription_id, handler in self._handlers.items():
            resolved.setdefault(subscription_id, as_async(handler))
        if not resolved:
            raise ConfigError("no subscriptions to serve: configure [[subscriptions]] or register a handler")
        return resolved

    # -- observation -----------------------------------------------------------------------

    def add_state_listener(self, listener: Callable[[State], None]) -> None:
        """Call `listener(state)` on every entry into a lifecycle state (from the runner's task).

        Keep it quick and non-blocking: it runs between two transitions.
        """
        self._listeners.append(listener)

    def remove_state_listener(self, listener: Callable[[State], None]) -> None:
        self._listeners.remove(listener)

    def progressing(self) -> tuple[bool, str]:
        """Is the runner making progress? False when wedged: what a watchdog should act on.

        Wedged means: the lifecycle driver is stuck inside one transition, the liveness
        heartbeat stopped beating, or a stop has overrun its deadline. Waiting for a
        server that is down is not wedged: the runner is doing its job, retrying.
        """
        active = self._active
        if active is None:
            return False, "the runner is not running"
        settings = self.settings
        if (busy := active.driver.busy_for()) > WEDGED_AFTER:
            return False, f"the lifecycle driver is stuck in one transition for {busy:.0f} s"
        beat_limit = 3 * settings.heartbeat_interval + settings.heartbeat_timeout
        if (silent := active.liveness.silent_for()) > beat_limit:
            return False, f"the liveness heartbeat has not completed a beat for {silent:.0f} s"
        health = self.health()
        if health.state == State.STOPPING.value and health.state_since is not None:
            deadline = settings.drain_timeout + settings.command_kill_grace + settings.finalizer_timeout + 5
            if (stopping := time.time() - health.state_since) > deadline:
                return False, f"stopping for {stopping:.0f} s, past its {deadline:.0f} s deadline"
        return True, f"{health.state}"

    @property
    def state(self) -> State:
        return self._active.driver.state if self._active is not None else State.STOPPED

    @property
    def running(self) -> bool:
        return self._active is not None

    def health(self) -> Health:
        in_flight = self._active.claims.in_flight() if self._active else []
        return self._vitals.snapshot(in_flight, self._position.offset if self._position else None)

    def metrics_exposition(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of this runner's own registry, and its content type."""
        return self._vitals.metrics.exposition()

    @property
    def metrics_registry(self) -> CollectorRegistry:
        """This runner's Prometheus registry, to mount in an app's own /metrics if wanted."""
        return self._vitals.metrics.registry

    # -- control ---------------------------------------------------------------------------

    async def start(self, nursery: trio.Nursery) -> None:
        """Run in `nursery`; returns once the runner is under way (state `connecting`)."""
        await nursery.start(self.run)

    async def stop(self) -> None:
        """Drain and stop; safe from any state and from many tasks at once.

        Every caller waits for the same stop sequence. Raises `StopError` if the
        drain ran into trouble (the runner is `stopped` all the same).
        """
        if self._active is not None:
            await self._active.driver.stop()
        await self._run_done.wait()
        if self._stop_errors:
            raise StopError(f"the runner stopped with {len(self._stop_errors)} problem(s)", list(self._stop_errors))

    def interrupt(self) -> None:
        """Cut a running drain short: in-flight claims are cancelled now (finalizers still run)."""
        if self._active is not None:
            self._active.claims.interrupt_all()

    async def wait_stopped(self) -> None:
        await self._run_done.wait()

    async def wait_until(self, *states: State) -> None:
        """Wait until the lifecycle is in one of `states` (e.g. STREAMING: following the wake stream)."""
        if self._active is None:
            if State.STOPPED in states:
                return
            raise RunnerError("the runner is not running: start it first")
        await self._active.driver.wait_until(*states)

    def abort(self, subscription_id: str) -> bool:
        """Abort the in-flight claim of one subscription; the runner keeps serving the others."""
        return self._active is not None and self._active.claims.abort(subscription_id)

    # -- the run ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until stopped. Raises `WakeStreamClosed` if the wake stream reached its end."""
        if self._active is not None or not self._run_done.is_set():
            raise AlreadyRunning(f"runner {self.settings.runner_id!r} is already running")
        handlers = self._resolved_handlers()
        settings = self.settings
        self._run_done = trio.Event()
        self._stop_errors, self._fatal = [], None
        self._vitals.started()
        try:
            with structlog.contextvars.bound_contextvars(runner_id=settings.runner_id):
                await self._run(settings, handlers, task_status)
        finally:
            self._active = None
            self.metrics_url = None
            self._vitals.entered(State.STOPPED)
            self._run_done.set()
        if self._fatal is not None:
            raise self._fatal

    async def _run(
        self, settings: Settings, handlers: dict[str, AsyncHandler], task_status: trio.TaskStatus[None]
    ) -> None:
        http = build_http(
            settings.server_url,
            timeout=settings.request_timeout,
            verify_tls=settings.verify_tls,
            ca_file=str(settings.ca_file) if settings.ca_file else None,
            concurrency=settings.max_concurrent_claims,
        )
        client = StreamsClient(
            http, stream_root=settings.stream_root, token=settings.service_token(), timeout=settings.request_timeout
        )
        checkpoint = (
            Checkpoint(Path(settings.state_dir), server_url=settings.server_url, wake_stream=settings.wake_stream)
            if settings.state_dir is not None
            else None
        )
        position = WakePosition(checkpoint.load() if checkpoint else None)
        self._position = position
        log.info(
            "runner.starting", server=settings.server_url, wake_stream=settings.wake_stream, offset=position.offset
        )
        async with http, trio.open_nursery() as lifetime:
            async with trio.open_nursery() as work:
                keeper = SubscriptionKeeper(client, settings.subscriptions, wake_stream=settings.wake_stream)
                claims = Claims(client, settings, handlers, self._vitals, keeper, work)

                async def resync() -> None:
                    # The server may have restarted: its generations start over, and the
                    # reference server forgets subscriptions, so put ours back.
                    claims.forget()
                    await keeper.ensure_all()

                follower = WakeFollower(
                    client,
                    wake_stream=settings.wake_stream,
                    position=position,
                    vitals=self._vitals,
                    prepare=resync,
                    live_mode=settings.live_mode,
                    connect_timeout=settings.connect_timeout,
                    keepalive_timeout=settings.keepalive_timeout,
                    long_poll_timeout=settings.long_poll_timeout,
                )
                backoff = BackoffActivity(
                    Backoff(settings.backoff_initial, settings.backoff_max, jitter=settings.backoff_jitter)
                )

                async def drain(context: StateContext) -> None:
                    await claims.drain(settings.drain_timeout)
                    self._stop_errors.extend(claims.cleanup_errors)
                    await context.emit(Event.DRAINED)

                driver = Driver(
                    {"connect": follower.connect, "consume": follower.consume, "backoff": backoff, "drain": drain},
                    {
                        Effect.CLAIM: lambda envelope: claims.wake(_wake_of(envelope)),
                        Effect.RESET_BACKOFF: backoff.reset,
                        Effect.FATAL: self._record_fatal,
                    },
                    on_step=self._observe,
                )
                liveness = Liveness(
                    partial(follower.tail, timeout=settings.heartbeat_timeout),
                    driver,
                    position,
                    self._vitals,
                    interval=settings.heartbeat_interval,
                    timeout=settings.heartbeat_timeout,
                    threshold=settings.heartbeat_failure_threshold,
                )
                self._active = _Active(driver, claims, liveness)
                if settings.control_socket is not None:
                    await lifetime.start(serve_control, self, Path(settings.control_socket))
                if settings.metrics_listen is not None:
                    self.metrics_url = await lifetime.start(serve_metrics, self, settings.metrics_listen)
                if settings.control_stream_enabled:
                    await lifetime.start(
                        partial(
                            follow_control_stream,
                            client,
                            settings.control_stream_path,
                            claims.abort,
                            hold=settings.long_poll_timeout,
                            backoff=Backoff(settings.backoff_initial, settings.backoff_max),
                        ),
                        name="control-stream",
                    )
                lifetime.start_soon(liveness.run, name="heartbeat")
                lifetime.start_soon(self._sweep, driver, claims, settings.sweep_interval, name="sweep")
                if checkpoint is not None:
                    lifetime.start_soon(
                        partial(keep_checkpoint, checkpoint, position, interval=settings.checkpoint_interval),
                        name="checkpoint",
                    )
                async with trio.open_nursery() as driving:
                    await driving.start(driver.run)
                    await driver.send(Event.START)
                    task_status.started()
                # The drain has emptied the work nursery; anything left is a bug, not work.
                work.cancel_scope.cancel()
            lifetime.cancel_scope.cancel()
        log.info("runner.stopped", claims=dict(self._vitals.claims))

    async def _sweep(self, driver: Driver, claims: Claims, interval: float) -> None:
        """Claim every served subscription once when streaming starts, then every `interval`."""
        while True:
            await driver.wait_until(State.STREAMING)
            for subscription in claims.served:
                await driver.send(Event.WAKE, payload=Wake(subscription))
            await trio.sleep(interval)

    def _record_fatal(self, envelope: Envelope) -> None:
        self._fatal = envelope.error or WakeStreamClosed("the wake stream ended for good")

    def _observe(self, step: Step, envelope: Envelope, epoch: int) -> None:
        if step.event is Event.DRAINED and envelope.error is not None:
            self._stop_errors.append(envelope.error)
        if not step.entered:
            return
        self._vitals.entered(step.target)
        for listener in list(self._listeners):
            try:
                listener(step.target)
            except Exception:
                log.exception("state_listener.failed", listener=repr(listener))
        log.info(
            "lifecycle.transition",
            source=step.source.value,
            target=step.target.value,
            lifecycle_event=step.event.value,
            epoch=epoch,
            error=str(envelope.error) if envelope.error else None,
        )


def _wake_of(envelope: Envelope) -> Wake:
    assert isinstance(envelope.payload, Wake)
    return envelope.payload
