"""One claim, from POST /claim to the done ack or the hand-back, against the in-memory wire in virtual time."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from runner._claims.claim import ClaimContext, ClaimResult, ClaimRun
from runner._claims.outcome import HANDLER_FAILING, Outcome
from runner._claims.recovery import return_held_claims
from runner._config import SubscriptionSpec
from runner._handlers.batch import SUSPEND, Batch, HandlerResult
from runner._health import Vitals
from runner._secrets import Redactor
from runner._state.journal import Journal
from runner._wire.protocol import Ack
from runner.errors import Fenced, InvalidOffset, PermanentFailure, RequestError, SubscriptionNotFound, TransportError
from tests.claim_harness import JOBS, SUB, Recorder, forever, jobs, make_context, sleep_for
from tests.fake_wire import FakeWire, offset_of
from tests.support import captured_logs

TTL = 30.0


def server(*streams: tuple[str, int], chunk: int = 2) -> FakeWire:
    """A server with these streams (and this many messages each), all linked to SUB."""
    wire = FakeWire(chunk=chunk)
    for path, count in streams:
        wire.add_stream(path, jobs(count, path))
    wire.subscribe(SUB, [path for path, _ in streams], lease_ttl_ms=int(TTL * 1000))
    return wire


async def claim(context: ClaimContext) -> ClaimResult:
    """One claim of SUB; a claim that runs past a day of virtual time is a bug (or a mutant that loops)."""
    with trio.fail_after(24 * 3600):
        return await ClaimRun(context, SUB).run()


def ack_times(wire: FakeWire, since: float = 0.0) -> list[float]:
    return [round(call.at - since, 6) for call in wire.called("ack")]


def fails_on(*bad: int, error: Exception | None = None) -> Recorder:
    """A handler that fails every batch holding one of these message numbers."""

    async def behave(batch: Batch) -> HandlerResult:
        if any(int(message["job"].rsplit("#", 1)[1]) in bad for message in batch.messages):
            raise error if error is not None else RuntimeError("boom")
        return None

    return Recorder(behave)


# -- batches, in order, and acks ------------------------------------------------------------


async def test_batches_reach_the_handler_in_order_and_the_server_ends_acked_at_the_tail(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire, handler = server((JOBS, 5)), Recorder()
    result = await claim(make_context(wire, handler))

    assert result == ClaimResult(Outcome.COMPLETED, generation=1)
    everything = jobs(5)
    assert handler.messages == [everything[0:2], everything[2:4], everything[4:5]]
    assert [(b.start_offset, b.next_offset) for b in handler.seen] == [
        ("-1", offset_of(2)),
        (offset_of(2), offset_of(4)),
        (offset_of(4), offset_of(5)),
    ]
    assert {(b.subscription, b.stream, b.wake_id, b.generation, b.attempt) for b in handler.seen} == {
        (SUB, JOBS, "w1", 1, 1)
    }
    assert wire.acked(SUB) == {JOBS: offset_of(5)}
    assert wire.holder(SUB) is None


async def test_each_batch_is_acked_at_once_except_the_last_which_rides_on_the_done_ack(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire = server((JOBS, 5))
    await claim(make_context(wire, Recorder()))

    assert [call.args for call in wire.called("ack")] == [
        ((Ack(JOBS, offset_of(2)),), False),
        ((Ack(JOBS, offset_of(4)),), False),
        ((Ack(JOBS, offset_of(5)),), True),
    ]
    assert wire.called("release") == []


async def test_every_pending_stream_is_worked_in_turn_and_streams_without_pending_events_are_not_read(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire, handler = server(("jobs/a", 3), ("jobs/b", 0), ("jobs/c", 1)), Recorder()
    result = await claim(make_context(wire, handler))

    assert result.outcome is Outcome.COMPLETED
    assert [(b.stream, len(b.messages)) for b in handler.seen] == [("jobs/a", 2), ("jobs/a", 1), ("jobs/c", 1)]
    assert {call.args[0] for call in wire.called("read")} == {"jobs/a", "jobs/c"}
    assert [call.args for call in wire.called("ack")] == [
        ((Ack("jobs/a", offset_of(2)),), False),
        ((Ack("jobs/a", offset_of(3)),), False),
        ((Ack("jobs/c", offset_of(1)),), True),
    ]
    assert wire.acked(SUB) == {"jobs/a": offset_of(3), "jobs/b": "-1", "jobs/c": offset_of(1)}


async def test_the_claim_reports_which_stream_it_is_on_and_how_many_batches_it_finished(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen: list[tuple[str | None, int]] = []
    run: ClaimRun

    async def behave(batch: Batch) -> HandlerResult:
        seen.append((run.stream, run.batches_done))
        return None

    wire = server(("jobs/a", 3), ("jobs/c", 1))
    run = ClaimRun(make_context(wire, Recorder(behave)), SUB)
    with trio.fail_after(3600):
        await run.run()
    assert seen == [("jobs/a", 0), ("jobs/a", 1), ("jobs/c", 2)]
    assert run.batches_done == 3
    assert run.claim is not None
    assert run.claim.generation == 1


async def test_the_server_saying_more_work_is_pending_at_the_done_ack_asks_for_another_claim(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire = server((JOBS, 1))

    async def behave(batch: Batch) -> HandlerResult:
        wire.add_stream(JOBS, [{"job": "late"}])  # appended while the claim works
        return None

    result = await claim(make_context(wire, Recorder(behave)))
    assert result == ClaimResult(Outcome.COMPLETED, generation=1, next_wake=True)


async def test_handled_events_and_batches_are_counted(autojump_clock: trio.testing.MockClock) -> None:
    vitals = Vitals("test")
    wire = server((JOBS, 5))
    await claim(make_context(wire, Recorder(), vitals=vitals))
    assert vitals.batches == {"ok": 3}
    assert vitals.metrics.registry.get_sample_value("pullwake_events_handled_total") == 5


# -- the first read, sent beside the claim ----------------------------------------------------


async def claimed_once(wire: FakeWire, handler: Recorder) -> ClaimContext:
    """A context whose journal learned, from one finished claim, where SUB's streams were acknowledged."""
    context = make_context(wire, handler)
    assert (await claim(context)).outcome is Outcome.COMPLETED
    return context


async def test_the_known_streams_first_read_goes_out_beside_the_claim_and_its_batch_waits_for_the_grant(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire, handler = server((JOBS, 2)), Recorder()
    context = await claimed_once(wire, handler)
    wire.add_stream(JOBS, jobs(4)[2:])
    wire.delay("claim", 5)
    start, reads_before = trio.current_time(), len(wire.called("read"))

    result = await claim(context)

    assert result.outcome is Outcome.COMPLETED
    reads = wire.called("read")[reads_before:]
    assert [(call.at - start, call.args) for call in reads] == [(0, (JOBS, offset_of(2)))], "one read, at once"
    assert handler.messages[1:] == [jobs(4)[2:4]]
    assert handler.at[1] - start == 5, "the batch waited for the claim to be granted"
    assert wire.acked(SUB) == {JOBS: offset_of(4)}


async def test_an_early_read_from_where_the_claim_does_not_start_is_not_used(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire, handler = server((JOBS, 2)), Recorder()
    context = await claimed_once(wire, handler)
    wire.add_stream(JOBS, jobs(5)[2:])
    wire.subscriptions[SUB].acked[JOBS] = offset_of(3)  # another runner handled one event meanwhile
    reads_before = len(wire.called("read"))

    await claim(context)

    # The early read (from 2) may have gone out or not by the time the claim was answered.
    assert (JOBS, offset_of(3)) in [call.args for call in wire.called("read")[reads_before:]]
    assert handler.messages[1:] == [jobs(5)[3:5]], "nothing handled twice, nothing skipped"


async def test_an_early_read_that_fails_is_read_again_after_the_claim(autojump_clock: trio.testing.MockClock) -> None:
    wire, handler = server((JOBS, 2)), Recorder()
    context = await claimed_once(wire, handler)
    wire.add_stream(JOBS, jobs(3)[2:])
    wire.fail_transport("read")

    result = await claim(context)

    assert result.outcome is Outcome.COMPLETED
    assert handler.messages[1:] == [jobs(3)[2:3]]


async def test_a_bug_in_the_early_read_costs_only_the_early_read(autojump_clock: trio.testing.MockClock) -> None:
    wire, handler = server((JOBS, 2)), Recorder()
    context = await claimed_once(wire, handler)
    wire.add_stream(JOBS, jobs(3)[2:])
    wire.fail("read", RuntimeError("a bug, not a ClientError"))

    result = await claim(context)

    assert result.outcome is Outcome.COMPLETED
    assert handler.messages[1:] == [jobs(3)[2:3]]
    assert wire.holder(SUB) is None


async def test_an_early_read_answered_before_the_events_arrived_does_not_end_the_stream(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire, handler = server((JOBS, 2)), Recorder()
    context = await claimed_once(wire, handler)

    async def appended_meanwhile() -> None:
        await trio.sleep(1)  # the early read is answered (empty) before the events land
        wire.add_stream(JOBS, jobs(3)[2:])

    wire.script("claim", appended_meanwhile)
    result = await claim(context)

    assert result.outcome is Outcome.COMPLETED
    assert handler.messages[1:] == [jobs(3)[2:3]]
    assert wire.acked(SUB) == {JOBS: offset_of(3)}


async def test_an_early_read_for_a_claim_not_granted_reaches_no_handler(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire, handler = server((JOBS, 2)), Recorder()
    context = await claimed_once(wire, handler)
    wire.add_stream(JOBS, jobs(3)[2:])
    wire.take_over(SUB)

    result = await claim(context)

    assert result.outcome is Outcome.SKIPPED
    assert len(handler.seen) == 1


async def test_with_more_than_one_known_stream_the_read_waits_for_the_claim(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire, handler = server((JOBS, 1), ("jobs/b", 1)), Recorder()
    context = await claimed_once(wire, handler)
    wire.add_stream(JOBS, jobs(2)[1:])
    wire.delay("claim", 5)
    start, reads_before = trio.current_time(), len(wire.called("read"))

    await claim(context)

    assert [call.at - start for call in wire.called("read")[reads_before:]] == [5]


# -- the lease ------------------------------------------------------------------------------


async def test_the_lease_keeper_renews_at_a_third_of_the_lease_while_a_handler_takes_its_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire = server((JOBS, 1))
    start = trio.current_time()
    result = await claim(make_context(wire, Recorder(sleep_for(25))))

    assert result.outcome is Outcome.COMPLETED
    assert ack_times(wire, start) == [10, 20, 25]
    assert [call.args for call in wire.called("ack")][:2] == [((), False), ((), False)]


async def test_a_batch_ack_renews_the_lease_so_the_keeper_waits_a_third_from_there(
    autojump_clock: trio.testing.MockClock,
) -> None:
    durations = iter([8, 15])

    async def behave(batch: Batch) -> HandlerResult:
        await trio.sleep(next(durations))
        return None

    wire = server((JOBS, 2), chunk=1)
    start = trio.current_time()
    await claim(make_context(wire, Recorder(behave)))
    assert ack_times(wire, start) == [8, 18, 23]


async def test_the_lease_counts_from_when_the_granting_claim_was_sent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire = server((JOBS, 1))
    wire.fail_transport("claim", times=2)
    await claim(make_context(wire, Recorder(sleep_for(15))))
    granted = wire.called("claim")[-1].at
    assert granted > 0.3  # two retries backed off first
    assert ack_times(wire, granted)[0] == 10


async def test_the_lease_counts_from_when_a_renewal_was_sent_not_answered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire = server((JOBS, 1))
    wire.answer("ack")
    wire.delay("ack", 4)  # the keeper's first renewal is slow to answer
    wire.answer("ack")
    start = trio.current_time()
    await claim(make_context(wire, Recorder(sleep_for(25))))
    assert ack_times(wire, start) == [10, 20, 25]


async def test_a_lease_renewals_could_not_keep_fresh_is_proven_before_the_next_batch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire, handler = server((JOBS, 2), chunk=1), Recorder()
    wire.answer("read")
    wire.freeze("read", autojump_clock, TTL + 10)  # frozen past the lease while reading batch 2
    result = await claim(make_context(wire, handler))

    assert result.outcome is Outcome.FENCED
    assert handler.messages == [jobs(2)[0:1]], "no handler may run on a lease that is not proven"
    assert wire.acked(SUB) == {JOBS: offset_of(1)}
    assert wire.called("release") == []


async def test_a_fresh_lease_is_not_proven_again_before_a_batch(autojump_clock: trio.testing.MockClock) -> None:
    wire = server((JOBS, 2), chunk=1)
    wire.answer("read")
    wire.delay("read", 15)  # the keeper renews meanwhile: still fresh
    start = trio.current_time()
    await claim(make_context(wire, Recorder()))
    assert ack_times(wire, start) == [0, 10, 15]


@pytest.mark.parametrize("loss", ["fenced", "token"])
async def test_a_lost_lease_cancels_the_handler_at_once_and_nothing_is_acked_or_released_after(
    autojump_clock: trio.testing.MockClock, loss: str
) -> None:
    wire, handler = server((JOBS, 1)), Recorder(forever)
    start = trio.current_time()

    async def intruder() -> None:
        await trio.sleep(5)
        if loss == "fenced":
            wire.take_over(SUB)
        else:
            wire.revoke_token(SUB)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(intruder)
        result = await claim(make_context(wire, handler))

    assert result == ClaimResult(Outcome.FENCED, generation=1)
    assert handler.cancelled_at == start + 10, "cancelled by the keeper's refused renewal"
    assert ack_times(wire, start) == [10]
    assert wire.called("release") == []
    assert wire.acked(SUB) == {JOBS: "-1"}


async def test_a_refused_batch_ack_stops_the_claim_before_the_next_batch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def behave(batch: Batch) -> HandlerResult:
        wire.take_over(SUB)
        return None

    wire, handler = server((JOBS, 2), chunk=1), Recorder(behave)
    result = await claim(make_context(wire, handler))
    assert result.outcome is Outcome.FENCED
    assert len(handler.seen) == 1
    assert len(wire.called("ack")) == 1
    assert wire.called("release") == []


async def test_a_refused_done_ack_is_a_lost_lease(autojump_clock: trio.testing.MockClock) -> None:
    async def behave(batch: Batch) -> HandlerResult:
        wire.take_over(SUB)
        return None

    wire = server((JOBS, 1))
    result = await claim(make_context(wire, Recorder(behave)))
    assert result == ClaimResult(Outcome.FENCED, generation=1)
    assert wire.called("release") == []


async def test_failing_renewals_are_retried_until_the_local_lease_deadline_then_the_claim_is_lost(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire, handler = server((JOBS, 1)), Recorder(forever)
    wire.fail_transport("ack", times=1000)
    vitals = Vitals("test")
    start = trio.current_time()
    result = await claim(make_context(wire, handler, vitals=vitals))

    assert result.outcome is Outcome.FENCED
    assert handler.cancelled_at is not None
    assert start + TTL - 2.0 <= handler.cancelled_at < start + TTL, "retried until the lease ran out, not past it"
    assert wire.called("release") == []
    assert vitals.last_error is not None
    assert "TransportError" in vitals.last_error


async def test_a_renewal_that_fails_briefly_is_retried(autojump_clock: trio.testing.MockClock) -> None:
    wire = server((JOBS, 5))
    wire.fail_server("ack", times=2)
    result = await claim(make_context(wire, Recorder()))
    assert result.outcome is Outcome.COMPLETED
    assert wire.acked(SUB) == {JOBS: offset_of(5)}


# -- handler failures -------------------------------------------------------------------------


async def test_a_failing_batch_is_retried_with_backoff_then_dead_lettered_and_the_claim_moves_past_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire, handler, vitals = server((JOBS, 4)), fails_on(0), Vitals("test")
    context = make_context(
        wire,
        handler,
        vitals=vitals,
        handler_max_attempts=3,
        handler_retry_initial=1.0,
        handler_retry_max=30.0,
        dead_letter_stream="dead/letters",
    )
    result = await claim(context)

    assert result == ClaimResult(Outcome.DEAD_LETTERED, generation=1)
    assert [b.attempt for b in handler.seen] == [1, 2, 3, 1]
    first, second, third = handler.at[:3]
    assert 0.8 <= second - first <= 1.0
    assert 1.6 <= third - second <= 2.0
    [letter] = wire.streams["dead/letters"]
    assert letter["type"] == "dead_letter"
    assert letter["runner_id"] == "runner-1"
    assert letter["error"] == "RuntimeError: boom"
    assert letter["batch"]["messages"] == jobs(4)[0:2]
    assert letter["batch"]["attempt"] == 1
    assert wire.acked(SUB) == {JOBS: offset_of(4)}
    assert vitals.batches == {"retried": 2, "dead_lettered": 1, "ok": 1}


async def test_the_subscriptions_own_dead_letter_stream_wins_over_the_default(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire = server((JOBS, 1))
    spec = SubscriptionSpec(id=SUB, pattern="jobs/*", dead_letter_stream="dead/s1")
    context = make_context(
        wire, fails_on(0), handler_max_attempts=1, dead_letter_stream="dead/all", subscriptions=(spec,)
    )
    await claim(context)
    assert len(wire.streams["dead/s1"]) == 1
    assert "dead/all" not in wire.streams


async def test_the_dead_letter_stream_is_created_once(autojump_clock: trio.testing.MockClock) -> None:
    wire = server((JOBS, 2), chunk=1)
    context = make_context(wire, fails_on(0, 1), handler_max_attempts=1, dead_letter_stream="dead/letters")
    await claim(context)
    assert len(wire.streams["dead/letters"]) == 2
    assert len(wire.called("create_stream")) == 1


async def test_without_a_dead_letter_stream_an_exhausted_batch_fails_the_claim_and_hands_it_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire, handler, vitals = server((JOBS, 3), chunk=1), fails_on(1), Vitals("test")
    result = await claim(make_context(wire, handler, vitals=vitals, handler_max_attempts=2))

    assert result == ClaimResult(Outcome.FAILED, generation=1)
    assert [(b.next_offset, b.attempt) for b in handler.seen] == [
        (offset_of(1), 1),
        (offset_of(2), 1),
        (offset_of(2), 2),
    ]
    assert wire.acked(SUB) == {JOBS: offset_of(1)}, "the progress before the failed batch is kept"
    assert len(wire.called("release")) == 1
    assert wire.holder(SUB) is None
    assert wire.subscriptions[SUB].wakes == [2], "the server wakes the next holder at once"
    assert vitals.batches == {"ok": 1, "retried": 1, "failed": 1}


async def test_a_permanent_failure_is_not_retried(autojump_clock: trio.testing.MockClock) -> None:
    wire, handler = server((JOBS, 1)), fails_on(0, error=PermanentFailure("never"))
    result = await claim(make_context(wire, handler, handler_max_attempts=5))
    assert result.outcome is Outcome.FAILED
    assert len(handler.seen) == 1


async def test_a_dead_letter_stream_that_cannot_be_written_fails_the_claim(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire = server((JOBS, 1))
    wire.fail("create_stream", RequestError("create stream dead/letters: 403 forbidden", status=403))
    vitals = Vitals("test")
    context = make_context(wire, fails_on(0), vitals=vitals, handler_max_attempts=1, dead_letter_stream="dead/letters")
    result = await claim(context)
    assert result.outcome is Outcome.FAILED
    assert len(wire.called("release")) == 1
    assert vitals.batches == {"failed": 1}


async def test_a_batch_the_handler_cannot_get_past_degrades_its_subscription_until_one_gets_past(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Blocked on a batch (no dead-letter stream, or one that cannot be written): health names the
    subscription; a batch handled or dead-lettered clears it."""
    wire, vitals = server((JOBS, 1)), Vitals("test")
    await claim(make_context(wire, fails_on(0), vitals=vitals, handler_max_attempts=1))
    assert vitals.problems[HANDLER_FAILING] == {SUB}
    await claim(make_context(wire, Recorder(), vitals=vitals))
    assert vitals.problems[HANDLER_FAILING] == set()

    wire.add_stream(JOBS, jobs(2)[1:])
    wire.fail("create_stream", RequestError("create stream dead/letters: 403 forbidden", status=403))
    dead_letters: dict[str, Any] = {"handler_max_attempts": 1, "dead_letter_stream": "dead/letters"}
    await claim(make_context(wire, fails_on(1), vitals=vitals, **dead_letters))
    assert vitals.problems[HANDLER_FAILING] == {SUB}
    await claim(make_context(wire, fails_on(1), vitals=vitals, **dead_letters))
    assert len(wire.streams["dead/letters"]) == 1
    assert vitals.problems[HANDLER_FAILING] == set(), "dead-lettered: the subscription moves again"


async def test_a_handler_over_its_timeout_is_cancelled_and_retried(autojump_clock: trio.testing.MockClock) -> None:
    calls = 0

    async def behave(batch: Batch) -> HandlerResult:
        nonlocal calls
        calls += 1
        if calls == 1:
            await trio.sleep_forever()
        return None

    handler = Recorder(behave)
    result = await claim(make_context(server((JOBS, 1)), handler, handler_timeout=5.0))
    assert result.outcome is Outcome.COMPLETED
    assert [b.attempt for b in handler.seen] == [1, 2]
    assert handler.cancelled_at == handler.at[0] + 5.0


async def test_the_lease_is_kept_alive_while_a_batch_waits_for_its_retry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire = server((JOBS, 1))
    context = make_context(wire, fails_on(0), handler_max_attempts=2, handler_retry_initial=50, handler_retry_max=50)
    result = await claim(context)
    assert result.outcome is Outcome.FAILED
    assert ack_times(wire)[:3] == pytest.approx([10, 20, 30], abs=1)


async def test_a_suspending_handler_keeps_its_progress_and_ends_the_claim(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def behave(batch: Batch) -> HandlerResult:
        return SUSPEND

    wire, handler, vitals = server((JOBS, 5)), Recorder(behave), Vitals("test")
    result = await claim(make_context(wire, handler, vitals=vitals))
    assert result.outcome is Outcome.SUSPENDED
    assert len(handler.seen) == 1
    assert [call.args for call in wire.called("ack")] == [((Ack(JOBS, offset_of(2)),), True)]
    assert wire.holder(SUB) is None
    assert vitals.batches == {"suspended": 1}


# -- no claim to hold ---------------------------------------------------------------------------


async def test_a_subscription_held_elsewhere_is_skipped(autojump_clock: trio.testing.MockClock) -> None:
    wire, handler = server((JOBS, 1)), Recorder()
    wire.take_over(SUB)
    assert await claim(make_context(wire, handler)) == ClaimResult(Outcome.SKIPPED)
    assert handler.seen == []


async def test_a_subscription_without_pending_work_is_skipped(autojump_clock: trio.testing.MockClock) -> None:
    wire = server((JOBS, 0))
    assert await claim(make_context(wire, Recorder())) == ClaimResult(Outcome.SKIPPED)


async def test_a_subscription_the_server_forgot_is_created_again_and_its_generations_start_over(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire = server((JOBS, 1))
    wire.forget_subscriptions()
    result = await claim(make_context(wire, Recorder()))
    assert result == ClaimResult(Outcome.SKIPPED, restarted=True)
    assert SUB in wire.subscriptions


async def test_a_forgotten_subscription_that_cannot_be_created_again_is_an_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def not_created(subscription: str) -> bool:
        return False

    async def refused(subscription: str) -> bool:
        raise RequestError("ensure: 403 forbidden", status=403)

    for recreate in (not_created, refused):
        wire = server((JOBS, 1))
        wire.forget_subscriptions()
        result = await claim(make_context(wire, Recorder(), recreate=recreate))
        assert result == ClaimResult(Outcome.ERROR, restarted=True)


async def test_a_subscription_that_could_not_be_put_back_for_want_of_an_answer_is_tried_again_soon(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A server shutting down answers the claim (404: it no longer has its subscriptions) and then
    not the create: no verdict on the subscription, so no cooldown (new events would wait 30 s)."""

    async def unreachable(subscription: str) -> bool:
        raise TransportError("ensure: ConnectError: refused")

    wire = server((JOBS, 1))
    wire.forget_subscriptions()
    result = await claim(make_context(wire, Recorder(), recreate=unreachable))
    assert result == ClaimResult(Outcome.ERROR, restarted=True, unanswered=True)


async def test_a_claim_request_that_fails_briefly_is_retried(autojump_clock: trio.testing.MockClock) -> None:
    wire = server((JOBS, 1))
    wire.fail_transport("claim", times=4)
    assert (await claim(make_context(wire, Recorder()))).outcome is Outcome.COMPLETED


async def test_the_claim_is_made_in_the_runners_name(autojump_clock: trio.testing.MockClock) -> None:
    wire = server((JOBS, 1))
    await claim(make_context(wire, Recorder()))
    assert [call.args for call in wire.called("claim")] == [(SUB, "runner-1")]


async def test_a_refused_claim_request_is_an_error_and_says_why(autojump_clock: trio.testing.MockClock) -> None:
    wire, vitals = server((JOBS, 1)), Vitals("test")
    wire.fail("claim", RequestError("claim s1: 403 forbidden", status=403))
    result = await claim(make_context(wire, Recorder(), vitals=vitals))
    assert result == ClaimResult(Outcome.ERROR)
    assert len(wire.called("claim")) == 1, "a refusal is not retried"
    assert vitals.last_error == "RequestError: claim s1: 403 forbidden"


async def test_a_claim_request_that_keeps_failing_is_an_error(autojump_clock: trio.testing.MockClock) -> None:
    wire, vitals = server((JOBS, 1)), Vitals("test")
    wire.fail_transport("claim", times=5)
    result = await claim(make_context(wire, Recorder(), vitals=vitals))
    assert result == ClaimResult(Outcome.ERROR, unanswered=True), "no answer: tried again soon, not cooled down"
    assert len(wire.called("claim")) == 5
    assert vitals.last_error is not None


# -- a claim that cannot go on ------------------------------------------------------------------


async def test_a_read_that_keeps_failing_abandons_the_claim_and_hands_it_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire, handler, vitals = server((JOBS, 2), chunk=1), Recorder(), Vitals("test")
    wire.answer("read")
    wire.fail_transport("read", times=5)
    result = await claim(make_context(wire, handler, vitals=vitals))
    assert result == ClaimResult(Outcome.ERROR, generation=1, unanswered=True), "tried again soon, not cooled down"
    assert len(handler.seen) == 1
    assert wire.acked(SUB) == {JOBS: offset_of(1)}
    assert len(wire.called("release")) == 1
    assert vitals.last_error is not None


async def test_acks_the_server_refuses_as_invalid_abandon_the_claim(autojump_clock: trio.testing.MockClock) -> None:
    wire = server((JOBS, 2), chunk=1)
    wire.fail("ack", InvalidOffset("ack: 409 INVALID_OFFSET", status=409, code="INVALID_OFFSET"))
    result = await claim(make_context(wire, Recorder()))
    assert result.outcome is Outcome.ERROR
    assert not result.unanswered, "the server's verdict: the subscription rests"
    assert wire.acked(SUB) == {JOBS: offset_of(1)}, "the hand-back acks what was finished"
    assert len(wire.called("release")) == 1


async def test_an_unexpected_error_ends_the_claim_as_an_error_and_hands_it_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire = server((JOBS, 1))
    wire.fail("read", RuntimeError("a bug"))
    result = await claim(make_context(wire, Recorder()))
    assert result == ClaimResult(Outcome.ERROR, generation=1)
    assert len(wire.called("release")) == 1


async def test_a_failing_hand_back_is_not_raised(autojump_clock: trio.testing.MockClock) -> None:
    wire = server((JOBS, 1))
    wire.fail("release", TransportError("release: refused"))
    result = await claim(make_context(wire, fails_on(0), handler_max_attempts=1))
    assert result.outcome is Outcome.FAILED


# -- cancelled from outside (a stop or an abort) ---------------------------------------------------


async def cancel_at(seconds: float, run: ClaimRun) -> None:
    with trio.move_on_after(seconds):
        await run.run()


async def test_a_cancelled_claim_acks_what_was_finished_and_releases_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls = 0

    async def behave(batch: Batch) -> HandlerResult:
        nonlocal calls
        calls += 1
        if calls == 2:
            await trio.sleep_forever()
        return None

    wire = server((JOBS, 2), chunk=1)
    wire.hang("ack")  # the ack of batch 1 is in flight when the cancel comes
    run = ClaimRun(make_context(wire, Recorder(behave)), SUB)
    await cancel_at(5, run)

    assert run.result == ClaimResult(None, generation=1)
    assert wire.acked(SUB) == {JOBS: offset_of(1)}
    assert len(wire.called("release")) == 1
    assert wire.holder(SUB) is None


async def test_the_hand_back_of_a_cancelled_claim_is_shielded(autojump_clock: trio.testing.MockClock) -> None:
    wire = server((JOBS, 2), chunk=1)
    wire.hang("ack")
    wire.delay("ack", 2)  # the finalizer's ack takes a while: the cancel must not cut it
    run = ClaimRun(make_context(wire, Recorder()), SUB)
    start = trio.current_time()
    await cancel_at(5, run)
    assert trio.current_time() == start + 7
    assert wire.acked(SUB) == {JOBS: offset_of(1)}
    assert run.result == ClaimResult(None, generation=1)


async def test_the_hand_back_of_a_cancelled_claim_is_bounded(autojump_clock: trio.testing.MockClock) -> None:
    wire = server((JOBS, 1))
    wire.hang("release")
    run = ClaimRun(make_context(wire, Recorder(forever), finalizer_timeout=3.0), SUB)
    start = trio.current_time()
    await cancel_at(5, run)

    assert trio.current_time() == start + 5 + 3
    assert run.result is not None
    assert run.result.outcome is None
    assert isinstance(run.result.cleanup_error, TimeoutError)
    assert "took over 3 s" in str(run.result.cleanup_error)


async def test_a_failed_hand_back_of_a_cancelled_claim_is_reported(autojump_clock: trio.testing.MockClock) -> None:
    wire = server((JOBS, 1))
    wire.fail("release", TransportError("release: refused"))
    run = ClaimRun(make_context(wire, Recorder(forever)), SUB)
    await cancel_at(5, run)
    assert run.result is not None
    assert isinstance(run.result.cleanup_error, TransportError)


async def test_a_claim_cancelled_during_an_ack_hands_back_with_the_token_its_last_ack_answered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire = server((JOBS, 2), chunk=1)
    wire.refresh_tokens = True  # the hand-back's ack answers a new token; the old one is refused
    wire.hang("ack")
    run = ClaimRun(make_context(wire, Recorder()), SUB)
    await cancel_at(5, run)
    assert run.result == ClaimResult(None, generation=1)
    assert wire.acked(SUB) == {JOBS: offset_of(1)}
    assert wire.holder(SUB) is None, "released: the next holder starts at once"


async def test_a_handler_fenced_by_the_server_ends_the_claim_as_fenced_and_touches_nothing_more(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def fenced(batch: Batch) -> HandlerResult:
        raise Fenced("append jobs/out: 403 fenced by a newer claim", status=403, code="FENCED")

    wire = server((JOBS, 1))
    result = await claim(make_context(wire, Recorder(fenced)))
    assert result == ClaimResult(Outcome.FENCED, generation=1)
    assert wire.called("release") == []
    assert wire.called("ack") == []


async def test_a_claim_cancelled_before_it_was_granted_leaves_no_result(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire = server((JOBS, 1))
    wire.hang("claim")
    run = ClaimRun(make_context(wire, Recorder()), SUB)
    await cancel_at(5, run)
    assert run.result is None
    assert run.claim is None


async def test_the_claim_token_is_redacted_from_every_text_while_the_claim_is_held(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire = server((JOBS, 1))
    seen: list[str] = []

    async def quote_the_token(batch: Batch) -> HandlerResult:
        holder = wire.subscriptions[SUB].holder
        assert holder is not None
        seen.append(context.redactor.redact(f"error text quoting {holder.token}"))
        return None

    context = make_context(wire, Recorder(quote_the_token))
    await claim(context)

    assert seen == ["error text quoting [redacted]"]


# -- what operators see: metrics and the last error ----------------------------------------------


def sample(vitals: Vitals, name: str, **labels: str) -> float | None:
    return vitals.metrics.registry.get_sample_value(name, labels)


async def test_renewals_are_counted_ok_and_the_done_ack_is_not_a_renewal(
    autojump_clock: trio.testing.MockClock,
) -> None:
    vitals = Vitals("test")
    await claim(make_context(server((JOBS, 1)), Recorder(sleep_for(25)), vitals=vitals))
    assert sample(vitals, "pullwake_lease_renewals_total", result="ok") == 2
    assert sample(vitals, "pullwake_lease_renewals_total", result="lost") == 0


@pytest.mark.parametrize("loss", ["fenced", "unreachable"])
async def test_a_lost_renewal_is_counted_lost(autojump_clock: trio.testing.MockClock, loss: str) -> None:
    wire, vitals = server((JOBS, 1)), Vitals("test")
    if loss == "unreachable":
        wire.fail_transport("ack", times=1000)

    async def behave(batch: Batch) -> HandlerResult:
        if loss == "fenced":
            wire.take_over(SUB)
        await trio.sleep_forever()

    await claim(make_context(wire, Recorder(behave), vitals=vitals))
    assert sample(vitals, "pullwake_lease_renewals_total", result="lost") == 1
    assert sample(vitals, "pullwake_lease_renewals_total", result="ok") == 0


async def test_handler_time_is_measured_per_call(autojump_clock: trio.testing.MockClock) -> None:
    vitals = Vitals("test")
    context = make_context(server((JOBS, 1)), fails_on(0), vitals=vitals, handler_max_attempts=2)
    await claim(context)
    assert sample(vitals, "pullwake_handler_duration_seconds_count") == 2

    vitals = Vitals("test")
    await claim(make_context(server((JOBS, 1)), Recorder(sleep_for(25)), vitals=vitals))
    assert sample(vitals, "pullwake_handler_duration_seconds_sum") == pytest.approx(25)

    async def slow_failure(batch: Batch) -> HandlerResult:
        await trio.sleep(3)
        raise PermanentFailure("no")

    vitals = Vitals("test")
    await claim(make_context(server((JOBS, 1)), Recorder(slow_failure), vitals=vitals))
    assert sample(vitals, "pullwake_handler_duration_seconds_sum") == pytest.approx(3)

    async def slow_retry(batch: Batch) -> HandlerResult:
        await trio.sleep(4)
        raise RuntimeError("again")

    vitals = Vitals("test")
    await claim(make_context(server((JOBS, 1)), Recorder(slow_retry), vitals=vitals, handler_max_attempts=1))
    assert sample(vitals, "pullwake_handler_duration_seconds_sum") == pytest.approx(4)


async def test_the_time_from_the_wake_to_the_handler_is_measured_once_per_claim(
    autojump_clock: trio.testing.MockClock,
) -> None:
    vitals = Vitals("test")
    context = make_context(server((JOBS, 5)), Recorder(), vitals=vitals)
    with trio.fail_after(3600):
        result = await ClaimRun(context, SUB, woken_at=time.time() - 5).run()
    assert result.outcome is Outcome.COMPLETED
    assert sample(vitals, "pullwake_wake_to_handler_seconds_count") == 1
    latency = sample(vitals, "pullwake_wake_to_handler_seconds_sum")
    assert latency is not None
    assert 5 <= latency < 6


@pytest.mark.parametrize("method", ["claim", "read", "ack"])
async def test_transient_failures_are_reported_even_when_a_retry_succeeds(
    autojump_clock: trio.testing.MockClock, method: str
) -> None:
    wire, vitals = server((JOBS, 3)), Vitals("test")
    wire.fail_transport(method, times=2)
    result = await claim(make_context(wire, Recorder(), vitals=vitals))
    assert result.outcome is Outcome.COMPLETED
    assert vitals.last_error == f"TransportError: {method}: ConnectError: refused"


async def test_an_abandoned_claim_reports_why(autojump_clock: trio.testing.MockClock) -> None:
    wire, vitals = server((JOBS, 2), chunk=1), Vitals("test")
    wire.answer("read")
    wire.fail_transport("read", times=5)
    await claim(make_context(wire, Recorder(), vitals=vitals))
    assert vitals.last_error is not None
    assert (
        vitals.last_error == f"ClaimAbandoned: reading {JOBS} from {offset_of(1)} failed: read: ConnectError: refused"
    )

    wire, vitals = server((JOBS, 2), chunk=1), Vitals("test")
    wire.fail("ack", InvalidOffset("ack: 409 INVALID_OFFSET", status=409, code="INVALID_OFFSET"))
    await claim(make_context(wire, Recorder(), vitals=vitals))
    assert vitals.last_error == "ClaimAbandoned: the server refused our acks: ack: 409 INVALID_OFFSET"


async def test_a_read_that_finds_nothing_before_the_claimed_tail_ends_that_streams_work(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def truncate(batch: Batch) -> HandlerResult:
        del wire.streams[JOBS][2:]  # the rest is gone (retention) by the time it is read
        return None

    wire = server((JOBS, 4))
    result = await claim(make_context(wire, Recorder(truncate)))
    assert result == ClaimResult(Outcome.COMPLETED, generation=1)
    assert wire.acked(SUB) == {JOBS: offset_of(2)}


async def test_a_claim_cancelled_after_its_lease_was_lost_is_fenced_and_hands_nothing_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def slow_to_stop(batch: Batch) -> HandlerResult:
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(5)  # cleaning up after the keeper's cancel at 10
        return None

    wire = server((JOBS, 1))
    run = ClaimRun(make_context(wire, Recorder(slow_to_stop)), SUB)

    async def intruder() -> None:
        await trio.sleep(5)
        wire.take_over(SUB)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(intruder)
        await cancel_at(12, run)  # the stop comes while the handler is still stopping
    assert run.result == ClaimResult(Outcome.FENCED, generation=1)
    assert wire.called("release") == []


# -- what servers other than the reference answer ------------------------------------------------


async def test_a_claim_granted_with_nothing_pending_is_released_at_once_and_skipped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire, handler = server((JOBS, 0)), Recorder()
    wire.grant_empty = True  # the reference server answers NO_PENDING_WORK; others grant it
    result = await claim(make_context(wire, handler))

    assert result == ClaimResult(Outcome.SKIPPED, generation=1)
    assert handler.seen == []
    assert [call.method for call in wire.calls] == ["claim", "release"]  # no read, no ack
    assert wire.holder(SUB) is None


async def test_a_claim_another_runner_holds_is_a_race_lost_one_an_earlier_run_of_this_runner_holds_is_not(
    autojump_clock: trio.testing.MockClock,
) -> None:
    vitals = Vitals("test")
    wire = server((JOBS, 1))
    wire.take_over(SUB)
    assert await claim(make_context(wire, Recorder(), vitals=vitals)) == ClaimResult(Outcome.SKIPPED)
    assert sample(vitals, "pullwake_claim_races_lost_total") == 1
    wire.take_over(SUB, worker="runner-1")  # this runner's id, from a run that left no journal
    with captured_logs() as logs:
        assert await claim(make_context(wire, Recorder(), vitals=vitals)) == ClaimResult(Outcome.SKIPPED)
    assert sample(vitals, "pullwake_claim_races_lost_total") == 1
    assert "claim.held_by_an_earlier_run" in [entry["event"] for entry in logs if entry["log_level"] == "warning"]


async def test_the_pending_streams_gauge_follows_the_servers_word(autojump_clock: trio.testing.MockClock) -> None:
    vitals = Vitals("test")
    wire = server((JOBS, 2), ("jobs/b", 1), chunk=1)
    seen: list[float | None] = []

    async def look(batch: Batch) -> HandlerResult:
        seen.append(sample(vitals, "pullwake_pending_streams", subscription=SUB))
        return None

    await claim(make_context(wire, Recorder(look), vitals=vitals))
    assert seen == [2, 2, 2], "as the claim's answer said"
    assert sample(vitals, "pullwake_pending_streams", subscription=SUB) == 0, "the done ack: nothing more"
    vitals.pending(SUB, 5)
    assert await claim(make_context(wire, Recorder(), vitals=vitals)) == ClaimResult(Outcome.SKIPPED)
    assert sample(vitals, "pullwake_pending_streams", subscription=SUB) == 0, "NO_PENDING_WORK"


GONE = SubscriptionNotFound("ack s1: 410 SUBSCRIPTION_GONE deleted", status=410, code="SUBSCRIPTION_GONE")


async def test_a_subscription_gone_at_a_renewal_ends_the_claim_as_gone_and_has_it_put_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire, handler = server((JOBS, 1)), Recorder(forever)
    wire.fail("ack", GONE)
    with captured_logs() as logs:
        result = await claim(make_context(wire, handler))

    assert result == ClaimResult(Outcome.FENCED, generation=1, restarted=True)
    assert handler.cancelled_at == pytest.approx(TTL / 3)
    assert [entry["event"] for entry in logs if entry["log_level"] == "warning"] == ["claim.subscription_gone"]
    assert wire.called("release") == []


async def test_a_subscription_gone_at_the_hand_back_has_it_put_back(autojump_clock: trio.testing.MockClock) -> None:
    wire = server((JOBS, 1))
    wire.fail("release", GONE)
    with captured_logs() as logs:
        result = await claim(make_context(wire, fails_on(0, error=PermanentFailure("no"))))

    assert result == ClaimResult(Outcome.FAILED, generation=1, restarted=True)
    assert "claim.subscription_gone" in [entry["event"] for entry in logs]


async def test_a_refreshed_claim_token_is_carried_by_every_later_ack_and_redacted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire = server((JOBS, 1))
    wire.refresh_tokens = True  # each renewal answers a new token; the one before is refused
    quoted: list[str] = []

    async def outlive_the_first_tokens(batch: Batch) -> HandlerResult:
        await trio.sleep(TTL * 0.9)  # two renewals (at a third and two thirds), two new tokens
        holder = wire.subscriptions[SUB].holder
        assert holder is not None
        assert holder.token != "token-1"
        quoted.append(context.redactor.redact(f"error text quoting {holder.token}"))
        return None

    context = make_context(wire, Recorder(outlive_the_first_tokens))
    result = await claim(context)

    assert result == ClaimResult(Outcome.COMPLETED, generation=1)
    assert len(wire.called("ack")) == 3  # two renewals and the done ack
    assert wire.acked(SUB) == {JOBS: offset_of(1)}
    assert quoted == ["error text quoting [redacted]"]


async def test_a_restarted_runner_hands_a_claim_back_with_its_newest_token(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    wire = server((JOBS, 1))
    wire.refresh_tokens = True
    context = make_context(wire, Recorder(forever))
    context = replace(context, journal=Journal(tmp_path / "journal.json", server_url=context.settings.server_url))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(claim, context)
        await trio.sleep(TTL / 3 + 1)  # one renewal: the token is refreshed
        assert len(wire.called("ack")) == 1

        # The runner is killed here; the next one reads the journal it left.
        restarted = Journal(tmp_path / "journal.json", server_url=context.settings.server_url)
        assert await return_held_claims(wire, restarted, Redactor()) == [SUB]
        assert wire.holder(SUB) is None
        nursery.cancel_scope.cancel()
