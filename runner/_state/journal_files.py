"""The journal on disk: a snapshot and an append-only log of records (docs/design.md §6.4).

`journal.json` is a snapshot: the state as it was when log generation `generation`
began. `journal.<n>.log` holds the records of generation n, one JSON line each,
after a header line naming the server, the stream root and n. A start reads the
snapshot and replays the logs of its generation and later, in order. A torn last
line (a write the process did not finish) is ignored; a damaged line ends the
replay of its log, which is set aside with a warning (what it held up to there is
kept). Nothing read from disk can stop a start (`loading`).

`LogWriter` appends to the newest log: an fsync of the file (and of its directory,
once, after creating it) for the records a restart depends on. Past its bound it
seals the log and starts the next generation; `Compactor` applies the sealed
records to its own copy of the state, writes the next snapshot (atomically, file
and directory fsynced) and then removes the logs the snapshot covers. A crash at
any point leaves a snapshot and logs that replay to the state last written.
Each of the two is used by one thread at a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from .files import sync_directory, write_atomically
from .journal_records import JournalState, Record, checked
from .loading import Unusable, check_identity, exactly, read_bounded, read_document, set_aside

log = structlog.get_logger("pullwake.journal")

VERSION = 2
"""Of the snapshot and of the log header; a snapshot of version 1 (one file, no log) is read as generation 0."""
LOG_MIN_BYTES = 256 * 1024
"""A log is sealed past this size, or past the size of the last snapshot if larger: a snapshot
then costs at most as many bytes as the records it replaces, whatever the number of subscriptions."""
LOST = (
    "the fast resume of claims an earlier run held (they wait out their leases) and the offsets of gaps still to replay"
)


def log_path(path: Path, generation: int) -> Path:
    return path.with_name(f"{path.stem}.{generation}.log")


def logs(path: Path) -> list[tuple[int, Path]]:
    """The logs next to the snapshot `path`, oldest generation first."""
    pattern = re.compile(rf"{re.escape(path.stem)}\.(\d{{1,18}})\.log")
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    return sorted((int(match[1]), path.with_name(name)) for name in names if (match := pattern.fullmatch(name)))


def encode(record: Record) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


# -- reading ------------------------------------------------------------------------------------


def load(path: Path, identity: dict[str, str]) -> tuple[JournalState, int]:
    """The state an earlier run left, and the newest generation found; anything unusable is set aside."""
    state, base = JournalState(), 0
    try:
        document = read_document(path)
        if document is not None:
            version = _version(document, (1, VERSION))
            check_identity(document, identity)
            base = exactly(document.get("generation"), int, "generation") if version == VERSION else 0
            state = JournalState.parse(document)
    except Unusable as exc:
        state, base = JournalState(), 0
        set_aside(path, str(exc), lost=LOST)
    newest = base
    for generation, found in logs(path):
        newest = max(newest, generation)
        if generation < base:
            continue  # the snapshot holds it: a compaction ended before it could remove it
        try:
            replay(found, generation, identity, state)
        except Unusable as exc:
            set_aside(found, str(exc), lost=LOST)
    return state, newest


def replay(path: Path, generation: int, identity: dict[str, str], state: JournalState) -> None:
    """Apply the records of one log to `state`; `Unusable` (after applying what came before) if damaged."""
    data = read_bounded(path)
    if data is None:
        return
    lines = data.split(b"\n")
    torn = lines.pop()  # what follows the last newline: nothing, or a record the process did not finish
    if torn:
        log.info("journal.torn_record_ignored", path=str(path), bytes=len(torn))
    if not lines:
        return
    header = _line(lines[0], "the header")
    _version(header, (VERSION,))
    check_identity(header, identity)
    if type(header.get("generation")) is not int or header["generation"] != generation:
        raise Unusable(f"a header of generation {str(header.get('generation'))[:40]!r} in the log of {generation}")
    for number, line in enumerate(lines[1:], start=2):
        state.apply(checked(_line(line, f"line {number}")))


def _version(document: dict[str, Any], known: tuple[int, ...]) -> int:
    version = document.get("version")
    if type(version) is not int or version not in known:
        raise Unusable(f"unknown version {str(version)[:40]!r}")
    return version


def _line(line: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise Unusable(f"{what} is damaged ({type(exc).__name__}); the records after it are lost") from None
    if not isinstance(value, dict):
        raise Unusable(f"{what} is not a JSON object; the records after it are lost")
    return value


# -- writing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sealed:
    """The records of a full log, for the compactor: the snapshot of `generation` follows them."""

    generation: int
    records: list[Record]


class LogWriter:
    """Appends records to the newest log. Used by one thread at a time."""

    def __init__(self, path: Path, identity: dict[str, str], generation: int) -> None:
        self.path = path
        self._identity = identity
        self.generation = generation
        """Of the log being written, or to be created by the next append."""
        self.bound = LOG_MIN_BYTES
        self._descriptor: int | None = None
        self._size = 0
        self._segment: list[Record] = []
        self._directory_synced = False
        self._sealed: list[Sealed] = []

    def take_sealed(self) -> list[Sealed]:
        """The logs sealed since the last call, for the compactor (oldest first)."""
        sealed, self._sealed = self._sealed, []
        return sealed

    def append(self, records: list[Record], *, sync: bool) -> bool:
        """Write `records` in one go, fsynced if `sync`; False if written but the fsync failed.

        OSError: nothing of them was kept; write them again.
        """
        if self._descriptor is not None and (self._size > self.bound or os.fstat(self._descriptor).st_nlink == 0):
            # Full, or removed under us (its records would go nowhere): the compaction keeps them.
            self._sealed.append(self.seal())
        if self._descriptor is None:
            self._open()
        assert self._descriptor is not None
        data = b"".join(encode(record) for record in records)
        try:
            _write_all(self._descriptor, data)
        except OSError:
            try:
                os.ftruncate(self._descriptor, self._size)
            except OSError:
                # Cannot take the torn piece back: never append after it (it stays a torn last line).
                self._sealed.append(self.seal())
            raise
        self._size += len(data)
        self._segment.extend(records)
        if not sync:
            return True
        try:
            os.fsync(self._descriptor)
            if not self._directory_synced:
                sync_directory(self.path.parent)
                self._directory_synced = True
        except OSError as exc:
            # What a failed fsync left on disk is unknown: seal this log so a snapshot holds its records.
            log.error("journal.sync_failed", path=str(self.path.parent), error=str(exc))
            self._sealed.append(self.seal())
            return False
        return True

    def seal(self) -> Sealed:
        """Close the log being written; the next append starts the next generation."""
        if self._descriptor is not None:
            with contextlib.suppress(OSError):
                os.close(self._descriptor)
        sealed = Sealed(self.generation + 1, self._segment)
        self._descriptor, self._size, self._segment = None, 0, []
        self.generation += 1
        return sealed

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        path = log_path(self.path, self.generation)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600)
        header = encode({"version": VERSION, **self._identity, "generation": self.generation})
        try:
            _write_all(descriptor, header)
        except OSError:
            os.close(descriptor)
            path.unlink(missing_ok=True)
            raise
        self._descriptor, self._size, self._directory_synced = descriptor, len(header), False


class Compactor:
    """Writes snapshots: applies sealed logs to its own state, then removes them. One thread at a time."""

    def __init__(self, path: Path, identity: dict[str, str], state: JournalState) -> None:
        self.path = path
        self._identity = identity
        self._state = state
        self.snapshot_bytes = 0

    def compact(self, sealed: list[Sealed]) -> None:
        """Write the snapshot that follows `sealed` (oldest first). OSError: their logs stay."""
        for each in sealed:
            for record in each.records:
                self._state.apply(record)
        self._write(self._state, sealed[-1].generation)

    def _write(self, state: JournalState, generation: int) -> None:
        document = {"version": VERSION, **self._identity, "generation": generation, **state.document()}
        encoded = json.dumps(document, separators=(",", ":")).encode()
        write_atomically(self.path, encoded, sync=True)
        self.snapshot_bytes = len(encoded)
        for older, found in logs(self.path):
            if older < generation:
                with contextlib.suppress(OSError):  # best effort: a start ignores the logs a snapshot covers
                    found.unlink(missing_ok=True)


def _write_all(descriptor: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(descriptor, view) :]
