"""Server-sent events from a byte stream, with a bound on what one event may hold.

A live stream may carry anything a server or a proxy sends, for hours: a line
that never ends, or one event of a hundred megabytes. Lines and events larger
than `max_event_bytes` are not buffered: their bytes are dropped as they
arrive, and the event is reported as `OVERSIZE` when it ends, so the caller
can count it and go on with the stream (the offset after it still arrives).
Lines end at LF or CRLF.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable

from httpx_sse import ServerSentEvent

OVERSIZE = "pullwake.oversize"
"""The `event` of an event whose lines or data went over the bound (its data is dropped)."""


class _Event:
    def __init__(self) -> None:
        self.name = ""
        self.data: list[str] = []
        self.size = 0
        self.oversize = False
        self.id = ""
        self.retry: int | None = None

    def field(self, line: str, limit: int) -> None:
        if line.startswith(":"):
            return  # a comment: servers send them as keep-alives
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self.name = value
        elif name == "data":
            self.size += len(value) + 1
            if self.size > limit:
                self.oversize, self.data = True, []
            elif not self.oversize:
                self.data.append(value)
        elif name == "id" and "\0" not in value:
            self.id = value
        elif name == "retry" and value.isdigit():
            self.retry = int(value)

    def finish(self) -> ServerSentEvent | None:
        if self.oversize:
            return ServerSentEvent(event=OVERSIZE, data="", id=self.id)
        if not self.name and not self.data:
            return None
        return ServerSentEvent(event=self.name or "message", data="\n".join(self.data), id=self.id, retry=self.retry)


async def sse_events(chunks: AsyncIterable[bytes], *, max_event_bytes: int) -> AsyncGenerator[ServerSentEvent, None]:
    """The events of an SSE body, none holding more than `max_event_bytes`."""
    pending = bytearray()
    skipping = False  # inside a line that went over the bound: drop until its end
    event = _Event()
    async for chunk in chunks:
        pending += chunk
        while True:
            end = pending.find(b"\n")
            if end < 0:
                if len(pending) > max_event_bytes:
                    skipping, event.oversize = True, True
                    pending.clear()
                break
            raw = bytes(pending[:end])
            del pending[: end + 1]
            if skipping:
                skipping = False
                continue
            line = raw.removesuffix(b"\r").decode("utf-8", errors="replace")
            if line:
                event.field(line, max_event_bytes)
                continue
            finished = event.finish()
            event = _Event()
            if finished is not None:
                yield finished
