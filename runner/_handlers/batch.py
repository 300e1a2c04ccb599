"""What a handler is given and may return: a `Batch` in, `None` or `SUSPEND` out (docs/design.md §5.6)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any, Final, TypeAlias


class Suspend:
    """Returned by a handler: this batch is done, stop here until new events arrive."""

    _instance: Suspend | None = None

    def __new__(cls) -> Suspend:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "SUSPEND"


SUSPEND: Final = Suspend()

HandlerResult: TypeAlias = Suspend | None
AsyncHandler: TypeAlias = Callable[["Batch"], Awaitable[HandlerResult]]
SyncHandler: TypeAlias = Callable[["Batch"], HandlerResult]
Handler: TypeAlias = AsyncHandler | SyncHandler


@dataclass(frozen=True)
class Batch:
    """A run of events from one stream, handed to a handler in order.

    Delivery is at least once: use (`stream`, `next_offset`) or
    (`subscription`, `wake_id`, `generation`) to make a handler idempotent.
    """

    subscription: str
    stream: str
    messages: list[Any]
    start_offset: str
    """Where this batch starts (exclusive): the offset acknowledged before it."""
    next_offset: str
    """Where the next batch starts; acknowledged once this batch succeeds."""
    wake_id: str
    generation: int
    attempt: int
    """1 on the first try, 2 on the first retry, and so on."""
    replayed: bool = False
    """Handed over again by the runner itself (wake id "replay", generation 0): the server
    forgot the subscription and re-created it past these events."""

    @property
    def message_keys(self) -> list[str]:
        """A key per message, `"<start_offset>#<index>"`, for showing or de-duplicating items.

        The protocol gives offsets only between reads, not per message. A redelivered batch
        starts again at the same `start_offset` (batches begin where the last acknowledged
        one ended), so its messages get the same keys; a replayed batch (`replayed`) can
        start elsewhere.
        """
        return [f"{self.start_offset}#{index}" for index in range(len(self.messages))]

    def to_json(self) -> dict[str, Any]:
        document = asdict(self)
        document["messages"] = [
            message.decode(errors="replace") if isinstance(message, bytes) else message for message in self.messages
        ]
        return document
