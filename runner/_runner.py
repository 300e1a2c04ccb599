"""The `Runner`: wires the lifecycle driver to the real activities and runs them (docs/design.md §4.3).

Nursery layout of one run (outermost first):

    lifetime   heartbeat, checkpoint writer, sweep, control-stream reader
      work     claim workers (never cancelled by a wake-stream reconnect)
        driving   the driver, and inside it one nursery per lifecycle state

The machine decides *when* (machine.TABLE); this module only says *what*.
Serving the control socket and the metrics listener is the daemon's business
(runner/_service/daemon.py): a program embedding a runner pays for no HTTP server.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
import trio
import trio.lowlevel
from prometheus_client import CollectorRegistry

from machine import Effect, Event, State, Step

from ._claims.claim import ClaimContext
from ._claims.delivery import DeadLetters, Delivery
from ._claims.recovery import return_held_claims
from ._config import LIVE_SETTINGS, Settings, check_state_dir, fixed_settings_changed
from ._dispatch import Dispatcher, Wake
from ._driver import Driver, Envelope, StateContext
from ._fleet.peers import Fleet
from ._handlers.batch import AsyncHandler, Handler
from ._handlers.calling import resolve, resolve_handlers
from ._health import Health, Vitals, progressing
from ._runs.journal import check_journal_outside
from ._runs.keeper import RunKeeper
from ._runs.listing import list_runs
from ._runs.workflow import Workflow, WorkflowHandler
from ._secrets import Redactor
from ._state.checkpoint import Checkpoint, WakePosition, keep_checkpoint
from ._state.journal import Journal
from ._state.lock import StateDirLock
from ._tracing import Tracing
from ._wake.control_stream import follow_control_stream
from ._wake.follower import WakeFollower
from ._wake.liveness import Liveness
from ._wake.reading import Tally
from ._wake.reconnect import BackoffActivity
from ._wake.reload import Reloaded, apply_reload
from ._wake.subscriptions import SubscriptionKeeper
from ._wire.client import StreamsClient, build_http, tls_context
from ._wire.retrying import Backoff
from .errors import AlreadyRunning, ConfigError, RunnerError, StopError, WakeStreamClosed

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

log = structlog.get_logger("pullwake.runner")


@dataclass
class _Active:
    """What exists only while a run is in progress."""

    driver: Driver
    dispatcher: Dispatcher
    liveness: Liveness
    reload: Callable[[Settings, dict[str, AsyncHandler], Mapping[str, WorkflowHandler]], Awaitable[Reloaded]]
    """Apply a new configuration's subscriptions (`Runner.reload`), given its handlers."""


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
    counters and a fresh HTTP client (the TLS context is built once, for the runner's life).
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        handlers: Mapping[str, Handler] | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        """`tracer_provider`: where the spans of claims, batches and acks go (runner._tracing), with the
        `otel` extra installed; None: OpenTelemetry's global provider (a no-op until the app sets an SDK up)."""
        self.settings = settings if settings is not None else Settings()
        self._tracing = Tracing(tracer_provider)
        self._handlers: dict[str, Handler] = dict(handlers or {})
        self._workflows: dict[str, Workflow] = {}
        self.redactor = Redactor()
        """The secrets this runner knows (service token, claim tokens held): redact them from any text."""
        self._vitals = Vitals(self.settings.runner_id, redact=self.redactor.redact)
        self._runs = RunKeeper(self._vitals.metrics.registry)
        self._active: _Active | None = None
        self._position: WakePosition | None = None
        """The wake offset of the current (or last) run."""
        self._stop_errors: list[BaseException] = []
        self._fatal: BaseException | None = None
        self._run_done = trio.Event()
        self._run_done.set()
        self._listeners: list[Callable[[State], None]] = []
        self._tls: ssl.SSLContext | None = None
        self._stop_requested = False
        self._reloading = trio.Lock()

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

    def workflow(self, subscription_id: str) -> Callable[[Workflow], Workflow]:
        """Register the workflow of one subscription (decorator): each of its streams is a durable run."""

        def register(function: Workflow) -> Workflow:
            self.add_workflow(subscription_id, function)
            return function

        return register

    def add_workflow(self, subscription_id: str, workflow: Workflow) -> None:
        if subscription_id in self._handlers or subscription_id in self._workflows:
            raise ConfigError(f"subscription {subscription_id!r} already has a handler")
        self._workflows[subscription_id] = workflow

    async def runs(self) -> list[dict[str, object]]:
        """Every run of this runner's workflow subscriptions, read from the server (docs/design.md §9)."""
        return await list_runs(self.settings, sorted(self._workflow_handlers()))

    def check(self) -> None:
        """Raise `ConfigError` for what can be found wrong without the server.

        Every subscription has a handler that imports, and the service token is readable.
        """
        self._resolved_handlers()
        self.redactor.keep(self.settings.service_token())
        if (state_dir := self.settings.state_dir) is not None:
            check_state_dir(Path(state_dir))

    def _workflow_handlers(self, settings: Settings | None = None) -> dict[str, WorkflowHandler]:
        """Workflows from code and from the configuration, each made a handler; ConfigError on a clash."""
        settings = settings or self.settings
        workflows: dict[str, WorkflowHandler] = {}
        for spec in settings.subscriptions:
            if spec.workflow:
                if spec.id in self._workflows or spec.id in self._handlers:
                    raise ConfigError(
                        f"subscription {spec.id!r} has a workflow in the configuration and a handler in code"
                    )
                workflows[spec.id] = WorkflowHandler(spec.id, resolve(spec.workflow))  # type: ignore[arg-type]
        for subscription, function in self._workflows.items():
            workflows[subscription] = WorkflowHandler(subscription, function)
        for subscription, handler in workflows.items():
            if (served := settings.subscription(subscription)) is not None:
                check_journal_outside(subscription, served.pattern, served.streams)
                handler.hold = served.lease_ttl_ms / 1000  # a live holder says so within its lease
        return workflows

    def _resolved_handlers(
        self, workflows: Mapping[str, WorkflowHandler] | None = None, settings: Settings | None = None
    ) -> dict[str, AsyncHandler]:
        settings = settings or self.settings
        workflows = self._workflow_handlers(settings) if workflows is None else workflows
        return resolve_handlers(settings, {**self._handlers, **workflows})

    # -- observation -----------------------------------------------------------------------

    def add_state_listener(self, listener: Callable[[State], None]) -> None:
        """Call `listener(state)` on every entry into a lifecycle state (from the runner's task).

        Keep it quick and non-blocking: it runs between two transitions.
        """
        self._listeners.append(listener)

    def remove_state_listener(self, listener: Callable[[State], None]) -> None:
        self._listeners.remove(listener)

    def progressing(self) -> tuple[bool, str]:
        """Is the runner making progress? False when wedged: what a watchdog should act on."""
        active = self._active
        if active is None:
            return False, "the runner is not running"
        settings = self.settings
        return progressing(
            self.health(),
            busy_for=active.driver.busy_for(),
            silent_for=active.liveness.silent_for(),
            beat_limit=3 * settings.heartbeat_interval + settings.heartbeat_timeout,
            stop_deadline=settings.drain_timeout + settings.command_kill_grace + settings.finalizer_timeout + 5,
        )

    @property
    def state(self) -> State:
        return self._active.driver.state if self._active is not None else State.STOPPED

    @property
    def running(self) -> bool:
        return self._active is not None

    def health(self) -> Health:
        dispatcher = self._active.dispatcher if self._active else None
        health = self._vitals.snapshot(
            self.state,
            dispatcher.in_flight() if dispatcher else [],
            self._position.offset if self._position else None,
            cooldowns=dispatcher.cooldowns() if dispatcher else {},
        )
        if self._workflows or any(spec.workflow for spec in self.settings.subscriptions):
            health = replace(health, runs=self._runs.snapshot())
        return health

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
        self._stop_requested = True  # a run that is starting sends STOP once its driver runs
        if self._active is not None:
            await self._active.driver.stop()
        await self._run_done.wait()
        if self._stop_errors:
            raise StopError(f"the runner stopped with {len(self._stop_errors)} problem(s)", list(self._stop_errors))

    def interrupt(self) -> None:
        """Cut a running drain short: in-flight claims are cancelled now (finalizers still run)."""
        if self._active is not None:
            self._active.dispatcher.interrupt_all()

    async def wait_stopped(self) -> None:
        await self._run_done.wait()

    async def wait_until(self, *states: State) -> None:
        """Wait until the lifecycle is in one of `states` (e.g. STREAMING: following the wake stream)."""
        if self._active is None:
            if State.STOPPED in states:
                return
            raise RunnerError("the runner is not running: start it first")
        await self._active.driver.wait_until(*states)

    def abort(self, subscription_id: str, *, cooldown: float | None = None) -> bool:
        """Abort the in-flight claim of one subscription; the runner keeps serving the others.

        Finished progress is acknowledged and the claim released. The subscription then
        rests for `cooldown` seconds (default: the `cooldown` setting; 0 claims it again
        at once); `health().cooldowns` shows until when. True if a claim was in flight.
        """
        return self._active is not None and self._active.dispatcher.abort(subscription_id, cooldown=cooldown)

    async def reload(self, settings: Settings) -> Reloaded:
        """Apply `settings`' subscriptions to the running runner; returns what changed.

        Added subscriptions are created on the server, served and swept; removed ones take no
        new wake, their claim in flight runs to its end, and then (`delete_removed_subscriptions`)
        they are deleted on the server; a changed one is kept or replaced (`on_subscription_changed`).
        Other settings cannot change while running: the answer names those that differ, and
        they keep their values. Raises `ConfigError`, having changed nothing, if a handler of the
        new configuration cannot be had; `RunnerError` if the runner is not running.
        """
        async with self._reloading:
            active = self._active
            if active is None:
                raise RunnerError("the runner is not running: there is nothing to reload")
            workflows = self._workflow_handlers(settings)
            handlers = self._resolved_handlers(workflows, settings)
            return await active.reload(settings, handlers, workflows)

    # -- the run ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until stopped. Raises `WakeStreamClosed` if the wake stream reached its end, and
        `StateDirInUse` (a `ConfigError`) at once if another runner holds the `state_dir`."""
        if self._active is not None or not self._run_done.is_set():
            raise AlreadyRunning(f"runner {self.settings.runner_id!r} is already running")
        workflows = self._workflow_handlers()
        handlers = self._resolved_handlers(workflows)
        settings = self.settings
        self._run_done = trio.Event()
        self._stop_requested = False
        self._stop_errors, self._fatal = [], None
        self._vitals.started()
        # Before anything in the state dir is read: one owner per state dir (runner/_state/lock.py).
        lock = StateDirLock(Path(settings.state_dir)) if settings.state_dir is not None else None
        try:
            if lock is not None:
                lock.acquire()
            with structlog.contextvars.bound_contextvars(runner_id=settings.runner_id):
                await self._run(settings, handlers, workflows, task_status)
        finally:
            if lock is not None:
                lock.release()
            self._active = None
            self._vitals.entered(State.STOPPED)
            self._run_done.set()
        if self._fatal is not None:
            raise self._fatal

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            settings = self.settings
            self._tls = tls_context(
                https=settings.server_url.startswith("https:"),
                verify=settings.verify_tls,
                ca_file=str(settings.ca_file) if settings.ca_file else None,
            )
        return self._tls

    async def _run(
        self,
        settings: Settings,
        handlers: dict[str, AsyncHandler],
        workflows: Mapping[str, WorkflowHandler],
        task_status: trio.TaskStatus[None],
    ) -> None:
        http = build_http(
            settings.server_url,
            timeout=settings.request_timeout,
            tls=self._tls_context(),
            concurrency=settings.max_concurrent_claims,
            transport=settings.http_transport,
            deadline=settings.request_deadline,
            max_body_bytes=settings.max_response_bytes,
        )
        token = settings.service_token()
        self.redactor.keep(token)
        wire = StreamsClient(
            http,
            stream_root=settings.stream_root,
            token=token,
            timeout=settings.request_timeout,
            deadline=settings.request_deadline,
            max_event_bytes=settings.max_event_bytes,
        )
        self._runs.bind(wire, workflows.values(), self._tracing)
        checkpoint = (
            Checkpoint(
                Path(settings.state_dir),
                server_url=settings.server_url,
                stream_root=settings.stream_root,
                wake_stream=settings.wake_stream,
            )
            if settings.state_dir is not None
            else None
        )
        position = WakePosition(checkpoint.load() if checkpoint else None)
        self._position = position
        log.info(
            "runner.starting", server=settings.server_url, wake_stream=settings.wake_stream, offset=position.offset
        )
        journal = Journal(
            Path(settings.state_dir) / "journal.json" if settings.state_dir is not None else None,
            server_url=settings.server_url,
            stream_root=settings.stream_root,
            on_write=partial(self._vitals.state_written, "journal"),
        )
        keeper = SubscriptionKeeper(
            wire,
            settings.subscriptions,
            wake_stream=settings.wake_stream,
            journal=journal,
            vitals=self._vitals,
            replay=settings.on_subscription_lost == "replay",
        )
        dead_letters = DeadLetters(wire)

        def context_of(settings: Settings, handlers: Mapping[str, AsyncHandler], subscription: str) -> ClaimContext:
            self._vitals.pending(subscription, 0)
            return ClaimContext(
                wire,
                settings,
                self._vitals,
                journal,
                Delivery(subscription, handlers[subscription], settings, self._vitals, dead_letters, self._tracing),
                keeper.ensure,
                self.redactor,
                tracing=self._tracing,
            )

        contexts = {subscription: context_of(settings, handlers, subscription) for subscription in handlers}
        async with http, trio.open_nursery() as lifetime:
            # Before any claim: every journal write from here on is off the event loop.
            await lifetime.start(partial(journal.keep, interval=settings.checkpoint_interval), name="journal")
            async with trio.open_nursery() as work:
                fleet = (
                    Fleet(
                        wire,
                        settings.fleet_stream_path,
                        settings.runner_id,
                        interval=settings.fleet_interval,
                        fallback=settings.fleet_fallback,
                        hold=settings.long_poll_timeout,
                        backoff=Backoff(settings.backoff_initial, settings.backoff_max),
                        tally=Tally(self._vitals, f"fleet stream {settings.fleet_stream_path}"),
                        journal=journal,
                        on_change=lambda: dispatcher.reshare(),
                        live_mode=settings.live_mode,
                        covered=lambda: dispatcher.covered,
                    )
                    if settings.fleet
                    else None
                )
                dispatcher = Dispatcher(
                    contexts,
                    self._vitals,
                    work,
                    max_concurrent=settings.max_concurrent_claims,
                    peers=fleet,
                    confirm=keeper.confirm,
                )
                follower = WakeFollower(
                    wire,
                    wake_stream=settings.wake_stream,
                    position=position,
                    vitals=self._vitals,
                    keeper=keeper,
                    share=fleet.owns if fleet is not None else None,
                    known=journal.knows,
                    live_mode=settings.live_mode,
                    connect_timeout=settings.connect_timeout,
                    keepalive_timeout=settings.keepalive_timeout,
                    long_poll_timeout=settings.long_poll_timeout,
                )
                backoff = BackoffActivity(
                    Backoff(settings.backoff_initial, settings.backoff_max, jitter=settings.backoff_jitter)
                )

                async def drain(context: StateContext) -> None:
                    await dispatcher.drain(settings.drain_timeout)
                    self._stop_errors.extend(dispatcher.cleanup_errors)
                    await context.emit(Event.DRAINED)

                driver = Driver(
                    {"connect": follower.connect, "consume": follower.consume, "backoff": backoff, "drain": drain},
                    {
                        Effect.CLAIM: lambda envelope: dispatcher.wake(_wake_of(envelope)),
                        Effect.RESET_BACKOFF: backoff.reset,
                        Effect.RESYNC: lambda _envelope: dispatcher.resync(),
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
                    answered=follower.server_answered,
                )

                async def reload(
                    new: Settings, handlers: dict[str, AsyncHandler], workflows: Mapping[str, WorkflowHandler]
                ) -> Reloaded:
                    old = self.settings
                    kept = fixed_settings_changed(old, new)
                    if kept:
                        log.warning(
                            "reload.settings_kept",
                            settings=kept,
                            detail="these cannot change while running: they keep their values until a restart",
                        )
                    applied = old.model_copy(update={name: getattr(new, name) for name in LIVE_SETTINGS})
                    self._runs.bind(wire, workflows.values(), self._tracing)
                    self.settings = applied
                    return await apply_reload(
                        old,
                        applied,
                        handlers,
                        dispatcher=dispatcher,
                        keeper=keeper,
                        context_of=partial(context_of, applied, handlers),
                        background=lifetime,
                        kept_settings=kept,
                    )

                async with trio.open_nursery() as driving:
                    await driving.start(driver.run)
                    self._active = _Active(driver, dispatcher, liveness, reload)
                    await driver.send(Event.START)
                    if self._stop_requested:
                        await driver.send(Event.STOP)  # stop() was called while the run was starting
                    if settings.control_stream_enabled:
                        await lifetime.start(
                            partial(
                                follow_control_stream,
                                wire,
                                settings.control_stream_path,
                                dispatcher.abort,
                                hold=settings.long_poll_timeout,
                                backoff=Backoff(settings.backoff_initial, settings.backoff_max),
                                tally=Tally(self._vitals, f"control stream {settings.control_stream_path}"),
                            ),
                            name="control-stream",
                        )
                    if fleet is not None:
                        await lifetime.start(fleet.run, name="fleet")
                    lifetime.start_soon(liveness.run, name="heartbeat")
                    lifetime.start_soon(
                        partial(
                            self._sweep,
                            driver,
                            dispatcher,
                            settings.sweep_interval,
                            partial(return_held_claims, wire, journal, self.redactor),
                        ),
                        name="sweep",
                    )
                    if checkpoint is not None:
                        lifetime.start_soon(
                            partial(
                                keep_checkpoint,
                                checkpoint,
                                position,
                                interval=settings.checkpoint_interval,
                                on_write=partial(self._vitals.state_written, "wake checkpoint"),
                            ),
                            name="checkpoint",
                        )
                    if workflows:
                        lifetime.start_soon(self._runs.serve, wire, sorted(workflows), name="runs")
                    task_status.started()
                # The drain has emptied the work nursery; anything left is a bug, not work.
                work.cancel_scope.cancel()
            lifetime.cancel_scope.cancel()
        log.info("runner.stopped", claims=dict(self._vitals.claims))

    async def _sweep(
        self, driver: Driver, dispatcher: Dispatcher, interval: float, first: Callable[[], Awaitable[list[str]]]
    ) -> None:
        """Claim every served subscription once every `interval` (each new connection sweeps too).

        `first` runs once, as soon as the server is reachable: claims an earlier run left
        held are handed back, and those subscriptions are claimed again at once.
        """
        await driver.wait_until(State.STREAMING)
        for subscription in await first():
            await driver.send(Event.WAKE, payload=Wake(subscription))
        while True:
            await trio.sleep(interval)
            await driver.wait_until(State.STREAMING)
            for subscription in dispatcher.served:
                await driver.send(Event.WAKE, payload=Wake(subscription))

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
