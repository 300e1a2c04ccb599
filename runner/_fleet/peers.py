"""One claimant per wake, and a fleet-wide memory, through a stream on the server (docs/design.md §5.9).

Every runner of a wake stream appends to the same *fleet stream* (a stream on the same
server that no subscription matches) and follows it:

- `alive` every `interval`, and at once when a runner says `hello` (it just joined), so
  every runner knows the live members; one not heard of for three intervals is gone;
- `taking`: this runner claims this wake of this subscription now;
- `acked`: the offsets this runner had acknowledged lately, so whichever runner puts back a
  subscription the server forgot replays its gap from the newest offset anyone knew
  (streams survive a server restart, subscriptions on the reference server do not);
- `leaving`, on the way out, so the others take over at once.

For each subscription the members agree on an order (`ring.ranked`). A wake is claimed at
once by the first; the n-th claims only if nobody said `taking` within n times `fallback`
seconds. So a dead, frozen or busy runner costs that delay, never lost work: the server's
lease and fencing still decide who works. Most wakes a runner hears are a peer's: such a
wake is only an entry in a heap here (`leave`), no task, until its turn comes. The stream is
followed over SSE (long-polls if the wake stream is, or if SSE is refused), each small read
lingering a tenth of `fallback` so that the records of a busy fleet are read several at a time.
A sweep (the runner's own claim of everything) covers only this runner's share. A runner
alone sends nothing on the path of a wake.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Collection, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import structlog
import trio

from .._state.journal import Journal
from .._wake.reading import Tally, paced_long_polls
from .._wire.protocol import LiveRead, Wire, is_after
from .._wire.retrying import Backoff, next_attempt
from ..errors import (
    ClientError,
    ImmediateClose,
    SSERefused,
    StreamNotFound,
    StreamSilent,
    TransportError,
    Unreachable,
)
from .ring import first, ranked

log = structlog.get_logger("pullwake.fleet")

# A member not heard of for this many announcement intervals is gone.
MISSED_INTERVALS = 3
# After its `hello`, a runner waits for the members to answer before it trusts what it knows: a
# few round trips (as long as the hello took), at least JOIN_FLOOR, at most JOIN_WINDOW seconds.
JOIN_FLOOR = 0.1
JOIN_WINDOW = 0.5
# A member answers each runner's `hello` at most this often (a runner with a fixed id restarting in a
# loop cannot flood the stream), and every runner's: one limit for all hellos left a runner that
# joined within a second of another blind to that member for an interval, and it took its share.
ANSWER_EVERY = 1.0
# An answer says where at most this many streams of the joining runner's share were linked (about
# 150 KB with short paths): a record stays far below what a server takes in one append (and a
# reader's event bound); the joining runner confirms the rest to learn it.
ANSWER_OFFSETS = 2_000
# Bound on one announcement: a slow server must not hold up leaving or the next beat.
APPEND_TIMEOUT = 2.0
# Bound on opening the live read of the fleet stream (SSE: until the answer's headers are in).
OPEN_TIMEOUT = 10.0
# Each small read of the fleet stream over SSE waits this long before the next (at most a tenth of
# `fallback`): records that came meanwhile are taken in one read, not one wake-up each. Every runner
# hears every `taking`, so at 40 wakes/s this is what a runner's share of them costs, less the reads.
LINGER = 0.1
# A live read that brought nothing for this many intervals, not even this runner's own `alive`
# (nor a server's keep-alive), is dead (a half-open connection): another one is opened.
SILENT_INTERVALS = 2
# A live read that ended by itself sooner than this counts as an error: a server or proxy that
# closes at once cannot drive a reconnect loop (the backoff paces it).
MIN_USEFUL_READ = 1.0


@dataclass
class _Turn:
    """A wake this runner left to the peers before it in line, until its own turn comes."""

    generation: int
    due: float
    """Trio time: rank x fallback after the wake came."""
    on_due: Callable[[], None]


class Fleet:
    """This runner's view of its fleet: who is alive, who takes which wake, what was acknowledged."""

    def __init__(
        self,
        wire: Wire,
        path: str,
        runner_id: str,
        *,
        interval: float,
        fallback: float,
        hold: float,
        backoff: Backoff,
        tally: Tally,
        journal: Journal | None = None,
        on_change: Callable[[], None] = lambda: None,
        live_mode: str = "sse",
        covered: Callable[[], Collection[str]] = frozenset,
    ) -> None:
        """`covered`: the subscriptions this runner claimed (with an answer) since its wake stream
        last connected (`Dispatcher.covered`); a member that joins hears them in the answer to its
        `hello` and neither creates nor sweeps them at its start (`owns`, `may_claim`); it confirms
        those it does not know, to learn where they were linked (`Dispatcher._learn_links`)."""
        self._wire = wire
        self.path = path
        self.runner_id = runner_id
        self.interval = interval
        self.fallback = fallback
        self._hold = hold
        self._backoff = backoff
        self._tally = tally
        self._journal = journal
        self._on_change = on_change
        self._live_mode = live_mode
        self._linger = min(LINGER, fallback / 10)
        """How the fleet stream is followed: SSE (one connection, records pushed as they come), or
        long-polls (one request per answer: with every runner hearing every `taking`, that is a
        round trip per wake per runner, the bulk of what an extra runner cost before SSE)."""
        self._offset: str | None = None
        """Where the read of the fleet stream goes on from; None until this runner said hello."""
        self._seen: dict[str, float] = {}
        """Peer id -> when it was last heard of (trio time)."""
        self._members: frozenset[str] = frozenset()
        self._taken: dict[str, int] = {}
        """Subscription -> the newest wake generation a peer said it takes."""
        self._news = trio.Event()
        self._turns: dict[str, _Turn] = {}
        """Subscription -> the wake left to a peer, while nobody said `taking` for it (`leave`)."""
        self._due: list[tuple[float, str]] = []
        """Heap of (due, subscription) of `_turns`; stale entries are skipped when popped."""
        self._timer: trio.CancelScope | None = None
        """The sleep until the earliest turn, while there is one."""
        self._joined = trio.Event()
        self._answered: dict[str, float] = {}
        """Peer -> when its `hello` was last answered (within `ANSWER_EVERY`)."""
        self._covered = covered
        self._vouched: dict[str, str] = {}
        """Subscription -> the peer that vouched for it in its answer to our `hello`: it claimed it
        since its wake stream connected and follows it since, so our first sweep need not."""
        self._nursery: trio.Nursery | None = None
        self._blind_since: float | None = None
        """Since when the server cannot be reached (it is down): the members are not heard, but
        are not gone either. Their silence does not count until the fleet stream is back."""

    # -- what the dispatcher asks ---------------------------------------------------------

    def peers(self) -> frozenset[str]:
        """The other members alive now (as of when the server went out of reach, while it is)."""
        now = trio.current_time() if self._blind_since is None else self._blind_since
        horizon = now - MISSED_INTERVALS * self.interval
        return frozenset(peer for peer, seen in self._seen.items() if seen >= horizon)

    def rank(self, subscription: str) -> int:
        """0 if this runner is first for `subscription` (or alone), else how many come before it."""
        peers = self.peers()
        if not peers:
            return 0
        return ranked(subscription, [self.runner_id, *peers]).index(self.runner_id)

    async def owns(self, subscription: str) -> bool:
        """Is `subscription`, which this runner never saw on this server, its to create or confirm
        before following its wake stream?

        Waits for the join window (at most `JOIN_WINDOW` and two lingers; not at all for the first
        runner ever, which created the fleet stream): a runner that heard no peers yet would take
        all M. Only subscriptions the journal does not know get here, so a restart with its state
        directory never waits. Asked once per subscription as its turn to be confirmed comes, so
        a member heard meanwhile narrows the share. One a peer vouched for (`covered`) exists and
        is followed: not this runner's to confirm. A member that leaves or falls silent hands its
        share over (`Dispatcher.reshare`), whose claims create what nobody did.
        """
        await self._joined.wait()
        return self.rank(subscription) == 0 and not self.vouched(subscription)

    def vouched(self, subscription: str) -> bool:
        """Did a member that is still alive vouch for `subscription` when this runner joined?"""
        peer = self._vouched.get(subscription)
        return peer is not None and peer in self.peers()

    async def may_claim(self, subscription: str, generation: int | None) -> bool:
        """Should this runner claim now? Waits for its turn; says `taking` when it does.

        `generation` None is a sweep: only the first claims (the others' sweeps cover the rest).
        """
        await self._joined.wait()
        rank = self.rank(subscription)
        if generation is None:
            # A member vouched for it: it claimed it since its wake stream connected and follows
            # every wake of it since, so nothing it holds pending lacks a wake. Once only: a later
            # sweep (a reconnect, the periodic one, a share handed over) claims it as usual.
            return rank == 0 and self._vouched.pop(subscription, None) not in self.peers()
        if rank and await self._taken_within(subscription, generation, rank * self.fallback):
            log.debug("fleet.left_to_peer", subscription=subscription, generation=generation, rank=rank)
            return False
        self._say({"type": "taking", "subscription": subscription, "generation": generation})
        return True

    def leave(self, subscription: str, generation: int, on_due: Callable[[], None]) -> bool:
        """Leave a wake to the peers before this runner in line, without a task of its own.

        False when this runner should see to it as usual (`may_claim`): it is first, or has not
        joined yet. Else True: `on_due` is called when its turn comes (rank x fallback from now)
        unless someone said `taking` for this generation or a newer one by then; the caller then
        claims (after `take`). Every runner hears every wake and most are some peer's: this is
        what each of those costs (no task, no wait of its own, nothing on the wire).
        """
        if not self._joined.is_set() or self._nursery is None:
            return False
        rank = self.rank(subscription)
        if rank == 0:
            return False
        if self._taken.get(subscription, -1) >= generation:
            return True  # said before the wake reached this runner (the two streams race)
        due = trio.current_time() + rank * self.fallback
        turn = self._turns.get(subscription)
        if turn is not None and turn.due <= due:
            # A newer wake while one is still left to a peer: the turn stays when it was.
            turn.generation, turn.on_due = max(turn.generation, generation), on_due
            return True
        self._turns[subscription] = _Turn(generation, due, on_due)
        heapq.heappush(self._due, (due, subscription))
        if self._timer is not None and due < self._timer.deadline:
            self._timer.deadline = due
        return True

    def reconnected(self) -> None:
        """This runner's wake stream connected again: what members vouched for at the join no longer
        spares a sweep (their connections broke too, if the server restarted)."""
        self._vouched.clear()

    def take(self, subscription: str, generation: int) -> None:
        """This runner claims this wake now (its turn came): the ones after it in line need not."""
        self._say({"type": "taking", "subscription": subscription, "generation": generation})

    async def _keep_turns(self) -> None:
        """Call back the wakes left to a peer whose turn came with nobody having said `taking`.

        Sleeps until the earliest turn still open: one a peer took (most of them) is dropped
        from the heap when its `taking` is heard (`_drop_taken`), and never wakes this task.
        """
        while True:
            with trio.CancelScope(deadline=self._next_due()) as self._timer:
                await trio.sleep_forever()
            self._timer = None
            now = trio.current_time()
            while self._due and self._due[0][0] <= now:
                due, subscription = heapq.heappop(self._due)
                turn = self._turns.get(subscription)
                if turn is None or turn.due != due:
                    continue  # taken meanwhile (or a stale entry)
                del self._turns[subscription]
                log.debug("fleet.turn_came", subscription=subscription, generation=turn.generation)
                turn.on_due()

    def _next_due(self) -> float:
        """When the earliest turn still open comes; entries of turns taken meanwhile are dropped on the way."""
        due = self._due
        while due:
            at, subscription = due[0]
            turn = self._turns.get(subscription)
            if turn is not None and turn.due == at:
                return at
            heapq.heappop(due)
        return math.inf

    def _drop_taken(self, subscription: str, generation: int) -> None:
        """A peer said `taking`: the turn left to it (if this generation or older) need not come."""
        turn = self._turns.get(subscription)
        if turn is None or generation < turn.generation:
            return
        del self._turns[subscription]
        if self._due and self._due[0] == (turn.due, subscription) and self._timer is not None:
            self._timer.deadline = self._next_due()  # it was the earliest: sleep on to the next one

    async def _taken_within(self, subscription: str, generation: int, seconds: float) -> bool:
        with trio.move_on_after(seconds):
            while self._taken.get(subscription, -1) < generation:
                await self._news.wait()
            return True
        return False

    # -- the fleet stream -----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Join, follow and announce until cancelled; say `leaving` on the way out.

        Ready at once: wakes that come before the join window is over wait for it.
        """
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._keep_turns)
                task_status.started()
                await self._follow(nursery)
        finally:
            self._nursery = None
            self._turns.clear()
            with trio.move_on_after(APPEND_TIMEOUT, shield=True):
                await self._append({"type": "leaving"})

    async def _follow(self, nursery: trio.Nursery) -> None:
        while True:
            try:
                if self._offset is None:
                    sent_at = trio.current_time()
                    created = await self._hello()
                    round_trip = trio.current_time() - sent_at
                    nursery.start_soon(self._beat)
                    if created:
                        self._joined.set()  # the first runner ever: nobody to wait for
                    else:
                        # Answers are heard up to a linger late, and heard of up to one.
                        window = min(JOIN_WINDOW, JOIN_FLOOR + 4 * round_trip) + 2 * self._linger
                        nursery.start_soon(self._join_window, window)
                await self._read()
            except ClientError as exc:
                # A server that cannot be reached (a restart) is asked again soon; an answer paces us.
                delay = next_attempt(self._backoff, exc)
                log.warning("fleet.stream_error", fleet_stream=self.path, error=str(exc), retry_in=round(delay, 2))
                self._joined.set()  # alone for now: wakes must not wait on a fleet stream that is down
                if isinstance(exc, Unreachable) and self._blind_since is None:
                    # The server is down, not the members: nobody hears anybody, and nobody counts
                    # the others gone (which would sweep every share, in every runner, at once).
                    self._blind_since = trio.current_time()
                await trio.sleep(delay)

    def _sighted(self) -> None:
        """The fleet stream answers again: the members' silence counts from now on, as if the outage had not been."""
        if self._blind_since is None:
            return
        blind_for = trio.current_time() - self._blind_since
        self._blind_since = None
        for peer in self._seen:
            self._seen[peer] += blind_for

    async def _read(self) -> None:
        """Follow the fleet stream from `_offset` until a live read ends (SSE), or for good (long-polls)."""
        assert self._offset is not None
        if self._live_mode == "sse":
            try:
                with trio.fail_after(OPEN_TIMEOUT):
                    read = await self._wire.open_sse(self.path, self._offset, linger=self._linger)
            except trio.TooSlowError:
                raise TransportError(f"opening the fleet stream took longer than {OPEN_TIMEOUT:g} s") from None
            except SSERefused as exc:
                log.warning("fleet.sse_refused", fleet_stream=self.path, reason=str(exc), fallback="long-poll")
                self._live_mode = "long-poll"
            else:
                await self._read_live(read)
                return
        async with aclosing(paced_long_polls(self._wire, self.path, self._offset, hold=self._hold)) as results:
            async for result in results:
                self._backoff.reset()
                self._sighted()
                for message in result.messages:
                    self._heard(message)
                self._offset = result.next_offset

    async def _read_live(self, read: LiveRead) -> None:
        """One SSE read of the fleet stream, to its end; silence past the watchdog ends it as an error."""
        started = trio.current_time()
        silence = SILENT_INTERVALS * self.interval + APPEND_TIMEOUT
        since_data = False
        try:
            with trio.CancelScope(deadline=started + silence) as watchdog:
                async with aclosing(read.frames()) as frames:
                    async for frame in frames:
                        watchdog.deadline = trio.current_time() + silence
                        self._backoff.reset()
                        self._sighted()
                        if frame.unusable is not None:
                            self._tally.ignored("unusable event", frame.unusable)
                        for message in frame.messages:
                            self._heard(message)
                        since_data = since_data or bool(frame.messages)
                        # An empty answer just past a lagging tail never moves the offset back.
                        offset, current = frame.offset, self._offset or "-1"
                        if offset is not None and (since_data or is_after(offset, current)):
                            self._offset, since_data = offset, False
                        if frame.closed:
                            break
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                await read.aclose()
        if watchdog.cancelled_caught:
            raise StreamSilent(f"fleet stream {self.path}: nothing heard for {silence:g} s")
        if (lived := trio.current_time() - started) < MIN_USEFUL_READ:
            raise ImmediateClose(f"the fleet stream's live read ended after {lived:.2f} s")

    async def _hello(self) -> bool:
        """Say `hello`, and follow the fleet stream from just past it: the members' answers come after
        it (no HEAD for the tail first; a record a peer wrote just before it is not missed either:
        that peer hears this hello and answers it).

        Bounded by the request timeout only, not `APPEND_TIMEOUT`: a hello the server stored but
        answered late must still be followed from, or its answers go unheard and this runner,
        counting itself alone, takes every share (a server is slowest at a fleet's start).

        The fleet stream is created only if the hello finds none (one request fewer per runner but
        the first ever); True if this runner created it: it is the first, nobody to wait for."""
        hello = {"type": "alive", "hello": True, "runner_id": self.runner_id}
        try:
            self._offset = await self._wire.append(self.path, hello)
        except StreamNotFound:
            created = await self._wire.create_stream(self.path)
            self._offset = await self._wire.append(self.path, hello)
            return created
        return False

    async def _join_window(self, seconds: float) -> None:
        await trio.sleep(seconds)
        self._joined.set()
        log.info("fleet.joined", fleet_stream=self.path, peers=sorted(self.peers()))
        self._membership()

    async def _beat(self) -> None:
        """`alive` every interval (with what this runner acknowledged lately), and notice who went quiet."""
        while True:
            await trio.sleep(self.interval)
            record: dict[str, Any] = {"type": "alive"}
            # Kept while alone: the first peer to join hears what was confirmed before it came.
            fresh = self._journal.take_fresh() if self._journal is not None and self.peers() else {}
            if fresh:
                record["acked"] = fresh
            await self._append(record)
            self._membership()

    def _heard(self, message: object) -> None:
        if not isinstance(message, dict) or not isinstance(peer := message.get("runner_id"), str):
            self._tally.ignored("fleet record not understood", message)
            return
        if peer == self.runner_id:
            return
        kind = message.get("type")
        if kind == "leaving":
            self._seen.pop(peer, None)
        else:
            self._seen[peer] = trio.current_time()
        if kind == "alive":
            if message.get("hello"):
                self._answer(peer)
            if self._journal is not None and isinstance(acked := message.get("acked"), dict):
                self._learn(acked)
            if isinstance(covered := message.get("covered"), list) and not self._joined.is_set():
                for subscription in covered:
                    if isinstance(subscription, str):
                        self._vouched[subscription] = peer
        elif kind == "taking":
            subscription, generation = message.get("subscription"), message.get("generation")
            if isinstance(subscription, str) and isinstance(generation, int):
                self._taken[subscription] = max(generation, self._taken.get(subscription, -1))
                self._drop_taken(subscription, generation)
                self._news.set()
                self._news = trio.Event()
        self._membership()

    def _answer(self, peer: str) -> None:
        """Say `alive` to a member that just joined, with what this runner vouches for."""
        now = trio.current_time()
        if now - self._answered.get(peer, -math.inf) < ANSWER_EVERY:
            return
        self._answered = {p: at for p, at in self._answered.items() if now - at < ANSWER_EVERY}
        self._answered[peer] = now
        record: dict[str, Any] = {"type": "alive"}
        if covered := sorted(self._covered()):
            record["covered"] = covered
        if self._journal is not None:
            # What this runner linked (created or confirmed) or acknowledged since its last beat, kept
            # while it was alone: the member that joins knows those subscriptions exist (`Journal.knows`)
            # before it decides what to create ahead of following its wake stream. And where each
            # subscription it covered (it linked or claimed in this run, so it exists as configured)
            # that the joining runner is first for was linked or acknowledged: the joining runner
            # neither creates nor sweeps those, and would otherwise confirm each to learn that (up
            # to M/N requests; `Dispatcher._learn_links`), lest it put one back after a server restart
            # without its gap. It hears only what follows its hello.
            members = [self.runner_id, *self.peers()]
            fresh = self._journal.take_fresh()
            theirs = self._journal.vouchable(
                (sub for sub in covered if first(sub, members) == peer), streams=ANSWER_OFFSETS
            )
            if acked := {**fresh, **theirs}:  # whole, where fresh has some of a subscription's streams
                record["acked"] = acked
        self._say(record)

    def _learn(self, acked: Mapping[object, object]) -> None:
        assert self._journal is not None
        for subscription, offsets in acked.items():
            if isinstance(subscription, str) and isinstance(offsets, dict):
                clean = {s: o for s, o in offsets.items() if isinstance(s, str) and isinstance(o, str)}
                self._journal.learn(subscription, clean)

    def _membership(self) -> None:
        """Tell the dispatcher when the members changed: the shares moved."""
        members = self.peers()
        if members != self._members and self._joined.is_set():
            joined, left = sorted(members - self._members), sorted(self._members - members)
            self._members = members
            log.info("fleet.changed", joined=joined, left=left, members=len(members) + 1)
            self._on_change()

    def _say(self, record: dict[str, Any]) -> None:
        """Append without waiting (nothing on the path of a wake waits for it); only with peers to hear it."""
        if self._nursery is not None and self.peers():
            self._nursery.start_soon(self._append, record)

    async def _append(self, record: dict[str, Any]) -> None:
        try:
            with trio.fail_after(APPEND_TIMEOUT):
                await self._wire.append(self.path, {**record, "runner_id": self.runner_id})
            self._sighted()
        except (ClientError, trio.TooSlowError) as exc:
            log.info("fleet.announce_failed", fleet_stream=self.path, record=record.get("type"), error=str(exc))
