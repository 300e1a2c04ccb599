"""Every (state, event) pair of docs/design.md §4, driven through the real driver.

The table below is copied by hand from the design document; it is not derived
from `machine`, so a change to the machine that the design does not share
fails here, cell by cell. `-` means ignored: the state is unchanged and the
state's running activity is not disturbed. `+effect` names an effect the
runner must carry out for that cell, in order.
"""

from __future__ import annotations

import pytest
import trio

from machine import Effect, Event, State
from tests.driver_harness import Fakes, drive_to, settle

MATRIX = """
event            stopped     connecting                      streaming        reconnecting  stopping
START            connecting  -                               -                -             -
STOP             -           stopping                        stopping         stopping      -
CONNECTED        -           streaming+reset_backoff+resync  -                -             -
CONNECT_FAILED   -           reconnecting                    -                -             -
STREAM_END       -           -                               connecting       -             -
STREAM_ERROR     -           -                               reconnecting     -             -
STREAM_CLOSED    -           -                               stopping+fatal   -             -
STREAM_RESET     -           reconnecting                    reconnecting     -             -
BACKOFF_ELAPSED  -           -                               -                connecting    -
PROBE_OK         -           -                               -                connecting    -
WAKE             -           -                               -+claim          -             -
DRAINED          -           -                               -                -             stopped
"""


def _cases() -> list[tuple[State, Event, State, list[Effect]]]:
    lines = [line.split() for line in MATRIX.strip().splitlines()]
    header, rows = lines[0], lines[1:]
    states = [State(name) for name in header[1:]]
    cases = []
    for row in rows:
        event = Event(row[0])
        for source, cell in zip(states, row[1:], strict=True):
            target_name, *effect_names = cell.split("+")
            target = source if target_name == "-" else State(target_name)
            cases.append((source, event, target, [Effect(name.replace("_", " ")) for name in effect_names]))
    return cases


CASES = _cases()


def test_the_matrix_covers_all_60_pairs() -> None:
    assert len(CASES) == 60
    assert {(source, event) for source, event, _, _ in CASES} == {(s, e) for s in State for e in Event}


@pytest.mark.parametrize(("source", "event", "target", "effects"), CASES, ids=[f"{s}-{e}" for s, e, _, _ in CASES])
async def test_cell(source: State, event: Event, target: State, effects: list[Effect]) -> None:
    fakes = Fakes()
    driver = fakes.driver()
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run)
        await drive_to(driver, source)
        epoch_before = driver.epoch
        running_before = fakes.running()
        del fakes.effects[:]

        # Sent as the current state's own activity would send it.
        await driver.send(event, epoch=driver.epoch)
        await settle()

        assert driver.state is target
        assert [found for found, _ in fakes.effects] == effects
        if target is source:
            assert driver.epoch == epoch_before
            assert fakes.running() == running_before, "an ignored event must not disturb the state's activity"
        else:
            assert driver.epoch == epoch_before + 1
            assert all(life.cancelled for life in running_before), "leaving a state cancels its activity"
            assert [life.epoch for life in fakes.running()] == ([driver.epoch] if target is not State.STOPPED else [])
        nursery.cancel_scope.cancel()
    assert driver.state is State.STOPPED
