"""How a claim ends, as the journal and the health report see it (in virtual time)."""

from __future__ import annotations

import trio
import trio.testing

from runner._claims.claim import ClaimResult, ClaimRun
from runner._claims.outcome import Outcome
from runner._handlers.batch import Batch, HandlerResult
from runner._health import Vitals
from runner._wire.protocol import ReadResult
from runner.errors import PermanentFailure, TransportError
from tests.claim_harness import JOBS, SUB, Recorder, forever, make_context
from tests.fake_wire import FakeWire
from tests.test_claim import cancel_at, claim, server


async def test_a_claim_that_ends_is_no_longer_held_in_the_journal(autojump_clock: trio.testing.MockClock) -> None:
    wire, handler = server((JOBS, 3)), Recorder()
    context = make_context(wire, handler)
    result = await claim(context)
    assert result.outcome is Outcome.COMPLETED
    assert [batch.replayed for batch in handler.seen] == [False, False], "a claim's own batches are not replays"
    assert not context.journal.holds(SUB)
    assert context.journal.sole_stream(SUB) == (JOBS, "00000003")


async def test_a_claim_whose_lease_was_lost_is_no_longer_held_in_the_journal(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire = server((JOBS, 1))
    context = make_context(wire, Recorder(forever))

    async def intruder() -> None:
        await trio.sleep(5)
        wire.take_over(SUB)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(intruder)
        result = await claim(context)
    assert result.outcome is Outcome.FENCED
    assert not context.journal.holds(SUB)


async def test_a_claim_handed_back_is_no_longer_held_in_the_journal(autojump_clock: trio.testing.MockClock) -> None:
    wire = server((JOBS, 1))
    context = make_context(wire, Recorder(forever))
    run = ClaimRun(context, SUB)
    await cancel_at(5, run)
    assert run.result == ClaimResult(None, generation=1)
    assert not context.journal.holds(SUB)


async def test_an_ack_refused_while_handing_back_is_reported_and_the_claim_still_released(
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
    wire.hang("ack")  # the batch ack
    failure = TransportError("ack: refused")
    wire.fail("ack", failure)  # the hand-back's ack
    vitals = Vitals("test")
    context = make_context(wire, Recorder(behave), vitals=vitals)
    run = ClaimRun(context, SUB)
    await cancel_at(5, run)
    assert run.result == ClaimResult(None, generation=1, cleanup_error=failure)
    assert vitals.last_error == "handing back s1: ack: refused"
    assert wire.holder(SUB) is None
    assert not context.journal.holds(SUB)


async def test_a_release_that_fails_is_reported_and_the_claim_kept_in_the_journal(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire = server((JOBS, 1))
    wire.fail("release", TransportError("release: refused"))
    vitals = Vitals("test")
    context = make_context(wire, Recorder(forever), vitals=vitals)
    await cancel_at(5, ClaimRun(context, SUB))
    assert vitals.last_error == "handing back s1: release: refused"
    assert context.journal.holds(SUB), "handed back at the next start"


class StuckWire(FakeWire):
    """Answers every read with its messages but an offset that does not move."""

    async def read(self, path: str, offset: str) -> ReadResult:
        result = await super().read(path, offset)
        return ReadResult(result.messages, offset, result.up_to_date, result.closed)


async def test_a_read_that_does_not_advance_abandons_the_claim_and_says_so(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire = StuckWire()
    wire.add_stream(JOBS, [{"job": 1}])
    wire.subscribe(SUB, [JOBS])
    vitals = Vitals("test")
    result = await claim(make_context(wire, Recorder(), vitals=vitals))
    assert result.outcome is Outcome.ERROR
    assert vitals.last_error == "ClaimAbandoned: reading jobs/a from -1 did not advance (-1)"


async def test_a_failing_handler_is_reported(autojump_clock: trio.testing.MockClock) -> None:
    async def boom(batch: Batch) -> HandlerResult:
        raise RuntimeError("boom")

    vitals = Vitals("test")
    result = await claim(make_context(server((JOBS, 1)), Recorder(boom), vitals=vitals, handler_max_attempts=1))
    assert result.outcome is Outcome.FAILED
    assert vitals.last_error == "handler of s1: RuntimeError: boom"


async def test_a_handler_failing_for_good_is_reported(autojump_clock: trio.testing.MockClock) -> None:
    async def no(batch: Batch) -> HandlerResult:
        raise PermanentFailure("not this one")

    vitals = Vitals("test")
    result = await claim(make_context(server((JOBS, 1)), Recorder(no), vitals=vitals))
    assert result.outcome is Outcome.FAILED
    assert vitals.last_error == "handler of s1: not this one"
