"""One claim of one subscription, from POST /claim to its final ack or hand-back (docs/design.md §5, §6.3).

Batches of each pending stream go to the handler in order; each successful
batch is acknowledged at once (which also renews the lease; the last one rides
on the final `done` ack), and a lease keeper renews the lease while a handler
takes its time. Before a batch is handed over, a lease that renewals could not
keep fresh (a frozen process) is proven first. `FENCED` or a refused token
means the claim is someone else's now: the handler is cancelled at once and
nothing is acknowledged or released afterwards; a subscription found gone
(404/410 on its URL) ends the claim the same way and has it put back at once.
A claim granted with nothing pending is handed back at once. A refreshed claim
token in an ack answer is carried from then on (and journaled, and redacted). A claim cancelled by a stop or
an abort runs a shielded, time-bounded finalizer that acknowledges what was
finished and releases the claim, so the next holder resumes exactly there.

A claim knows nothing of other claims: it gets a `ClaimContext` and ends with
a `ClaimResult`; deciding what follows is the dispatcher's job.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

import structlog
import trio
from pydantic import SecretStr

from .._config import Settings
from .._secrets import Redactor
from .._state.journal import Journal, Written
from .._tracing import OFF, Span, Tracing
from .._wire.protocol import Ack, AckAnswer, Claim, ReadResult, Wire, is_after
from .._wire.retrying import retrying
from ..errors import (
    AlreadyClaimed,
    ClientError,
    Fenced,
    InvalidOffset,
    NoPendingWork,
    SubscriptionNotFound,
    TokenInvalid,
)
from .delivery import Delivery
from .early_read import EarlyRead
from .outcome import SUCCEEDED, Outcome, Reports
from .recovery import ReplayPacing, replay_gaps

log = structlog.get_logger("pullwake.claims")

MIN_LEASE = 1.0


# The lease keeper renews after a third of the lease has gone by without an ack.
RENEW_FRACTION = 1 / 3


class Lease:
    """When the lease was last proven, and what follows from it, by the runner's own clock.

    A lease is only as fresh as the request that granted or renewed it: it is
    counted from when that request was *sent*, since the server may have started
    its clock at any moment after that. Time the process spent frozen (SIGSTOP, a
    suspended VM) counts too, because the monotonic clock keeps running, so a claim
    that slept past its lease is never treated as fresh.
    """

    def __init__(self, ttl: float, sent_at: float) -> None:
        self.ttl = ttl
        self.renewed_at = sent_at

    def renewed(self, sent_at: float) -> None:
        """A renewal sent at `sent_at` was accepted."""
        self.renewed_at = max(self.renewed_at, sent_at)

    @property
    def deadline(self) -> float:
        """When the lease runs out, at the latest, unless renewed."""
        return self.renewed_at + self.ttl

    @property
    def renew_at(self) -> float:
        """When the keeper renews it, unless an ack did meanwhile."""
        return self.renewed_at + self.ttl * RENEW_FRACTION

    def fresh(self, now: float) -> bool:
        """Is it safe to hand a batch to a handler now without proving the lease first?

        While the keeper keeps up, at least two thirds of the lease are always left. Less
        than that means renewals fell behind: the process may have been frozen, and the
        server may have given the subscription to someone else meanwhile.
        """
        return self.deadline - now >= self.ttl * (1 - RENEW_FRACTION)


class LeaseLost(Exception):
    """The claim is not ours anymore (fenced, token refused, or expired locally)."""


class SubscriptionGone(LeaseLost):
    """The server no longer has the subscription (deleted, or forgotten by its restart)."""


class ClaimAbandoned(Exception):
    """The claim cannot go on (a read kept failing, an ack was refused); hand it back."""


@dataclass(frozen=True)
class ClaimContext:
    """Everything a claim of one subscription needs from the runner."""

    wire: Wire
    settings: Settings
    vitals: Reports
    journal: Journal
    deliver: Delivery
    recreate: Callable[[str], Awaitable[bool]]
    """Put a subscription the server has forgotten back; True if it is there now."""
    redactor: Redactor
    """Knows the claim tokens held, so no log line or error text shows them."""
    replays: ReplayPacing = field(default_factory=ReplayPacing)
    """Paces gap replays that failed for now (one per subscription, for the runner's life)."""
    tracing: Tracing = OFF
    """The claim's `receive` span and its settlements' (runner._tracing); the batches' are the delivery's."""


@dataclass(frozen=True)
class ClaimResult:
    """How one claim ended."""

    outcome: Outcome | None
    """None: cancelled from outside (a stop or an abort), after its finalizer ran."""
    generation: int | None = None
    next_wake: bool = False
    """The server says more work is pending (claimed again at once if this claim made progress)."""
    restarted: bool = False
    """The subscription had to be created again: its generations start over, and what the
    server skipped is replayed by the next claim, at once."""
    cleanup_error: BaseException | None = None
    """The finalizer of a cancelled claim could not hand the claim back."""
    unanswered: bool = False
    """The claim, or a read of its events, got no usable answer (the server was unreachable or
    failing): it is tried again soon, not cooled down like a claim the server refused."""


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
class ClaimRun:
    """One claim attempt; what it is doing is readable while it runs (for `in_flight`)."""

    context: ClaimContext
    subscription: str
    woken_at: float | None = None
    """When the server wrote the wake that led here (Unix seconds), for the latency metric."""
    read_early: bool = True
    """Send the first read beside the claim if the journal can predict it (docs/design.md §5.5).
    The dispatcher asks for it only where the claim is likely granted with work pending."""
    claim: Claim | None = None
    stream: str | None = None
    batches_done: int = 0
    messages_read: int = 0
    replayed_to: dict[str, str] = field(default_factory=dict)
    result: ClaimResult | None = field(default=None, init=False)
    """Set however the claim ends, cancellation included."""

    async def run(self) -> ClaimResult:
        tracing = self.context.tracing
        with tracing.receive(self.subscription) as span:
            try:
                return await self._run()
            finally:
                if tracing.on:
                    self._traced(span)

    def _traced(self, span: Span) -> None:
        """What the receive span says of how the claim went (never its token)."""
        if self.claim is not None:
            span.set_attribute("pullwake.claim.generation", self.claim.generation)
            span.set_attribute("pullwake.wake_id", self.claim.wake_id)
            span.set_attribute("pullwake.claim.pending_streams", sum(s.has_pending for s in self.claim.streams))
        span.set_attribute("messaging.batch.message_count", self.messages_read)
        span.set_attribute("pullwake.claim.batches", self.batches_done)
        outcome = self.result.outcome if self.result is not None else None
        span.set_attribute("pullwake.claim.outcome", outcome.value if outcome is not None else "cancelled")
        if outcome in (Outcome.ERROR, Outcome.FENCED):
            self.context.tracing.failed(span, outcome.value)

    async def _run(self) -> ClaimResult:
        if self.context.journal.gaps(self.subscription):
            replayed = await replay_gaps(self)
            if replayed is not None:
                self.result = ClaimResult(replayed)
                return self.result
        early = EarlyRead.predicted(self.context.journal, self.subscription) if self.read_early else None
        if early is None:
            return await self._claim(None)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(early.fetch, self.context.wire)
            try:
                return await self._claim(early)
            finally:
                early.cancel()

    async def _claim(self, early: EarlyRead | None) -> ClaimResult:
        granted = await self._obtain()
        if early is not None and (isinstance(granted, ClaimResult) or not early.matches(granted[0])):
            early.cancel()
            early = None
        if isinstance(granted, ClaimResult):
            self.result = granted
            return granted
        claim, lease, journaled = granted
        self.claim = claim
        held = _Held(self, claim, lease, early, journaled)
        bound = structlog.contextvars.bound_contextvars(
            subscription=self.subscription, wake_id=claim.wake_id, generation=claim.generation
        )
        with bound, self.context.redactor.holding(claim.token):
            try:
                outcome, next_wake = await held.work()
            except Exception:
                log.exception("claim.crashed")
                await held.hand_back()
                outcome, next_wake = Outcome.ERROR, False
            except BaseException:
                # Cancellation arrives as Cancelled or as a group of them from the nursery inside.
                if trio.current_effective_deadline() == -math.inf:
                    self.result = await held.finalize_cancelled()
                raise
            finally:
                held.forget_refreshed_tokens()
        self.result = ClaimResult(outcome, claim.generation, next_wake, restarted=held.gone, unanswered=held.unanswered)
        return self.result

    async def _obtain(self) -> tuple[Claim, Lease, Written] | ClaimResult:
        """POST /claim, retrying transient failures; a result when there is nothing to hold."""
        context, subscription = self.context, self.subscription
        sent_at = trio.current_time()

        async def claim() -> Claim:
            nonlocal sent_at
            sent_at = trio.current_time()
            return await context.wire.claim(subscription, context.settings.runner_id)

        try:
            granted = await retrying(claim, what="claim", report=context.vitals.error)
        except AlreadyClaimed as exc:
            if exc.holder == context.settings.runner_id and not context.journal.holds(subscription):
                log.warning(
                    "claim.held_by_an_earlier_run",
                    subscription=subscription,
                    detail="an earlier run of this runner id holds it and left no journal to hand it back; "
                    "the server frees it when its lease runs out",
                )
            else:
                context.vitals.claim_race_lost()
                log.debug("claim.skipped", subscription=subscription, reason=exc.code)
            return ClaimResult(Outcome.SKIPPED)
        except NoPendingWork as exc:
            context.vitals.pending(subscription, 0)
            log.debug("claim.skipped", subscription=subscription, reason=exc.code)
            return ClaimResult(Outcome.SKIPPED)
        except SubscriptionNotFound:
            try:
                recreated = await context.recreate(subscription)
            except ClientError as exc:
                log.warning("subscription.ensure_failed", subscription=subscription, error=str(exc))
                return ClaimResult(Outcome.ERROR, restarted=True, unanswered=exc.retryable)
            if recreated:
                # Put back by this claim, or meanwhile by the connect: either way claim it again now.
                log.warning("subscription.was_missing", subscription=subscription, action="put back")
                return ClaimResult(Outcome.SKIPPED, restarted=True)
            log.error(
                "subscription.not_found",
                subscription=subscription,
                detail="the server has no such subscription, and this runner cannot put it back "
                "(manage = false, or one with this id exists with another configuration)",
            )
            return ClaimResult(Outcome.ERROR, restarted=True)
        except ClientError as exc:
            context.vitals.error(exc)
            log.warning("claim.failed", subscription=subscription, error=str(exc), retried_soon=exc.retryable)
            return ClaimResult(Outcome.ERROR, unanswered=exc.retryable)
        journaled = context.journal.claimed(granted)
        context.vitals.pending(subscription, sum(stream.has_pending for stream in granted.streams))
        # The protocol's shortest lease is 1 s: a shorter one would pace renewals into a spin.
        return granted, Lease(max(granted.lease_ttl_ms / 1000, MIN_LEASE), sent_at), journaled


class _Held:
    """A granted claim at work: the batch loop, the lease keeper, acks and the hand-back."""

    def __init__(
        self,
        run: ClaimRun,
        claim: Claim,
        lease: Lease,
        early: EarlyRead | None = None,
        journaled: Written | None = None,
    ) -> None:
        self.run = run
        self.journaled = journaled
        """The claim's journal record on disk: awaited before the first batch goes to the handler."""
        self.early = early
        self.claim = claim
        self.lease = lease
        self.context = run.context
        self.settings = run.context.settings
        self.vitals = run.context.vitals
        self.progress = Progress(claim)
        self.ack_lock = trio.Lock()
        self.lost: LeaseLost | None = None
        self.gone = False
        """The subscription was found gone: the dispatcher has it put back, and claims again, at once."""
        self.unanswered = False
        """The claim was abandoned because the server stopped answering: tried again soon, not cooled down."""
        self.dead_lettered = 0
        self.refreshed: list[SecretStr] = []
        """Claim tokens the server refreshed in ack answers, redacted while the claim is held."""

    async def work(self) -> tuple[Outcome, bool]:
        if not any(stream.has_pending for stream in self.claim.streams):
            # Granted with nothing pending (the reference server answers NO_PENDING_WORK instead,
            # others grant it): no batch, no lease to keep, just the release.
            log.debug("claim.skipped", reason="granted with nothing pending: handed back at once")
            await self.hand_back()
            return Outcome.SKIPPED, False
        log.info("claim.started", streams=[s.path for s in self.claim.streams if s.has_pending])
        outcome = Outcome.ERROR
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keep_lease, nursery.cancel_scope)
                try:
                    outcome = await self._process(nursery.cancel_scope)
                finally:
                    nursery.cancel_scope.cancel()
        except* ClaimAbandoned as group:
            abandoned = group.exceptions[0]
            log.warning("claim.abandoned", error=str(abandoned))
            self.vitals.error(abandoned)
            # A read the server never answered (down, restarting) says nothing about the work.
            self.unanswered = isinstance(cause := abandoned.__cause__, ClientError) and cause.retryable
            outcome = Outcome.ERROR
        if self.lost is not None:
            self._report_lost(self.lost)
            return Outcome.FENCED, False
        if outcome in SUCCEEDED:
            try:
                next_wake = await self._ack(done=True)
            except LeaseLost as exc:
                self._report_lost(exc)
                return Outcome.FENCED, False
            return outcome, next_wake
        await self.hand_back()
        return outcome, False

    async def _keep_lease(self, work: trio.CancelScope) -> None:
        while True:
            await trio.sleep_until(self.lease.renew_at)
            if trio.current_time() < self.lease.renew_at:
                continue  # a batch ack renewed it meanwhile
            try:
                await self._ack()
            except LeaseLost as exc:
                await self._lose(exc, work)

    def _report_lost(self, lost: LeaseLost) -> None:
        if isinstance(lost, SubscriptionGone):
            log.warning("claim.subscription_gone", reason=str(lost), action="put back")
        else:
            log.warning("claim.lease_lost", reason=str(lost))

    def _adopt(self, token: SecretStr | None) -> None:
        """Carry a refreshed claim token from now on: the next ack or release, and the journal."""
        if token is None or token.get_secret_value() == self.claim.token.get_secret_value():
            return
        self.context.redactor.add(token)  # before anything could show it
        self.refreshed.append(token)
        self.claim = replace(self.claim, token=token)
        self.run.claim = self.claim

    def forget_refreshed_tokens(self) -> None:
        for token in self.refreshed:
            self.context.redactor.forget(token)
        self.refreshed.clear()

    async def _lose(self, lost: LeaseLost, work: trio.CancelScope) -> None:
        """The claim is someone else's: stop the handler at once, and touch nothing more."""
        self.lost = lost
        work.cancel()
        await trio.lowlevel.checkpoint()  # raises Cancelled right here

    async def _process(self, work: trio.CancelScope) -> Outcome:
        pending = [stream for stream in self.claim.streams if stream.has_pending]
        for index, stream in enumerate(pending):
            self.run.stream = stream.path
            offset = stream.acked_offset
            if is_after(replayed := self.run.replayed_to.get(stream.path, offset), offset):
                offset = replayed  # the gap replay before this claim read on past the gap: handed over
                self.progress.finish(stream.path, offset)
            while is_after(stream.tail_offset, offset):
                result = await self._read(stream.path, offset)
                self.run.messages_read += len(result.messages)
                if not result.messages:
                    break
                if not is_after(result.next_offset, offset):
                    # Acking it would ack nothing (or -1), and reading again would loop on one batch.
                    raise ClaimAbandoned(f"reading {stream.path} from {offset} did not advance ({result.next_offset})")
                if not result.is_json:
                    log.warning(
                        "stream.not_json",
                        stream=stream.path,
                        content_type=result.content_type,
                        detail="handing the raw body to the handler as one bytes message",
                    )
                if self.journaled is not None:
                    # A crash from here on must find the claim in the journal, to hand it back at
                    # once. The first read overlapped the fsync; later batches do not wait.
                    journaled, self.journaled = self.journaled, None
                    await journaled.wait()
                if not self.lease.fresh(trio.current_time()):
                    # Renewals fell behind (a frozen process?): prove the lease before any handler runs.
                    try:
                        await self._ack()
                    except LeaseLost as exc:
                        await self._lose(exc, work)
                if self.run.woken_at is not None:
                    self.vitals.wake_latency(time.time() - self.run.woken_at)
                    self.run.woken_at = None
                try:
                    verdict = await self.context.deliver(
                        stream.path, offset, result, wake_id=self.claim.wake_id, generation=self.claim.generation
                    )
                except Fenced as exc:
                    await self._lose(LeaseLost(f"the handler was fenced: {exc}"), work)
                    raise  # not reached: _lose raises Cancelled

                if verdict is Outcome.FAILED:
                    return Outcome.FAILED
                if verdict is Outcome.DEAD_LETTERED:
                    self.dead_lettered += 1
                self.progress.finish(stream.path, result.next_offset)
                self.run.batches_done += 1
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
        if self.early is not None:
            early, self.early = await self.early.take(stream, offset), None
            if early is not None:
                return early
        try:
            return await retrying(
                lambda: self.context.wire.read(stream, offset), what=f"read {stream}", report=self.vitals.error
            )
        except ClientError as exc:
            raise ClaimAbandoned(f"reading {stream} from {offset} failed: {exc}") from exc

    async def _ack(self, *, done: bool = False) -> bool:
        """Acknowledge progress (renewing the lease); retried until the local lease deadline."""
        progress, wire = self.progress, self.context.wire
        async with self.ack_lock:
            claim = self.claim  # under the lock: with the newest token
            acks = progress.unacked()
            sent_at = trio.current_time()

            async def ack() -> AckAnswer:
                nonlocal sent_at
                sent_at = trio.current_time()
                return await wire.ack(claim, acks, done=done)

            try:
                with self.context.tracing.settle(claim.subscription, "ack", [a.stream for a in acks], done=done):
                    answer = await retrying(ack, what="ack", deadline=self.lease.deadline, report=self.vitals.error)
            except (Fenced, TokenInvalid, SubscriptionNotFound) as exc:
                self.vitals.lease_renewal("lost")
                self.context.journal.ended(claim.subscription, claim.wake_id)
                if isinstance(exc, SubscriptionNotFound):
                    self.gone = True
                    raise SubscriptionGone(str(exc)) from exc
                raise LeaseLost(str(exc)) from exc
            except InvalidOffset as exc:
                raise ClaimAbandoned(f"the server refused our acks: {exc}") from exc
            except ClientError as exc:
                self.vitals.lease_renewal("lost")
                raise LeaseLost(f"could not renew the lease before it ran out: {exc}") from exc
            self._adopt(answer.token)
            progress.acknowledged(acks)
            self.lease.renewed(sent_at)
            self.context.journal.acked(self.claim, acks)
            if done:
                self.context.journal.ended(claim.subscription, claim.wake_id)
                if not answer.next_wake:
                    self.vitals.pending(claim.subscription, 0)
            else:
                self.vitals.lease_renewal("ok")
            return answer.next_wake

    async def hand_back(self) -> ClientError | None:
        """Keep what was finished and let the next holder start right away.

        A refused ack does not stop the release: the next holder then starts from what was
        acknowledged before (the unacknowledged batch is delivered again, at least once).
        Problems are logged and returned, never raised: cleanup must not mask why we are here.
        """
        claim, progress, wire, journal = self.claim, self.progress, self.context.wire, self.context.journal
        error: ClientError | None = None
        try:
            if acks := progress.unacked():
                try:
                    with self.context.tracing.settle(claim.subscription, "ack", [a.stream for a in acks]):
                        answer = await wire.ack(claim, acks)
                except (Fenced, TokenInvalid, SubscriptionNotFound):
                    raise
                except ClientError as exc:
                    error = exc
                else:
                    self._adopt(answer.token)
                    progress.acknowledged(acks)
                    journal.acked(self.claim, acks)
            with self.context.tracing.settle(claim.subscription, "release"):
                await wire.release(self.claim)
        except SubscriptionNotFound as exc:
            self.gone = True
            log.warning("claim.subscription_gone", reason=str(exc), action="put back")
        except (Fenced, TokenInvalid) as exc:
            log.info("claim.already_gone", reason=str(exc))  # someone else holds it: nothing to hand back
        except ClientError as exc:
            error = error or exc
            self.vitals.error(f"handing back {claim.subscription}: {exc}")
            log.warning("claim.hand_back_failed", error=str(exc), unacked=[a.offset for a in progress.unacked()])
            return error
        journal.ended(claim.subscription, claim.wake_id)
        if error is not None:
            self.vitals.error(f"handing back {claim.subscription}: {error}")
            log.warning("claim.hand_back_partial", error=str(error), unacked=[a.offset for a in progress.unacked()])
        return error

    async def finalize_cancelled(self) -> ClaimResult:
        """The shielded, bounded cleanup of a claim cancelled by a stop or an abort."""
        generation = self.claim.generation
        if self.lost is not None:
            return ClaimResult(Outcome.FENCED, generation, restarted=self.gone)
        error: BaseException | None = None
        timeout = self.settings.finalizer_timeout
        with trio.move_on_after(timeout, shield=True) as bound:
            error = await self.hand_back()
        if bound.cancelled_caught:
            error = TimeoutError(f"handing back {self.run.subscription} took over {timeout:g} s")
            log.warning("claim.finalizer_timeout", seconds=timeout)
        return ClaimResult(None, generation, restarted=self.gone, cleanup_error=error)
