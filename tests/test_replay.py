"""Recovery in virtual time (runner/_claims/recovery.py): gaps replayed, held claims handed back.

The server re-created a subscription past events nobody handled: the journal holds them
as gaps, handed to the handler (`replayed` batches) before the next claim. A runner that
was killed with claims held hands them back at start.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from runner._claims.claim import ClaimContext, ClaimRun
from runner._claims.outcome import GAP_REPLAY_FAILED, Outcome
from runner._claims.recovery import replay_gaps, return_held_claims
from runner._handlers.batch import Batch, HandlerResult
from runner._health import Vitals
from runner._secrets import Redactor
from runner._state.journal import Gap, Journal
from runner._wire.protocol import ReadResult
from runner.errors import PermanentFailure, RequestError, SubscriptionNotFound, TransportError
from tests.claim_harness import JOBS, SUB, Recorder, jobs, make_context
from tests.fake_wire import FakeWire, offset_of

OTHER = "jobs/b"


def with_gaps(wire: FakeWire, context: ClaimContext, *gaps: tuple[str, int, int]) -> list[Gap]:
    """The journal knew `stream` acknowledged at `start`; the re-created subscription linked it at `end`."""
    context.journal.linked(SUB, {stream: offset_of(start) for stream, start, _ in gaps}, created=False)
    found = context.journal.linked(SUB, {stream: offset_of(end) for stream, _, end in gaps}, created=True)
    assert found == context.journal.gaps(SUB)
    return found


def replayed_count(vitals: Vitals) -> float | None:
    return vitals.metrics.registry.get_sample_value("pullwake_subscription_gaps_total", {"action": "replayed"})


def fail_at(*calls: int) -> Recorder:
    """A handler that fails for good on the given calls (counting from 1)."""
    recorder: Recorder

    async def behave(batch: Batch) -> HandlerResult:
        if len(recorder.seen) in calls:
            raise PermanentFailure("no")
        return None

    recorder = Recorder(behave)
    return recorder


async def test_gaps_are_replayed_in_order_as_replayed_batches(autojump_clock: trio.testing.MockClock) -> None:
    wire = FakeWire(chunk=2)
    wire.add_stream(JOBS, jobs(6))
    wire.add_stream(OTHER, jobs(3, OTHER))
    handler = Recorder()
    vitals = Vitals("test")
    context = make_context(wire, handler, vitals=vitals)
    with_gaps(wire, context, (JOBS, 1, 5), (OTHER, 0, 3))
    run = ClaimRun(context, SUB)

    assert await replay_gaps(run) is None
    assert [(b.stream, b.start_offset, b.next_offset) for b in handler.seen] == [
        (JOBS, offset_of(1), offset_of(3)),
        (JOBS, offset_of(3), offset_of(5)),
        (OTHER, "-1", offset_of(2)),
        (OTHER, offset_of(2), offset_of(3)),
    ]
    assert handler.messages[0] == jobs(3)[1:3]
    assert all(b.replayed and b.wake_id == "replay" and b.generation == 0 for b in handler.seen)
    assert run.batches_done == 4
    assert run.stream is None
    assert context.journal.gaps(SUB) == []
    assert replayed_count(vitals) == 2
    assert wire.called("claim") == [], "a replay claims nothing"


async def test_a_replay_reads_no_further_than_the_end_of_the_gap(autojump_clock: trio.testing.MockClock) -> None:
    wire = FakeWire(chunk=2)
    wire.add_stream(JOBS, jobs(6))
    handler = Recorder()
    context = make_context(wire, handler)
    with_gaps(wire, context, (JOBS, 2, 3))
    assert await replay_gaps(ClaimRun(context, SUB)) is None
    assert [call.args[1:] for call in wire.called("read")] == [(offset_of(2),)]
    assert context.journal.gaps(SUB) == []


async def test_a_gap_whose_stream_is_gone_is_dropped_and_the_rest_replayed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire = FakeWire()
    wire.add_stream(OTHER, jobs(1, OTHER))
    handler = Recorder()
    vitals = Vitals("test")
    context = make_context(wire, handler, vitals=vitals)
    with_gaps(wire, context, (JOBS, 0, 4), (OTHER, 0, 1))
    assert await replay_gaps(ClaimRun(context, SUB)) is None
    assert [b.stream for b in handler.seen] == [OTHER]
    assert context.journal.gaps(SUB) == []
    assert replayed_count(vitals) == 2


async def test_a_gap_the_stream_no_longer_holds_is_dropped(autojump_clock: trio.testing.MockClock) -> None:
    wire = FakeWire()
    wire.add_stream(JOBS, jobs(2))  # the stream was re-created shorter than the gap
    handler = Recorder()
    context = make_context(wire, handler)
    with_gaps(wire, context, (JOBS, 3, 6))
    assert await replay_gaps(ClaimRun(context, SUB)) is None
    assert handler.seen == []
    assert context.journal.gaps(SUB) == []


async def test_a_read_that_keeps_failing_keeps_the_gap_for_later(autojump_clock: trio.testing.MockClock) -> None:
    wire = FakeWire()
    wire.add_stream(JOBS, jobs(4))
    wire.fail_transport("read", times=10)
    handler = Recorder()
    vitals = Vitals("test")
    context = make_context(wire, handler, vitals=vitals)
    gaps = with_gaps(wire, context, (JOBS, 0, 4))
    run = ClaimRun(context, SUB)
    assert await replay_gaps(run) is None, "a replay failing for now does not hold up the claim (issue 21)"
    assert context.journal.gaps(SUB) == gaps
    assert handler.seen == []
    assert vitals.last_error == "TransportError: read: ConnectError: refused"
    assert not replayed_count(vitals)


async def test_a_replay_failing_for_now_degrades_its_subscription_until_a_replay_succeeds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire = FakeWire()
    wire.add_stream(JOBS, jobs(4))
    wire.add_stream(OTHER, [])  # shorter than its gap: dropped
    wire.fail_transport("read", times=5)  # one replay's retries
    vitals = Vitals("test")
    context = make_context(wire, Recorder(), vitals=vitals)
    with_gaps(wire, context, (JOBS, 0, 4), (OTHER, 0, 2))
    run = ClaimRun(context, SUB)
    assert await replay_gaps(run) is None
    assert vitals.problems[GAP_REPLAY_FAILED] == {SUB}
    counted = vitals.metrics.registry.get_sample_value
    assert counted("pullwake_subscription_gaps_total", {"action": "replay_failed"}) == 1
    await trio.sleep(3600)  # the replay's own backoff
    assert await replay_gaps(run) is None
    assert vitals.problems[GAP_REPLAY_FAILED] == set()
    assert counted("pullwake_subscription_gaps_total", {"action": "replayed"}) == 2, "the dropped one too"
    assert context.journal.gaps(SUB) == []


async def test_a_gap_the_server_refuses_to_read_for_good_is_dropped_counted_and_forgotten(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire = FakeWire()
    wire.add_stream(JOBS, jobs(4))
    wire.add_stream(OTHER, jobs(1, OTHER))
    wire.fail("read", RequestError("read jobs/a: 400 Invalid offset format", status=400))
    vitals = Vitals("test")
    handler = Recorder()
    context = make_context(wire, handler, vitals=vitals)
    with_gaps(wire, context, (JOBS, 0, 4), (OTHER, 0, 1))
    assert await replay_gaps(ClaimRun(context, SUB)) is None
    counted = vitals.metrics.registry.get_sample_value
    assert counted("pullwake_subscription_gaps_total", {"action": "dropped"}) == 1
    assert [batch.stream for batch in handler.seen] == [OTHER], "the other gap is replayed"
    assert context.journal.gaps(SUB) == [], "not tried again at the next claim"


async def test_a_failed_replay_waits_for_its_backoff_and_a_success_clears_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire = FakeWire()
    wire.add_stream(JOBS, jobs(4))
    context = make_context(wire, Recorder())
    with_gaps(wire, context, (JOBS, 0, 2))
    run = ClaimRun(context, SUB)
    wire.fail_transport("read", times=5)  # one replay's retries
    assert await replay_gaps(run) is None
    reads = len(wire.called("read"))
    assert await replay_gaps(run) is None, "the next claim, at once"
    assert len(wire.called("read")) == reads, "not before the replay's backoff"
    await trio.sleep(60)
    assert await replay_gaps(run) is None
    assert context.journal.gaps(SUB) == []
    with_gaps(wire, context, (JOBS, 2, 4))  # lost again later
    assert await replay_gaps(run) is None, "a success started the pacing over"
    assert context.journal.gaps(SUB) == []


async def test_a_read_that_fails_briefly_is_retried(autojump_clock: trio.testing.MockClock) -> None:
    wire = FakeWire()
    wire.add_stream(JOBS, jobs(2))
    wire.fail_transport("read", times=2)
    handler = Recorder()
    vitals = Vitals("test")
    context = make_context(wire, handler, vitals=vitals)
    with_gaps(wire, context, (JOBS, 0, 2))
    assert await replay_gaps(ClaimRun(context, SUB)) is None
    assert handler.messages == [jobs(2)]
    assert vitals.last_error == "TransportError: read: ConnectError: refused", "retries are reported"


async def test_a_failing_handler_keeps_what_it_did_not_finish(autojump_clock: trio.testing.MockClock) -> None:
    wire = FakeWire(chunk=2)
    wire.add_stream(JOBS, jobs(6))
    wire.add_stream(OTHER, jobs(2, OTHER))
    handler = fail_at(2)
    vitals = Vitals("test")
    context = make_context(wire, handler, vitals=vitals, handler_max_attempts=1)
    with_gaps(wire, context, (JOBS, 0, 6), (OTHER, 0, 2))
    run = ClaimRun(context, SUB)
    assert await replay_gaps(run) is Outcome.FAILED
    assert len(handler.seen) == 2
    assert run.batches_done == 1
    assert context.journal.gaps(SUB) == [Gap(JOBS, offset_of(2), offset_of(6)), Gap(OTHER, "-1", offset_of(2))]
    assert not replayed_count(vitals)

    # After the cooldown the replay goes on from there.
    handler.behave = fail_at()
    assert await replay_gaps(run) is None
    assert [b.start_offset for b in handler.seen[2:]] == [offset_of(2), offset_of(4), "-1"]
    assert context.journal.gaps(SUB) == []


@pytest.mark.parametrize(("behave", "outcome"), [("fail", Outcome.FAILED)])
async def test_a_claim_with_a_gap_it_cannot_replay_ends_without_claiming(
    autojump_clock: trio.testing.MockClock, behave: str, outcome: Outcome
) -> None:
    wire = FakeWire()
    wire.add_stream(JOBS, jobs(4))
    wire.subscribe(SUB, [JOBS])
    handler = fail_at(1) if behave == "fail" else Recorder()
    if behave == "read":
        wire.fail_transport("read", times=10)
    context = make_context(wire, handler, handler_max_attempts=1)
    with_gaps(wire, context, (JOBS, 0, 2))
    result = await ClaimRun(context, SUB).run()
    assert result.outcome is outcome
    assert wire.called("claim") == []


async def test_a_claim_replays_its_gaps_then_claims(autojump_clock: trio.testing.MockClock) -> None:
    wire = FakeWire()
    wire.add_stream(JOBS, jobs(4))
    wire.subscribe(SUB, [JOBS])
    handler = Recorder()
    context = make_context(wire, handler)
    with_gaps(wire, context, (JOBS, 0, 2))
    wire.subscriptions[SUB].acked[JOBS] = offset_of(2)  # where the re-created subscription linked it
    result = await ClaimRun(context, SUB).run()
    assert result.outcome is Outcome.COMPLETED
    assert [(b.replayed, b.start_offset) for b in handler.seen] == [(True, "-1"), (False, offset_of(2))]
    assert wire.acked(SUB) == {JOBS: offset_of(4)}


# -- claims an earlier run held ----------------------------------------------------------------


async def held(wire: FakeWire, journal: Journal, subscription: str = SUB) -> None:
    """This runner claimed `subscription`, and then was killed."""
    wire.subscribe(subscription, [f"{subscription}/jobs"])
    wire.add_stream(f"{subscription}/jobs", jobs(2))
    journal.claimed(await wire.claim(subscription, "runner-1"))


async def test_claims_an_earlier_run_held_are_handed_back_and_forgotten(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire = FakeWire()
    journal = Journal(None, server_url="http://127.0.0.1:1")
    await held(wire, journal, "s1")
    await held(wire, journal, "s2")
    redactor = Redactor()
    seen: list[str] = []

    async def check_redacted() -> None:
        await trio.lowlevel.checkpoint()
        seen.append(redactor.redact("token-1 token-2"))

    wire.script("release", check_redacted)
    assert await return_held_claims(wire, journal, redactor) == ["s1", "s2"]
    assert wire.holder("s1") is None
    assert wire.holder("s2") is None
    assert journal.held_claims() == []
    assert seen == ["[redacted] token-2"], "the token is redacted while it is used"


async def test_a_claim_already_gone_is_forgotten_but_not_counted_as_handed_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire = FakeWire()
    journal = Journal(None, server_url="http://127.0.0.1:1")
    await held(wire, journal, "s1")
    await held(wire, journal, "s2")
    wire.fail("release", SubscriptionNotFound("gone", status=404))  # s1, the first
    assert await return_held_claims(wire, journal, Redactor()) == ["s2"]
    assert journal.held_claims() == []


async def test_a_claim_already_taken_over_is_forgotten(autojump_clock: trio.testing.MockClock) -> None:
    wire = FakeWire()
    journal = Journal(None, server_url="http://127.0.0.1:1")
    await held(wire, journal)
    wire.take_over(SUB)
    assert await return_held_claims(wire, journal, Redactor()) == []
    assert journal.held_claims() == []
    assert wire.holder(SUB) == "someone-else"


async def test_a_claim_that_could_not_be_handed_back_is_kept_for_the_next_start(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire = FakeWire()
    journal = Journal(None, server_url="http://127.0.0.1:1")
    await held(wire, journal, "s1")
    await held(wire, journal, "s2")
    wire.fail("release", TransportError("refused"))
    assert await return_held_claims(wire, journal, Redactor()) == ["s2"]
    assert [claim.subscription for claim in journal.held_claims()] == ["s1"]
    assert wire.holder("s1") == "runner-1"


class DrainedWire(FakeWire):
    """Answers reads with no messages, but an offset that moved on (the events expired)."""

    async def read(self, path: str, offset: str) -> ReadResult:
        await super().read(path, offset)
        return ReadResult([], offset_of(9), up_to_date=True, closed=False)


async def test_a_gap_whose_events_are_no_longer_there_is_dropped(autojump_clock: trio.testing.MockClock) -> None:
    wire = DrainedWire()
    wire.add_stream(JOBS, jobs(4))
    handler = Recorder()
    context = make_context(wire, handler)
    with_gaps(wire, context, (JOBS, 0, 4))
    assert await replay_gaps(ClaimRun(context, SUB)) is None
    assert handler.seen == []
    assert context.journal.gaps(SUB) == []
