"""Random event sequences through the real driver agree with the design's table.

The expected behaviour comes from the literal matrix in test_driver_matrix.py,
not from `machine`. Events are sent either as the current state's activity
would send them, from a runner-lifetime source (no epoch), or stale (from an
epoch already left, which must change nothing).
"""

from __future__ import annotations

import os

import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from machine import Event, State
from tests.driver_harness import Fakes, settle
from tests.test_driver_matrix import CASES

EXPECTED = {(source, event): target for source, event, target, _ in CASES}
SENDERS = ("current", "lifetime", "stale")
# `make mutate` runs this for many mutants of the driver: it asks for fewer examples there.
EXAMPLES = int(os.environ.get("PULLWAKE_PROPERTY_EXAMPLES", "400"))


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(list(Event)), st.sampled_from(SENDERS)), max_size=40))
def test_random_sequences_end_where_the_table_says(sequence: list[tuple[Event, str]]) -> None:
    async def main() -> None:
        fakes = Fakes()
        driver = fakes.driver()
        model = State.STOPPED
        async with trio.open_nursery() as nursery:
            for event, sender in sequence:
                if not driver.running:
                    await nursery.start(driver.run)
                if sender == "stale" and driver.epoch == 0:
                    sender = "lifetime"
                epoch = {"current": driver.epoch, "lifetime": None, "stale": driver.epoch - 1}[sender]
                await driver.send(event, epoch=epoch)
                await settle()
                if sender != "stale":
                    model = EXPECTED[(model, event)]

                assert driver.state is model
                alive = fakes.running()
                assert all(life.epoch == driver.epoch for life in alive), "an exited state's activity still runs"
                assert len(alive) == (0 if model is State.STOPPED else 1)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
