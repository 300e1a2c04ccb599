"""A fleet on one wake stream, in virtual time: who is first for what, one claimant per wake, takeovers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Collection
from contextlib import asynccontextmanager
from dataclasses import replace

import pytest
import trio
import trio.testing

import runner._fleet.peers
from runner._claims.outcome import Outcome
from runner._config import SubscriptionSpec
from runner._dispatch import Dispatcher, Wake
from runner._fleet.peers import APPEND_TIMEOUT, JOIN_WINDOW, MISSED_INTERVALS, SILENT_INTERVALS, Fleet
from runner._fleet.ring import ranked
from runner._health import Vitals
from runner._state.journal import Journal
from runner._wake.reading import Tally
from runner._wake.subscriptions import SubscriptionKeeper
from runner._wire.protocol import Ack
from runner._wire.retrying import Backoff
from tests.claim_harness import Recorder, jobs, make_context, sleep_for
from tests.fake_wire import FakeWire, ScriptedRead, offset_of

PATH = "__pullwake/fleet/wake/pool"
INTERVAL = 1.0
FALLBACK = 0.5
SUBSCRIPTIONS = [f"s{i}" for i in range(40)]


def member(
    wire: FakeWire,
    runner_id: str,
    journal: Journal | None = None,
    covered: Callable[[], Collection[str]] = frozenset,
) -> Fleet:
    return Fleet(
        wire,
        PATH,
        runner_id,
        interval=INTERVAL,
        fallback=FALLBACK,
        hold=2.0,
        backoff=Backoff(0.1, 1.0),
        tally=Tally(Vitals(runner_id), "fleet"),
        journal=journal,
        covered=covered,
    )


def keeping(
    wire: FakeWire,
    fleet: Fleet,
    journal: Journal,
    subscriptions: list[str],
    work: trio.Nursery,
    handler: Recorder,
    *,
    max_concurrent: int,
) -> Dispatcher:
    """`fleet`'s dispatcher with a real `SubscriptionKeeper`: it confirms and puts back each
    subscription (stream `jobs/<id>`), and `journal` learns where each was linked."""
    keeper = SubscriptionKeeper(
        wire,
        [SubscriptionSpec(id=sub, streams=(f"jobs/{sub}",)) for sub in subscriptions],
        wake_stream="wake/pool",
        journal=journal,
        vitals=Vitals(fleet.runner_id),
    )
    context = replace(make_context(wire, handler, runner_id=fleet.runner_id), journal=journal, recreate=keeper.ensure)
    return Dispatcher(
        dict.fromkeys(subscriptions, context),
        Vitals(fleet.runner_id),
        work,
        max_concurrent=max_concurrent,
        peers=fleet,
        confirm=keeper.confirm,
    )


def linked_by_a(wire: FakeWire, runners: str) -> dict[str, Journal]:
    """Every subscription on `wire` (stream `jobs/<id>`), and a journal for each of `runners`: "a"'s
    knows where each subscription was linked."""
    for sub in SUBSCRIPTIONS:
        wire.add_stream(f"jobs/{sub}")
        wire.subscribe(sub, [f"jobs/{sub}"])
    journals = {runner_id: Journal(None, server_url="x") for runner_id in runners}
    for sub in SUBSCRIPTIONS:
        journals["a"].linked(sub, {f"jobs/{sub}": offset_of(0)}, created=False)
    return journals


@asynccontextmanager
async def fleet_of(wire: FakeWire, *members: Fleet) -> AsyncIterator[trio.Nursery]:
    with trio.fail_after(3600):
        async with trio.open_nursery() as nursery:
            for each in members:
                await nursery.start(each.run)
            await trio.sleep(JOIN_WINDOW + 0.1)
            yield nursery
            nursery.cancel_scope.cancel()


def takings(wire: FakeWire) -> list[tuple[str, str, int]]:
    return [
        (record["runner_id"], record["subscription"], record["generation"])
        for record in wire.streams.get(PATH, [])
        if record.get("type") == "taking"
    ]


# -- the ring -------------------------------------------------------------------------------------


def test_every_member_computes_the_same_order_whatever_order_it_learnt_the_members_in() -> None:
    members = ["a", "b", "c", "d"]
    for subscription in SUBSCRIPTIONS:
        assert ranked(subscription, members) == ranked(subscription, reversed(members))


def test_a_member_leaving_moves_only_the_subscriptions_it_was_first_for() -> None:
    before = {sub: ranked(sub, ["a", "b", "c", "d"])[0] for sub in SUBSCRIPTIONS}
    after = {sub: ranked(sub, ["a", "b", "c"])[0] for sub in SUBSCRIPTIONS}
    moved = {sub for sub in SUBSCRIPTIONS if before[sub] != after[sub]}
    assert moved == {sub for sub in SUBSCRIPTIONS if before[sub] == "d"}
    assert 0 < len(moved) < len(SUBSCRIPTIONS) / 2, "about a quarter of them"


# -- who claims a wake ------------------------------------------------------------------------------


async def test_a_runner_alone_claims_at_once_and_says_nothing(autojump_clock: trio.testing.MockClock) -> None:
    wire = FakeWire()
    alone = member(wire, "a")
    async with fleet_of(wire, alone):
        started = trio.current_time()
        assert await alone.may_claim("s1", 7)
        assert await alone.may_claim("s1", None), "a sweep covers everything"
        assert trio.current_time() == started
        assert takings(wire) == []
        assert [record["type"] for record in wire.streams[PATH]] == ["alive"], "its hello, nothing on a wake's path"


async def test_a_runner_joins_with_two_requests_and_hears_what_follows_its_hello(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Fleet start (issue 22): say hello, follow from just past the hello (its append's answer says
    where); no HEAD for the tail first, and no create of the fleet stream that the first runner
    made (2N - 1 requests fewer per fleet start)."""
    wire = FakeWire()
    a, b = member(wire, "a"), member(wire, "b")
    async with fleet_of(wire, a):
        joining = len(wire.calls)
        async with trio.open_nursery() as nursery:
            await nursery.start(b.run)
            await trio.sleep(JOIN_WINDOW + 0.1)
            assert b.peers() == {"a"}, "a's answer to the hello was heard"
            assert [call.method for call in wire.calls[joining:] if call.args[0] == PATH][:2] == ["append", "open_sse"]
            assert [call.method for call in wire.calls[:joining] if call.args[0] == PATH][:3] == [
                "append",
                "create_stream",
                "append",
            ], "the first runner ever: its hello found no fleet stream"
            assert not wire.called("tail")
            nursery.cancel_scope.cancel()


async def test_of_two_runners_only_the_first_in_line_claims_a_wake(autojump_clock: trio.testing.MockClock) -> None:
    wire = FakeWire()
    a, b = member(wire, "a"), member(wire, "b")
    async with fleet_of(wire, a, b):
        assert a.peers() == {"b"}
        assert b.peers() == {"a"}
        for generation, subscription in enumerate(SUBSCRIPTIONS[:10]):
            first, second = (a, b) if ranked(subscription, ["a", "b"])[0] == "a" else (b, a)
            assert first.rank(subscription) == 0
            assert second.rank(subscription) == 1
            started = trio.current_time()
            async with trio.open_nursery() as nursery:
                verdicts: dict[str, bool] = {}

                async def ask(fleet: Fleet) -> None:
                    verdicts[fleet.runner_id] = await fleet.may_claim(subscription, generation)  # noqa: B023

                nursery.start_soon(ask, second)
                nursery.start_soon(ask, first)
            assert verdicts == {first.runner_id: True, second.runner_id: False}
            assert trio.current_time() - started < FALLBACK, "the second hears the first before its turn"
        assert len(takings(wire)) == 10


async def test_the_next_in_line_claims_after_the_fallback_when_the_first_says_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A frozen or busy first runner (alive, silent on this wake) costs the fallback, never the work."""
    wire = FakeWire()
    a, b = member(wire, "a"), member(wire, "b")
    async with fleet_of(wire, a, b):
        subscription = next(sub for sub in SUBSCRIPTIONS if b.rank(sub) == 1)
        started = trio.current_time()
        assert await b.may_claim(subscription, 3)
        assert trio.current_time() - started == pytest.approx(FALLBACK)
        await trio.sleep(0.01)  # the announcement goes out beside the claim
        assert takings(wire) == [("b", subscription, 3)], "and it says so, for the runners after it"


async def test_a_sweep_covers_only_this_runners_share(autojump_clock: trio.testing.MockClock) -> None:
    wire = FakeWire()
    a, b = member(wire, "a"), member(wire, "b")
    async with fleet_of(wire, a, b):
        mine = {sub for sub in SUBSCRIPTIONS if await a.may_claim(sub, None)}
        theirs = {sub for sub in SUBSCRIPTIONS if await b.may_claim(sub, None)}
        assert mine
        assert theirs
        assert mine | theirs == set(SUBSCRIPTIONS)
        assert not mine & theirs


async def test_a_runner_that_joins_counts_as_its_own_only_its_share_of_what_nobody_vouched_for(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Issue 22, fleet start: before, a joining runner asked at once what to create before following
    its wake stream, heard no peers yet, and took all M. It now waits for the join window (bounded)
    and asks each subscription as its turn comes."""
    wire = FakeWire()
    a, b = member(wire, "a"), member(wire, "b")
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await trio.sleep(JOIN_WINDOW + 0.1)
        await nursery.start(b.run)
        started = trio.current_time()
        mine = {sub for sub in SUBSCRIPTIONS if await b.owns(sub)}
        assert trio.current_time() - started <= JOIN_WINDOW + 0.2, "bounded by the join window"
        assert mine == {sub for sub in SUBSCRIPTIONS if ranked(sub, ["a", "b"])[0] == "b"}
        assert 0 < len(mine) < len(SUBSCRIPTIONS)
        nursery.cancel_scope.cancel()


async def test_a_runner_that_joins_right_after_another_hears_every_member_within_its_join_window(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Issue 22, fleet start at N=4, M=1,000: a member answered one `hello` a second at most, so a
    runner that joined within a second of another did not hear that member until its next `alive`
    (an interval later), counted its share as its own, and created and swept it too (290
    subscription PUTs and 157 claims over 2M). Each joining runner's hello is answered now."""
    wire = FakeWire()
    a, b, c = member(wire, "a"), member(wire, "b"), member(wire, "c")
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await trio.sleep(INTERVAL + 0.05)  # just after a's beat: its next one comes after c's window
        await nursery.start(b.run)
        await trio.sleep(0.2)
        await nursery.start(c.run)
        mine = {sub for sub in SUBSCRIPTIONS if await c.owns(sub)}
        assert trio.current_time() < 2 * INTERVAL, "decided before a's next beat"
        assert c.peers() == {"a", "b"}
        assert mine == {sub for sub in SUBSCRIPTIONS if ranked(sub, ["a", "b", "c"])[0] == "c"}
        nursery.cancel_scope.cancel()


async def test_a_runner_whose_hello_is_answered_late_still_hears_the_members(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A server slow to answer the hello (it is slowest at a fleet's start, creating subscriptions):
    the runner follows from just past its hello when the answer comes, and hears the members'
    answers. Bounded by the hello's own timeout, it took every share as its own."""
    wire = FakeWire()
    a, b = member(wire, "a"), member(wire, "b")
    async with fleet_of(wire, a), trio.open_nursery() as nursery:
        wire.delay("append", 2.5)  # b's hello, the next append (a's next beat is later)
        await nursery.start(b.run)
        mine = {sub for sub in SUBSCRIPTIONS if await b.owns(sub)}
        assert b.peers() == {"a"}
        assert mine == {sub for sub in SUBSCRIPTIONS if ranked(sub, ["a", "b"])[0] == "b"}
        nursery.cancel_scope.cancel()


async def test_the_first_runner_ever_asks_what_to_create_without_waiting(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire = FakeWire()
    alone = member(wire, "a")
    async with trio.open_nursery() as nursery:
        await nursery.start(alone.run)
        started = trio.current_time()
        assert all([await alone.owns(sub) for sub in SUBSCRIPTIONS])
        assert trio.current_time() == started, "it created the fleet stream: nobody to wait for"
        nursery.cancel_scope.cancel()


async def test_what_a_member_vouches_for_is_neither_created_nor_swept_by_a_runner_that_joins(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A runner that claimed a subscription since its wake stream connected says so in its answer to
    a `hello`: the joining runner's first sweep leaves it (once), and does not create it."""
    wire = FakeWire()
    covered = set(SUBSCRIPTIONS[:30])
    a = member(wire, "a", covered=lambda: covered)
    b = member(wire, "b")
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await trio.sleep(JOIN_WINDOW + 0.1)
        await nursery.start(b.run)
        share = {sub for sub in SUBSCRIPTIONS if ranked(sub, ["a", "b"])[0] == "b"}
        assert share & covered
        assert share - covered, "the test needs some of its share nobody vouched for"
        created = {sub for sub in SUBSCRIPTIONS if await b.owns(sub)}
        assert created == share - covered
        swept = {sub for sub in SUBSCRIPTIONS if await b.may_claim(sub, None)}
        assert swept == share - covered
        assert {sub for sub in SUBSCRIPTIONS if await b.may_claim(sub, None)} == share, "once only"
        nursery.cancel_scope.cancel()


async def test_after_a_reconnect_what_members_vouched_for_is_swept_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire = FakeWire()
    a = member(wire, "a", covered=lambda: SUBSCRIPTIONS)
    b = member(wire, "b")
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await trio.sleep(JOIN_WINDOW + 0.1)
        await nursery.start(b.run)
        await trio.sleep(JOIN_WINDOW + 0.1)
        b.reconnected()
        swept = {sub for sub in SUBSCRIPTIONS if await b.may_claim(sub, None)}
        assert swept == {sub for sub in SUBSCRIPTIONS if ranked(sub, ["a", "b"])[0] == "b"}
        nursery.cancel_scope.cancel()


async def test_a_sweep_leaves_to_a_runner_that_joined_while_it_waited_for_slots_what_became_its_share(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The first runner of a fleet started together sweeps all M, some at a time, for seconds; the
    runners that join meanwhile sweep their shares of what it had not claimed when it answered their
    `hello`. Each subscription is claimed once (those were claimed twice: the 2M start budget missed)."""
    wire = FakeWire()
    for sub in SUBSCRIPTIONS:
        wire.add_stream(f"jobs/{sub}")
        wire.subscribe(sub, [f"jobs/{sub}"])
    dispatchers: dict[str, Dispatcher] = {}

    def covered(rid: str) -> Callable[[], Collection[str]]:
        return lambda: dispatchers[rid].covered if rid in dispatchers else frozenset()

    fleets = {rid: member(wire, rid, covered=covered(rid)) for rid in "ab"}
    async with trio.open_nursery() as nursery, trio.open_nursery() as work:

        def dispatcher(rid: str) -> Dispatcher:
            dispatchers[rid] = Dispatcher(
                {sub: make_context(wire, Recorder(), runner_id=rid) for sub in SUBSCRIPTIONS},
                Vitals(rid),
                work,
                max_concurrent=1,
                peers=fleets[rid],
            )
            return dispatchers[rid]

        wire.delay("claim", 0.2, times=len(SUBSCRIPTIONS))  # a server busy with a fleet's start
        await nursery.start(fleets["a"].run)
        dispatcher("a").resync()
        await trio.sleep(1)
        await nursery.start(fleets["b"].run)
        await trio.sleep(JOIN_WINDOW + 0.1)
        dispatcher("b").resync()
        await trio.sleep(30)
        claimed = [call.args[0] for call in wire.called("claim")]
        assert set(claimed) == set(SUBSCRIPTIONS)
        # At most the one a had in flight when it answered (its answer names what was claimed).
        assert len(claimed) <= len(SUBSCRIPTIONS) + 1, "each once"
        assert {call.args[1] for call in wire.called("claim")} == {"a", "b"}
        for each in dispatchers.values():
            each.interrupt_all()
        nursery.cancel_scope.cancel()
        work.cancel_scope.cancel()


async def test_a_servers_wake_that_came_with_a_sweep_while_busy_is_claimed_after_its_turn_if_a_peer_is_first_now(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A wake and a sweep that arrive while the subscription's claim runs are claimed once after it,
    as a sweep (it counts for all). Where a runner that joined meanwhile is first for it now, a
    sweep is that runner's: the wake's claim was dropped with it, and the server's wake waited for
    the periodic sweep (a frozen or busy first in line never claims it). It is the wake's now: its
    turn comes after the fallback, as for any wake left to a peer."""
    wire = FakeWire()
    sub = next(s for s in SUBSCRIPTIONS if ranked(s, ["a", "b"])[0] == "b")
    wire.add_stream(f"jobs/{sub}", jobs(1, f"jobs/{sub}"))
    wire.subscribe(sub, [f"jobs/{sub}"])
    a, b = member(wire, "a"), member(wire, "b")
    async with fleet_of(wire, a), trio.open_nursery() as work:
        dispatcher = Dispatcher(
            {sub: make_context(wire, Recorder(sleep_for(2)), runner_id="a")},
            Vitals("a"),
            work,
            max_concurrent=1,
            peers=a,
        )
        dispatcher.wake(wire.wake(sub))  # alone: a claims at once; its handler takes 2 s
        await trio.sleep(0.5)
        dispatcher.wake(Wake(sub, f"jobs/{sub}", generation=5))  # while busy: remembered
        dispatcher.sweep([sub])  # the sweep stands for it
        await work.start(b.run)  # b joins and is first for sub; it never claims (frozen, busy)
        await trio.sleep(JOIN_WINDOW + 0.1)
        claimed = [call.at for call in wire.called("claim")]
        assert len(claimed) == 1
        await trio.sleep(10)
        claimed = [call.at for call in wire.called("claim")]
        assert len(claimed) == 2, "the server's wake, after its turn"
        assert claimed[1] - claimed[0] >= 2 + FALLBACK, "after the first claim, and after the fallback"
        assert [record["subscription"] for record in wire.streams[PATH] if record.get("type") == "taking"] == [sub]
        dispatcher.interrupt_all()
        work.cancel_scope.cancel()


async def test_a_sweep_that_took_in_a_servers_wake_is_claimed_even_if_a_peer_became_first_while_it_waited_for_a_slot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The slot-time check leaves only a pure sweep to a runner that joined meanwhile: one that stands
    for a server's wake (which that runner never heard, joining after it) is claimed here."""
    wire = FakeWire()
    sub = next(s for s in SUBSCRIPTIONS if ranked(s, ["a", "b"])[0] == "b")
    other = next(s for s in SUBSCRIPTIONS if s != sub)
    for each in (sub, other):
        wire.add_stream(f"jobs/{each}", jobs(1, f"jobs/{each}"))
        wire.subscribe(each, [f"jobs/{each}"])
    a, b = member(wire, "a"), member(wire, "b")
    async with fleet_of(wire, a), trio.open_nursery() as work:
        dispatcher = Dispatcher(
            {each: make_context(wire, Recorder(sleep_for(2)), runner_id="a") for each in (sub, other)},
            Vitals("a"),
            work,
            max_concurrent=1,
            peers=a,
        )
        dispatcher.wake(wire.wake(sub))  # alone: claimed at once, the slot held 2 s
        await trio.sleep(0.5)
        dispatcher.wake(wire.wake(other))  # the next in the slot, for 2 s more
        dispatcher.wake(Wake(sub, f"jobs/{sub}", generation=5))  # while busy: remembered
        dispatcher.sweep([sub])  # the sweep stands for it; still alone when its turn is decided
        await trio.sleep(2)
        await work.start(b.run)  # b joins while sub waits for the slot, and is first for it
        await trio.sleep(10)
        assert [call.args[0] for call in wire.called("claim")].count(sub) == 2
        dispatcher.interrupt_all()
        work.cancel_scope.cancel()


async def test_a_runner_that_leaves_hands_its_share_over_at_once(autojump_clock: trio.testing.MockClock) -> None:
    wire = FakeWire()
    a, b = member(wire, "a"), member(wire, "b")
    async with trio.open_nursery() as outer, fleet_of(wire, b):
        scope = trio.CancelScope()

        async def run_a() -> None:
            with scope:
                await a.run()

        outer.start_soon(run_a)
        await trio.sleep(JOIN_WINDOW + 0.1)
        assert b.peers() == {"a"}
        scope.cancel()
        await trio.sleep(0.1)
        assert b.peers() == set(), "its `leaving` was heard"
        assert all(b.rank(sub) == 0 for sub in SUBSCRIPTIONS)


async def test_a_runner_never_heard_of_again_is_gone_after_three_intervals(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """kill -9 or SIGSTOP: no `leaving`. Its share moves once it has missed three announcements."""
    wire = FakeWire()
    a, b = member(wire, "a"), member(wire, "b")
    async with fleet_of(wire, a, b):
        assert b.peers() == {"a"}
        silenced = FakeWire()
        silenced.hang("append")
        a._wire = silenced  # from now on, nothing a says reaches the server
        await trio.sleep((MISSED_INTERVALS - 1) * INTERVAL)
        assert b.peers() == {"a"}, "a missed announcement or two is no reason"
        await trio.sleep(2 * INTERVAL)
        assert b.peers() == set()
        assert all(b.rank(sub) == 0 for sub in SUBSCRIPTIONS)


async def test_a_runner_counted_gone_that_is_heard_again_is_a_member_again_with_its_share(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The members (and each subscription's order) are worked out again when they may have changed:
    a member that went quiet, one that speaks again, one that leaves, not at every wake."""
    wire = FakeWire()
    a, b = member(wire, "a"), member(wire, "b")
    async with fleet_of(wire, a, b) as nursery:
        assert [b.rank(sub) for sub in SUBSCRIPTIONS] == [ranked(sub, ["a", "b"]).index("b") for sub in SUBSCRIPTIONS]
        talking = a._wire
        silenced = FakeWire()
        silenced.hang("append")
        a._wire = silenced
        await trio.sleep((MISSED_INTERVALS + 1) * INTERVAL)
        assert b.peers() == set()
        assert all(b.rank(sub) == 0 for sub in SUBSCRIPTIONS)
        a._wire = talking
        await trio.sleep(INTERVAL + 0.1)
        assert b.peers() == {"a"}, "its next `alive` was heard"
        assert [b.rank(sub) for sub in SUBSCRIPTIONS] == [ranked(sub, ["a", "b"]).index("b") for sub in SUBSCRIPTIONS]
        c = member(wire, "c")
        await nursery.start(c.run)
        await trio.sleep(JOIN_WINDOW + 0.1)
        assert b.peers() == {"a", "c"}
        assert [b.rank(sub) for sub in SUBSCRIPTIONS] == [
            ranked(sub, ["a", "b", "c"]).index("b") for sub in SUBSCRIPTIONS
        ]
        a._wire = silenced  # says nothing more after its `leaving`
        await talking.append(PATH, {"type": "leaving", "runner_id": "a"})
        await trio.sleep(0.1)
        assert b.peers() == {"c"}, "a's `leaving` was heard"
        assert [b.rank(sub) for sub in SUBSCRIPTIONS] == [ranked(sub, ["b", "c"]).index("b") for sub in SUBSCRIPTIONS]


async def test_while_the_server_is_down_nobody_counts_the_others_gone(autojump_clock: trio.testing.MockClock) -> None:
    """A server restart silences everyone at once: no member's share moves (which would make
    every runner sweep everything as it comes back), and the silence is forgiven once it answers."""
    wire = FakeWire()
    changes: list[frozenset[str]] = []
    a, b = member(wire, "a"), member(wire, "b")
    b._on_change = lambda: changes.append(b.peers())
    async with fleet_of(wire, a, b):
        assert b.peers() == {"a"}
        changes.clear()
        wire.down = True
        await trio.sleep(4 * MISSED_INTERVALS * INTERVAL)
        assert b.peers() == {"a"}, "the server is down, not the members"
        assert a.peers() == {"b"}
        wire.down = False
        await trio.sleep((MISSED_INTERVALS - 1) * INTERVAL)
        assert b.peers() == {"a"}
        assert a.peers() == {"b"}
        assert changes == [], "no share moved, no sweep"
        # A member that does not come back with the server is gone three intervals after it answers.
        silenced = FakeWire()
        silenced.hang("append")
        a._wire = silenced
        await trio.sleep((MISSED_INTERVALS + 1) * INTERVAL)
        assert b.peers() == set()


async def test_a_fleet_stream_the_server_refuses_to_serve_is_no_reason_to_keep_the_members(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Only a server out of reach freezes the members: one that answers (here 503 on every call)
    while a member says nothing leaves that member gone after three intervals, as before."""
    wire = FakeWire()
    a, b = member(wire, "a"), member(wire, "b")
    async with fleet_of(wire, a, b):
        assert b.peers() == {"a"}
        wire.fail_server("read", times=10_000)
        wire.fail_server("append", times=10_000)
        await trio.sleep((MISSED_INTERVALS + 1) * INTERVAL)
        assert b.peers() == set()


async def test_acknowledged_offsets_travel_to_every_member(autojump_clock: trio.testing.MockClock) -> None:
    """Whoever puts back a subscription the server forgot replays its gap from the newest offset anyone knew."""
    wire = FakeWire()
    journals = Journal(None, server_url="x"), Journal(None, server_url="x")
    a, b = member(wire, "a", journals[0]), member(wire, "b", journals[1])
    async with fleet_of(wire, a, b):
        wire.add_stream("jobs/1", jobs(5, "jobs/1"))
        wire.subscribe("s1", ["jobs/1"])
        claim = await wire.claim("s1", "a")
        journals[0].claimed(claim)
        journals[0].acked(claim, [Ack("jobs/1", offset_of(5))])
        await trio.sleep(INTERVAL + 0.1)
        gaps = journals[1].linked("s1", {"jobs/1": offset_of(9)}, created=True)
        assert [(gap.start, gap.end) for gap in gaps] == [(offset_of(5), offset_of(9))]


async def test_a_subscription_one_member_created_is_known_to_the_others_before_any_ack(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Each runner confirms only its share at start. A peer that must put back a subscription it
    never served after a server restart still replays from where it was linked: before, it saw a
    subscription it did not know, computed no gap, and the events in between were lost."""
    wire = FakeWire()
    journals = Journal(None, server_url="x"), Journal(None, server_url="x")
    a, b = member(wire, "a", journals[0]), member(wire, "b", journals[1])
    journals[0].linked("s1", {"jobs/1": offset_of(2)}, created=True)  # created by "a", alone so far
    async with fleet_of(wire, a, b):
        await trio.sleep(INTERVAL + 0.1)
        gaps = journals[1].linked("s1", {"jobs/1": offset_of(9)}, created=True)
        assert [(gap.start, gap.end) for gap in gaps] == [(offset_of(2), offset_of(9))]


# -- with the dispatcher ----------------------------------------------------------------------------


async def test_two_dispatchers_make_one_claim_per_wake(autojump_clock: trio.testing.MockClock) -> None:
    wire = FakeWire()
    for sub in SUBSCRIPTIONS[:8]:
        wire.add_stream(f"jobs/{sub}", jobs(1, f"jobs/{sub}"))
        wire.subscribe(sub, [f"jobs/{sub}"])
    handlers = {"a": Recorder(), "b": Recorder()}
    fleets = {rid: member(wire, rid) for rid in handlers}
    vitals_of = [Vitals(rid) for rid in handlers]
    async with fleet_of(wire, *fleets.values()), trio.open_nursery() as work:
        dispatchers = [
            Dispatcher(
                {sub: make_context(wire, handlers[rid], runner_id=rid, vitals=vitals) for sub in wire.subscriptions},
                vitals,
                work,
                max_concurrent=4,
                peers=fleets[rid],
            )
            for rid, vitals in zip(handlers, vitals_of, strict=True)
        ]
        for generation, sub in enumerate(SUBSCRIPTIONS[:8]):
            for dispatcher in dispatchers:
                dispatcher.wake(Wake(sub, f"jobs/{sub}", generation=generation))
        await trio.sleep(10)
        assert len(wire.called("claim")) == 8
        handled = {rid: len(handler.seen) for rid, handler in handlers.items()}
        assert handled["a"] + handled["b"] == 8
        assert handled["a"]
        assert handled["b"]
        assert all(Outcome.SKIPPED not in vitals.claims for vitals in vitals_of), "no lost race, no wasted claim"
        for dispatcher in dispatchers:
            dispatcher.interrupt_all()


async def test_a_gap_is_replayed_by_the_runner_that_holds_it_first_in_line_or_not(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The runner that put back a subscription the server forgot holds its gap: the only one that
    knows of those events. It replays them even where a peer is first in line (seen in the fleet
    bench: a gap found by a runner second in line was never replayed, its events lost), and leaves
    the claim to that peer."""
    wire = FakeWire()
    sub = next(s for s in SUBSCRIPTIONS if ranked(s, ["a", "b"])[0] == "a")
    stream = f"jobs/{sub}"
    wire.add_stream(stream, jobs(3, stream))
    wire.subscribe(sub, [stream])
    journal = Journal(None, server_url="x")
    journal.linked(sub, {stream: offset_of(0)}, created=False)
    journal.linked(sub, {stream: offset_of(3)}, created=True)  # re-created past three events
    handler = Recorder()
    b = member(wire, "b")
    async with fleet_of(wire, member(wire, "a"), b), trio.open_nursery() as work:
        context = replace(make_context(wire, handler, runner_id="b"), journal=journal)
        dispatcher = Dispatcher({sub: context}, Vitals("b"), work, max_concurrent=1, peers=b)
        dispatcher.sweep()
        await trio.sleep(10)
        assert [message for batch in handler.seen for message in batch.messages] == jobs(3, stream)
        assert all(batch.replayed for batch in handler.seen)
        assert journal.gaps(sub) == []
        assert wire.called("claim") == [], "the claim is the first in line's"
        dispatcher.interrupt_all()


@pytest.mark.parametrize("word_without_offsets", [False, True])
async def test_a_runner_that_joins_late_learns_where_what_a_member_covered_was_linked_before_a_restart(
    autojump_clock: trio.testing.MockClock, word_without_offsets: bool
) -> None:
    """A runner that joins a running fleet neither creates nor sweeps what a member covered, and
    learns those subscriptions' offsets only from the `acked` records since the member's last beat.
    A quiet one it never learned, put back by it after a server restart, had no gap: the events
    appended before it was put back were lost. It is confirmed at its first sweep now (where the
    runner is first for it and does not know it), which tells the runner where it was linked. Also
    when a member's `acked` named it without offsets (a lease renewal that acknowledged nothing)."""
    wire = FakeWire()
    sub = next(s for s in SUBSCRIPTIONS if ranked(s, ["a", "b", "c"])[0] == "c")
    stream = f"jobs/{sub}"
    wire.add_stream(stream)
    wire.subscribe(sub, [stream])
    journals = {runner: Journal(None, server_url="x") for runner in "abc"}
    journals["a"].linked(sub, {stream: offset_of(0)}, created=False)
    a = member(wire, "a", journals["a"], covered=lambda: {sub})
    b, c = member(wire, "b", journals["b"]), member(wire, "c", journals["c"])
    handler = Recorder()
    async with fleet_of(wire, a, b), trio.open_nursery() as work:
        await trio.sleep(INTERVAL + 0.1)  # b heard a's links; a said them and has said nothing new since
        await work.start(c.run)
        await trio.sleep(JOIN_WINDOW + 0.1)
        if word_without_offsets:
            await wire.append(PATH, {"type": "alive", "runner_id": "a", "acked": {sub: {}}})
            await trio.sleep(0.5)
        dispatcher = keeping(wire, c, journals["c"], [sub], work, handler, max_concurrent=1)
        dispatcher.resync()  # c's first connection: a covers sub, c's sweep leaves it
        await trio.sleep(1)
        assert wire.called("claim") == []
        wire.forget_subscriptions()  # the server restarts; an event comes before c puts sub back
        wire.streams[stream].extend(jobs(1, stream))
        dispatcher.resync()
        await trio.sleep(10)
        assert [message for batch in handler.seen for message in batch.messages] == jobs(1, stream)
        dispatcher.interrupt_all()
        work.cancel_scope.cancel()


async def test_a_runner_that_joins_learns_from_the_answers_where_its_share_of_what_members_covered_was_linked(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The answer to a `hello` says where each covered subscription the joining runner is first for
    was linked or acknowledged (not only what changed since the member's last beat, which the
    joining runner did not hear): the joining runner neither sweeps nor confirms those (at a fleet's
    start that was up to M/N requests per runner), and still puts each back with its gap after a
    server restart."""
    wire = FakeWire()
    journals = linked_by_a(wire, "abc")
    a = member(wire, "a", journals["a"], covered=lambda: SUBSCRIPTIONS)
    b, c = member(wire, "b", journals["b"]), member(wire, "c", journals["c"])
    share = [sub for sub in SUBSCRIPTIONS if ranked(sub, ["a", "b", "c"])[0] == "c"]
    handler = Recorder()
    async with fleet_of(wire, a, b), trio.open_nursery() as work:
        await trio.sleep(INTERVAL + 0.1)  # b heard a's links; a has said nothing new since
        await work.start(c.run)
        await trio.sleep(JOIN_WINDOW + 0.1)
        dispatcher = keeping(wire, c, journals["c"], SUBSCRIPTIONS, work, handler, max_concurrent=4)
        dispatcher.resync()  # c's first connection
        await trio.sleep(1)
        assert wire.called("ensure_subscription") == [], "nothing confirmed to learn where it was linked"
        assert wire.called("claim") == []
        woken = share[0]
        wire.forget_subscriptions()  # the server restarts; an event comes before c puts it back
        wire.streams[f"jobs/{woken}"].extend(jobs(1, f"jobs/{woken}"))
        dispatcher.resync()
        await trio.sleep(10)
        assert [message for batch in handler.seen for message in batch.messages] == jobs(1, f"jobs/{woken}")
        dispatcher.interrupt_all()
        work.cancel_scope.cancel()


async def test_an_answer_says_where_a_bounded_number_of_subscriptions_were_linked_and_the_rest_are_confirmed(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One record per answer, whatever M: past `ANSWER_OFFSETS`, the joining runner learns where the
    rest of its share was linked as it did before answers said it (it confirms them)."""
    monkeypatch.setattr(runner._fleet.peers, "ANSWER_OFFSETS", 3)
    wire = FakeWire()
    journals = linked_by_a(wire, "ab")
    journals["a"].take_fresh()  # said at a beat long ago
    a, b = member(wire, "a", journals["a"], covered=lambda: SUBSCRIPTIONS), member(wire, "b", journals["b"])
    share = [sub for sub in SUBSCRIPTIONS if ranked(sub, ["a", "b"])[0] == "b"]
    async with fleet_of(wire, a), trio.open_nursery() as work:
        await work.start(b.run)
        await trio.sleep(JOIN_WINDOW + 0.1)
        [answer] = [record for record in wire.streams[PATH] if record["runner_id"] == "a" and "acked" in record]
        assert sum(len(offsets) for offsets in answer["acked"].values()) == 3, "streams in all"
        dispatcher = keeping(wire, b, journals["b"], SUBSCRIPTIONS, work, Recorder(), max_concurrent=4)
        dispatcher.resync()
        await trio.sleep(1)
        assert sorted(call.args[0] for call in wire.called("ensure_subscription")) == sorted(
            set(share) - set(answer["acked"])
        )
        dispatcher.interrupt_all()
        work.cancel_scope.cancel()


async def test_a_wake_does_not_wait_behind_the_confirmations_of_what_members_vouched_for(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A runner that joins a busy fleet confirms most of its share once (to learn where each was
    linked, see above); a subscription's wake must not wait for its turn among those (seconds on a
    loaded server at M=1,000)."""
    wire = FakeWire()
    everything = [f"v{i}" for i in range(120)]
    share = [sub for sub in everything if ranked(sub, ["a", "c"])[0] == "c"]
    for sub in everything:
        wire.add_stream(f"jobs/{sub}")
        wire.subscribe(sub, [f"jobs/{sub}"])
    journal = Journal(None, server_url="x")
    a, c = member(wire, "a", covered=lambda: everything), member(wire, "c", journal)
    async with fleet_of(wire, a), trio.open_nursery() as work:
        await work.start(c.run)
        await trio.sleep(JOIN_WINDOW + 0.1)
        dispatcher = keeping(wire, c, journal, everything, work, Recorder(), max_concurrent=4)
        woken = share[-1]
        wire.delay("ensure_subscription", 1.0, times=len(share) + 1)  # a server busy creating
        dispatcher.sweep(share[:-1])
        await trio.sleep(0.1)
        dispatcher.sweep([woken])  # last in line for a confirmation
        await trio.sleep(0.1)
        wire.streams[f"jobs/{woken}"].extend(jobs(1, f"jobs/{woken}"))
        asked = trio.current_time()
        dispatcher.wake(wire.wake(woken))
        await trio.sleep(10)
        claimed = [call.at for call in wire.called("claim") if call.args[0] == woken]
        assert claimed
        assert claimed[0] - asked <= 1.5, "its own confirmation, then the claim"
        assert len(wire.called("ensure_subscription")) >= len(share), "the share confirmed all the same"
        dispatcher.interrupt_all()
        work.cancel_scope.cancel()


# -- what a wake left to a peer costs -------------------------------------------------------------


async def left_to_a(wire: FakeWire) -> tuple[str, Fleet, Fleet]:
    """A subscription "a" is first for, with one pending event, and both members."""
    sub = next(s for s in SUBSCRIPTIONS if ranked(s, ["a", "b"])[0] == "a")
    wire.add_stream(f"jobs/{sub}", jobs(1, f"jobs/{sub}"))
    wire.subscribe(sub, [f"jobs/{sub}"])
    await trio.lowlevel.checkpoint()
    return sub, member(wire, "a"), member(wire, "b")


async def test_a_wake_left_to_the_first_in_line_starts_no_worker_and_is_dropped_when_it_says_taking(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire = FakeWire()
    sub, a, b = await left_to_a(wire)
    async with fleet_of(wire, a, b), trio.open_nursery() as work:
        dispatcher = Dispatcher(
            {sub: make_context(wire, Recorder(), runner_id="b")}, Vitals("b"), work, max_concurrent=1, peers=b
        )
        dispatcher.wake(Wake(sub, generation=1))
        assert dispatcher.in_flight() == [], "no worker waits for the peer"
        a.take(sub, 1)
        await trio.sleep(10 * FALLBACK)
        assert wire.called("claim") == []
        assert dispatcher.in_flight() == []
        assert takings(wire) == [("a", sub, 1)]


class _Steps(trio.abc.Instrument):
    """Counts the steps of the tasks whose name ends with `name`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith(self.name):
            self.steps += 1


async def test_wakes_a_peer_took_wake_nothing_when_their_turn_would_have_come(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Most wakes a runner hears are a peer's, and the peer says `taking`: such a wake costs no timer
    that goes off later (the turn's sleep moves on to the next turn still open, if any)."""
    wire = FakeWire()
    sub, a, b = await left_to_a(wire)
    others = [s for s in SUBSCRIPTIONS if ranked(s, ["a", "b"])[0] == "a" and s != sub]
    async with fleet_of(wire, a, b), trio.open_nursery() as work:
        dispatcher = Dispatcher(
            {s: make_context(wire, Recorder(), runner_id="b") for s in [sub, *others]},
            Vitals("b"),
            work,
            max_concurrent=1,
            peers=b,
        )
        steps = _Steps("_keep_turns")
        trio.lowlevel.add_instrument(steps)
        try:
            for generation, each in enumerate(others, 1):
                dispatcher.wake(Wake(each, generation=generation))
                a.take(each, generation)
                await trio.sleep(0.01)
            dispatcher.wake(Wake(sub, generation=1))  # a's `taking` never comes for this one
            await trio.sleep(10 * FALLBACK)
        finally:
            trio.lowlevel.remove_instrument(steps)
        assert steps.steps == 1, "one turn came (the wake nobody took), and nothing else woke"
        assert len(wire.called("claim")) == 1, "the wake nobody took was claimed at its turn"


async def test_a_wake_whose_taking_came_before_it_is_left_at_once(autojump_clock: trio.testing.MockClock) -> None:
    """The wake stream and the fleet stream race: `taking` may reach a runner before the wake."""
    wire = FakeWire()
    sub, a, b = await left_to_a(wire)
    async with fleet_of(wire, a, b), trio.open_nursery() as work:
        dispatcher = Dispatcher(
            {sub: make_context(wire, Recorder(), runner_id="b")}, Vitals("b"), work, max_concurrent=1, peers=b
        )
        a.take(sub, 2)
        await trio.sleep(0.1)
        dispatcher.wake(Wake(sub, generation=2))
        await trio.sleep(10 * FALLBACK)
        assert wire.called("claim") == []


async def test_a_wake_left_to_a_silent_first_in_line_is_claimed_when_the_turn_comes_and_said_so(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire = FakeWire()
    sub, a, b = await left_to_a(wire)
    handler = Recorder()
    async with fleet_of(wire, a, b), trio.open_nursery() as work:
        dispatcher = Dispatcher(
            {sub: make_context(wire, handler, runner_id="b")}, Vitals("b"), work, max_concurrent=1, peers=b
        )
        woken = trio.current_time()
        dispatcher.wake(Wake(sub, generation=1))
        await trio.sleep(10 * FALLBACK)
        claims = wire.called("claim")
        assert len(claims) == 1, "claimed once, without waiting for a second turn"
        assert claims[0].at - woken == pytest.approx(FALLBACK)
        assert len(handler.seen) == 1
        assert takings(wire) == [("b", sub, 1)], "the runners after it in line are told"


# -- following the fleet stream -------------------------------------------------------------------


async def test_members_follow_the_fleet_stream_over_sse_and_read_it_lingering(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire = FakeWire()
    wire.live_sse = True
    a, b = member(wire, "a"), member(wire, "b")
    async with fleet_of(wire, a, b):
        assert a.peers() == {"b"}
        assert b.peers() == {"a"}
        sub = next(s for s in SUBSCRIPTIONS if b.rank(s) == 1)
        a.take(sub, 5)
        started = trio.current_time()
        assert not await b.may_claim(sub, 5), "it heard the first in line take it"
        assert trio.current_time() - started < FALLBACK
        assert [call.method for call in wire.calls if call.method in ("read", "open_sse")] == ["open_sse"] * 2
        assert wire.lingers == [FALLBACK / 10] * 2, "a tenth of the fallback, at most LINGER"


async def test_a_silent_sse_read_of_the_fleet_stream_is_opened_again(autojump_clock: trio.testing.MockClock) -> None:
    """A half-open connection brings nothing, not even the runner's own `alive`: it is not waited on forever."""
    wire = FakeWire()
    wire.live_sse = True
    wire.sse_reads.append(ScriptedRead(3600.0))
    alone = member(wire, "a")
    async with fleet_of(wire, alone):
        await trio.sleep(SILENT_INTERVALS * INTERVAL + APPEND_TIMEOUT + 5)
        opened = wire.called("open_sse")
        assert len(opened) == 2
        assert opened[1].at - opened[0].at == pytest.approx(SILENT_INTERVALS * INTERVAL + APPEND_TIMEOUT + 0.1, abs=1)


async def test_a_fleet_stream_refused_over_sse_is_long_polled(autojump_clock: trio.testing.MockClock) -> None:
    wire = FakeWire()  # SSE refused
    a, b = member(wire, "a"), member(wire, "b")
    async with fleet_of(wire, a, b):
        await trio.sleep(5 * INTERVAL)
        assert len(wire.called("open_sse")) == 2, "asked once each"
        assert a.peers() == {"b"}
        assert b.peers() == {"a"}
