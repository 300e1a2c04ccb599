"""What the journal remembers, and the small records that change it (docs/design.md §6.4).

Every change the runner makes to its journal is a `Record` (a JSON object with an
`op`), applied to a `JournalState` by `apply`: the in-memory journal applies it at
once, the log on disk holds it, a start replays it over the last snapshot, and the
compaction applies it to the snapshot it writes. One function for all four makes
them agree by construction. A record read back from disk is `checked` first, so
`apply` never sees a value of the wrong type.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pydantic import SecretStr

from .._wire.protocol import Claim, is_after
from .loading import Unusable, exactly

# Streams remembered per subscription: a pattern subscription can link streams without
# end; the ones acknowledged longest ago are forgotten first.
MAX_STREAMS = 10_000

Record = dict[str, Any]
"""One change: `{"op": ..., "sub": ..., ...}`, JSON-able, never changed once made."""


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


class JournalState:
    """Claims held, acknowledged offsets and gaps, per subscription."""

    def __init__(self) -> None:
        self.claims: dict[str, HeldClaim] = {}
        self.acked: dict[str, dict[str, str]] = {}
        self.gaps: dict[str, list[Gap]] = {}

    def copy(self) -> JournalState:
        other = JournalState()
        other.claims = dict(self.claims)
        other.acked = {sub: dict(offsets) for sub, offsets in self.acked.items()}
        other.gaps = {sub: list(gaps) for sub, gaps in self.gaps.items()}
        return other

    def apply(self, record: Record) -> None:
        """Make the change `record` describes (an unknown op changes nothing)."""
        op, sub = record["op"], record["sub"]
        if op == "claimed":
            self.claims[sub] = HeldClaim(sub, record["wake_id"], record["generation"], record["token"], record["at"])
            self._advance(sub, record["offsets"])
        elif op == "acked":
            self._advance(sub, record["offsets"])
            held = self.claims.get(sub)
            if held is not None and held.wake_id == record["wake_id"]:
                self.claims[sub] = HeldClaim(sub, held.wake_id, held.generation, record["token"], record["at"])
        elif op == "ended":
            held = self.claims.get(sub)
            if held is not None and held.wake_id == record["wake_id"]:
                del self.claims[sub]
        elif op == "learned":
            self._advance(sub, record["offsets"])
        elif op == "linked":
            offsets = self.acked.setdefault(sub, {})
            for stream, offset in record["offsets"].items():
                offsets[stream] = offset
            if record["gaps"]:
                self.gaps.setdefault(sub, []).extend(_gap_of(gap) for gap in record["gaps"])
        elif op == "replayed":
            self._replayed(sub, _gap_of(record["gap"]), record["offset"])

    def _advance(self, sub: str, offsets: dict[str, str]) -> None:
        known = self.acked.setdefault(sub, {})
        for stream, offset in offsets.items():
            advance(known, stream, offset)

    def _replayed(self, sub: str, gap: Gap, offset: str) -> None:
        gaps = self.gaps.get(sub, [])
        if gap not in gaps:
            return
        index = gaps.index(gap)
        if is_after(gap.end, offset):
            gaps[index] = Gap(gap.stream, offset, gap.end)
        else:
            del gaps[index]
        if not gaps:
            self.gaps.pop(sub, None)

    # -- the snapshot --------------------------------------------------------------------------

    def document(self) -> dict[str, Any]:
        return {
            "claims": {sub: asdict(held) for sub, held in self.claims.items()},
            "acked": self.acked,
            "gaps": {sub: [asdict(gap) for gap in gaps] for sub, gaps in self.gaps.items()},
        }

    @classmethod
    def parse(cls, document: dict[str, Any]) -> JournalState:
        """A snapshot's content, every field checked for its exact type; `Unusable` if anything is off."""
        state = cls()
        for sub, held in _mapping(document.get("claims"), "claims").items():
            held = _mapping(held, f"claims.{sub}")
            state.claims[sub] = HeldClaim(
                exactly(held.get("subscription"), str, "claim subscription"),
                exactly(held.get("wake_id"), str, "claim wake_id"),
                exactly(held.get("generation"), int, "claim generation"),
                exactly(held.get("token"), str, "claim token"),
                float(exactly(held.get("renewed_at"), (int, float), "claim renewed_at")),
            )
        for sub, offsets in _mapping(document.get("acked"), "acked").items():
            state.acked[sub] = _offsets(offsets, f"acked.{sub}")
        for sub, listed in _mapping(document.get("gaps"), "gaps").items():
            state.gaps[sub] = [_gap(gap, f"a gap of {sub}") for gap in exactly(listed, list, f"gaps.{sub}")]
        return state


# -- records ---------------------------------------------------------------------------------------


def checked(value: Any) -> Record:
    """A record read back from disk, every field of its op checked; `Unusable` if anything is off."""
    record: Record = _mapping(value, "a record")
    op: str = exactly(record.get("op"), str, "record op")
    exactly(record.get("sub"), str, f"{op} sub")
    if op in ("claimed", "acked", "ended"):
        exactly(record.get("wake_id"), str, f"{op} wake_id")
    if op in ("claimed", "acked"):
        exactly(record.get("token"), str, f"{op} token")
        record = {**record, "at": float(exactly(record.get("at"), (int, float), f"{op} at"))}
    if op == "claimed":
        exactly(record.get("generation"), int, "claimed generation")
    if op in ("claimed", "acked", "learned", "linked"):
        _offsets(record.get("offsets"), f"{op} offsets")
    if op == "linked":
        for gap in exactly(record.get("gaps"), list, "linked gaps"):
            _gap(gap, "a linked gap")
    if op == "replayed":
        _gap(record.get("gap"), "a replayed gap")
        exactly(record.get("offset"), str, "replayed offset")
    if op not in ("claimed", "acked", "ended", "learned", "linked", "replayed"):
        raise Unusable(f"unknown record op {op[:40]!r}")
    return record


def advance(offsets: dict[str, str], stream: str, offset: str) -> None:
    """Remember `offset` for `stream` unless it goes backwards; the newest entries stay."""
    current = offsets.pop(stream, None)
    offsets[stream] = offset if current is None or is_after(offset, current) else current
    while len(offsets) > MAX_STREAMS:
        del offsets[next(iter(offsets))]


def _gap_of(gap: dict[str, str]) -> Gap:
    return Gap(gap["stream"], gap["start"], gap["end"])


def _mapping(value: Any, what: str) -> dict[str, Any]:
    """A JSON object (its keys are strings by JSON's rules), else `Unusable`."""
    return exactly(value, dict, what)  # type: ignore[no-any-return]


def _offsets(value: Any, what: str) -> dict[str, str]:
    return {stream: exactly(offset, str, f"offset in {what}") for stream, offset in _mapping(value, what).items()}


def _gap(value: Any, what: str) -> Gap:
    gap = _mapping(value, what)
    return Gap(*(exactly(gap.get(field), str, f"gap {field} of {what}") for field in ("stream", "start", "end")))
