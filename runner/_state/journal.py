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

With a `state_dir` it lives in `journal.json` there (owner-only, replaced
atomically, bounded in size; one written for another server or stream root, or
that cannot be used, is set aside at start: see `loading`); without one it lives in memory, which still covers
a server restart while the runner runs. While the runner runs, `keep` writes it
from a worker thread: at once after a change a restart depends on (a claim
taken, gaps found or replayed), at most once per interval after acks and ended
claims (an ack older than that may be replayed after a crash: at least once),
and once more at the end. A file write costs ~0.4 ms; written through on every
change it was three per claim, on the event loop. It holds claim
tokens (the server's short-lived proof of a lease) and no other secret.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import structlog
import trio
from pydantic import SecretStr

from .._wire.protocol import Ack, Claim, is_after
from .files import write_atomically
from .loading import Unusable, check_identity, exactly, read_document, set_aside

log = structlog.get_logger("pullwake.journal")

# Streams remembered per subscription: a pattern subscription can link streams without
# end; the ones acknowledged longest ago are forgotten first.
MAX_STREAMS = 10_000
VERSION = 1


@dataclass(frozen=True)
class HeldClaim:
    """A claim the runner holds, as much of it as is needed to hand it back."""

    subscription: str
    wake_id: str
    generation: int
    token: str
    renewed_at: float
    """Unix seconds: when the lease was last renewed (for operators; the server decides)."""

    def as_claim(self) -> Claim:
        return Claim(self.subscription, self.wake_id, self.generation, (), 0, SecretStr(self.token))


@dataclass(frozen=True)
class Gap:
    """Events of one stream the server skipped when it re-created a subscription."""

    stream: str
    start: str
    """Replay from here (exclusive: the last offset acknowledged before the loss)."""
    end: str
    """Up to here: where the re-created subscription linked the stream."""


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
        self._server_url = server_url
        self._stream_root = stream_root
        self._claims: dict[str, HeldClaim] = {}
        self._acked: dict[str, dict[str, str]] = {}
        self._gaps: dict[str, list[Gap]] = {}
        self._fresh: dict[str, dict[str, str]] = {}
        """Offsets acknowledged by this runner since `take_fresh` last took them (for its peers)."""
        self._dirty = False
        self._urgent = False
        self._wakeup: trio.Event | None = None
        """Set while `keep` runs; without it every change is written through."""
        self._load()

    # -- claims ----------------------------------------------------------------------------

    def held_claims(self) -> list[HeldClaim]:
        return list(self._claims.values())

    def holds(self, subscription: str) -> bool:
        return subscription in self._claims

    def claimed(self, claim: Claim) -> None:
        """A claim was granted: remember it, and where each of its streams was acknowledged."""
        self._claims[claim.subscription] = HeldClaim(
            claim.subscription, claim.wake_id, claim.generation, claim.token.get_secret_value(), time.time()
        )
        offsets = self._acked.setdefault(claim.subscription, {})
        for stream in claim.streams:
            _advance(offsets, stream.path, stream.acked_offset)
        self._save(urgent=True)

    def acked(self, claim: Claim, acks: list[Ack]) -> None:
        """An ack was accepted: progress is the server's now, and the lease was renewed."""
        offsets = self._acked.setdefault(claim.subscription, {})
        fresh = self._fresh.setdefault(claim.subscription, {})
        for ack in acks:
            _advance(offsets, ack.stream, ack.offset)
            _advance(fresh, ack.stream, ack.offset)
        held = self._claims.get(claim.subscription)
        refreshed = False
        if held is not None and held.wake_id == claim.wake_id:
            # The token too: a server may refresh it in the ack answer, and a restarted
            # runner hands the claim back with the newest (so that write is not put off).
            token = claim.token.get_secret_value()
            refreshed = token != held.token
            self._claims[claim.subscription] = HeldClaim(
                held.subscription, held.wake_id, held.generation, token, time.time()
            )
        self._save(urgent=refreshed)

    def ended(self, subscription: str, wake_id: str) -> None:
        """The server no longer counts this runner as the holder (done, released, or lost)."""
        held = self._claims.get(subscription)
        if held is not None and held.wake_id == wake_id:
            del self._claims[subscription]
            self._save()

    def take_fresh(self) -> dict[str, dict[str, str]]:
        """What this runner acknowledged since the last call, per subscription and stream."""
        fresh, self._fresh = self._fresh, {}
        return fresh

    def learn(self, subscription: str, offsets: Mapping[str, str]) -> None:
        """A peer acknowledged these: a gap is never replayed from before them (offsets only move forward)."""
        known = self._acked.setdefault(subscription, {})
        changed = False
        for stream, offset in offsets.items():
            before = known.get(stream)
            _advance(known, stream, offset)
            changed = changed or known[stream] != before
        if changed:
            self._save()

    def sole_stream(self, subscription: str) -> tuple[str, str] | None:
        """The subscription's only known stream and the offset acknowledged there, if it has one only."""
        offsets = self._acked.get(subscription)
        if offsets is None or len(offsets) != 1:
            return None
        return next(iter(offsets.items()))

    # -- lost subscriptions ----------------------------------------------------------------

    def linked(self, subscription: str, linked: dict[str, str], *, created: bool, keep_gaps: bool = True) -> list[Gap]:
        """The server linked `subscription`'s streams at these offsets (a create or a confirm).

        When the subscription had to be created although the journal knew it, the server
        had forgotten it: the events between what was acknowledged and where each stream
        is linked now were skipped. Returns them as gaps (kept until replayed, if
        `keep_gaps`). A stream the journal never saw is replayed from its start.
        """
        known = self._acked.get(subscription)
        gaps: list[Gap] = []
        if created and known is not None:
            for stream, end in linked.items():
                start = known.get(stream, "-1")
                if is_after(end, start):
                    gaps.append(Gap(stream, start, end))
        offsets = self._acked.setdefault(subscription, {})
        for stream, offset in linked.items():
            offsets[stream] = offset
        if gaps and keep_gaps:
            self._gaps.setdefault(subscription, []).extend(gaps)
        self._save(urgent=True)
        return gaps

    def gaps(self, subscription: str) -> list[Gap]:
        return list(self._gaps.get(subscription, ()))

    def replayed(self, subscription: str, gap: Gap, offset: str) -> Gap | None:
        """Everything of `gap` up to `offset` reached the handler; returns what is left of it."""
        gaps = self._gaps.get(subscription, [])
        if gap not in gaps:
            return None
        index = gaps.index(gap)
        left: Gap | None = Gap(gap.stream, offset, gap.end) if is_after(gap.end, offset) else None
        if left is not None:
            gaps[index] = left
        else:
            del gaps[index]
        if not gaps:
            self._gaps.pop(subscription, None)
        self._save(urgent=True)
        return left

    # -- the file --------------------------------------------------------------------------

    def _document(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "server_url": self._server_url,
            "stream_root": self._stream_root,
            "claims": {sub: asdict(held) for sub, held in self._claims.items()},
            "acked": self._acked,
            "gaps": {sub: [asdict(gap) for gap in gaps] for sub, gaps in self._gaps.items()},
        }

    def _save(self, *, urgent: bool = False) -> None:
        if self.path is None:
            return
        self._dirty = True
        if self._wakeup is None:
            self._write()
            return
        self._urgent = self._urgent or urgent
        self._wakeup.set()

    def _write(self) -> None:
        """Write what is in memory now, on this thread."""
        assert self.path is not None
        self._dirty = False
        self._on_write(_write(self.path, self._encoded()))

    def _encoded(self) -> bytes:
        return json.dumps(self._document(), separators=(",", ":")).encode()

    async def keep(self, *, interval: float) -> None:
        """Write changes from a worker thread until cancelled, then once more (see the module doc)."""
        if self.path is None:
            return
        path, written_at = self.path, -math.inf
        self._wakeup = trio.Event()
        try:
            while True:
                await self._wakeup.wait()
                with trio.move_on_at(written_at + interval):
                    while not self._urgent:
                        self._wakeup = trio.Event()
                        await self._wakeup.wait()
                self._wakeup = trio.Event()
                self._dirty = self._urgent = False
                # Encoded here (a consistent snapshot), written there (the slow part).
                self._on_write(await trio.to_thread.run_sync(_write, path, self._encoded()))
                written_at = trio.current_time()
                if self._dirty:
                    self._wakeup.set()
        finally:
            self._wakeup = None
            if self._dirty:
                self._write()

    def _load(self) -> None:
        """Read what an earlier run left; anything unusable is set aside (see `loading`)."""
        if self.path is None:
            return
        try:
            document = read_document(self.path)
            if document is None:
                return
            self._claims, self._acked, self._gaps = self._parse(document)
        except Unusable as exc:
            set_aside(
                self.path,
                str(exc),
                lost="the fast resume of claims an earlier run held (they wait out their leases) "
                "and the offsets of gaps still to replay",
            )

    def _parse(
        self, document: dict[str, Any]
    ) -> tuple[dict[str, HeldClaim], dict[str, dict[str, str]], dict[str, list[Gap]]]:
        """The journal's content, every field checked for its exact type; `Unusable` if anything is off."""
        if document.get("version") != VERSION:
            raise Unusable(f"unknown version {str(document.get('version'))[:40]!r}")
        check_identity(document, {"server_url": self._server_url, "stream_root": self._stream_root})
        claims: dict[str, HeldClaim] = {}
        for sub, held in _mapping(document.get("claims"), "claims").items():
            held = _mapping(held, f"claims.{sub}")
            claims[sub] = HeldClaim(
                exactly(held.get("subscription"), str, "claim subscription"),
                exactly(held.get("wake_id"), str, "claim wake_id"),
                exactly(held.get("generation"), int, "claim generation"),
                exactly(held.get("token"), str, "claim token"),
                float(exactly(held.get("renewed_at"), (int, float), "claim renewed_at")),
            )
        acked: dict[str, dict[str, str]] = {}
        for sub, offsets in _mapping(document.get("acked"), "acked").items():
            acked[sub] = {
                stream: exactly(offset, str, f"acked offset of {sub}")
                for stream, offset in _mapping(offsets, f"acked.{sub}").items()
            }
        gaps: dict[str, list[Gap]] = {}
        for sub, listed in _mapping(document.get("gaps"), "gaps").items():
            gaps[sub] = []
            for gap in exactly(listed, list, f"gaps.{sub}"):
                gap = _mapping(gap, f"a gap of {sub}")
                gaps[sub].append(
                    Gap(
                        *(exactly(gap.get(field), str, f"gap {field} of {sub}") for field in ("stream", "start", "end"))
                    )
                )
        return claims, acked, gaps


def _mapping(value: Any, what: str) -> dict[str, Any]:
    """A JSON object (its keys are strings by JSON's rules), else `Unusable`."""
    return exactly(value, dict, what)  # type: ignore[no-any-return]


def _write(path: Path, document: bytes) -> bool:
    """Write the journal; False (and an error line) if the disk refused: the run goes on."""
    try:
        write_atomically(path, document, sync=False)
    except OSError as exc:
        log.error("journal.write_failed", path=str(path), error=str(exc))
        return False
    return True


def _advance(offsets: dict[str, str], stream: str, offset: str) -> None:
    """Remember `offset` for `stream` unless it goes backwards; the newest entries stay."""
    current = offsets.pop(stream, None)
    offsets[stream] = offset if current is None or is_after(offset, current) else current
    while len(offsets) > MAX_STREAMS:
        del offsets[next(iter(offsets))]
