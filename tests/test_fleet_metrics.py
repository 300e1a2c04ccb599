"""The series a fleet needs from each runner: races lost, pending work per subscription, pre-set counters.

Claims against the in-memory wire in virtual time; tests/test_ops.py checks the series exist on a live
runner's /metrics (the dashboard names them).
"""

from __future__ import annotations

import trio
import trio.testing

from runner._claims.claim import ClaimContext, ClaimResult, ClaimRun
from runner._claims.outcome import Outcome
from runner._health import BATCH_OUTCOMES, GAP_ACTIONS, LEASE_RENEWAL_RESULTS, Vitals
from tests.claim_harness import JOBS, SUB, Recorder, jobs, make_context
from tests.fake_wire import FakeWire


def sample(vitals: Vitals, name: str, **labels: str) -> float | None:
    return vitals.metrics.registry.get_sample_value(name, labels)


def server(*streams: tuple[str, int]) -> FakeWire:
    wire = FakeWire(chunk=2)
    for path, count in streams:
        wire.add_stream(path, jobs(count, path))
    wire.subscribe(SUB, [path for path, _ in streams])
    return wire


async def claim(context: ClaimContext) -> ClaimResult:
    with trio.fail_after(3600):
        return await ClaimRun(context, SUB).run()


def test_labelled_counters_start_at_zero_for_every_known_label_value() -> None:
    vitals = Vitals("r")
    for outcome in Outcome:
        assert sample(vitals, "pullwake_claims_total", result=outcome.value) == 0
    for batch in BATCH_OUTCOMES:
        assert sample(vitals, "pullwake_batches_total", outcome=batch) == 0
    for result in LEASE_RENEWAL_RESULTS:
        assert sample(vitals, "pullwake_lease_renewals_total", result=result) == 0
    for action in GAP_ACTIONS:
        assert sample(vitals, "pullwake_subscription_gaps_total", action=action) == 0
    assert sample(vitals, "pullwake_claim_races_lost_total") == 0


async def test_a_claim_another_runner_holds_is_a_race_lost_and_no_pending_work_is_not(
    autojump_clock: trio.testing.MockClock,
) -> None:
    vitals = Vitals("r")
    wire = server((JOBS, 1))
    wire.take_over(SUB)
    assert (await claim(make_context(wire, Recorder(), vitals=vitals))).outcome is Outcome.SKIPPED
    assert sample(vitals, "pullwake_claim_races_lost_total") == 1

    idle = server((JOBS, 0))
    assert (await claim(make_context(idle, Recorder(), vitals=vitals))).outcome is Outcome.SKIPPED
    assert sample(vitals, "pullwake_claim_races_lost_total") == 1, "NO_PENDING_WORK is no race"
    assert sample(vitals, "pullwake_pending_streams", subscription=SUB) == 0


async def test_pending_streams_is_what_the_claim_answer_said_until_a_done_ack_says_nothing_is_left(
    autojump_clock: trio.testing.MockClock,
) -> None:
    vitals = Vitals("r")
    wire = server(("jobs/a", 3), ("jobs/b", 0), ("jobs/c", 1))
    seen: list[float | None] = []

    async def behave(batch: object) -> None:
        seen.append(sample(vitals, "pullwake_pending_streams", subscription=SUB))

    result = await claim(make_context(wire, Recorder(behave), vitals=vitals))
    assert result.outcome is Outcome.COMPLETED
    assert seen == [2, 2, 2], "two of the three streams had pending work in the claim answer"
    assert sample(vitals, "pullwake_pending_streams", subscription=SUB) == 0, "the done ack said nothing is left"


async def test_pending_streams_stays_when_the_done_ack_says_more_is_pending(
    autojump_clock: trio.testing.MockClock,
) -> None:
    vitals = Vitals("r")
    wire = server((JOBS, 1))

    async def behave(batch: object) -> None:
        wire.add_stream(JOBS, jobs(2, JOBS)[1:])  # appended while the handler runs

    result = await claim(make_context(wire, Recorder(behave), vitals=vitals))
    assert result.next_wake
    assert sample(vitals, "pullwake_pending_streams", subscription=SUB) == 1
