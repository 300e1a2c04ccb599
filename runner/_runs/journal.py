"""A run's journal: where it lives, what its entries say, and writing them exactly once.

The journal of the run stream `runs/42` is the stream `__runs/runs/42`: on the same
server, outside any pattern that names the runs (a configuration whose pattern would
match it is refused, see `check_journal_outside`), so journaling wakes nothing. Beside
the journals, each workflow subscription has a deadlines index, `__runs/~deadlines/<id>`
(runner/_runs/timers.py), refused likewise.

Entries are JSON objects, appended in order, each carrying the producer epoch and seq it
was written with:

    {"kind": "status", "status": "running", "generation": 7, "at": 1700000000.0, "held_for": 30.0}
                                                                   first entry of every delivery
    {"kind": "held", "at": 1700000010.0}                           every held_for / 3 while it goes on
    {"kind": "step", "at": 0, "name": "plan", "result": ...}       a step's result
    {"kind": "step", "at": 1, "name": "tool", "error": "..."}      a step's final error
    {"kind": "timer", "wait": 2, "type": "approval", "key": "c1", "deadline": 1700000000.0}
    {"kind": "status", "status": "suspended", "waiting_for": {"type": "approval", "key": "c1", ...}}
    {"kind": "status", "status": "completed", "result": ...}
    {"kind": "status", "status": "failed", "error": "..."}
    {"kind": "status", "status": "cancelled", "reason": ...}
    {"kind": "status", "status": "interrupted", "step": "tool"}  a stop, abort or lost lease cut it

A step entry at position `at` replaces what the journal held from that position on (see
"Epochs" below: only a holder that could not have seen those entries writes one there).

Holding
-------
The server says nothing about who holds a claim (GET of a subscription has no holder, and
asking it to claim would take the claim), so a delivery says it itself: its `running` entry
and then a `held` entry every `held_for / 3` seconds (`held_for` = the subscription's lease)
carry the writer's wall-clock time. A run whose status is `running` and whose newest such
time is more than `held_for` old has no live holder (its runner was killed or froze):
readers show it `interrupted` with `holder_lost`. It resumes at the next claim, like any
interrupted run. Clocks of writer and reader are compared: keep their skew well under
`held_for` (NTP does).

Epochs
------
Every append is an idempotent producer's (PROTOCOL.md §5.2.1): one producer id per journal,
and a per-delivery epoch. The server refuses an epoch below the newest it has seen (403,
`ProducerFenced`), starts a higher one at seq 0, and answers a repeated (epoch, seq) with
204 and appends nothing.

The epoch of a delivery is computed from the journal it has just read:

    epoch = max(newest epoch in the journal + 1, claim generation)

and the delivery's first append (its `running` entry, seq 0) comes before anything else.

- It never goes down. A legitimate holder always writes above everything the journal holds,
  whatever its generation: after a server restart (subscriptions forgotten, generations start
  again at 1) and for the runner's own gap replays (generation 0) alike. The journal of a run
  can no longer be stuck behind an epoch nobody will reach again.
- A zombie stays fenced. Take an older holder Z (claim generation g_Z, read the journal when it
  held newest epoch E_Z) and the newer holder N (generation g_N > g_Z within one server's life,
  read the journal later, E_N >= E_Z since a journal only grows). Then
  e_N = max(E_N + 1, g_N) >= max(E_Z + 1, g_Z) = e_Z.
  * e_N > e_Z: once N's first entry has landed, the server refuses every append of Z.
    If Z's first entry had landed before N read, E_N >= e_Z and this is the case.
  * e_N = e_Z: both deliveries start with seq 0 of the same epoch; the server appends the
    first and answers the second with 204. A 204 for a delivery's seq 0 is therefore read as
    "fenced" (a retry of our own lost answer is read the same way: it only costs a
    redelivery). So one delivery per epoch ever writes.
  Entries Z wrote after N read and before N's first entry are ones N did not replay; N writes
  its own step at those positions, and a step entry at position `at` supersedes the rest
  (`JournalState.of`), so every reader folds the same history: the one of the newest epoch.
- Across a server restart, generations are no longer ordered with the holder before it; a
  holder from before the restart (its claim forgotten by the server) with a higher generation
  than the journal's newest epoch + 1 would win the epoch order. It writes only until its
  runner learns the claim is gone; the other holder is refused (fenced, redelivered) and is
  never stuck: its next delivery reads the journal again and writes above it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from .._wire.protocol import ALREADY_APPENDED, Producer, Wire
from .._wire.retrying import retrying
from ..errors import ConfigError, ProducerFenced, StreamNotFound

JOURNAL_PREFIX = "__runs/"
DEADLINES_PREFIX = JOURNAL_PREFIX + "~deadlines/"
PRODUCER_ID = "pullwake-run"
"""One producer per journal stream (one stream per run): stable across runners and restarts."""

TERMINAL = frozenset({"completed", "failed", "cancelled"})
STATUSES = ("pending", "running", "suspended", "interrupted", "completed", "failed", "cancelled")
_STATUS_DETAIL = {"completed": "result", "failed": "error", "cancelled": "reason", "interrupted": "step"}


def journal_path(run_path: str) -> str:
    return JOURNAL_PREFIX + run_path.strip("/")


def deadlines_path(subscription: str) -> str:
    return DEADLINES_PREFIX + subscription.strip("/")


def glob_match(pattern: str, path: str) -> bool:
    """The reference server's subscription globs: `*` one segment, `**` any number of them."""
    parts = [part for part in pattern.strip("/").split("/") if part]
    segments = [segment for segment in path.strip("/").split("/") if segment]

    def match(pi: int, si: int) -> bool:
        while pi < len(parts) and si < len(segments):
            if parts[pi] == "**":
                return any(match(pi + 1, start) for start in range(si, len(segments) + 1))
            if parts[pi] != "*" and parts[pi].replace("%2A", "*").replace("%2a", "*") != segments[si]:
                return False
            pi, si = pi + 1, si + 1
        while pi < len(parts) and parts[pi] == "**":
            pi += 1
        return pi == len(parts) and si == len(segments)

    return match(0, 0)


def check_journal_outside(subscription: str, pattern: str | None, streams: Sequence[str]) -> None:
    """ConfigError if the subscription would follow its own runs' journals (each entry would wake it)."""
    if pattern:
        example = "/".join("x" if part in ("*", "**") else part for part in pattern.strip("/").split("/"))
        for ours in (journal_path(example), deadlines_path(subscription)):
            if glob_match(pattern, ours):
                raise ConfigError(
                    f"subscription {subscription!r} is a workflow, and its pattern {pattern!r} also matches its "
                    f"runs' journals ({ours!r}): use a pattern that does not match {JOURNAL_PREFIX}..."
                )
    if clashing := [stream for stream in streams if stream.startswith(JOURNAL_PREFIX)]:
        raise ConfigError(f"subscription {subscription!r} lists run journals as streams: {clashing}")


@dataclass
class JournalState:
    """What a run's journal says, folded from its entries."""

    entries: list[dict[str, Any]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    """By position: a step entry at `at` replaces what was held from `at` on."""
    timers: dict[int, dict[str, Any]] = field(default_factory=dict)
    """The deadlines of waits with a timeout, by the wait's position."""
    status: str = "pending"
    """`pending` until a runner first handled the run (no journal yet)."""
    last_status: dict[str, Any] | None = None
    last_held: float | None = None
    """The writer's clock at the newest `running` or `held` entry (see Holding)."""

    @classmethod
    def of(cls, entries: Sequence[Any]) -> JournalState:
        state = cls()
        for entry in entries:
            if isinstance(entry, dict):  # a journal is only written by runs, but never trust a stream blindly
                state.fold(entry)
        return state

    def fold(self, entry: dict[str, Any]) -> None:
        self.entries.append(entry)
        kind = entry.get("kind")
        if kind == "step":
            at = entry.get("at")
            if isinstance(at, int) and 0 <= at <= len(self.steps):
                del self.steps[at:]
            self.steps.append(entry)
        elif kind == "timer" and isinstance(entry.get("wait"), int):
            self.timers[entry["wait"]] = entry
        elif kind == "status":
            self.status = str(entry.get("status"))
            self.last_status = entry
        if kind in ("status", "held") and isinstance(entry.get("at"), int | float):
            self.last_held = float(entry["at"])

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    @property
    def waiting_for(self) -> dict[str, Any] | None:
        if self.status != "suspended" or self.last_status is None:
            return None
        waiting = self.last_status.get("waiting_for")
        return waiting if isinstance(waiting, dict) else None

    @property
    def deadline(self) -> tuple[float, str] | None:
        """(deadline, timer key) of the wait a suspended run is in, if it has a timeout."""
        waiting = self.waiting_for
        if waiting is None or not isinstance(waiting.get("deadline"), int | float):
            return None
        return float(waiting["deadline"]), str(waiting.get("timer"))

    def newest_epoch(self) -> int:
        return max((entry["epoch"] for entry in self.entries if isinstance(entry.get("epoch"), int)), default=-1)

    def holder_lost(self, now: float) -> bool:
        """Is this `running` run's holder gone (nothing said for longer than its hold)? See Holding."""
        held_for = self.last_status.get("held_for") if self.last_status is not None else None
        if self.status != "running" or self.last_held is None or not isinstance(held_for, int | float):
            return False
        return now - self.last_held > held_for

    def view(self, run_path: str, now: float | None = None) -> dict[str, Any]:
        """What `pullwake runs --json` prints for one run (`now`: the reader's clock, for Holding)."""
        lost = now is not None and self.holder_lost(now)
        status = "interrupted" if lost else self.status
        document: dict[str, Any] = {
            "id": run_path,
            "status": status,
            "waiting_for": self.waiting_for,
            "steps": [step.get("name") for step in self.steps],
        }
        detail = _STATUS_DETAIL.get(status)
        if detail is not None and self.last_status is not None:
            document[detail] = self.last_status.get(detail)
        if self.status == "running":
            document |= {"holder_lost": lost, "last_held": self.last_held}
        return document


async def read_stream(wire: Wire, path: str) -> tuple[list[Any], str] | None:
    """Every message of `path` and the offset after them (None if the stream does not exist)."""
    messages: list[Any] = []
    offset = "-1"
    while True:
        try:
            result = await retrying(functools.partial(wire.read, path, offset), what=f"read {path}")
        except StreamNotFound:
            return None
        messages.extend(result.messages)
        if result.up_to_date or not result.messages or result.next_offset == offset:
            return messages, result.next_offset
        offset = result.next_offset


async def read_all(wire: Wire, path: str) -> list[Any] | None:
    """Every message of `path` (None if the stream does not exist), following the server's chunks."""
    read = await read_stream(wire, path)
    return None if read is None else read[0]


class JournalWriter:
    """Appends one delivery's journal entries as the run's producer, in an epoch of its own (see Epochs)."""

    def __init__(self, wire: Wire, run_path: str, state: JournalState, generation: int) -> None:
        self.wire = wire
        self.run_path = run_path
        self.path = journal_path(run_path)
        self.state = state
        self.epoch = max(state.newest_epoch() + 1, generation)
        self.seq = 0
        self._one_at_a_time = trio.Lock()  # a `held` entry may come while a step is being journaled

    async def record(self, entry: dict[str, Any]) -> None:
        async with self._one_at_a_time:
            written = {**entry, "epoch": self.epoch, "seq": self.seq}
            producer = Producer(PRODUCER_ID, self.epoch, self.seq)
            answer = await retrying(
                lambda: self.wire.append(self.path, written, producer=producer), what=f"journal {self.path}"
            )
            if answer == ALREADY_APPENDED and self.seq == 0:
                raise ProducerFenced(
                    f"the journal of {self.run_path} already has epoch {self.epoch}: another delivery took it",
                    status=403,
                )
            self.seq += 1
            self.state.fold(written)  # a later status or step in this delivery sees it
