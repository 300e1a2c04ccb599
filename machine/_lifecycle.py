"""The runner's lifecycle, declared as data (docs/design.md §4).

The table below is written in the same orientation as the design document:
one row per event, one column per state. Every cell must be decided: adding a
state or an event without extending every row (or adding a row) fails at
import time, so no (state, event) pair can be forgotten.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass


class State(enum.StrEnum):
    """Where the runner is in its life."""

    STOPPED = "stopped"
    CONNECTING = "connecting"
    STREAMING = "streaming"
    RECONNECTING = "reconnecting"
    STOPPING = "stopping"


class Event(enum.StrEnum):
    """Something that happened and that the lifecycle must react to."""

    START = "START"
    STOP = "STOP"
    CONNECTED = "CONNECTED"
    CONNECT_FAILED = "CONNECT_FAILED"
    STREAM_END = "STREAM_END"
    STREAM_ERROR = "STREAM_ERROR"
    STREAM_CLOSED = "STREAM_CLOSED"
    STREAM_RESET = "STREAM_RESET"
    BACKOFF_ELAPSED = "BACKOFF_ELAPSED"
    PROBE_OK = "PROBE_OK"
    WAKE = "WAKE"
    DRAINED = "DRAINED"


class Effect(enum.StrEnum):
    """A named piece of work the runner performs when a cell says so.

    The machine only names effects; the runner decides how to carry them out.
    """

    CLAIM = "claim"
    """Hand the wake to the claim dispatcher."""

    RESET_BACKOFF = "reset backoff"
    """The connection worked: the next reconnect starts from the initial delay."""

    FATAL = "fatal"
    """The wake stream ended for good: record it as the reason the runner stops."""

    RESYNC = "resync"
    """A new connection: the server may have restarted since the last one. Its generations
    started over (forget which were handled), and every served subscription is claimed
    once (a sweep), so nothing pending waits for a wake the runner may have missed."""


@dataclass(frozen=True)
class Cell:
    """What one (state, event) pair does: where it leads, and which effects run, in order."""

    target: State | None
    effects: tuple[Effect, ...] = ()

    @property
    def ignored(self) -> bool:
        return self.target is None and not self.effects


@dataclass(frozen=True)
class Activity:
    """The work a state runs in its own nursery while the runner is in it.

    `on_crash` is the event the driver sends if the activity fails
    unexpectedly, so a bug in one activity moves the lifecycle on instead of
    taking the whole runner down.
    """

    name: str
    on_crash: Event


class IncompleteTableError(Exception):
    """The lifecycle table leaves a (state, event) pair undecided."""


IGNORE = Cell(None)


def go(target: State, *effects: Effect) -> Cell:
    return Cell(target, effects)


def stay(*effects: Effect) -> Cell:
    return Cell(None, effects)


S = State
_ = IGNORE
COLUMNS: tuple[State, ...] = (S.STOPPED, S.CONNECTING, S.STREAMING, S.RECONNECTING, S.STOPPING)

# fmt: off
ROWS: tuple[tuple[Event, tuple[Cell, ...]], ...] = (
    #                    stopped           connecting                                          streaming                       reconnecting          stopping
    (Event.START,           (go(S.CONNECTING), _,                                              _,                              _,                    _)),
    (Event.STOP,            (_,                go(S.STOPPING),                                 go(S.STOPPING),                 go(S.STOPPING),       _)),
    (Event.CONNECTED,       (_,                go(S.STREAMING, Effect.RESET_BACKOFF, Effect.RESYNC), _,                       _,                    _)),
    (Event.CONNECT_FAILED,  (_,                go(S.RECONNECTING),                             _,                              _,                    _)),
    (Event.STREAM_END,      (_,                _,                                              go(S.CONNECTING),               _,                    _)),
    (Event.STREAM_ERROR,    (_,                _,                                              go(S.RECONNECTING),             _,                    _)),
    (Event.STREAM_CLOSED,   (_,                _,                                              go(S.STOPPING, Effect.FATAL),   _,                    _)),
    (Event.STREAM_RESET,    (_,                go(S.RECONNECTING),                             go(S.RECONNECTING),             _,                    _)),
    (Event.BACKOFF_ELAPSED, (_,                _,                                              _,                              go(S.CONNECTING),     _)),
    (Event.PROBE_OK,        (_,                _,                                              _,                              go(S.CONNECTING),     _)),
    (Event.WAKE,            (_,                _,                                              stay(Effect.CLAIM),             _,                    _)),
    (Event.DRAINED,         (_,                _,                                              _,                              _,                    go(S.STOPPED))),
)
# fmt: on

ACTIVITIES: Mapping[State, Activity | None] = {
    S.STOPPED: None,
    S.CONNECTING: Activity("connect", on_crash=Event.CONNECT_FAILED),
    S.STREAMING: Activity("consume", on_crash=Event.STREAM_ERROR),
    S.RECONNECTING: Activity("backoff", on_crash=Event.BACKOFF_ELAPSED),
    S.STOPPING: Activity("drain", on_crash=Event.DRAINED),
}

INITIAL = S.STOPPED


def _build_table() -> dict[State, dict[Event, Cell]]:
    if set(COLUMNS) != set(State) or len(COLUMNS) != len(State):
        raise IncompleteTableError(f"columns {COLUMNS} must name every state exactly once")
    events = [event for event, _cells in ROWS]
    missing = set(Event) - set(events)
    if missing or len(events) != len(set(events)):
        raise IncompleteTableError(f"every event needs exactly one row; missing {sorted(missing)}")
    if set(ACTIVITIES) != set(State):
        raise IncompleteTableError("every state must declare its activity (or None)")
    table: dict[State, dict[Event, Cell]] = {state: {} for state in State}
    for event, cells in ROWS:
        if len(cells) != len(COLUMNS):
            raise IncompleteTableError(f"row {event} has {len(cells)} cells for {len(COLUMNS)} states")
        for state, cell in zip(COLUMNS, cells, strict=True):
            table[state][event] = cell
    return table


TABLE: Mapping[State, Mapping[Event, Cell]] = _build_table()
