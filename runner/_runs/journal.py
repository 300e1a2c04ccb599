"""A run's journal: where it lives, what its entries say, and writing them exactly once.

The journal of the run stream `runs/42` is the stream `__runs/runs/42`: on the same
server, outside any pattern that names the runs (a configuration whose pattern would
match it is refused, see `check_journal_outside`), so journaling wakes nothing.

Entries are JSON objects, appended in order, each carrying the producer epoch and seq it
was written with:

    {"kind": "step", "at": 0, "name": "plan", "result": ...}      a step's result
    {"kind": "step", "at": 1, "name": "tool", "error": "..."}     a step's final error
    {"kind": "status", "status": "running"}
    {"kind": "status", "status": "suspended", "waiting_for": {"type": "approval", "key": "call-1"}}
    {"kind": "status", "status": "completed", "result": ...}
    {"kind": "status", "status": "failed", "error": "..."}

Every append is an idempotent producer's (PROTOCOL.md §5.2.1) with the claim's generation
as epoch: a retried append lands once, and a holder whose claim a newer generation took over
is refused by the server (403, `ProducerFenced`) and records nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .._wire.protocol import Producer, Wire
from .._wire.retrying import retrying
from ..errors import ConfigError, ProducerFenced, StreamNotFound

JOURNAL_PREFIX = "__runs/"
PRODUCER_ID = "pullwake-run"
"""One producer per journal stream (one stream per run): stable across runners and restarts."""

TERMINAL = frozenset({"completed", "failed", "cancelled"})


def journal_path(run_path: str) -> str:
    return JOURNAL_PREFIX + run_path.strip("/")


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
        if glob_match(pattern, journal_path(example)):
            raise ConfigError(
                f"subscription {subscription!r} is a workflow, and its pattern {pattern!r} also matches its runs' "
                f"journals ({journal_path(example)!r}): use a pattern that does not match {JOURNAL_PREFIX}..."
            )
    if clashing := [stream for stream in streams if stream.startswith(JOURNAL_PREFIX)]:
        raise ConfigError(f"subscription {subscription!r} lists run journals as streams: {clashing}")


@dataclass
class JournalState:
    """What a run's journal says, folded from its entries."""

    entries: list[dict[str, Any]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    status: str = "pending"
    """`pending` until a runner first handled the run (no journal yet)."""
    last_status: dict[str, Any] | None = None

    @classmethod
    def of(cls, entries: Sequence[Any]) -> JournalState:
        state = cls()
        for entry in entries:
            if not isinstance(entry, dict):
                continue  # not ours: a journal is only written by runs, but never trust a stream blindly
            state.entries.append(entry)
            if entry.get("kind") == "step":
                state.steps.append(entry)
            elif entry.get("kind") == "status":
                state.status = str(entry.get("status"))
                state.last_status = entry
        return state

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    @property
    def waiting_for(self) -> dict[str, Any] | None:
        if self.status != "suspended" or self.last_status is None:
            return None
        waiting = self.last_status.get("waiting_for")
        return waiting if isinstance(waiting, dict) else None

    def newest_epoch(self) -> int:
        return max((entry["epoch"] for entry in self.entries if isinstance(entry.get("epoch"), int)), default=-1)

    def next_seq(self, epoch: int) -> int:
        seqs = [
            entry["seq"] for entry in self.entries if entry.get("epoch") == epoch and isinstance(entry.get("seq"), int)
        ]
        return max(seqs, default=-1) + 1

    def view(self, run_path: str) -> dict[str, Any]:
        """What `pullwake runs --json` prints for one run."""
        document: dict[str, Any] = {
            "id": run_path,
            "status": self.status,
            "waiting_for": self.waiting_for,
            "steps": [step.get("name") for step in self.steps],
        }
        if self.last_status is not None and self.status == "completed":
            document["result"] = self.last_status.get("result")
        if self.last_status is not None and self.status == "failed":
            document["error"] = self.last_status.get("error")
        return document


async def read_all(wire: Wire, path: str) -> list[Any] | None:
    """Every message of `path` (None if the stream does not exist), following the server's chunks."""
    messages: list[Any] = []
    offset = "-1"
    while True:
        try:
            result = await retrying(functools.partial(wire.read, path, offset), what=f"read {path}")
        except StreamNotFound:
            return None
        messages.extend(result.messages)
        if result.up_to_date or not result.messages or result.next_offset == offset:
            return messages
        offset = result.next_offset


class JournalWriter:
    """Appends one run's journal entries as the claim's producer: epoch = generation, seq in order."""

    def __init__(self, wire: Wire, run_path: str, state: JournalState, epoch: int) -> None:
        if state.newest_epoch() > epoch:
            # A newer claim holder has written already: we lost this claim, so record nothing.
            raise ProducerFenced(
                f"the journal of {run_path} has epoch {state.newest_epoch()}, newer than this claim's {epoch}",
                status=403,
            )
        self.wire = wire
        self.path = journal_path(run_path)
        self.state = state
        self.epoch = epoch
        self.seq = state.next_seq(epoch)

    async def record(self, entry: dict[str, Any]) -> None:
        written = {**entry, "epoch": self.epoch, "seq": self.seq}
        producer = Producer(PRODUCER_ID, self.epoch, self.seq)
        await retrying(lambda: self.wire.append(self.path, written, producer=producer), what=f"journal {self.path}")
        self.seq += 1
        # Keep the folded state current: a later status or step in this delivery sees it.
        self.state.entries.append(written)
        if entry.get("kind") == "step":
            self.state.steps.append(written)
        elif entry.get("kind") == "status":
            self.state.status = str(entry.get("status"))
            self.state.last_status = written
