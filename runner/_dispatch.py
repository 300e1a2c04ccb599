"""The dispatcher (docs/design.md §5.1-5.3, §6.1): which wakes become claims, one worker per subscription at a time.

A WAKE for a served subscription starts a worker unless one is already in
flight; then the wake is remembered and the worker claims again when it ends
(single flight, coalesced). A wake whose generation was already handled is
skipped; a sweep (a wake of the runner's own, without a generation) always
counts. The work nursery belongs to the whole run, never to a lifecycle state:
losing the wake stream never interrupts a handler. Stopping drains: no new
work, in-flight claims get until the drain deadline, then they are cancelled
and their finalizers hand the claims back. A reload adds subscriptions and
retires others (`add`, `retire`): a retired one takes no new wake, and its claim
in flight runs to its end, as in a drain but without a deadline.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Literal, Protocol

import structlog
import trio

from ._claims.claim import ClaimContext, ClaimResult, ClaimRun
from ._claims.outcome import SUCCEEDED, Outcome
from ._claims.recovery import replay_gaps
from ._health import InFlightClaim, Vitals
from ._wire.retrying import Backoff
from .errors import ClientError

log = structlog.get_logger("pullwake.claims")


Turn = Literal["now", "while first"] | None
"""Whose the next claim is: this runner's ("now"), its only while it is first for the subscription
when the claim gets a slot (a sweep of its share, no server's wake in it: "while first"), or a
peer's (None)."""


@dataclass(frozen=True)
class Wake:
    """A reason to claim a subscription."""

    subscription: str
    stream: str | None = None
    generation: int | None = None
    """The server's generation of the wake; None for a wake of the runner's own (a sweep),
    which is always worth a claim."""
    ts_ms: int | None = None
    """Server time the wake was written (ms since the epoch), for latency."""


class Peers(Protocol):
    """The other runners of this wake stream, as far as the dispatcher needs them (`runner._fleet`)."""

    def rank(self, subscription: str) -> int:
        """0 if this runner is first for `subscription` (or alone)."""
        ...

    async def may_claim(self, subscription: str, generation: int | None) -> bool:
        """Wait for this runner's turn to claim this wake (None: a sweep); False if it is left to a peer."""
        ...

    def leave(self, subscription: str, generation: int, on_due: Callable[[], None]) -> bool:
        """Leave a wake to the peers first in line, without a task: `on_due` when this runner's turn
        comes with nobody having taken it. False: this runner sees to it (`may_claim`)."""
        ...

    def take(self, subscription: str, generation: int) -> None:
        """Say this runner claims this wake (its turn came)."""
        ...

    def reconnected(self) -> None:
        """The wake stream connected again (not the run's first connection)."""
        ...


class Slots:
    """The claim slots (`max_concurrent_claims`): first come, first served, except that a claim
    the server asked for (a wake) goes before the sweeps waiting for a slot.

    After a server restart every subscription is swept at once; new events must not queue
    behind hundreds of claims that will mostly find nothing (the sweeps).
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self._used = 0
        self._waiting: dict[object, trio.Event] = {}
        """Sweeps waiting for a slot, in order of arrival."""
        self._urgent: dict[object, trio.Event] = {}
        """Claims the server asked for, waiting for a slot, in order of arrival: served first."""

    @property
    def used(self) -> int:
        return self._used

    async def acquire(self, owner: object, *, urgent: bool) -> None:
        if self._used < self.total and not self._waiting and not self._urgent:
            self._used += 1
            await trio.lowlevel.checkpoint()
            return
        granted = trio.Event()
        (self._urgent if urgent else self._waiting)[owner] = granted
        try:
            await granted.wait()
        except BaseException:
            if granted.is_set():
                self.release()  # handed a slot as it was cancelled: pass it on
            else:
                self._waiting.pop(owner, None)
                self._urgent.pop(owner, None)
            raise

    def hurry(self, owner: object) -> None:
        """`owner` waits for a slot as a sweep, but the server has asked for it meanwhile."""
        if (granted := self._waiting.pop(owner, None)) is not None:
            self._urgent[owner] = granted

    def release(self) -> None:
        queue = self._urgent or self._waiting
        if queue:
            owner = next(iter(queue))
            queue.pop(owner).set()  # the slot passes straight on: `used` stays
        else:
            self._used -= 1


# Subscriptions created or confirmed at the same time: a start costs M requests, not M round trips.
CONFIRMING_AT_ONCE = 16

# Claims that show the subscription exists and is seen to (granted, or nothing/somebody else's).
COVERS = SUCCEEDED | {Outcome.SKIPPED}

# Outcomes after which a subscription rests for `cooldown` before it is claimed again.
COOLS_DOWN = frozenset({Outcome.FAILED, Outcome.ERROR, Outcome.ABORTED})


@dataclass(eq=False)
class Worker:
    """The handle of one subscription's worker: registered before its first claim starts."""

    subscription: str
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    waiting: trio.CancelScope = field(default_factory=trio.CancelScope)
    """Covers only the wait for a cooldown or a free slot: a drain cancels just that."""
    started_at: float = field(default_factory=time.time)
    run: ClaimRun | None = None
    reason: Outcome | None = None
    """Why the worker was cancelled from outside: INTERRUPTED (stop) or ABORTED."""
    rest: float | None = None
    """How long the subscription rests after this worker ends, if not the `cooldown` setting."""

    def cancel(self, reason: Outcome, *, rest: float | None = None) -> None:
        if self.reason is None:
            self.reason, self.rest = reason, rest
        self.scope.cancel()

    def describe(self) -> InFlightClaim:
        run = self.run
        claim = run.claim if run is not None else None
        return InFlightClaim(
            subscription=self.subscription,
            wake_id=claim.wake_id if claim else None,
            generation=claim.generation if claim else None,
            started_at=self.started_at,
            stream=run.stream if run is not None else None,
            batches_done=run.batches_done if run is not None else 0,
        )


@dataclass
class _Subscription:
    """What the dispatcher knows about one served subscription."""

    id: str
    context: ClaimContext
    handled: int = -1
    """The newest generation handled since the last (re)connect; generations start over with the server."""
    turn_came: int = -1
    """The newest generation left to a peer whose turn came to this runner (nobody took it):
    claimed without asking the fleet again. Starts over with the generations."""
    cooldown_until: float = 0.0
    woken_at: float | None = None
    announced: bool = False
    """The next claim answers the server's word that work is pending (its wake, or `next_wake`),
    not a sweep of the runner's own, which finds nothing pending more often than not."""
    urgent: bool = False
    """The next claim claims again what a put-back cut short where the server had asked for a claim
    (a wake): it goes before the sweeps waiting for a slot, like the wake's claim did. After a
    restart, the M sweeps of the new connection queue for the slots; a subscription with new
    events must not go to the back of that queue because its first claim found it forgotten."""
    won_last: bool = False
    """This runner's last claim of it was granted and done. Where several runners share the
    subscription and another won the last one, a read sent beside the claim is likely wasted."""
    retry: Backoff | None = None
    """Paces claims that got no answer (the server down or failing): soon, then less often."""
    put_back_in_a_row: int = 0
    """Claims in a row that found the subscription gone: a server that forgets it again at once
    (one shutting down still answers, without its subscriptions) must not drive a claim loop."""
    pacing: Literal["no answer", "put-backs"] | None = None
    """Why the cooldown paces claims, where it is not the server's verdict on this subscription.
    "no answer" (the server down): it ends once the server is heard again (a new connection, a
    wake). "put-backs" in a row (`put_back_in_a_row`): only a new connection ends it, and the
    row. A server shutting down forgets what it was just given back; the one started after it
    forgot it once more, which is no reason to make that subscription's events wait."""
    heard: trio.Event = field(default_factory=trio.Event)
    """Set when the pacing ends before the cooldown does."""
    confirmed: bool = False
    """Created or confirmed on the server in this run (before its first claim here, if it is
    this runner's to look after)."""
    worker: Worker | None = None
    asked: Wake | None = None
    """The wake the worker's next claim answers; None when it goes on by itself (`next_wake`)."""
    again: Wake | None = None
    """A wake that arrived while the worker was busy: claim again when it ends."""
    stood_for: int | None = None
    """The newest generation of a server's wake that the sweep in `again` (then `asked`) stands for
    too (`remember`): where a peer is first for the subscription by the time it is claimed, the
    sweep is that peer's, and this wake still gets its turn (a frozen or busy first in line would
    leave it to the periodic sweep)."""

    def asked_again(self) -> bool:
        """Has the server written a wake for it since its worker's claim began?"""
        return self.again is not None and self.again.generation is not None

    def reconnected(self) -> None:
        """A new connection: the server may have restarted since the put-backs counted so far."""
        self.put_back_in_a_row = 0
        self.stood_for = None  # generations start over; the connection's sweep claims what is pending
        if self.pacing is not None:
            self._pacing_ends()

    def server_heard(self) -> None:
        """The server answers again: a wait that only paced claims without an answer ends now."""
        if self.pacing == "no answer":
            self._pacing_ends()

    def _pacing_ends(self) -> None:
        self.pacing = None
        self.cooldown_until = min(self.cooldown_until, trio.current_time())
        self.heard.set()
        self.heard = trio.Event()

    def worth_claiming(self, wake: Wake) -> bool:
        return wake.generation is None or wake.generation > self.handled

    def remember(self, wake: Wake) -> None:
        """Coalesce wakes that arrive while busy: a sweep counts for all (and stands for the server's
        wakes it took in: `stood_for`), else the newest generation."""
        earlier = self.again
        if (
            earlier is None
            or wake.generation is None
            or (earlier.generation is not None and wake.generation > earlier.generation)
        ):
            self.again = wake
        kept = self.again
        taken_in = [each.generation for each in (earlier, wake) if each is not None and each.generation is not None]
        if kept is not None and kept.generation is None and taken_in:
            self.stood_for = max(taken_in if self.stood_for is None else [*taken_in, self.stood_for])

    def take_again(self) -> bool:
        """Is a remembered wake newer than what has been handled since?"""
        again, self.again = self.again, None
        if again is None or not self.worth_claiming(again):
            return False
        self.announced = again.generation is not None
        self.asked = again
        return True


class Dispatcher:
    """Decides which wakes become claims, and runs them in the work nursery."""

    def __init__(
        self,
        contexts: Mapping[str, ClaimContext],
        vitals: Vitals,
        nursery: trio.Nursery,
        *,
        max_concurrent: int,
        peers: Peers | None = None,
        confirm: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        """`confirm`: create or confirm a subscription on the server (`SubscriptionKeeper.confirm`), done
        before a subscription's first claim of the run if it is this runner's to look after."""
        self._subscriptions = {
            subscription: _Subscription(subscription, context) for subscription, context in contexts.items()
        }
        self._vitals = vitals
        self._nursery = nursery
        self._slots = Slots(max_concurrent)
        self._replaying = trio.CapacityLimiter(max_concurrent)
        self._confirming = trio.CapacityLimiter(CONFIRMING_AT_ONCE)
        self._learning = trio.CapacityLimiter(CONFIRMING_AT_ONCE)
        self._idle = trio.Event()
        self._idle.set()
        self._closed = False
        self._peers = peers
        self._confirm_one = confirm
        self._retiring: dict[str, tuple[_Subscription, trio.Event]] = {}
        """Retired subscriptions whose claim is still in flight, and what is set when it ends."""
        self._running: set[Worker] = set()
        """Every subscription's worker, served or retiring: counted at every wake, never by a walk over them all."""
        self._owned = set(self._subscriptions)
        """The subscriptions this runner sweeps: all of them, until its peers say otherwise."""
        self.covered: set[str] = set()
        """Subscriptions claimed with the server's answer since the wake stream last connected:
        they exist, and every wake of them since is followed here (told to a member that joins)."""
        self._connections = 0
        self.cleanup_errors: list[BaseException] = []
        """Finalizers of cancelled claims that could not hand their claim back."""

    # -- what the runner asks for ----------------------------------------------------------

    @property
    def served(self) -> list[str]:
        return sorted(self._subscriptions)

    def serves(self, subscription: str) -> bool:
        return subscription in self._subscriptions

    def _workers(self) -> list[Worker]:
        return list(self._running)

    def _serving(self, sub: _Subscription) -> bool:
        """May `sub` start another claim? Not once the runner drains, nor once a reload retired it."""
        return not self._closed and self._subscriptions.get(sub.id) is sub

    def in_flight(self) -> list[InFlightClaim]:
        """What each claim is doing, by subscription (a steady order for health pages and tests)."""
        return [worker.describe() for worker in sorted(self._workers(), key=lambda worker: worker.subscription)]

    def wake(self, wake: Wake) -> None:
        """The CLAIM effect: never blocks, never raises."""
        sub = self._subscriptions.get(wake.subscription)
        if sub is None:
            log.info("wake.not_served", subscription=wake.subscription, detail="no handler here for it")
            return
        if sub.worker is None and not sub.worth_claiming(wake):
            log.debug("wake.already_handled", subscription=wake.subscription, generation=wake.generation)
            return
        if sub.worker is None and self._left_to_peers(sub, wake):
            return
        if wake.ts_ms is not None:
            sub.woken_at = wake.ts_ms / 1000  # only a wake that leads to a claim times it
        if sub.worker is not None:
            sub.remember(wake)
            if wake.generation is not None:
                sub.server_heard()
                self._slots.hurry(sub.worker)
        else:
            sub.announced = wake.generation is not None
            sub.asked = wake
            self._start(sub)

    def _left_to_peers(self, sub: _Subscription, wake: Wake) -> bool:
        """A wake a peer is first in line for waits without a worker (most wakes, with many peers)."""
        if self._peers is None or wake.generation is None or self._closed or sub.context.journal.gaps(sub.id):
            return False  # a gap is replayed by whoever holds it, first in line or not
        return self._peers.leave(sub.id, wake.generation, partial(self._turn_came, sub, wake))

    def _turn_came(self, sub: _Subscription, wake: Wake) -> None:
        """Nobody took a wake left to the peers before this runner in line: claim it now."""
        assert wake.generation is not None
        if not self._serving(sub) or sub.handled >= wake.generation:
            return
        sub.turn_came = max(sub.turn_came, wake.generation)
        if wake.ts_ms is not None:
            sub.woken_at = wake.ts_ms / 1000
        if sub.worker is not None:
            sub.remember(wake)
        else:
            sub.announced, sub.asked = True, wake
            self._start(sub)

    def resync(self) -> None:
        """The RESYNC effect of a new connection: the server may have restarted since the last.

        Its generations started over, so which were handled is forgotten: a wake that was
        already handled costs one skipped claim at worst, a forgotten restart would cost a
        missed one. And every served subscription is claimed once (a sweep): work that
        became pending while the runner was away, or whose wake it could not trust, is
        not left waiting; what a forgotten subscription skipped is replayed first.
        """
        for sub in self._subscriptions.values():
            sub.handled = sub.turn_came = -1
            sub.reconnected()
        self.covered.clear()
        self._connections += 1
        if self._peers is not None and self._connections > 1:
            self._peers.reconnected()
        self.sweep()

    def sweep(self, subscriptions: list[str] | None = None) -> None:
        """Claim each of `subscriptions` (default: all served) once, whatever the wakes said."""
        for subscription in self.served if subscriptions is None else subscriptions:
            self.wake(Wake(subscription))

    def reshare(self) -> None:
        """The fleet changed: sweep the subscriptions that became this runner's own."""
        if self._peers is None:
            return
        owned = {sub for sub in self._subscriptions if self._peers.rank(sub) == 0}
        self.sweep(sorted(owned - self._owned))
        self._owned = owned

    def add(self, subscription: str, context: ClaimContext) -> None:
        """Serve `subscription` (a reload added it), and sweep it; a served one gets `context` from its next claim.

        One still retiring is served again as it is: its claim in flight stays the only one.
        """
        sub = self._subscriptions.get(subscription)
        if sub is None:
            if subscription in self._retiring:
                sub, retired = self._retiring.pop(subscription)
                retired.set()  # whoever waits for it finds it served again (`serves`)
            else:
                sub = _Subscription(subscription, context)
            self._subscriptions[subscription] = sub
        sub.context = context
        sub.confirmed = True  # the reload created or confirmed it; if it could not, the claim puts it back
        if self._peers is None or self._peers.rank(subscription) == 0:
            self._owned.add(subscription)
        if not self._closed:
            self.sweep([subscription])

    def retire(self, subscription: str) -> trio.Event:
        """Serve `subscription` no more; the event is set once its claim in flight (if any) has ended.

        The claim is not cut: it acks what it finishes and hands the claim back (done), as
        it would at the end of any claim. Only a wait for its turn (a cooldown, a free slot,
        a peer) is cancelled: no claim was made yet, so none is left behind.
        """
        ended = trio.Event()
        sub = self._subscriptions.pop(subscription, None)
        self._owned.discard(subscription)
        self.covered.discard(subscription)
        if sub is None or sub.worker is None:
            ended.set()
            return ended
        sub.again = None
        sub.worker.waiting.cancel()
        self._retiring[subscription] = (sub, ended)
        return ended

    def abort(self, subscription: str, *, cooldown: float | None = None) -> bool:
        """Abort the subscription's in-flight claim, if any; it then rests for `cooldown`."""
        sub = self._subscriptions.get(subscription)
        if sub is None and subscription in self._retiring:
            sub = self._retiring[subscription][0]
        if sub is None or sub.worker is None:
            return False
        rest = cooldown if cooldown is not None else sub.context.settings.cooldown
        log.warning("claim.abort_requested", subscription=subscription, cooldown=rest)
        sub.worker.cancel(Outcome.ABORTED, rest=rest)
        return True

    def cooldowns(self) -> dict[str, float]:
        """Subscriptions resting after a failure or an abort, and until when (Unix seconds)."""
        now = trio.current_time()
        return {
            sub.id: time.time() + sub.cooldown_until - now
            for sub in self._subscriptions.values()
            if sub.cooldown_until > now
        }

    def interrupt_all(self) -> None:
        for worker in self._workers():
            worker.cancel(Outcome.INTERRUPTED)

    async def drain(self, timeout: float) -> None:
        """Take no new work; let in-flight claims finish for up to `timeout`, then interrupt the rest."""
        self._closed = True
        for sub in self._subscriptions.values():
            sub.again = None
            if sub.worker is not None:
                sub.worker.waiting.cancel()
        with trio.move_on_after(timeout):
            await self._idle.wait()
        if busy := self._workers():
            log.warning("drain.deadline", interrupting=sorted(worker.subscription for worker in busy))
            self.interrupt_all()
        # Every finalizer is shielded but bounded, so this wait is bounded too.
        await self._idle.wait()

    # -- workers ---------------------------------------------------------------------------

    def _start(self, sub: _Subscription) -> None:
        worker = Worker(sub.id)
        sub.worker = worker
        self._running.add(worker)
        if self._idle.is_set():
            self._idle = trio.Event()
        self._vitals.dispatched()
        self._vitals.in_flight(len(self._running))
        self._nursery.start_soon(self._serve, sub, worker, name=f"claim:{worker.subscription}")

    async def _serve(self, sub: _Subscription, worker: Worker) -> None:
        booked = False
        try:
            with worker.scope:
                while self._serving(sub):
                    our_turn: Turn = None
                    with worker.waiting:
                        if sub.cooldown_until > trio.current_time():
                            with trio.move_on_at(sub.cooldown_until):
                                await sub.heard.wait()
                        our_turn = await self._our_turn(sub)
                        if our_turn and not sub.confirmed:
                            await self._confirm(sub)
                    if worker.waiting.cancelled_caught:
                        break
                    if not our_turn and not sub.context.journal.gaps(sub.id):
                        self._learn_links(sub)
                        if sub.take_again():
                            worker.waiting = trio.CancelScope()
                            continue
                        break
                    run = ClaimRun(
                        sub.context, sub.id, woken_at=sub.woken_at, read_early=sub.announced and sub.won_last
                    )
                    sub.woken_at, worker.run = None, run
                    try:
                        result = await self._replay_then_claim(sub, worker, run, turn=our_turn)
                    finally:
                        self._ended(sub, worker, run.result)
                        booked = True
                    worker.waiting, worker.run = trio.CancelScope(), None
                    if result is None:
                        # Replayed only (a peer claims), or the drain began while it waited for a slot.
                        if sub.take_again():
                            booked = False
                            continue
                        break
                    # `next_wake` only counts after a claim that handed something over: a server
                    # that keeps saying "more" without giving any cannot drive a claim loop.
                    if not self._serving(sub) or not (sub.take_again() or (result.next_wake and run.batches_done)):
                        break
                    if result.next_wake:
                        sub.announced, sub.asked = True, None
                    booked = False
            if worker.scope.cancelled_caught and not booked:
                self._ended(sub, worker, None)  # aborted or interrupted while waiting for its turn
        finally:
            # Only remove the handle this worker registered: a new worker may own the slot now.
            if sub.worker is worker:
                sub.worker = None
            self._running.discard(worker)
            # A wake that came in while this worker was winding down (an abort's finalizer,
            # say) must not be forgotten: the server writes one wake and then waits for a claim.
            if self._serving(sub) and sub.worker is None and sub.take_again():
                self._start(sub)
            elif sub.worker is None and sub.id in self._retiring and self._retiring[sub.id][0] is sub:
                self._retiring.pop(sub.id)[1].set()
            self._vitals.in_flight(len(self._running))
            if not self._running:
                self._idle.set()

    async def _replay_then_claim(
        self, sub: _Subscription, worker: Worker, run: ClaimRun, *, turn: Turn
    ) -> ClaimResult | None:
        """The subscription's gaps (if any), then the claim in a slot if it is this runner's `turn`;
        None when no claim was made (not its turn, or the drain came first, or a runner that joined
        while a sweep ("while first") waited for its slot is first for it now).

        Replays take no claim slot: they have a lane of their own, as wide, so new events on
        other subscriptions never queue behind the replays a server restart leaves (the
        subscription's own new events come after its gap, in order). And whoever holds a gap
        replays it, first in line or not: it is the only runner that knows of those events.
        """
        if sub.context.journal.gaps(sub.id):
            async with self._replaying:
                if (ended := await replay_gaps(run)) is not None:
                    run.result = ClaimResult(ended)
                    return run.result
        if turn is None:
            return None
        worker.waiting = trio.CancelScope()  # a drain cancels the wait for a slot, never a replay
        if self._closed:
            return None
        with worker.waiting:
            await self._slots.acquire(worker, urgent=sub.announced or sub.urgent or sub.asked_again())
        sub.urgent = False
        if worker.waiting.cancelled_caught:
            return None
        try:
            if turn == "while first" and self._peers is not None and self._peers.rank(sub.id) != 0:
                # A start's sweep of all M waits for slots for seconds, while the fleet's other runners
                # join: what became a newcomer's share is its sweep's (it swept what we had not
                # claimed when we answered its hello), not claimed twice.
                return None
            return await run.run()
        finally:
            self._slots.release()

    def _learn_links(self, sub: _Subscription) -> None:
        """The sweep left `sub` to the member that vouched for it (`covered`): if this runner is first
        for it and has not confirmed it, confirm it all the same, off the claim's path.

        That member's answer told this runner only what it acknowledged or linked lately; a runner
        that puts back, after a server restart, a subscription it never knew finds no gap, and the
        events appended before the put-back are lost. These confirmations have a lane of their own
        (`_learning`): a wake's claim never waits behind a joining runner's M/N of them.
        """
        if not sub.confirmed and self._peers is not None and self._peers.rank(sub.id) == 0:
            self._nursery.start_soon(self._confirm, sub, self._learning, name=f"confirm:{sub.id}")

    async def _confirm(self, sub: _Subscription, lane: trio.CapacityLimiter | None = None) -> None:
        """Create or confirm the subscription on the server before its first claim of the run, if it is
        this runner's to look after (with a fleet: its share).

        Those the runner knows (its journal saw them linked on this server) are confirmed here, not
        before the wake stream is followed: a restart follows at once, and each subscription is
        confirmed just before its sweep claims it (a wake claimed meanwhile is not held up by the
        others' confirmations); one the server forgot is put back with its gap (docs/design.md §4.2).
        A confirmation done already in this run (new subscriptions, before following) is not
        repeated. A failure is no reason to wait: the claim puts back a subscription the server
        does not have, and the next claim confirms again.
        """
        if self._confirm_one is None or (self._peers is not None and self._peers.rank(sub.id) != 0):
            return
        async with lane or self._confirming:
            try:
                await self._confirm_one(sub.id)
            except ClientError as exc:
                log.info("subscription.confirm_failed", subscription=sub.id, error=str(exc))
                return
        sub.confirmed = True

    async def _our_turn(self, sub: _Subscription) -> Turn:
        """Is the next claim this runner's to make (now), or left to a peer (None)?"""
        asked, sub.asked = sub.asked, None
        stood_for, sub.stood_for = sub.stood_for, None
        if self._peers is None or asked is None:
            return "now"
        generation = asked.generation
        if generation is None:
            if await self._peers.may_claim(sub.id, None):
                return "while first" if stood_for is None else "now"
            if stood_for is None or stood_for <= sub.handled:
                return None
            generation = stood_for  # a peer is first now: the server's wake the sweep stood for gets its turn
        if generation <= sub.turn_came:
            self._peers.take(sub.id, generation)
            return "now"
        return "now" if await self._peers.may_claim(sub.id, generation) else None

    def _ended(self, sub: _Subscription, worker: Worker, result: ClaimResult | None) -> None:
        """Book a claim's end, however it ended.

        No result: cancelled before the server's answer, or while waiting for its turn;
        booked only when cancelled on purpose (an abort rests the subscription as asked).
        """
        if result is None:
            if worker.reason is None:
                return
            result = ClaimResult(None)
        sub.urgent = result.restarted and (sub.announced or sub.asked_again())
        if result.restarted:
            sub.handled = -1
            sub.remember(Wake(sub.id))  # replay what the server skipped now, not at the next wake
            sub.put_back_in_a_row += 1
        else:
            sub.put_back_in_a_row = 0
        if result.cleanup_error is not None:
            self.cleanup_errors.append(result.cleanup_error)
        outcome = result.outcome or worker.reason or Outcome.INTERRUPTED
        sub.won_last = outcome in SUCCEEDED
        if result.outcome in COVERS and not (result.unanswered or result.restarted):
            self.covered.add(sub.id)
        sub.pacing = None
        if result.unanswered or sub.put_back_in_a_row > 1:
            # Not the server's verdict on this subscription: its work must not wait out a cooldown.
            # The first put-back is claimed again at once; a second in a row is paced like no answer.
            settings = sub.context.settings
            sub.retry = sub.retry or Backoff(
                settings.backoff_initial, max(settings.backoff_max, settings.backoff_initial)
            )
            sub.cooldown_until = trio.current_time() + sub.retry.next_delay()
            sub.pacing = "put-backs" if sub.put_back_in_a_row > 1 else "no answer"
            sub.remember(Wake(sub.id))
        elif result.outcome is not None:
            sub.retry = None
        if outcome in SUCCEEDED and result.generation is not None:
            sub.handled = max(sub.handled, result.generation)
        if outcome in COOLS_DOWN and not result.unanswered:
            rest = worker.rest if worker.rest is not None else sub.context.settings.cooldown
            sub.cooldown_until = trio.current_time() + rest
        self._vitals.claim_ended(outcome)
        level = "warning" if outcome in (Outcome.FAILED, Outcome.FENCED, Outcome.ERROR) else "info"
        getattr(log, level)("claim.outcome", outcome=outcome.value, subscription=sub.id, generation=result.generation)
