"""How handlers meet their hosts: asyncio handlers, and batch observers for hosts.

- `asyncio_handler` marks an `async def` handler as asyncio code. The runner awaits it
  on the asyncio loop that hosts the runner (`AsyncioHost`), as an asyncio task;
  anywhere else it fails the batch for good with a message that says what to do.
- A host (Qt, asyncio, a background thread) learns about every batch a handler
  started, finished or failed through `observing(observer)`: a context variable,
  inherited by the runner's tasks, read by the wrapper `as_async` puts around each
  handler. The claim code knows nothing of it.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import structlog
import trio

from ..errors import PermanentFailure

if TYPE_CHECKING:
    from .batch import AsyncHandler, Batch, HandlerResult

log = structlog.get_logger("pullwake.handlers")

_MARK = "__pullwake_asyncio__"
ASYNCIO_CANCEL_GRACE = 5.0
"""How long a cancelled claim waits for its asyncio handler task to unwind."""
F = TypeVar("F", bound=Callable[..., Any])


def asyncio_handler(function: F) -> F:
    """Mark an `async def` handler as asyncio code (it awaits asyncio things, e.g. aiohttp).

    The runner's own code is trio; unmarked `async def` handlers are awaited as trio code.
    A marked handler is run as a task on the asyncio loop hosting the runner (see
    `AsyncioHost`); cancelling the claim (stop, abort, lost lease) cancels that task.
    Anywhere else (plain `trio.run`, `BackgroundRunner`) each batch fails for good with
    an error saying so, and a warning is logged::

        @runner.handler("jobs")
        @asyncio_handler
        async def process(batch: Batch) -> None:
            await asyncio.sleep(0.1)
    """
    setattr(function, _MARK, True)
    return function


def is_asyncio_handler(function: object) -> bool:
    """True if `function` was marked with `asyncio_handler`."""
    return bool(getattr(function, _MARK, False))


class BatchObserver(Protocol):
    """What a host is told about each batch a handler works on (on the runner's thread)."""

    def batch_started(self, batch: Batch) -> None: ...

    def batch_handled(self, batch: Batch) -> None: ...

    def batch_failed(self, batch: Batch, error: BaseException) -> None: ...


_observer: contextvars.ContextVar[BatchObserver | None] = contextvars.ContextVar("pullwake_observer", default=None)


@contextmanager
def observing(observer: BatchObserver) -> Iterator[None]:
    """Tasks started inside this block (the runner's, when it is started here) report to `observer`."""
    token = _observer.set(observer)
    try:
        yield
    finally:
        _observer.reset(token)


def _notify(method: str, *args: Any) -> None:
    observer = _observer.get()
    if observer is None:
        return
    try:
        getattr(observer, method)(*args)
    except Exception:
        log.exception("batch_observer.failed", observer=repr(observer))


_ASYNCIO_HINTS = ("no running event loop", "unrecognized yield message", "can't be used in 'await' expression")


def observed(handler: AsyncHandler) -> AsyncHandler:
    """Tell the host's observer about each batch, and explain asyncio code run as trio code."""

    @functools.wraps(handler)
    async def call(batch: Batch) -> HandlerResult:
        _notify("batch_started", batch)
        try:
            result = await handler(batch)
        except trio.Cancelled:
            raise
        except BaseException as error:
            if isinstance(error, RuntimeError | TypeError) and any(hint in str(error) for hint in _ASYNCIO_HINTS):
                log.warning(
                    "handler.looks_like_asyncio",
                    subscription=batch.subscription,
                    handler=getattr(handler, "__qualname__", repr(handler)),
                    error=str(error),
                    hint="the runner awaits 'async def' handlers as trio code: mark asyncio code with "
                    "@runner.asyncio_handler and host the runner with runner.AsyncioHost",
                )
            _notify("batch_failed", batch, error)
            raise
        _notify("batch_handled", batch)
        return result

    return call


def on_asyncio_loop(handler: Callable[[Batch], Awaitable[HandlerResult]]) -> AsyncHandler:
    """Await an asyncio handler as a task on the asyncio loop that hosts this trio run."""

    @functools.wraps(handler)
    async def call(batch: Batch) -> HandlerResult:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            message = (
                f"handler {getattr(handler, '__qualname__', handler)!r} is asyncio code, but the runner is not "
                "hosted on an asyncio loop: run it with runner.AsyncioHost (or drop @asyncio_handler for trio code)"
            )
            log.warning("handler.no_asyncio_loop", subscription=batch.subscription, detail=message)
            raise PermanentFailure(message) from None
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()

        def finished(_: object) -> None:
            # The asyncio callback runs between trio ticks: hand the wake-up to trio.
            with suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        task: asyncio.Task[HandlerResult] = loop.create_task(handler(batch))  # type: ignore[arg-type]
        task.add_done_callback(finished)
        try:
            await done.wait()
        finally:
            if not task.done():
                task.cancel()
                # The asyncio task unwinds on the same loop; wait for it so that its
                # cleanup ends before the claim's finalizer acks and releases.
                # Bounded: an asyncio task that ignores cancellation cannot hold up a stop.
                with trio.CancelScope(shield=True), trio.move_on_after(ASYNCIO_CANCEL_GRACE):
                    await done.wait()
        if task.cancelled():
            raise RuntimeError(f"the asyncio handler {getattr(handler, '__qualname__', handler)!r} was cancelled")
        return task.result()

    return call
