"""The lifecycle table made executable with the `transitions` library."""

from __future__ import annotations

from dataclasses import dataclass

from transitions import Machine

from ._lifecycle import ACTIVITIES, INITIAL, TABLE, Activity, Effect, Event, State


@dataclass(frozen=True)
class Step:
    """The outcome of firing one event: what the runner must now do."""

    source: State
    event: Event
    target: State
    effects: tuple[Effect, ...]
    entered: bool
    """True when the event led into a state (its activity must start afresh)."""

    @property
    def activity(self) -> Activity | None:
        return ACTIVITIES[self.target]


class Lifecycle:
    """Holds the current state and moves it along the table, nothing else.

    Pure: no I/O, no clocks, no concurrency. The driver in `runner` owns one and
    carries out what each `Step` asks for.
    """

    state: str  # maintained by `transitions`

    def __init__(self, initial: State = INITIAL) -> None:
        self._machine = Machine(
            model=self,
            states=[state.value for state in State],
            initial=initial.value,
            auto_transitions=False,
            ignore_invalid_triggers=False,
        )
        for source, row in TABLE.items():
            for event, cell in row.items():
                # An ignored cell is an internal transition: declared, so the
                # machine accepts the trigger, but it neither exits nor enters.
                dest = cell.target.value if cell.target is not None else None
                self._machine.add_transition(event.value, source.value, dest)

    @property
    def current(self) -> State:
        return State(self.state)

    def fire(self, event: Event) -> Step:
        source = self.current
        cell = TABLE[source][event]
        self._machine.events[event.value].trigger(self)
        return Step(
            source=source,
            event=event,
            target=self.current,
            effects=cell.effects,
            entered=cell.target is not None,
        )
