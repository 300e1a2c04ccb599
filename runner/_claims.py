"""Claims: one worker per subscription at a time, batches in order, leases kept, nothing lost.

A WAKE for a served subscription starts a worker unless one is already in
flight; then the wake is remembered and the worker claims again when it ends
(single flight, coalesced). The work nursery belongs to the whole run, never to
a lifecycle state: losing the wake stream never interrupts a handler.

Inside a claim, batches of each pending stream go to the handler in order;
each successful batch is acknowledged at once (which also renews the lease; the
last one rides on the final `done` ack), and a lease keeper renews the lease
while a handler takes its time. `FENCED` or a refused
token means the claim is someone else's now: the handler is cancelled at once
and nothing is acknowledged or released afterwards. A claim cancelled by a stop
or an abort runs a shielded, time-bounded finalizer that acknowledges what was
finished and releases the claim, so the next holder resumes exactly there.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TypeVar

import structlog
import trio

from ._backoff import Backoff
from ._client import Ack, Claim, ReadResult, StreamsClient, is_after
from ._config import Settings
from ._exceptions import (
    AlreadyClaimed,
    ClientError,
    Fenced,
    InvalidOffset,
    NoPendingWork,
    PermanentFailure,
    SubscriptionNotFound,
    TokenInvalid,
)
from ._handlers import SUSPEND, AsyncHandler, Batch
from ._health import SUCCEEDED, InFlightClaim, Outcome, Vitals
from ._subscriptions import SubscriptionKeeper
from ._wake import Wake

log = structlog.get_logger("pullwake.claims")

T = TypeVar("T")

# Transient request failures inside a claim are retried this many times, backing off
# from REQUEST_RETRY_INITIAL up to REQUEST_RETRY_MAX seconds.
REQUEST_ATTEMPTS = 5
REQUEST_RETRY_INITIAL = 0.2
REQUEST_RETRY_MAX = 2.0
# Renew the lease when a third of it has gone by without an ack.
RENEW_FRACTION = 1 / 3


class LeaseLost(Exception):
    """The claim is not ours anymore (fenced, token refused, or expired locally)."""


class ClaimAbandoned(Exception):
    """The claim cannot go on (a read kept failing, an ack was refused); hand it back."""


async def retrying(
    call: Callable[[], Awaitable[T]],
    *,
    what: str,
    deadline: float | None = None,
    report: Callable[[BaseException], None] | None = None,
) -> T:
    """Retry transient client errors with backoff, up to REQUEST_ATTEMPTS or `deadline`."""
    backoff = Backoff(REQUEST_RETRY_INITIAL, REQUEST_RETRY_MAX)
    attempt = 1
    while True:
        try:
            return await call()
        except ClientError as exc:
            if report is not None and exc.retryable:
                report(exc)
            if not exc.retryable or (deadline is None and attempt >= REQUEST_ATTEMPTS):
                raise
            delay = backoff.next_delay()
            if deadline is not None and trio.current_time() + delay >= deadline:
                raise
            log.info("request.retry", what=what, attempt=attempt, error=str(exc), delay=round(delay, 3))
            attempt += 1
            await trio.sleep(delay)


class Progress:
    """Per stream: the offset finished by the handler, and the one the server has acknowledged."""

    def __init__(self, claim: Claim) -> None:
        self.acked = {stream.path: stream.acked_offset for stream in claim.streams}
        self.finished = dict(self.acked)

    def finish(self, stream: str, offset: str) -> None:
        self.finished[stream] = offset

    def unacked(self) -> list[Ack]:
        return [Ack(stream, offset) for stream, offset in self.finished.items() if offset != self.acked.get(stream)]

    def acknowledged(self, acks: list[Ack]) -> None:
        for ack in acks:
            self.acked[ack.stream] = ack.offset


@dataclass(eq=False)
class InFlight:
    """The handle of one subscription's worker: registered before the claim starts."""

    subscription: str
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    waiting: trio.CancelScope = field(default_factory=trio.CancelScope)
    started_at: float = field(default_factory=time.time)
    claim: Claim | None = None
    stream: str | None = None
    batches_done: int = 0
    reason: Outcome | None = None
    """Why the worker was cancelled from outside: INTERRUPTED (stop) or ABORTED."""

    def cancel(self, reason: Outcome) -> None:
        if self.reason is None:
            self.reason = reason
        self.scope.cancel()

    def describe(self) -> InFlightClaim:
        return InFlightClaim(
            subscription=self.subscription,
            wake_id=self.claim.wake_id if self.claim else None,
            generation=self.claim.generation if self.claim else None,
            started_at=self.started_at,
            stream=self.stream,
            batches_done=self.batches_done,
        )


class Claims:
    """The dispatcher: decides which wakes become claims, and runs them in the work nursery."""

    def __init__(
        self,
        client: StreamsClient,
        settings: Settings,
        handlers: Mapping[str, AsyncHandler],
        vitals: Vitals,
        keeper: SubscriptionKeeper,
        nursery: trio.Nursery,
    ) -> None:
        self._client = client
        self._settings = settings
        self._handlers = handlers
        self._vitals = vitals
        self._keeper = keeper
        self._nursery = nursery
        self._slots = trio.CapacityLimiter(settings.max_concurrent_claims)
        self._in_flight: dict[str, InFlight] = {}
        self._pending: dict[str, int | None] = {}
        """Subscriptions woken while busy, with the newest generation seen (None: a sweep)."""
        self._handled_generation: dict[str, int] = {}
        self._cooldown_until: dict[str, float] = {}
        self._idle = trio.Event()
        self._idle.set()
        self._closed = False
        self._dead_letter_streams: set[str] = set()
        self._woken_at: dict[str, float] = {}
        """When the server wrote the newest wake of each subscription (Unix seconds), for latency."""
        self.cleanup_errors: list[BaseException] = []
        """Finalizers of cancelled claims that could not hand their claim back."""

    # -- what the runner asks for ----------------------------------------------------------

    @property
    def served(self) -> list[str]:
        return sorted(self._handlers)

    def in_flight(self) -> list[InFlightClaim]:
        return [entry.describe() for entry in self._in_flight.values()]

    def wake(self, wake: Wake) -> None:
        """The CLAIM effect: never blocks, never raises."""
        subscription = wake.subscription
        if subscription not in self._handlers:
            log.info("wake.not_served", subscription=subscription, detail="no handler here for this subscription")
            return
        if wake.ts_ms is not None:
            self._woken_at[subscription] = wake.ts_ms / 1000
        if subscription in self._in_flight:
            self._remember(subscription, wake.generation)
            return
        if wake.generation is not None and wake.generation <= self._handled_generation.get(subscription, -1):
            log.debug("wake.already_handled", subscription=subscription, generation=wake.generation)
            return
        self._start(subscription)

    def _remember(self, subscription: str, generation: int | None) -> None:
        """Coalesce wakes that arrive while a worker is busy; None (a sweep) always counts."""
        if subscription in self._pending and self._pending[subscription] is None:
            return
        if generation is None or subscription not in self._pending:
            self._pending[subscription] = generation
        else:
            self._pending[subscription] = max(generation, self._pending[subscription] or 0)

    def _take_pending(self, subscription: str) -> bool:
        """Is a remembered wake newer than what the worker has just handled?"""
        if subscription not in self._pending:
            return False
        generation = self._pending.pop(subscription)
        return generation is None or generation > self._handled_generation.get(subscription, -1)

    def forget(self, subscription: str | None = None) -> None:
        """Generations start over when a subscription is (re)created, e.g. by a server restart.

        Called for every subscription on each (re)connect: a wake that was already
        handled costs one skipped claim at worst, a forgotten reset would cost a missed one.
        """
        if subscription is None:
            self._handled_generation.clear()
        else:
            self._handled_generation.pop(subscription, None)

    def abort(self, subscription: str) -> bool:
        """Abort the subscription's in-flight claim, if any. True if there was one."""
        entry = self._in_flight.get(subscription)
        if entry is None:
            return False
        log.warning("claim.abort_requested", subscription=subscription)
        entry.cancel(Outcome.ABORTED)
        return True

    def close(self) -> None:
        """Take no new work; drop workers that are only waiting (cooldown or a free slot)."""
        self._closed = True
        self._pending.clear()
        for entry in self._in_flight.values():
            entry.waiting.cancel()

    def interrupt_all(self) -> None:
        for entry in list(self._in_flight.values()):
            entry.cancel(Outcome.INTERRUPTED)

    async def wait_idle(self) -> None:
        await self._idle.wait()

    async def drain(self, timeout: float) -> None:
        """Let in-flight claims finish for up to `timeout`, then interrupt the rest."""
        self.close()
        with trio.move_on_after(timeout):
            await self.wait_idle()
        if self._in_flight:
            log.warning("drain.deadline", interrupting=sorted(self._in_flight))
            self.interrupt_all()
        # Every finalizer is shielded but bounded, so this wait is bounded too.
        await self.wait_idle()

    # -- workers ---------------------------------------------------------------------------

    def _start(self, subscription: str) -> None:
        entry = InFlight(subscription)
        self._in_flight[subscription] = entry
        if self._idle.is_set():
            self._idle = trio.Event()
        self._vitals.dispatched()
        self._vitals.in_flight(len(self._in_flight))
        self._nursery.start_soon(self._serve, entry, name=f"claim:{subscription}")

    async def _serve(self, entry: InFlight) -> None:
        subscription = entry.subscription
        try:
            with entry.scope:
                while not self._closed:
                    with entry.waiting:
                        await trio.sleep_until(self._cooldown_until.get(subscription, 0.0))
                        await self._slots.acquire_on_behalf_of(entry)
                    if entry.waiting.cancelled_caught:
                        break
                    try:
                        outcome, again = await self._claim_once(entry)
                    finally:
                        self._slots.release_on_behalf_of(entry)
                    if outcome in (Outcome.FAILED, Outcome.ERROR):
                        self._cooldown_until[subscription] = trio.current_time() + self._settings.cooldown
                    entry.waiting = trio.CancelScope()
                    entry.claim, entry.stream, entry.batches_done = None, None, 0
                    if not (self._take_pending(subscription) or again):
                        break
            if entry.reason is Outcome.ABORTED:
                self._cooldown_until[subscription] = trio.current_time() + self._settings.cooldown
        finally:
            # Only remove the handle this worker registered: a new worker may own the slot now.
            if self._in_flight.get(subscription) is entry:
                del self._in_flight[subscription]
            # A wake that came in while this worker was winding down (an abort's finalizer,
            # say) must not be forgotten: the server writes one wake and then waits for a claim.
            if not self._closed and subscription not in self._in_flight and self._take_pending(subscription):
                self._start(subscription)
            self._vitals.in_flight(len(self._in_flight))
            if not self._in_flight:
                self._idle.set()

    async def _obtain(self, subscription: str) -> Claim | Outcome:
        """POST /claim, retrying transient failures; an Outcome when there is nothing to hold."""
        try:
            return await retrying(
                lambda: self._client.claim(subscription, self._settings.runner_id),
                what="claim",
                report=self._vitals.error,
            )
        except (AlreadyClaimed, NoPendingWork) as exc:
            log.debug("claim.skipped", subscription=subscription, reason=exc.code)
            return Outcome.SKIPPED
        except SubscriptionNotFound:
            self.forget(subscription)
            try:
                recreated = await self._keeper.ensure(subscription)
            except ClientError as exc:
                log.warning("subscription.ensure_failed", subscription=subscription, error=str(exc))
                recreated = False
            if recreated:
                log.warning("subscription.was_missing", subscription=subscription, action="re-created")
                return Outcome.SKIPPED
            log.error("subscription.not_found", subscription=subscription)
            return Outcome.ERROR
        except ClientError as exc:
            self._vitals.error(exc)
            log.warning("claim.failed", subscription=subscription, error=str(exc))
            return Outcome.ERROR

    async def _claim_once(self, entry: InFlight) -> tuple[Outcome, bool]:
        claim = await self._obtain(entry.subscription)
        if isinstance(claim, Outcome):
            self._record(claim, subscription=entry.subscription)
            return claim, False
        entry.claim = claim
        return await HeldClaim(self, entry, claim).run()

    def _handled(self, subscription: str, generation: int) -> None:
        self._handled_generation[subscription] = max(generation, self._handled_generation.get(subscription, -1))

    def _record(self, outcome: Outcome, **context: object) -> None:
        self._vitals.claim_ended(outcome)
        level = "warning" if outcome in (Outcome.FAILED, Outcome.FENCED, Outcome.ERROR) else "info"
        getattr(log, level)("claim.outcome", outcome=outcome.value, **context)


class HeldClaim:
    """One granted claim, from the POST /claim answer to its final ack or release."""

    def __init__(self, claims: Claims, entry: InFlight, claim: Claim) -> None:
        self.claims = claims
        self.entry = entry
        self.claim = claim
        self.subscription = claim.subscription
        self.settings = claims._settings
        self.client = claims._client
        self.handler = claims._handlers[claim.subscription]
        self.vitals = claims._vitals
        self.progress = Progress(claim)
        self.renewed_at = trio.current_time()
        self.woken_at = claims._woken_at.pop(claim.subscription, None)
        self.ack_lock = trio.Lock()
        self.lost: LeaseLost | None = None
        self.dead_lettered = 0

    @property
    def lease_seconds(self) -> float:
        return self.claim.lease_ttl_ms / 1000

    @property
    def lease_deadline(self) -> float:
        return self.renewed_at + self.lease_seconds

    async def run(self) -> tuple[Outcome, bool]:
        """Returns the outcome and whether to claim again at once (`next_wake`)."""
        claim = self.claim
        bound = structlog.contextvars.bound_contextvars(
            subscription=self.subscription, wake_id=claim.wake_id, generation=claim.generation
        )
        with bound:
            log.info("claim.started", streams=[s.path for s in claim.streams if s.has_pending])
            try:
                outcome, next_wake = await self._work()
            except Exception:
                log.exception("claim.crashed")
                await self._hand_back()
                outcome, next_wake = Outcome.ERROR, False
            except BaseException:
                # Cancellation arrives as Cancelled or as a group of them from the nursery inside.
                if trio.current_effective_deadline() == -math.inf:
                    await self._finalize_cancelled()
                raise
            if outcome in SUCCEEDED:
                self.claims._handled(self.subscription, claim.generation)
            self.claims._record(outcome, subscription=self.subscription, generation=claim.generation)
        return outcome, next_wake

    async def _work(self) -> tuple[Outcome, bool]:
        outcome = Outcome.ERROR
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keep_lease, nursery.cancel_scope)
                try:
                    outcome = await self._process(nursery.cancel_scope)
                finally:
                    nursery.cancel_scope.cancel()
        except* ClaimAbandoned as group:
            log.warning("claim.abandoned", error=str(group.exceptions[0]))
            self.vitals.error(group.exceptions[0])
            outcome = Outcome.ERROR
        if self.lost is not None:
            log.warning("claim.lease_lost", reason=str(self.lost))
            return Outcome.FENCED, False
        if outcome in SUCCEEDED:
            try:
                next_wake = await self._ack(done=True)
            except LeaseLost as exc:
                log.warning("claim.lease_lost", reason=str(exc))
                return Outcome.FENCED, False
            return outcome, next_wake
        await self._hand_back()
        return outcome, False

    async def _keep_lease(self, work: trio.CancelScope) -> None:
        while True:
            await trio.sleep_until(self.renewed_at + self.lease_seconds * RENEW_FRACTION)
            if trio.current_time() < self.renewed_at + self.lease_seconds * RENEW_FRACTION:
                continue  # a batch ack renewed it meanwhile
            try:
                await self._ack()
            except LeaseLost as exc:
                await self._lose(exc, work)

    async def _lose(self, lost: LeaseLost, work: trio.CancelScope) -> None:
        """The claim is someone else's: stop the handler at once, and touch nothing more."""
        self.lost = lost
        work.cancel()
        await trio.lowlevel.checkpoint()  # raises Cancelled right here

    async def _process(self, work: trio.CancelScope) -> Outcome:
        pending = [stream for stream in self.claim.streams if stream.has_pending]
        for index, stream in enumerate(pending):
            self.entry.stream = stream.path
            offset = stream.acked_offset
            while is_after(stream.tail_offset, offset):
                result = await self._read(stream.path, offset)
                if not result.messages:
                    break
                if not result.is_json:
                    log.warning(
                        "stream.not_json",
                        stream=stream.path,
                        content_type=result.content_type,
                        detail="handing the raw body to the handler as one bytes message",
                    )
                batch = Batch(
                    subscription=self.subscription,
                    stream=stream.path,
                    messages=result.messages,
                    start_offset=offset,
                    next_offset=result.next_offset,
                    wake_id=self.claim.wake_id,
                    generation=self.claim.generation,
                    attempt=1,
                )
                verdict = await self._deliver(batch)
                if verdict is Outcome.FAILED:
                    return Outcome.FAILED
                self.progress.finish(stream.path, result.next_offset)
                self.entry.batches_done += 1
                offset = result.next_offset
                if verdict is Outcome.SUSPENDED:
                    return Outcome.SUSPENDED
                last = index == len(pending) - 1 and not is_after(stream.tail_offset, offset)
                if not last:
                    # Persist progress (and renew the lease) now; the last batch rides on the done ack.
                    try:
                        await self._ack()
                    except LeaseLost as exc:
                        await self._lose(exc, work)
        return Outcome.DEAD_LETTERED if self.dead_lettered else Outcome.COMPLETED

    async def _read(self, stream: str, offset: str) -> ReadResult:
        try:
            return await retrying(
                lambda: self.client.read(stream, offset), what=f"read {stream}", report=self.vitals.error
            )
        except ClientError as exc:
            raise ClaimAbandoned(f"reading {stream} from {offset} failed: {exc}") from exc

    async def _deliver(self, first: Batch) -> Outcome:
        """Hand a batch to the handler, retrying with backoff; returns how the batch ended."""
        settings = self.settings
        backoff = Backoff(
            settings.handler_retry_initial, max(settings.handler_retry_max, settings.handler_retry_initial)
        )
        error: BaseException | None = None
        for attempt in range(1, settings.handler_max_attempts + 1):
            batch = first if attempt == 1 else replace(first, attempt=attempt)
            started = trio.current_time()
            if self.woken_at is not None:
                self.vitals.wake_latency(time.time() - self.woken_at)
                self.woken_at = None
            try:
                if settings.handler_timeout is None:
                    result = await self.handler(batch)
                else:
                    with trio.fail_after(settings.handler_timeout):
                        result = await self.handler(batch)
            except PermanentFailure as exc:
                self.vitals.handler_ran(trio.current_time() - started)
                error = exc
                log.warning("batch.failed", stream=batch.stream, attempt=attempt, error=str(exc), permanent=True)
                break
            except Exception as exc:
                self.vitals.handler_ran(trio.current_time() - started)
                error = exc
                log.warning("batch.failed", stream=batch.stream, attempt=attempt, error=f"{type(exc).__name__}: {exc}")
                if attempt < settings.handler_max_attempts:
                    self.vitals.batch("retried")
                    await trio.sleep(backoff.next_delay())
            else:
                took = trio.current_time() - started
                self.vitals.handler_ran(took)
                self.vitals.events_handled(len(batch.messages))
                self.vitals.batch("suspended" if result is SUSPEND else "ok")
                log.debug("batch.done", stream=batch.stream, size=len(batch.messages), took=round(took, 6))
                return Outcome.SUSPENDED if result is SUSPEND else Outcome.COMPLETED
        assert error is not None
        return await self._give_up(first, error)

    async def _give_up(self, batch: Batch, error: BaseException) -> Outcome:
        spec = self.settings.subscription(self.subscription)
        stream = (spec.dead_letter_stream if spec else None) or self.settings.dead_letter_stream
        if stream is None:
            self.vitals.batch("failed")
            return Outcome.FAILED
        letter = {
            "type": "dead_letter",
            "runner_id": self.settings.runner_id,
            "error": f"{type(error).__name__}: {error}",
            "batch": batch.to_json(),
        }
        try:
            if stream not in self.claims._dead_letter_streams:
                await retrying(lambda: self.client.create_stream(stream), what="create dead-letter stream")
                self.claims._dead_letter_streams.add(stream)
            await retrying(lambda: self.client.append(stream, letter), what="dead-letter")
        except ClientError as exc:
            log.error("batch.dead_letter_failed", dead_letter_stream=stream, error=str(exc))
            self.vitals.batch("failed")
            return Outcome.FAILED
        log.warning("batch.dead_lettered", stream=batch.stream, dead_letter_stream=stream, error=letter["error"])
        self.vitals.batch("dead_lettered")
        self.dead_lettered += 1
        return Outcome.COMPLETED

    async def _ack(self, *, done: bool = False) -> bool:
        """Acknowledge progress (renewing the lease); retried until the local lease deadline."""
        claim, progress = self.claim, self.progress
        async with self.ack_lock:
            acks = progress.unacked()
            try:
                next_wake = await retrying(
                    lambda: self.client.ack(claim, acks, done=done),
                    what="ack",
                    deadline=self.lease_deadline,
                    report=self.vitals.error,
                )
            except (Fenced, TokenInvalid, SubscriptionNotFound) as exc:
                self.vitals.lease_renewal("lost")
                raise LeaseLost(str(exc)) from exc
            except InvalidOffset as exc:
                raise ClaimAbandoned(f"the server refused our acks: {exc}") from exc
            except ClientError as exc:
                self.vitals.lease_renewal("lost")
                raise LeaseLost(f"could not renew the lease before it ran out: {exc}") from exc
            progress.acknowledged(acks)
            self.renewed_at = trio.current_time()
            if not done:
                self.vitals.lease_renewal("ok")
            return next_wake

    async def _hand_back(self) -> ClientError | None:
        """Keep what was finished and let the next holder start right away."""
        claim, progress = self.claim, self.progress
        try:
            if acks := progress.unacked():
                await self.client.ack(claim, acks)
                progress.acknowledged(acks)
            await self.client.release(claim)
        except ClientError as exc:
            # Logged, never raised: cleanup must not mask why we are here.
            log.warning("claim.hand_back_failed", error=str(exc), unacked=[a.offset for a in progress.unacked()])
            return exc
        return None

    async def _finalize_cancelled(self) -> None:
        """The shielded, bounded cleanup of a claim cancelled by a stop or an abort."""
        if self.lost is not None:
            self.claims._record(Outcome.FENCED, subscription=self.subscription)
            return
        error: BaseException | None = None
        with trio.move_on_after(self.settings.finalizer_timeout, shield=True) as bound:
            error = await self._hand_back()
        if bound.cancelled_caught:
            error = TimeoutError(f"handing back {self.subscription} took over {self.settings.finalizer_timeout:g} s")
            log.warning("claim.finalizer_timeout", seconds=self.settings.finalizer_timeout)
        if error is not None:
            self.claims.cleanup_errors.append(error)
        self.claims._record(self.entry.reason or Outcome.INTERRUPTED, subscription=self.subscription)
