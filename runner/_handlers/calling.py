"""What user code sees: a `Batch` in, a verdict out. Knows nothing of HTTP.

Three kinds of handler, all called the same way by the claim worker:
- an async callable, awaited in the claim's task;
- a sync callable, run in a worker thread (abandoned, not waited for, if the
  claim is cancelled: a stuck thread cannot hold up a stop);
- an external command: the batch as JSON on stdin; exit 0 is success, 75
  (EX_TEMPFAIL) asks for a retry, anything else fails the batch for good; on
  cancellation it gets SIGTERM, then SIGKILL after a grace period, and so does
  everything it started (see `CommandHandler`).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Mapping
from typing import Any

import trio

from .._config import Settings
from ..errors import ConfigError
from .batch import AsyncHandler, Batch, Handler, HandlerResult
from .command import CommandHandler


def _is_async(function: object) -> bool:
    return inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(getattr(function, "__call__", None))  # noqa: B004


def as_async(handler: Handler) -> AsyncHandler:
    """One calling convention for trio, asyncio (`asyncio_handler`) and sync handlers.

    The result also reports each batch to the observer of the host running the runner,
    if any, and explains an asyncio handler awaited as trio code (see `runner._bridge`).
    """
    from .bridge import is_asyncio_handler, observed, on_asyncio_loop

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


def resolve(reference: str) -> Handler:
    """Import a handler given as 'package.module:function'."""
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"handler {reference!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"handler {reference!r}: cannot import {module_name}: {exc}") from exc
    except Exception as exc:  # the module itself fails at import (RuntimeError, SyntaxError, a bad setting...)
        detail = " ".join(str(exc).split())  # one line, whatever the module put in its message
        raise ConfigError(
            f"handler {reference!r}: importing {module_name} failed: {type(exc).__name__}: {detail}"
        ) from exc
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigError(f"handler {reference!r}: {module_name} has no {attribute}") from None
    if not callable(target):
        raise ConfigError(f"handler {reference!r} is not callable")
    return target  # type: ignore[no-any-return]


def resolve_handlers(settings: Settings, registered: Mapping[str, Handler]) -> dict[str, AsyncHandler]:
    """Every served subscription's handler, from the configuration or from code, in one calling convention."""
    resolved: dict[str, AsyncHandler] = {}
    for spec in settings.subscriptions:
        configured: Handler | None = None
        if spec.command:
            configured = CommandHandler(
                spec.command,
                kill_grace=settings.command_kill_grace,
                output_cap=settings.command_output_cap,
                env_passthrough=spec.command_env_passthrough,
            )
        elif spec.handler:
            configured = resolve(spec.handler)
        if configured is not None and spec.id in registered:
            raise ConfigError(f"subscription {spec.id!r} has a handler in the configuration and one in code")
        chosen = configured or registered.get(spec.id)
        if chosen is None:
            raise ConfigError(
                f"subscription {spec.id!r} has no handler: set 'handler' or 'command' in the configuration, "
                f"or register one with @runner.handler({spec.id!r})"
            )
        resolved[spec.id] = as_async(chosen)
    for subscription_id, handler in registered.items():
        resolved.setdefault(subscription_id, as_async(handler))
    if not resolved:
        raise ConfigError("no subscriptions to serve: configure [[subscriptions]] or register a handler")
    return resolved
