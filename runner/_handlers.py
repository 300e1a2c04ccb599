"""What user code sees: a `Batch` in, a verdict out. Knows nothing of HTTP.

Three kinds of handler, all called the same way by the claim worker:
- an async callable, awaited in the claim's task;
- a sync callable, run in a worker thread (abandoned, not waited for, if the
  claim is cancelled: a stuck thread cannot hold up a stop);
- an external command: the batch as JSON on stdin; exit 0 is success, 75
  (EX_TEMPFAIL) asks for a retry, anything else fails the batch for good; on
  cancellation it gets SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import json
import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final, TypeAlias

import trio

from ._exceptions import ConfigError, PermanentFailure

EX_TEMPFAIL: Final = 75


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

    def to_json(self) -> dict[str, Any]:
        document = asdict(self)
        document["messages"] = [
            message.decode(errors="replace") if isinstance(message, bytes) else message for message in self.messages
        ]
        return document


class CommandFailed(Exception):
    """An external command handler exited with a status asking for a retry."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: bytes) -> None:
        tail = stderr.decode(errors="replace").strip().splitlines()[-3:]
        super().__init__(f"{argv[0]} exited with {returncode}" + (f": {' | '.join(tail)}" if tail else ""))
        self.returncode = returncode


def _is_async(function: object) -> bool:
    return inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(getattr(function, "__call__", None))  # noqa: B004


def as_async(handler: Handler) -> AsyncHandler:
    """One calling convention for trio, asyncio (`asyncio_handler`) and sync handlers.

    The result also reports each batch to the observer of the host running the runner,
    if any, and explains an asyncio handler awaited as trio code (see `runner._bridge`).
    """
    from ._bridge import is_asyncio_handler, observed, on_asyncio_loop

    if is_asyncio_handler(handler):
        return observed(on_asyncio_loop(handler))  # type: ignore[arg-type]
    if _is_async(handler):
        return observed(handler)  # type: ignore[arg-type]

    sync = handler

    async def in_thread(batch: Batch) -> HandlerResult:
        # abandon_on_cancel: a sync handler cannot be interrupted; do not let it hold the claim.
        return await trio.to_thread.run_sync(sync, batch, abandon_on_cancel=True)  # type: ignore[arg-type]

    functools.update_wrapper(in_thread, sync)
    return observed(in_thread)


class CommandHandler:
    """Runs an external program per batch."""

    def __init__(self, argv: Sequence[str], *, kill_grace: float = 5.0) -> None:
        if not argv:
            raise ConfigError("a command handler needs a program to run")
        self.argv = tuple(argv)
        self.kill_grace = kill_grace

    def __repr__(self) -> str:
        return f"CommandHandler({list(self.argv)!r})"

    async def _terminate(self, process: trio.Process) -> None:
        # Polite first; a command that ignores SIGTERM is killed after the grace period.
        # The command leads its own process group, so its children go with it.
        _signal_group(process, signal.SIGTERM)
        with trio.move_on_after(self.kill_grace):
            await process.wait()
            return
        _signal_group(process, signal.SIGKILL)

    async def __call__(self, batch: Batch) -> HandlerResult:
        payload = json.dumps(batch.to_json()).encode()
        result = await trio.run_process(
            self.argv,
            stdin=payload,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            deliver_cancel=self._terminate,
            start_new_session=True,
        )
        if result.returncode == 0:
            return None
        if result.returncode == EX_TEMPFAIL:
            raise CommandFailed(self.argv, result.returncode, result.stderr)
        raise PermanentFailure(str(CommandFailed(self.argv, result.returncode, result.stderr)))


def _signal_group(process: trio.Process, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)


def resolve(reference: str) -> Handler:
    """Import a handler given as 'package.module:function'."""
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"handler {reference!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"handler {reference!r}: cannot import {module_name}: {exc}") from exc
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigError(f"handler {reference!r}: {module_name} has no {attribute}") from None
    if not callable(target):
        raise ConfigError(f"handler {reference!r} is not callable")
    return target  # type: ignore[no-any-return]
