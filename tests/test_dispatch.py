"""Which wakes become claims, and when: the dispatcher against the in-memory wire, in virtual time."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing

from runner._claims.claim import ClaimContext
from runner._claims.outcome import Outcome
from runner._dispatch import Dispatcher, Peers, Slots, Wake
from runner._handlers.batch import Batch, HandlerResult
from runner._health import InFlightClaim, Vitals
from runner._wire.retrying import REQUEST_RETRY_INITIAL
from runner.errors import RequestError, TransportError
from tests.claim_harness import Recorder, forever, jobs, make_context, sleep_for
from tests.fake_wire import FakeWire, offset_of

SUB = "s1"
COOLDOWN = 30.0
SWEEP = Wake(SUB)
"""A wake of the runner's own (no generation): always worth a claim."""


def stream_of(subscription: str) -> str:
    return f"jobs/{subscription}"


def server(*subscriptions: str, messages: int = 1, chunk: int = 2) -> FakeWire:
    wire = FakeWire(chunk=chunk)
    for subscription in subscriptions or (SUB,):
        wire.add_stream(stream_of(subscription), jobs(messages, stream_of(subscription)))
        wire.subscribe(subscription, [stream_of(subscription)])
    return wire


class Scene:
    """A dispatcher at work in a nursery, with the wire, the handler and the vitals it reports to."""

    def __init__(self, wire: FakeWire, handler: Recorder, vitals: Vitals, dispatcher: Dispatcher) -> None:
        self.wire = wire
        self.handler = handler
        self.vitals = vitals
        self.dispatcher = dispatcher
        self.contexts: dict[str, ClaimContext] = {}

    def claims_at(self, subscription: str | None = None) -> list[float]:
        return [call.at for call in self.wire.called("claim") if subscription in (None, call.args[0])]

    @property
    def outcomes(self) -> dict[Outcome, int]:
        return dict(self.vitals.claims)

    def in_flight_gauge(self) -> float | None:
        return self.vitals.metrics.registry.get_sample_value("pullwake_claims_in_flight")


@asynccontextmanager
async def dispatching(
    wire: FakeWire,
    handler: Recorder | None = None,
    *,
    max_concurrent: int = 16,
    peers: Peers | None = None,
    confirm: bool = False,
    **overrides: Any,
) -> AsyncIterator[Scene]:
    """Run a dispatcher serving every subscription of `wire`; whatever is still running at the end is interrupted."""
    handler = handler if handler is not None else Recorder()
    vitals = Vitals("test")
    overrides.setdefault("cooldown", COOLDOWN)
    contexts = {sub: make_context(wire, handler, vitals=vitals, **overrides) for sub in wire.subscriptions}
    with trio.fail_after(24 * 3600):  # a broken rule must fail the test, not hang it
        async with trio.open_nursery() as nursery:

            async def confirming(subscription: str) -> None:
                await wire.ensure_subscription(subscription, wake_stream="wake/pool", pattern="jobs/*")

            dispatcher = Dispatcher(
                contexts,
                vitals,
                nursery,
                max_concurrent=max_concurrent,
                peers=peers,
                confirm=confirming if confirm else None,
            )
            scene = Scene(wire, handler, vitals, dispatcher)
            scene.contexts = contexts
            yield scene
            dispatcher.interrupt_all()


async def fail(batch: Batch) -> HandlerResult:
    raise RuntimeError("boom")


# -- which wakes are claimed ----------------------------------------------------------------------


async def test_a_wake_for_a_served_subscription_is_claimed_and_worked(autojump_clock: trio.testing.MockClock) -> None:
    async with dispatching(server(messages=3)) as scene:
        assert scene.dispatcher.served == [SUB]
        scene.dispatcher.wake(Wake(SUB, stream_of(SUB), generation=1))
        await trio.sleep(1)
        assert scene.handler.messages == [jobs(3, stream_of(SUB))[0:2], jobs(3, stream_of(SUB))[2:3]]
        assert scene.outcomes == {Outcome.COMPLETED: 1}
        assert scene.wire.acked(SUB) == {stream_of(SUB): offset_of(3)}
        assert scene.vitals.last_dispatch_at is not None


async def test_the_first_read_goes_out_beside_a_claim_only_where_it_is_likely_granted_with_work(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Beside a claim the server announced (a wake), after this runner won the last one: not for a
    sweep (every subscription at each connect, mostly nothing pending), and not after another
    runner won the last claim (where runners share a subscription, the read is likely wasted)."""
    stream = stream_of(SUB)

    async def claim_once(wake: Wake, new_events: int) -> list[float]:
        """Append events, wake, and say when reads went out (relative to the wake)."""
        scene.wire.add_stream(stream, jobs(new_events, stream))
        scene.wire.delay("claim", 5)
        reads, start = len(scene.wire.called("read")), trio.current_time()
        scene.dispatcher.wake(wake)
        await trio.sleep(30)
        return [call.at - start for call in scene.wire.called("read")[reads:]]

    async with dispatching(server(messages=0)) as scene:
        assert await claim_once(scene.wire.wake(SUB), 1) == [5], "no claim won yet: read after the claim"
        assert await claim_once(scene.wire.wake(SUB), 1) == [0], "won the last one: read beside the claim"
        assert await claim_once(SWEEP, 0) == [], "a sweep that finds nothing sends no read"
        assert await claim_once(scene.wire.wake(SUB), 1) == [5], "the last claim found nothing: read after"
        assert await claim_once(scene.wire.wake(SUB), 1) == [0]
        scene.wire.take_over(SUB)
        # Another runner holds it: the read sent beside the refused claim is wasted, this once.
        assert await claim_once(scene.wire.wake(SUB), 1) == [0]
        scene.wire.subscriptions[SUB].holder = None
        assert await claim_once(scene.wire.wake(SUB), 1) == [5], "another runner won the last one: read after"
        assert len(scene.handler.seen) == 5


@pytest.mark.parametrize("follow_up", ["a wake that came meanwhile", "next_wake at the done ack"])
async def test_a_claim_that_follows_another_at_once_reads_beside_it_when_the_server_announced_it(
    follow_up: str, autojump_clock: trio.testing.MockClock
) -> None:
    stream = stream_of(SUB)
    async with dispatching(server(messages=1), Recorder(sleep_for(10))) as scene:
        scene.dispatcher.wake(scene.wire.wake(SUB))  # won: the next claims may read early
        await trio.sleep(30)
        scene.wire.add_stream(stream, jobs(2, stream)[1:])
        scene.dispatcher.wake(scene.wire.wake(SUB))
        await trio.sleep(1)  # the handler is busy for 10 s
        scene.wire.delay("claim", 5)  # the follow-up claim: a read sent after it would come 5 s later
        if follow_up == "a wake that came meanwhile":
            scene.dispatcher.wake(Wake(SUB, generation=scene.wire.subscriptions[SUB].generation + 1))
        else:
            scene.wire.add_stream(stream, jobs(3, stream)[2:])  # pending at the done ack: next_wake
        await trio.sleep(30)
        claims, reads = scene.claims_at(), [call.at for call in scene.wire.called("read")]
        assert len(claims) == 3
        assert claims[2] in reads, "the follow-up claim's read went out beside it"


async def test_served_subscriptions_are_listed_in_order(autojump_clock: trio.testing.MockClock) -> None:
    async with dispatching(server("b", "c", "a")) as scene:
        assert scene.dispatcher.served == ["a", "b", "c"]


async def test_a_wake_for_a_subscription_not_served_here_is_ignored(autojump_clock: trio.testing.MockClock) -> None:
    async with dispatching(server()) as scene:
        scene.dispatcher.wake(Wake("elsewhere", generation=1))
        await trio.sleep(1)
        assert scene.wire.called("claim") == []
        assert scene.dispatcher.in_flight() == []


async def test_one_claim_at_a_time_per_subscription_and_wakes_meanwhile_become_one_more_claim(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with dispatching(server(), Recorder(sleep_for(10))) as scene:
        start = trio.current_time()
        scene.dispatcher.wake(scene.wire.wake(SUB))
        for generation in (2, 3, 4):
            await trio.sleep(1)
            scene.dispatcher.wake(Wake(SUB, generation=generation))
        await trio.sleep(100)
        assert scene.claims_at() == [start, start + 10]
        assert scene.handler.most_running == 1
        assert scene.outcomes == {Outcome.COMPLETED: 1, Outcome.SKIPPED: 1}


async def test_the_newest_generation_of_the_wakes_that_came_while_busy_is_remembered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire = server()
    wire.subscriptions[SUB].generation = 1  # the coming claim is generation 2
    async with dispatching(wire, Recorder(sleep_for(10))) as scene:
        scene.dispatcher.wake(Wake(SUB, generation=2))
        await trio.sleep(1)
        scene.dispatcher.wake(Wake(SUB, generation=3))
        scene.dispatcher.wake(Wake(SUB, generation=2))  # late and out of order
        await trio.sleep(100)
        assert len(scene.claims_at()) == 2


@pytest.mark.parametrize("sweep_first", [True, False])
async def test_a_sweep_that_came_while_busy_outweighs_any_generation(
    autojump_clock: trio.testing.MockClock, sweep_first: bool
) -> None:
    wire = server()
    wire.subscriptions[SUB].generation = 1
    async with dispatching(wire, Recorder(sleep_for(10))) as scene:
        scene.dispatcher.wake(Wake(SUB, generation=2))
        await trio.sleep(1)
        wakes = [SWEEP, Wake(SUB, generation=2)]
        for wake in wakes if sweep_first else reversed(wakes):
            scene.dispatcher.wake(wake)
        await trio.sleep(100)
        assert len(scene.claims_at()) == 2


async def test_a_wake_that_came_while_busy_for_the_generation_being_worked_is_not_claimed_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with dispatching(server(), Recorder(sleep_for(10))) as scene:
        scene.dispatcher.wake(Wake(SUB, generation=1))
        await trio.sleep(1)
        scene.dispatcher.wake(Wake(SUB, generation=1))  # the server's wake was delivered twice
        await trio.sleep(100)
        assert len(scene.claims_at()) == 1


async def test_a_wake_for_a_generation_already_handled_is_skipped_a_newer_one_or_a_sweep_is_claimed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with dispatching(server()) as scene:
        scene.dispatcher.wake(Wake(SUB, generation=1))
        await trio.sleep(1)
        assert len(scene.claims_at()) == 1
        scene.dispatcher.wake(Wake(SUB, generation=1))
        scene.dispatcher.wake(Wake(SUB, generation=0))
        await trio.sleep(1)
        assert len(scene.claims_at()) == 1
        scene.dispatcher.wake(Wake(SUB, generation=2))
        await trio.sleep(1)
        assert len(scene.claims_at()) == 2
        scene.dispatcher.wake(SWEEP)
        await trio.sleep(1)
        assert len(scene.claims_at()) == 3


async def test_a_generation_counts_as_handled_only_when_its_claim_succeeded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with dispatching(server(), Recorder(fail), handler_max_attempts=1) as scene:
        scene.dispatcher.wake(Wake(SUB, generation=1))
        await trio.sleep(COOLDOWN + 1)
        scene.dispatcher.wake(Wake(SUB, generation=1))
        await trio.sleep(1)
        assert len(scene.claims_at()) == 2


async def test_after_a_reconnect_generations_may_start_over_so_none_counts_as_handled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with dispatching(server()) as scene:
        scene.dispatcher.wake(Wake(SUB, generation=1))
        await trio.sleep(1)
        scene.dispatcher.resync()  # a new connection: forgets generations, and sweeps
        await trio.sleep(1)
        scene.dispatcher.wake(Wake(SUB, generation=1))
        await trio.sleep(1)
        assert len(scene.claims_at()) == 3


async def test_a_subscription_created_again_starts_its_generations_over(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire = server()
    wire.subscriptions[SUB].generation = 4
    async with dispatching(wire) as scene:
        scene.dispatcher.wake(Wake(SUB, generation=5))
        await trio.sleep(1)
        wire.forget_subscriptions()  # the server restarted
        wire.add_stream(stream_of(SUB), [{"job": "after the restart"}])
        scene.dispatcher.wake(SWEEP)  # finds it gone: re-created
        await trio.sleep(1)
        wire.add_stream(stream_of(SUB), [{"job": "new"}])
        scene.dispatcher.wake(wire.wake(SUB))  # generation 1 of the new subscription
        await trio.sleep(1)
        # The put-back subscription is claimed again at once (to replay what it skipped): one more skip.
        assert scene.outcomes == {Outcome.COMPLETED: 2, Outcome.SKIPPED: 2}
        assert scene.handler.messages[-1] == [{"job": "new"}]


class ForgetfulServer(FakeWire):
    """A server shutting down: it still answers, but forgets every subscription put back at once."""

    def __init__(self) -> None:
        super().__init__()
        self.spinning = trio.Event()

    async def claim(self, subscription_id: str, worker: str) -> Any:
        if len(self.called("claim")) >= 1_000:  # a spin in no virtual time: stop it, so the test can say so
            self.spinning.set()
            await trio.sleep_forever()
        self.forget_subscriptions()
        return await super().claim(subscription_id, worker)


async def test_a_server_that_forgets_a_put_back_subscription_at_once_drives_no_claim_loop(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire = ForgetfulServer()
    wire.add_stream(stream_of(SUB), jobs(1, stream_of(SUB)))
    wire.subscribe(SUB, [stream_of(SUB)])
    async with dispatching(wire) as scene:
        scene.dispatcher.wake(wire.wake(SUB))
        with trio.move_on_after(60):
            await wire.spinning.wait()
        claims = scene.claims_at(SUB)
        assert trio.current_time() == pytest.approx(60), f"{len(claims)} claims in {trio.current_time():g} s"
        assert len(claims) < 30, "after the first put-back, claims are paced like ones that got no answer"
        assert claims[1] - claims[0] < 0.1, "the first put-back is claimed again at once"
        assert claims[2] - claims[1] >= 0.5, "a second put-back in a row waits"
        assert claims[-1] - claims[-2] >= 1, "later ones wait longer"


class ShuttingDown(FakeWire):
    """A server that forgets every subscription put back at once while it shuts down (`forgetting`)."""

    def __init__(self) -> None:
        super().__init__()
        self.forgetting = True

    async def claim(self, subscription_id: str, worker: str) -> Any:
        if self.forgetting:
            self.forget_subscriptions()
        return await super().claim(subscription_id, worker)


async def test_put_backs_before_a_new_connection_do_not_pace_the_put_back_after_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A server shutting down forgets what it is given back (put-backs in a row: paced); the server
    started after it forgot the subscription once more. That put-back starts a new row: the
    subscription is claimed again at once, its events do not wait out the old row's pacing."""
    wire = ShuttingDown()
    wire.add_stream(stream_of(SUB), jobs(1, stream_of(SUB)))
    wire.subscribe(SUB, [stream_of(SUB)])
    async with dispatching(wire) as scene:
        scene.dispatcher.wake(wire.wake(SUB))
        await trio.sleep(0.1)
        assert len(scene.claims_at(SUB)) == 2, "put back, claimed again, put back again: now paced"
        wire.forgetting = False  # the restarted server: it forgot the subscription once, at its start
        wire.forget_subscriptions()
        scene.dispatcher.resync()  # its new connection
        await trio.sleep(0.1)
        assert scene.outcomes == {Outcome.SKIPPED: 4}, "both servers' put-backs, then the claim after the last"
        [*_, forgotten, again] = scene.claims_at(SUB)
        assert again - forgotten < 0.1, "the first put-back on the new connection is claimed again at once"


async def test_the_claim_after_a_put_back_for_a_wake_goes_before_the_sweeps(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """After a restart every subscription is swept, each claim finding it forgotten; a wake's claim
    goes first, and when it puts its subscription back, its claim again does not queue behind the sweeps."""
    subscriptions = ["a", "b", "c", "d", "e"]
    wire = server(*subscriptions)
    async with dispatching(wire, max_concurrent=1) as scene:
        wire.forget_subscriptions()  # the server restarted
        wire.delay("claim", 0.5)
        scene.dispatcher.sweep(["a"])  # "a" takes the only slot for a while
        await trio.sleep(0.1)
        scene.dispatcher.resync()  # the others queue
        scene.dispatcher.wake(Wake("d", stream_of("d"), generation=1))
        await trio.sleep(1)
        order = [call.args[0] for call in wire.called("claim")]
        first = order.index("d")
        assert order[:2] == ["a", "d"], f"the wake's claim takes the first free slot: {order}"
        # The slot it freed passed on to the next sweep already; the next free one is its own.
        assert order.index("d", first + 1) <= first + 2, f"claimed again before the sweeps: {order}"


async def test_a_put_back_after_a_claim_that_went_well_is_claimed_again_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with dispatching(server(messages=1)) as scene:
        scene.dispatcher.wake(scene.wire.wake(SUB))
        await trio.sleep(1)
        assert scene.outcomes == {Outcome.COMPLETED: 1}
        scene.wire.forget_subscriptions()  # a server restart: the next claim finds it gone, puts it back
        scene.dispatcher.wake(SWEEP)
        await trio.sleep(10)
        [_, forgotten, again] = scene.claims_at(SUB)[:3]
        assert again - forgotten < 0.1, "only put-backs in a row are paced: the count starts over after a claim"


async def test_more_work_at_the_done_ack_is_claimed_again_at_once(autojump_clock: trio.testing.MockClock) -> None:
    wire = server()
    appended = False

    async def behave(batch: Batch) -> HandlerResult:
        nonlocal appended
        if not appended:
            appended = True
            wire.add_stream(stream_of(SUB), [{"job": "late"}])
        await trio.sleep(1)
        return None

    async with dispatching(wire, Recorder(behave)) as scene:
        start = trio.current_time()
        scene.dispatcher.wake(scene.wire.wake(SUB))
        await trio.sleep(100)
        assert scene.claims_at() == [start, start + 1]
        assert scene.outcomes == {Outcome.COMPLETED: 2}


# -- cooldown and the concurrency limit -----------------------------------------------------------


async def test_a_claim_that_got_no_answer_is_tried_again_soon_not_cooled_down(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A server restarting under load: the claim's retries all fail to connect. That is no verdict
    on the subscription, so its events wait for the server, not for a 30 s cooldown."""
    async with dispatching(server(messages=1), backoff_initial=1.0, backoff_max=8.0) as scene:
        scene.wire.fail_transport("claim", times=5 * 3)  # three claims' worth of retries
        scene.dispatcher.wake(SWEEP)
        await trio.sleep(COOLDOWN)
        assert len(scene.handler.seen) == 1, "handled once the server answers, well within a cooldown"
        assert scene.outcomes == {Outcome.ERROR: 3, Outcome.COMPLETED: 1}
        starts = scene.claims_at()[::5]
        gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
        assert all(gap < COOLDOWN / 3 for gap in gaps), gaps


async def test_claims_that_get_no_answer_are_paced_by_a_growing_backoff_that_starts_over_after_an_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A server that is down is not hammered: each claim that got no answer waits longer than the last
    before the next (jittered down by at most a fifth); one answer and the next outage starts short again."""

    def rests() -> list[float]:
        """From each claim's last unanswered attempt to the next claim's first."""
        at = scene.claims_at()
        return [at[n + 5] - at[n + 4] for n in range(0, len(at) - 5, 5)]

    async with dispatching(server(messages=1), backoff_initial=1.0, backoff_max=8.0) as scene:
        scene.wire.fail_transport("claim", times=5 * 3)
        scene.dispatcher.wake(SWEEP)
        await trio.sleep(COOLDOWN)
        assert scene.outcomes == {Outcome.ERROR: 3, Outcome.COMPLETED: 1}
        for rest, delay in zip(rests(), [1.0, 2.0, 4.0], strict=True):
            assert 0.8 * delay <= rest <= delay
        answered = len(scene.claims_at())
        scene.wire.fail_transport("claim", times=5)
        scene.dispatcher.wake(SWEEP)
        await trio.sleep(COOLDOWN)
        at = scene.claims_at()[answered:]
        assert len(at) == 6
        assert 0.8 <= at[5] - at[4] <= 1.0, "the backoff started over"


@pytest.mark.parametrize("heard", ["a new connection", "a wake"])
async def test_claims_paced_while_the_server_was_down_go_at_once_when_it_is_heard_again(
    autojump_clock: trio.testing.MockClock, heard: str
) -> None:
    """A restart under load: the claims got no answer for a while and their pacing grew to seconds.
    Once the server is heard again (the wake stream's new connection, or a wake of its own) the
    paced subscription is claimed at once, not at the end of its wait."""
    async with dispatching(server(messages=1), backoff_initial=1.0, backoff_max=30.0) as scene:
        scene.wire.down = True
        scene.dispatcher.wake(SWEEP)
        await trio.sleep(30)
        assert scene.outcomes[Outcome.ERROR] >= 3, "paced: 1, 2, 4, 8 s... between claims"
        scene.wire.down = False
        back = trio.current_time()
        if heard == "a wake":
            scene.dispatcher.wake(Wake(SUB, stream_of(SUB), generation=1))
        else:
            scene.dispatcher.resync()
        await trio.sleep(1)
        # At once; or, where a claim was under way (its request refused), at that request's next
        # attempt, which is never paced longer than REQUEST_RETRY_INITIAL while nothing answers.
        assert back <= scene.claims_at()[-1] <= back + REQUEST_RETRY_INITIAL, "claimed as soon as the server was heard"
        assert scene.outcomes[Outcome.COMPLETED] == 1


async def test_a_failed_claims_cooldown_is_not_cut_short_by_a_new_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Only the pacing of claims without an answer ends when the server is heard: a failure's
    cooldown is the server's (or the handler's) verdict, and is waited out."""
    async with dispatching(server(), Recorder(fail), handler_max_attempts=1) as scene:
        scene.dispatcher.wake(SWEEP)
        await trio.sleep(1)
        assert scene.outcomes == {Outcome.FAILED: 1}
        claims = len(scene.claims_at())
        scene.dispatcher.resync()
        scene.dispatcher.wake(Wake(SUB, stream_of(SUB), generation=5))
        await trio.sleep(COOLDOWN / 2)
        assert len(scene.claims_at()) == claims, "still cooling down"


async def test_a_wake_goes_before_the_sweeps_that_wait_for_a_slot(autojump_clock: trio.testing.MockClock) -> None:
    """After a server restart every subscription is swept at once; a new event's claim must not queue
    behind them all. One slot: the sweeps wait in order, and the one the server wakes goes next."""
    names = [f"s{n}" for n in range(6)]
    gate = trio.Event()

    async def held(batch: Batch) -> HandlerResult:
        if batch.stream == stream_of("s0"):
            await gate.wait()
        return None

    async with dispatching(server(*names), Recorder(held), max_concurrent=1) as scene:
        scene.dispatcher.sweep(names[:1])
        await trio.sleep(1)
        for name in names[1:]:
            scene.dispatcher.sweep([name])
            await trio.sleep(1)
        assert [call.args[0] for call in scene.wire.called("claim")] == ["s0"], "s0 holds the only slot"
        scene.dispatcher.wake(Wake("s4", stream_of("s4"), generation=1))
        gate.set()
        await trio.sleep(1)
        assert [call.args[0] for call in scene.wire.called("claim")] == ["s0", "s4", "s1", "s2", "s3", "s5"]


async def test_each_subscription_is_confirmed_once_just_before_its_first_claim_of_the_run(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Confirming what the runner knew is not on the way to following the wake stream: each such
    subscription is confirmed by the claim that sweeps it (with peers: only this runner's share)."""
    fleet = Fleet({"a", "b"})
    async with dispatching(server("a", "b", "c"), peers=fleet, confirm=True) as scene:
        scene.dispatcher.resync()
        await trio.sleep(5)
        scene.dispatcher.resync()
        scene.dispatcher.wake(Wake("c", stream_of("c"), generation=1))
        await trio.sleep(5)
        confirmed = [call.args[0] for call in scene.wire.called("ensure_subscription")]
        assert sorted(confirmed) == ["a", "b"], "once each, and only this runner's share"
        for name in ("a", "b"):
            ensured = next(c.at for c in scene.wire.calls if c.method == "ensure_subscription" and c.args[0] == name)
            assert ensured <= scene.claims_at(name)[0]


async def test_a_confirmation_that_gets_no_answer_does_not_hold_the_claim_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with dispatching(server(messages=1), confirm=True) as scene:
        scene.wire.fail_transport("ensure_subscription")
        scene.dispatcher.resync()
        await trio.sleep(1)
        assert scene.outcomes == {Outcome.COMPLETED: 1}
        scene.dispatcher.resync()
        await trio.sleep(1)
        assert len(scene.wire.called("ensure_subscription")) == 2, "confirmed by the next claim"


async def ends_with_an_error(scene: Scene) -> None:
    """The server refuses the claim (a 4xx it does not explain): its verdict, so the subscription rests."""
    scene.wire.fail("claim", RequestError("claim s1: 400 INVALID_REQUEST", status=400, code="INVALID_REQUEST"))


@pytest.mark.parametrize(("outcome", "arrange"), [(Outcome.FAILED, None), (Outcome.ERROR, ends_with_an_error)])
async def test_a_failed_claim_cools_the_subscription_down_before_the_next_claim(
    autojump_clock: trio.testing.MockClock, outcome: Outcome, arrange: Any
) -> None:
    async with dispatching(server(), Recorder(fail), handler_max_attempts=1) as scene:
        if arrange is not None:
            await arrange(scene)
        scene.dispatcher.wake(SWEEP)
        await trio.sleep(10)
        assert scene.outcomes == {outcome: 1}
        ended = scene.wire.calls[-1].at
        scene.dispatcher.wake(SWEEP)
        await trio.sleep(100)
        assert scene.claims_at()[-1] == ended + COOLDOWN


async def test_an_aborted_claim_cools_the_subscription_down(autojump_clock: trio.testing.MockClock) -> None:
    async with dispatching(server(), Recorder(forever)) as scene:
        scene.dispatcher.wake(SWEEP)
        await trio.sleep(5)
        assert scene.dispatcher.abort(SUB)
        await trio.sleep(1)
        ended = scene.wire.called("release")[-1].at
        scene.dispatcher.wake(SWEEP)
        await trio.sleep(COOLDOWN + 1)
        assert scene.claims_at()[-1] == ended + COOLDOWN


async def test_a_completed_or_skipped_claim_does_not_cool_down(autojump_clock: trio.testing.MockClock) -> None:
    async with dispatching(server()) as scene:
        scene.dispatcher.wake(SWEEP)
        await trio.sleep(1)
        scene.dispatcher.wake(SWEEP)  # nothing pending: skipped
        await trio.sleep(1)
        scene.wire.add_stream(stream_of(SUB), [{"job": "more"}])
        now = trio.current_time()
        scene.dispatcher.wake(SWEEP)
        await trio.sleep(1)
        assert scene.outcomes == {Outcome.COMPLETED: 2, Outcome.SKIPPED: 1}
        assert scene.claims_at()[-1] == now


async def test_a_fenced_claim_does_not_cool_down(autojump_clock: trio.testing.MockClock) -> None:
    async def behave(batch: Batch) -> HandlerResult:
        wire.take_over(SUB)
        return None

    wire = server()
    async with dispatching(wire, Recorder(behave)) as scene:
        scene.dispatcher.wake(SWEEP)
        await trio.sleep(1)
        assert scene.outcomes == {Outcome.FENCED: 1}
        wire.subscriptions[SUB].holder = None
        now = trio.current_time()
        scene.dispatcher.wake(SWEEP)
        await trio.sleep(1)
        assert scene.claims_at()[-1] == now


async def test_no_more_claims_run_at_once_than_the_limit(autojump_clock: trio.testing.MockClock) -> None:
    async with dispatching(server("a", "b", "c"), Recorder(sleep_for(10)), max_concurrent=2) as scene:
        start = trio.current_time()
        for subscription in ("a", "b", "c"):
            scene.dispatcher.wake(Wake(subscription))
        await trio.sleep(1)
        in_flight = scene.dispatcher.in_flight()
        assert len(in_flight) == 3, "the third waits for a slot, registered"
        [waiting] = [claim for claim in in_flight if claim.wake_id is None]
        assert (waiting.generation, waiting.stream, waiting.batches_done) == (None, None, 0)
        await trio.sleep(100)
        assert sorted(scene.claims_at()) == [start, start, start + 10]
        assert scene.handler.most_running == 2
        assert scene.outcomes == {Outcome.COMPLETED: 3}


# -- what is in flight, abort, interrupt ---------------------------------------------------------


async def test_in_flight_claims_say_where_they_are(autojump_clock: trio.testing.MockClock) -> None:
    calls = 0

    async def behave(batch: Batch) -> HandlerResult:
        nonlocal calls
        calls += 1
        if calls == 2:
            await trio.sleep_forever()
        return None

    wire = server(messages=2, chunk=1)
    wire.delay("claim", 5)
    async with dispatching(wire, Recorder(behave)) as scene:
        assert scene.dispatcher.in_flight() == []
        scene.dispatcher.wake(SWEEP)
        await trio.sleep(1)
        [waiting] = scene.dispatcher.in_flight()
        assert abs(waiting.started_at - time.time()) < 60
        assert (waiting.subscription, waiting.wake_id, waiting.generation, waiting.stream, waiting.batches_done) == (
            SUB,
            None,
            None,
            None,
            0,
        )
        assert scene.in_flight_gauge() == 1
        await trio.sleep(10)
        [working] = scene.dispatcher.in_flight()
        assert working == InFlightClaim(SUB, "w1", 1, waiting.started_at, stream_of(SUB), 1)
        scene.dispatcher.interrupt_all()
        await trio.sleep(1)
        assert scene.dispatcher.in_flight() == []
        assert scene.in_flight_gauge() == 0


async def test_an_aborted_claim_hands_back_what_it_finished(autojump_clock: trio.testing.MockClock) -> None:
    calls = 0

    async def behave(batch: Batch) -> HandlerResult:
        nonlocal calls
        calls += 1
        if calls == 2:
            await trio.sleep_forever()
        return None

    async with dispatching(server(messages=2, chunk=1), Recorder(behave)) as scene:
        assert not scene.dispatcher.abort(SUB), "nothing in flight to abort"
        assert not scene.dispatcher.abort("elsewhere")
        scene.dispatcher.wake(SWEEP)
        await trio.sleep(5)
        assert scene.dispatcher.abort(SUB)
        await trio.sleep(1)
        assert scene.handler.cancelled_at == trio.current_time() - 1
        assert scene.outcomes == {Outcome.ABORTED: 1}
        assert scene.wire.acked(SUB) == {stream_of(SUB): offset_of(1)}
        assert len(scene.wire.called("release")) == 1
        assert scene.dispatcher.in_flight() == []


async def test_interrupted_claims_are_counted_as_interrupted(autojump_clock: trio.testing.MockClock) -> None:
    async with dispatching(server(), Recorder(forever)) as scene:
        scene.dispatcher.wake(SWEEP)
        await trio.sleep(5)
        scene.dispatcher.interrupt_all()
        scene.dispatcher.abort(SUB)  # too late: it was interrupted first
        await trio.sleep(1)
        assert scene.outcomes == {Outcome.INTERRUPTED: 1}


async def test_a_wake_during_an_aborted_claims_hand_back_is_claimed_after_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire = server()
    async with dispatching(wire, Recorder(forever)) as scene:
        scene.dispatcher.wake(SWEEP)
        await trio.sleep(5)
        wire.delay("release", 2)
        scene.dispatcher.abort(SUB)
        await trio.sleep(1)
        scene.dispatcher.wake(SWEEP)  # the server's wake for the released work, during the hand-back
        await trio.sleep(COOLDOWN + 10)
        assert len(scene.claims_at()) == 2


async def test_a_hand_back_that_could_not_finish_is_kept_as_a_cleanup_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire = server()
    async with dispatching(wire, Recorder(forever), finalizer_timeout=3.0) as scene:
        scene.dispatcher.wake(SWEEP)
        await trio.sleep(5)
        wire.hang("release")
        scene.dispatcher.abort(SUB)
        await trio.sleep(10)
        [error] = scene.dispatcher.cleanup_errors
        assert isinstance(error, TimeoutError)


# -- draining ----------------------------------------------------------------------------------------


async def test_a_drain_lets_in_flight_claims_finish_within_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with dispatching(server(), Recorder(sleep_for(10))) as scene:
        start = trio.current_time()
        scene.dispatcher.wake(SWEEP)
        await trio.sleep(1)
        await scene.dispatcher.drain(30)
        assert trio.current_time() == start + 10
        assert scene.outcomes == {Outcome.COMPLETED: 1}


async def test_a_drain_interrupts_what_is_still_running_at_its_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with dispatching(server(), Recorder(forever)) as scene:
        scene.dispatcher.wake(SWEEP)
        await trio.sleep(1)
        began = trio.current_time()
        await scene.dispatcher.drain(30)
        assert scene.handler.cancelled_at == began + 30
        assert trio.current_time() == began + 30
        assert scene.outcomes == {Outcome.INTERRUPTED: 1}
        assert len(scene.wire.called("release")) == 1


async def test_a_drain_waits_for_the_bounded_hand_backs(autojump_clock: trio.testing.MockClock) -> None:
    wire = server()
    async with dispatching(wire, Recorder(forever), finalizer_timeout=3.0) as scene:
        scene.dispatcher.wake(SWEEP)
        await trio.sleep(1)
        wire.delay("release", 2)
        began = trio.current_time()
        await scene.dispatcher.drain(30)
        assert trio.current_time() == began + 32
        assert scene.dispatcher.cleanup_errors == []


async def test_a_drain_takes_no_new_work_and_forgets_remembered_wakes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with dispatching(server(), Recorder(sleep_for(10))) as scene:
        scene.dispatcher.wake(SWEEP)
        await trio.sleep(1)
        scene.dispatcher.wake(SWEEP)  # remembered: would claim again after this one
        await scene.dispatcher.drain(30)
        scene.dispatcher.wake(SWEEP)
        await trio.sleep(100)
        assert len(scene.claims_at()) == 1


async def test_a_drain_does_not_wait_out_a_cooldown_or_a_free_slot(autojump_clock: trio.testing.MockClock) -> None:
    async with dispatching(server("a", "b"), Recorder(fail), max_concurrent=1, handler_max_attempts=1) as scene:
        scene.dispatcher.wake(Wake("a"))
        await trio.sleep(1)
        scene.dispatcher.wake(Wake("a"))  # waits out the cooldown
        scene.wire.hang("read")
        scene.dispatcher.wake(Wake("b"))  # takes the only slot and hangs in its read
        await trio.sleep(1)
        scene.dispatcher.wake(Wake("a"))
        began = trio.current_time()
        await scene.dispatcher.drain(5)
        assert trio.current_time() == began + 5, "only the claim at work held up the drain"
        assert len(scene.claims_at("a")) == 1
        assert scene.outcomes == {Outcome.FAILED: 1, Outcome.INTERRUPTED: 1}


async def test_a_drain_with_nothing_in_flight_returns_at_once(autojump_clock: trio.testing.MockClock) -> None:
    async with dispatching(server()) as scene:
        began = trio.current_time()
        await scene.dispatcher.drain(30)
        assert trio.current_time() == began


async def test_a_transport_error_in_the_hand_back_does_not_block_the_drain(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire = server()
    async with dispatching(wire, Recorder(forever)) as scene:
        scene.dispatcher.wake(SWEEP)
        await trio.sleep(1)
        wire.fail("release", TransportError("release: refused"))
        await scene.dispatcher.drain(5)
        [error] = scene.dispatcher.cleanup_errors
        assert isinstance(error, TransportError)


async def test_the_time_from_the_servers_wake_to_the_handler_is_measured(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with dispatching(server()) as scene:
        scene.dispatcher.wake(Wake(SUB, generation=1, ts_ms=int((time.time() - 5) * 1000)))
        await trio.sleep(1)
        registry = scene.vitals.metrics.registry
        assert registry.get_sample_value("pullwake_wake_to_handler_seconds_count") == 1
        latency = registry.get_sample_value("pullwake_wake_to_handler_seconds_sum")
        assert latency is not None
        assert 5 <= latency < 6


async def test_a_skipped_wake_does_not_count_toward_the_next_claims_latency(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with dispatching(server()) as scene:
        scene.dispatcher.wake(Wake(SUB, generation=1))
        await trio.sleep(1)
        scene.dispatcher.wake(Wake(SUB, generation=1, ts_ms=int(time.time() * 1000)))  # handled already: skipped
        scene.wire.add_stream(stream_of(SUB), [{"job": "later"}])
        await trio.sleep(300)
        scene.dispatcher.wake(SWEEP)  # the periodic sweep finds the new event
        await trio.sleep(1)
        assert len(scene.claims_at()) == 2
        registry = scene.vitals.metrics.registry
        assert registry.get_sample_value("pullwake_wake_to_handler_seconds_count") == 0, "no timed wake led here"


# -- aborts, rests and sweeps -----------------------------------------------------------------


async def test_an_abort_rests_the_subscription_exactly_as_long_as_asked(autojump_clock: trio.testing.MockClock) -> None:
    async with dispatching(server(), Recorder(forever)) as scene:
        scene.dispatcher.wake(SWEEP)
        await trio.sleep(1)
        assert scene.dispatcher.abort(SUB, cooldown=5.0)
        await trio.sleep(0.5)
        resting = scene.dispatcher.cooldowns()
        assert set(resting) == {SUB}
        assert resting[SUB] - time.time() == pytest.approx(4.5, abs=0.5)
        aborted_at = trio.current_time()
        scene.dispatcher.wake(SWEEP)
        await trio.sleep(10)
        [_, again] = scene.claims_at()
        assert again - aborted_at == pytest.approx(5.0 - 0.5, abs=0.01), "claimed again when the rest ended"
        assert scene.outcomes[Outcome.ABORTED] == 1


async def test_an_abort_without_a_cooldown_rests_for_the_setting_and_zero_not_at_all(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with dispatching(server(), Recorder(forever)) as scene:
        scene.dispatcher.wake(SWEEP)
        await trio.sleep(1)
        assert scene.dispatcher.abort(SUB)
        await trio.sleep(0.1)
        assert scene.dispatcher.cooldowns()[SUB] - time.time() == pytest.approx(COOLDOWN - 0.1, abs=0.5)
        assert not scene.dispatcher.abort("nobody")
    async with dispatching(server(), Recorder(forever)) as scene:
        scene.dispatcher.wake(SWEEP)
        await trio.sleep(1)
        assert scene.dispatcher.abort(SUB, cooldown=0)
        await trio.sleep(0.1)
        assert scene.dispatcher.cooldowns() == {}


async def test_an_abort_while_waiting_for_a_slot_is_booked_and_rests(autojump_clock: trio.testing.MockClock) -> None:
    async with dispatching(server("a", "b"), Recorder(forever), max_concurrent=1) as scene:
        scene.dispatcher.wake(Wake("a"))
        await trio.sleep(1)
        scene.dispatcher.wake(Wake("b"))  # waits for the only slot
        await trio.sleep(1)
        assert scene.dispatcher.abort("b", cooldown=7.0)
        await trio.sleep(0.1)
        assert scene.outcomes.get(Outcome.ABORTED) == 1
        assert set(scene.dispatcher.cooldowns()) == {"b"}
        assert scene.claims_at("b") == [], "it never got as far as claiming"


async def test_an_abort_while_waiting_for_a_slot_to_claim_again_is_booked_and_rests(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with dispatching(server("a", "b"), Recorder(sleep_for(10)), max_concurrent=1) as scene:
        scene.dispatcher.wake(Wake("b"))
        await trio.sleep(1)
        scene.dispatcher.wake(Wake("b"))  # remembered: b claims again when this claim ends
        scene.dispatcher.wake(Wake("a"))  # first in line for the only slot
        await trio.sleep(10)  # b's claim ended, a's took the slot: b waits for it again
        assert [claim.subscription for claim in scene.dispatcher.in_flight()] == ["a", "b"]
        assert scene.dispatcher.abort("b", cooldown=7.0)
        await trio.sleep(0.1)
        assert scene.outcomes == {Outcome.COMPLETED: 1, Outcome.ABORTED: 1}
        assert set(scene.dispatcher.cooldowns()) == {"b"}
        assert len(scene.claims_at("b")) == 1, "its second claim never went out"


async def test_a_resync_claims_every_served_subscription_once(autojump_clock: trio.testing.MockClock) -> None:
    async with dispatching(server("a", "b", "c")) as scene:
        scene.dispatcher.resync()
        await trio.sleep(1)
        assert sorted(call.args[0] for call in scene.wire.called("claim")) == ["a", "b", "c"]
        scene.dispatcher.sweep(["b"])
        await trio.sleep(1)
        assert sorted(call.args[0] for call in scene.wire.called("claim")) == ["a", "b", "b", "c"]


async def test_a_cooldown_is_listed_until_the_moment_it_ends(autojump_clock: trio.testing.MockClock) -> None:
    async with dispatching(server(), Recorder(forever)) as scene:
        scene.dispatcher.wake(SWEEP)
        await trio.sleep(1)
        aborted_at = trio.current_time()
        assert scene.dispatcher.abort(SUB, cooldown=5)
        await trio.sleep_until(aborted_at + 4.5)
        assert set(scene.dispatcher.cooldowns()) == {SUB}
        await trio.sleep_until(aborted_at + 5)
        assert scene.dispatcher.cooldowns() == {}


# -- a reload: retiring and adding subscriptions ----------------------------------------------------


async def test_a_retired_subscriptions_claim_in_flight_runs_to_its_end_and_no_other_follows(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stream = stream_of(SUB)
    async with dispatching(server(messages=3), Recorder(sleep_for(10))) as scene:
        scene.dispatcher.wake(scene.wire.wake(SUB))
        await trio.sleep(5)
        ended = scene.dispatcher.retire(SUB)
        scene.wire.add_stream(stream, jobs(2, stream))  # pending when the claim ends: `next_wake`
        scene.dispatcher.wake(scene.wire.wake(SUB))  # not served any more
        assert not ended.is_set()
        await ended.wait()
        assert trio.current_time() == pytest.approx(20), "two batches of 10 s: not cut short"
        await trio.sleep(60)
        assert scene.outcomes == {Outcome.COMPLETED: 1}
        handled = sum(len(batch) for batch in scene.handler.messages)
        assert handled < 5, "what came after its claim is left for whoever serves it"
        assert scene.wire.acked(SUB) == {stream: offset_of(handled)}, "acknowledged as far as it handled"
        assert scene.wire.holder(SUB) is None, "and handed back"
        assert len(scene.claims_at(SUB)) == 1
        assert scene.dispatcher.served == []
        assert scene.dispatcher.in_flight() == []


async def test_retiring_a_subscription_that_waits_out_a_cooldown_ends_its_wait_without_a_claim(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with dispatching(server(), Recorder(fail), handler_max_attempts=1) as scene:
        scene.dispatcher.wake(scene.wire.wake(SUB))
        await trio.sleep(1)
        assert scene.outcomes == {Outcome.FAILED: 1}
        scene.dispatcher.wake(SWEEP)  # waits for the cooldown
        await trio.sleep(1)
        assert len(scene.dispatcher.in_flight()) == 1
        ended = scene.dispatcher.retire(SUB)
        await ended.wait()
        assert trio.current_time() < COOLDOWN
        assert len(scene.claims_at(SUB)) == 1


async def test_a_subscription_added_back_while_it_drains_keeps_one_claim_at_a_time_and_is_swept(
    autojump_clock: trio.testing.MockClock,
) -> None:
    overlap: list[int] = []
    busy = 0

    async def counted(batch: Batch) -> HandlerResult:
        nonlocal busy
        busy += 1
        overlap.append(busy)
        await trio.sleep(10)
        busy -= 1
        return None

    async with dispatching(server(messages=1), Recorder(counted)) as scene:
        context = make_context(scene.wire, scene.handler, vitals=scene.vitals, cooldown=COOLDOWN)
        scene.dispatcher.wake(scene.wire.wake(SUB))
        await trio.sleep(5)
        ended = scene.dispatcher.retire(SUB)
        scene.dispatcher.add(SUB, context)
        assert ended.is_set(), "whoever waited for the drain learns it is served again"
        scene.wire.add_stream(stream_of(SUB), jobs(1, stream_of(SUB)))
        await trio.sleep(60)
        assert max(overlap) == 1
        assert scene.dispatcher.served == [SUB]
        assert scene.outcomes == {Outcome.COMPLETED: 2}, "served again: the pending event was claimed"


async def test_a_subscription_added_by_a_reload_is_served_and_swept_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with dispatching(server(messages=1)) as scene:
        scene.wire.add_stream(stream_of("s2"), jobs(2, stream_of("s2")))
        scene.wire.subscribe("s2", [stream_of("s2")])
        added = Recorder()
        scene.dispatcher.add("s2", make_context(scene.wire, added, vitals=scene.vitals, cooldown=COOLDOWN))
        await trio.sleep(1)
        assert scene.dispatcher.served == [SUB, "s2"]
        assert added.messages == [jobs(2, stream_of("s2"))], "claimed without a wake, by its own handler"
        assert scene.handler.messages == []
        assert scene.claims_at(SUB) == [], "only the added one is swept"


async def test_adding_a_served_subscription_again_keeps_its_claim_in_flight_and_the_next_claim_takes_the_new_context(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stream = stream_of(SUB)
    async with dispatching(server(messages=1), Recorder(sleep_for(10))) as scene:
        scene.dispatcher.wake(scene.wire.wake(SUB))
        await trio.sleep(5)
        changed = Recorder()
        scene.dispatcher.add(SUB, make_context(scene.wire, changed, vitals=scene.vitals, cooldown=COOLDOWN))
        scene.wire.add_stream(stream, jobs(2, stream)[1:])
        await trio.sleep(60)
        first, second = scene.claims_at(SUB)
        assert second >= first + 10, "one claim at a time: the sweep waited for the claim in flight"
        assert scene.handler.messages == [jobs(1, stream)]
        assert changed.messages == [jobs(2, stream)[1:]]
        assert scene.outcomes == {Outcome.COMPLETED: 2}


async def test_retiring_a_subscription_with_no_claim_in_flight_ends_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with dispatching(server("a", "b")) as scene:
        assert scene.dispatcher.serves("a")
        assert scene.dispatcher.retire("a").is_set()
        assert not scene.dispatcher.serves("a")
        assert scene.dispatcher.retire("never-served").is_set()
        assert scene.dispatcher.served == ["b"]
        scene.dispatcher.wake(scene.wire.wake("a"))
        await trio.sleep(1)
        assert scene.claims_at() == []


async def test_an_abort_reaches_the_claim_of_a_subscription_that_is_retiring(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with dispatching(server(messages=1), Recorder(forever)) as scene:
        scene.dispatcher.wake(scene.wire.wake(SUB))
        await trio.sleep(5)
        ended = scene.dispatcher.retire(SUB)
        assert scene.dispatcher.abort(SUB)
        with trio.fail_after(10):
            await ended.wait()
        assert scene.outcomes == {Outcome.ABORTED: 1}
        assert scene.wire.holder(SUB) is None, "handed back"
        assert not scene.dispatcher.abort(SUB), "nothing left to abort"


# -- with peers -------------------------------------------------------------------------------------


class Fleet:
    """Peers as the dispatcher sees them: who is first for what, and whose turn each claim is."""

    def __init__(self, first_for: set[str]) -> None:
        self.first_for = first_for
        self.asked: list[tuple[str, int | None]] = []

    def rank(self, subscription: str) -> int:
        return 0 if subscription in self.first_for else 1

    async def may_claim(self, subscription: str, generation: int | None) -> bool:
        await trio.lowlevel.checkpoint()
        self.asked.append((subscription, generation))
        return subscription in self.first_for

    def leave(self, subscription: str, generation: int, on_due: Callable[[], None]) -> bool:
        return False  # every wake asks `may_claim` (tests/test_fleet.py covers leaving)

    def take(self, subscription: str, generation: int) -> None:
        pass

    def reconnected(self) -> None:
        pass


async def test_when_the_fleet_changes_only_the_subscriptions_that_became_this_runners_are_swept(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fleet = Fleet({"a", "b"})
    async with dispatching(server("a", "b", "c", "d"), peers=fleet) as scene:
        scene.dispatcher.reshare()  # nothing changed hands yet: all four were assumed this runner's
        await trio.sleep(1)
        assert scene.claims_at() == []
        fleet.first_for = {"a", "c"}  # a peer left: c is this runner's now, b went to a peer
        scene.dispatcher.reshare()
        await trio.sleep(1)
        assert [call.args[0] for call in scene.wire.called("claim")] == ["c"]
        scene.dispatcher.reshare()
        await trio.sleep(1)
        assert len(scene.claims_at()) == 1, "swept once, when it changed hands"
        fleet.first_for = {"a", "b", "c"}
        scene.dispatcher.reshare()
        await trio.sleep(1)
        assert sorted(call.args[0] for call in scene.wire.called("claim")) == ["b", "c"]


async def test_each_claim_asks_the_fleet_for_its_turn_with_the_generation_of_its_wake(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fleet = Fleet({SUB})
    async with dispatching(server(messages=1), Recorder(sleep_for(10)), peers=fleet) as scene:
        scene.dispatcher.wake(Wake(SUB, generation=4))
        await trio.sleep(1)
        scene.dispatcher.wake(Wake(SUB, generation=5))  # remembered while busy
        await trio.sleep(30)
        assert fleet.asked == [(SUB, 4), (SUB, 5)]
        fleet.first_for = set()  # a peer's turn now: no claim
        scene.dispatcher.wake(Wake(SUB, generation=6))
        await trio.sleep(30)
        assert fleet.asked[-1] == (SUB, 6)
        assert len(scene.claims_at()) == 2


async def test_a_subscription_added_by_a_reload_is_swept_once_by_the_runner_first_in_line_for_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fleet = Fleet({SUB, "c"})
    async with dispatching(server(), peers=fleet) as scene:
        for added in ("c", "d"):
            scene.wire.add_stream(stream_of(added), jobs(1, stream_of(added)))
            scene.wire.subscribe(added, [stream_of(added)])
            scene.dispatcher.add(added, make_context(scene.wire, scene.handler, vitals=scene.vitals))
        await trio.sleep(1)
        assert [call.args[0] for call in scene.wire.called("claim")] == ["c"], "d is a peer's"
        scene.dispatcher.reshare()  # nothing changed hands
        await trio.sleep(1)
        assert len(scene.claims_at()) == 1, "c was this runner's from the start: not swept again"
        fleet.first_for.add("d")  # a peer left: d is this runner's now
        scene.dispatcher.reshare()
        await trio.sleep(1)
        assert [call.args[0] for call in scene.wire.called("claim")] == ["c", "d"]


# -- claim slots ------------------------------------------------------------------------------------


async def test_a_free_claim_slot_goes_to_the_wakes_the_server_wrote_before_the_sweeps(
    autojump_clock: trio.testing.MockClock,
) -> None:
    slots = Slots(1)
    order: list[str] = []

    async def claim(name: str, *, urgent: bool) -> None:
        await slots.acquire(name, urgent=urgent)
        order.append(name)
        await trio.sleep(1)
        slots.release()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(claim, "first", urgent=False))
        await trio.sleep(0.1)
        for name, urgent in (("sweep-1", False), ("wake-1", True), ("sweep-2", False), ("wake-2", True)):
            nursery.start_soon(partial(claim, name, urgent=urgent))
            await trio.sleep(0.1)
        slots.hurry("sweep-2")  # a wake for a subscription already waiting as a sweep
    assert order == ["first", "wake-1", "wake-2", "sweep-2", "sweep-1"]
    assert slots.used == 0


@pytest.mark.parametrize("urgent", [False, True], ids=["sweep", "wake"])
async def test_a_claim_cancelled_while_it_waits_for_a_slot_leaves_no_slot_taken(
    autojump_clock: trio.testing.MockClock, urgent: bool
) -> None:
    slots = Slots(1)
    await slots.acquire("holder", urgent=False)
    with trio.move_on_after(1):
        await slots.acquire("cancelled", urgent=urgent)
    slots.release()
    assert slots.used == 0
    with trio.fail_after(0.1):
        await slots.acquire("next", urgent=False)
    assert slots.used == 1


class CountingFleet(Fleet):
    def __init__(self, first_for: set[str]) -> None:
        super().__init__(first_for)
        self.reconnects = 0

    def reconnected(self) -> None:
        self.reconnects += 1


async def test_a_runner_vouches_to_joining_peers_only_for_what_the_server_answered_since_it_connected(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """`covered` is told to a member that joins, which then neither creates nor sweeps those: only a
    claim the server answered on this connection (granted and done, or nothing pending) may be in
    it; not one whose handler failed, nor one that got no answer; a new connection starts it over,
    and tells the fleet (not the run's first connection: nothing was vouched for before it)."""

    async def fails_on_b(batch: Batch) -> HandlerResult:
        if batch.stream == stream_of("b"):
            raise RuntimeError("boom")
        return None

    fleet = CountingFleet({"a", "b", "c"})
    async with dispatching(server("a", "b", "c"), Recorder(fails_on_b), handler_max_attempts=1, peers=fleet) as scene:
        scene.dispatcher.resync()
        await trio.sleep(1)
        assert fleet.reconnects == 0, "the first connection is no reconnect"
        assert scene.dispatcher.covered == {"a", "c"}, "b's claim failed"
        scene.wire.fail_transport("claim", times=100)
        scene.dispatcher.resync()
        await trio.sleep(1)
        assert fleet.reconnects == 1
        assert scene.dispatcher.covered == set(), "claims without an answer vouch for nothing"


async def test_a_wake_of_a_subscription_with_a_gap_replays_it_and_then_claims(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Whoever holds a gap replays it first (the events the server skipped), then claims as usual:
    the replay is on the way to the new events, not instead of them."""
    async with dispatching(server(messages=4)) as scene:
        journal = scene.contexts[SUB].journal
        journal.linked(SUB, {stream_of(SUB): offset_of(1)}, created=False)
        journal.linked(SUB, {stream_of(SUB): offset_of(3)}, created=True)  # 1..3 skipped
        scene.dispatcher.wake(scene.wire.wake(SUB))
        await trio.sleep(1)
        assert journal.gaps(SUB) == []
        assert scene.handler.seen[0].replayed, "the gap first"
        assert len(scene.claims_at(SUB)) == 1, "then the claim"
        assert any(not batch.replayed for batch in scene.handler.seen)
