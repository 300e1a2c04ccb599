"""What the runner remembers of its own work, across its own restarts and the server's (docs/design.md §6.4-6.5).

The journal keeps, per served subscription:
- the claim the runner holds, if any (wake id, generation, claim token, when the
  lease was last renewed), so a restarted runner can hand it back at once
  instead of waiting for the lease to run out;
- the last acknowledged offset of every linked stream (from claim answers and
  the runner's own acks), so when the server forgets the subscription (the
  reference server keeps subscriptions in memory) and the runner re-creates it,
  the events between that offset and where the new subscription linked the
  stream are not skipped: they become gaps the runner replays to the handler;
- the gaps still to replay.

Every change is a small record (`journal_records`). With a `state_dir` the records
go to an append-only log there, compacted into `journal.json` when it grows past
a bound (`journal_files`; both owner-only; files that cannot be used are set aside
at start: see `loading`); without one the journal lives in memory, which still
covers a server restart while the runner runs. While the runner runs, `keep`
appends from a worker thread: at once, fsynced (file, and directory once per log),
after a change a restart depends on (a claim taken, a refreshed token, gaps found
or replayed), at most once per interval after acks and ended claims (an ack older
than that may be replayed after a crash: at least once), and at the end of the run
a snapshot of everything. `claimed` returns a `Written` a claim awaits before its
first batch: the claim it took is on disk by then, whatever else is being written.
An append costs the same at 10 subscriptions as at 1,000; the event loop only
builds the record. The journal holds claim tokens (the server's short-lived proof
of a lease) and no other secret.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict
from pathlib import Path

import structlog
import trio

from .._wire.protocol import Ack, Claim, is_after
from .journal_files import LOG_MIN_BYTES, Compactor, LogWriter, Sealed, load
from .journal_records import MAX_STREAMS, Gap, HeldClaim, JournalState, Record, advance

__all__ = ["MAX_STREAMS", "Gap", "HeldClaim", "Journal", "Written"]

log = structlog.get_logger("pullwake.journal")


class Written:
    """When a record reached the disk: `wait` returns once it did (True) or its write failed (False)."""

    def __init__(self, *, done: bool = False, ok: bool = True) -> None:
        self._event = trio.Event()
        self.ok = ok
        if done:
            self._event.set()

    def set(self, ok: bool) -> None:
        self.ok = ok
        self._event.set()

    async def wait(self) -> bool:
        await self._event.wait()
        return self.ok


DONE = Written(done=True)
"""Nothing to wait for (no state dir, or written through already)."""


class Journal:
    """The runner's memory: current in memory at once, on disk as `keep` writes it (else at once)."""

    def __init__(
        self,
        path: Path | None,
        *,
        server_url: str,
        stream_root: str = "/v1/stream",
        on_write: Callable[[bool], None] = lambda ok: None,
    ) -> None:
        self.path = path
        self._on_write = on_write
        """Told how every write ended: a failed one is a degraded runner (health, metrics)."""
        self._state = JournalState()
        self._fresh: dict[str, dict[str, str]] = {}
        """Offsets acknowledged or linked (without a gap) since `take_fresh` last took them (for its peers)."""
        self.vouched: set[str] = set()
        """Subscriptions a peer said it linked or acknowledged on this server during this run (memory only)."""
        self._pending: list[Record] = []
        """Records applied in memory, not written yet (in order)."""
        self._urgent = False
        """A pending record is one a restart depends on: write (and fsync) it at once."""
        self._recorded = 0
        """Records made, counted from 1: the number a claim waits for."""
        self._waiting: list[tuple[int, Written]] = []
        self._last_ok = True
        """How the last write ended."""
        self._sealed: list[Sealed] = []
        """Full logs waiting for their compaction."""
        self._wakeup: trio.Event | None = None
        """Set while `keep` runs; without it every change is written through."""
        self._hurry: trio.Event | None = None
        """Set (while `keep` runs) when an urgent record is pending."""
        self._compaction_due: trio.Event | None = None
        self._writer: LogWriter | None = None
        self._compactor: Compactor | None = None
        if path is not None:
            identity = {"server_url": server_url, "stream_root": stream_root}
            self._state, newest = load(path, identity)
            self._writer = LogWriter(path, identity, newest + 1)
            self._compactor = Compactor(path, identity, self._state.copy())
            # The first compaction writes what was loaded as one snapshot and removes the old logs.
            self._sealed.append(Sealed(newest + 1, []))

    # -- claims ----------------------------------------------------------------------------

    def held_claims(self) -> list[HeldClaim]:
        return list(self._state.claims.values())

    def holds(self, subscription: str) -> bool:
        return subscription in self._state.claims

    def claimed(self, claim: Claim) -> Written:
        """A claim was granted: remember it, and where each of its streams was acknowledged.

        Returns when that is on disk (fsynced): the claim's first batch waits for it, so a
        crash at any moment of the claim leaves a journal that hands it back at the next start.
        """
        offsets: dict[str, str] = {}
        for stream in claim.streams:
            advance(offsets, stream.path, stream.acked_offset)
        sequence = self._record(
            {
                "op": "claimed",
                "sub": claim.subscription,
                "wake_id": claim.wake_id,
                "generation": claim.generation,
                "token": claim.token.get_secret_value(),
                "at": time.time(),
                "offsets": offsets,
            },
            urgent=True,
        )
        if self._writer is None:
            return DONE
        if self._wakeup is None:
            return Written(done=True, ok=self._last_ok)  # written through already
        written = Written()
        self._waiting.append((sequence, written))
        return written

    def acked(self, claim: Claim, acks: list[Ack]) -> None:
        """An ack was accepted: progress is the server's now, and the lease was renewed."""
        offsets: dict[str, str] = {}
        for ack in acks:
            advance(offsets, ack.stream, ack.offset)
            # Only with an offset: a renewal that acknowledged nothing leaves no entry, which a peer
            # would take as word of where the subscription was linked, and never learn it (`learn`).
            advance(self._fresh.setdefault(claim.subscription, {}), ack.stream, ack.offset)
        held = self._state.claims.get(claim.subscription)
        token = claim.token.get_secret_value()
        # The token too: a server may refresh it in the ack answer, and a restarted
        # runner hands the claim back with the newest (so that write is not put off).
        refreshed = held is not None and held.wake_id == claim.wake_id and token != held.token
        self._record(
            {
                "op": "acked",
                "sub": claim.subscription,
                "wake_id": claim.wake_id,
                "token": token,
                "at": time.time(),
                "offsets": offsets,
            },
            urgent=refreshed,
        )

    def ended(self, subscription: str, wake_id: str) -> None:
        """The server no longer counts this runner as the holder (done, released, or lost)."""
        held = self._state.claims.get(subscription)
        if held is not None and held.wake_id == wake_id:
            self._record({"op": "ended", "sub": subscription, "wake_id": wake_id})

    def take_fresh(self) -> dict[str, dict[str, str]]:
        """What this runner acknowledged since the last call, per subscription and stream."""
        fresh, self._fresh = self._fresh, {}
        return fresh

    def learn(self, subscription: str, offsets: Mapping[str, str]) -> None:
        """A peer acknowledged these: a gap is never replayed from before them (offsets only move forward).

        Word without offsets vouches for nothing: the subscription is still confirmed here, which
        tells where it was linked, so that putting it back after a server restart finds its gap."""
        if not offsets:
            return
        self.vouched.add(subscription)
        known = self._state.acked.get(subscription, {})
        moved = {
            stream: offset
            for stream, offset in offsets.items()
            if stream not in known or is_after(offset, known[stream])
        }
        if moved:
            self._record({"op": "learned", "sub": subscription, "offsets": moved})

    def vouchable(self, subscriptions: Iterable[str], *, streams: int) -> dict[str, dict[str, str]]:
        """Where each of `subscriptions` was acknowledged or linked, for a peer to `learn`, up to
        `streams` offsets in all (one fleet record); only without a gap of this runner's pending (it
        alone holds those events until it has replayed them: a peer that learnt past them would put
        the subscription back without)."""
        vouched: dict[str, dict[str, str]] = {}
        for sub in subscriptions:
            offsets = self._state.acked.get(sub)
            if not offsets or self._state.gaps.get(sub):
                continue
            streams -= len(offsets)
            if streams < 0:
                break
            vouched[sub] = dict(offsets)
        return vouched

    def sole_stream(self, subscription: str) -> tuple[str, str] | None:
        """The subscription's only known stream and the offset acknowledged there, if it has one only."""
        offsets = self._state.acked.get(subscription)
        if offsets is None or len(offsets) != 1:
            return None
        return next(iter(offsets.items()))

    # -- lost subscriptions ----------------------------------------------------------------

    def linked(self, subscription: str, linked: dict[str, str], *, created: bool, keep_gaps: bool = True) -> list[Gap]:
        """The server linked `subscription`'s streams at these offsets (a create or a confirm).

        When the subscription had to be created although the journal knew it, the server
        had forgotten it: the events between what was acknowledged and where each stream
        is linked now were skipped. Returns them as gaps (kept until replayed, if
        `keep_gaps`; on disk, fsynced, at once). A stream the journal never saw is
        replayed from its start.
        """
        known = self._state.acked.get(subscription)
        gaps: list[Gap] = []
        if created and known is not None:
            for stream, end in linked.items():
                start = known.get(stream, "-1")
                if is_after(end, start):
                    gaps.append(Gap(stream, start, end))
        kept = [asdict(gap) for gap in gaps] if keep_gaps else []
        self._record({"op": "linked", "sub": subscription, "offsets": dict(linked), "gaps": kept}, urgent=True)
        if not gaps:
            # Peers learn that the subscription exists and from where nothing is owed: one that
            # must put it back without having served it computes the gap from here. Not past a
            # gap: only this runner holds those events until it has replayed them.
            fresh = self._fresh.setdefault(subscription, {})
            for stream, offset in linked.items():
                advance(fresh, stream, offset)
        return gaps

    def knows(self, subscription: str) -> bool:
        """Has this runner (or a peer) seen `subscription` linked or acknowledged on this server?
        If the server forgot it since, putting it back finds the gap (`linked`): nothing is lost."""
        return subscription in self._state.acked

    def gaps(self, subscription: str) -> list[Gap]:
        return list(self._state.gaps.get(subscription, ()))

    def replayed(self, subscription: str, gap: Gap, offset: str) -> Gap | None:
        """Everything of `gap` up to `offset` reached the handler; returns what is left of it."""
        if gap not in self._state.gaps.get(subscription, []):
            return None
        self._record({"op": "replayed", "sub": subscription, "gap": asdict(gap), "offset": offset}, urgent=True)
        return Gap(gap.stream, offset, gap.end) if is_after(gap.end, offset) else None

    # -- the disk --------------------------------------------------------------------------

    def _record(self, record: Record, *, urgent: bool = False) -> int:
        """Apply `record` in memory, and have it written; returns its number."""
        self._state.apply(record)
        if self._writer is None:
            return 0
        self._pending.append(record)
        self._recorded += 1
        self._urgent = self._urgent or urgent
        if self._wakeup is None:
            self._write_through()
            return self._recorded
        self._wakeup.set()
        if urgent:
            assert self._hurry is not None
            self._hurry.set()
        return self._recorded

    def _write_through(self) -> None:
        """Without a keeper: write what is pending on this thread, compactions included."""
        records, sync, upto = self._take()
        self._appended(self._append(records, sync), records, upto)
        if self._sealed:
            sealed, self._sealed = self._sealed, []
            self._compacted(self._compact(sealed))

    def _take(self) -> tuple[list[Record], bool, int]:
        records, sync, upto = self._pending, self._urgent, self._recorded
        self._pending, self._urgent = [], False
        return records, sync, upto

    def _append(self, records: list[Record], sync: bool) -> bool | None:
        """On the writer's thread: durable?, or None if the disk refused them (an error line; written again later)."""
        assert self._writer is not None
        try:
            return self._writer.append(records, sync=sync)
        except OSError as exc:
            log.error("journal.write_failed", path=str(self.path), error=str(exc))
            return None

    def _appended(self, appended: bool | None, records: list[Record], upto: int) -> None:
        """Back on the loop: tell the claims waiting for these records, queue the full logs."""
        assert self._writer is not None
        ok = appended is True
        if appended is None:
            self._pending[:0] = records
        if sealed := self._writer.take_sealed():
            self._sealed.extend(sealed)
            if self._compaction_due is not None:
                self._compaction_due.set()
        self._last_ok = ok
        self._on_write(ok)
        still: list[tuple[int, Written]] = []
        for sequence, written in self._waiting:
            if sequence <= upto:
                written.set(ok)
            else:
                still.append((sequence, written))
        self._waiting = still

    def _compact(self, sealed: list[Sealed]) -> bool:
        """On the compactor's thread: False if the snapshot could not be written (the logs stay)."""
        assert self._compactor is not None
        try:
            self._compactor.compact(sealed)
        except OSError as exc:
            log.error("journal.write_failed", path=str(self.path), error=str(exc))
            return False
        return True

    async def keep(self, *, interval: float, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write changes from worker threads until cancelled, then a snapshot of everything (see the module doc)."""
        if self._writer is None:
            task_status.started()
            return
        written_at = -math.inf
        self._wakeup, self._hurry = trio.Event(), trio.Event()
        self._compaction_due = trio.Event()
        if self._pending:
            self._wakeup.set()
        if self._sealed:
            self._compaction_due.set()
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keep_compacting)
                while True:
                    await self._wakeup.wait()
                    if not self._urgent:
                        with trio.move_on_at(written_at + interval):
                            await self._hurry.wait()
                    self._wakeup, self._hurry = trio.Event(), trio.Event()
                    records, sync, upto = self._take()
                    if not records:
                        continue
                    appended = await trio.to_thread.run_sync(self._append, records, sync)
                    self._appended(appended, records, upto)
                    written_at = trio.current_time()
                    if self._pending:
                        # More came meanwhile (or these failed: tried again after the interval).
                        self._wakeup.set()
        finally:
            self._wakeup = self._hurry = self._compaction_due = None
            self.flush()

    async def _keep_compacting(self) -> None:
        assert self._writer is not None
        assert self._compactor is not None
        while True:
            assert self._compaction_due is not None
            await self._compaction_due.wait()
            self._compaction_due = trio.Event()
            sealed, self._sealed = self._sealed, []
            if sealed:
                self._compacted(await trio.to_thread.run_sync(self._compact, sealed))

    def _compacted(self, ok: bool) -> None:
        assert self._writer is not None
        assert self._compactor is not None
        self._on_write(ok)
        self._writer.bound = max(LOG_MIN_BYTES, self._compactor.snapshot_bytes)

    def flush(self) -> None:
        """Write everything now, on this thread, and compact it into one snapshot (the end of a run)."""
        if self._writer is None:
            return
        if self._pending:
            records, _urgent, upto = self._take()
            self._appended(self._append(records, True), records, upto)
        sealed, self._sealed = [*self._sealed, *self._writer.take_sealed(), self._writer.seal()], []
        self._compacted(self._compact(sealed))
