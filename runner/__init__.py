"""pullwake-runner: follow Durable Streams pull-wake subscriptions, claim, handle, ack.

The public API is this namespace (`__all__`), `runner.errors` (every error, with what it
means and what to do) and `runner.qt` (imported on demand: it needs PySide6). Everything
whose name starts with `_` is private and may change in any release.
"""

from __future__ import annotations

import warnings

from machine import State

from . import errors
from ._claims.outcome import Outcome
from ._config import Settings, SubscriptionSpec, load_settings
from ._handlers.batch import SUSPEND, Batch, Handler, Suspend
from ._handlers.bridge import asyncio_handler
from ._handlers.command import CommandHandler
from ._health import Health
from ._health import InFlightClaim as InFlightClaim  # importable, not in __all__ (the items of Health.in_flight)
from ._hosts.asyncio_host import AsyncioHost
from ._hosts.guest import Ended
from ._hosts.thread import BackgroundRunner
from ._runner import Runner
from ._runs.run import Run
from ._wake.reload import Reloaded as Reloaded  # importable, not in __all__ (what Runner.reload returns)
from .errors import (
    AlreadyRunning,
    ConfigError,
    PermanentFailure,
    PullwakeError,
    RunnerError,
    StopError,
    TokenRefused,
    WakeStreamClosed,
)

__all__ = [
    "SUSPEND",
    "AlreadyRunning",
    "AsyncioHost",
    "BackgroundRunner",
    "Batch",
    "CommandHandler",
    "ConfigError",
    "Ended",
    "Handler",
    "Health",
    "Outcome",
    "PermanentFailure",
    "PullwakeError",
    "Run",
    "Runner",
    "RunnerError",
    "Settings",
    "State",
    "StopError",
    "SubscriptionSpec",
    "Suspend",
    "TokenRefused",
    "WakeStreamClosed",
    "asyncio_handler",
    "load_settings",
]

# Exported here before 0.2: still importable for one release, with a DeprecationWarning.
_MOVED_TO_ERRORS = frozenset(
    {
        "AlreadyClaimed",
        "ClientError",
        "Fenced",
        "HandlerError",
        "ImmediateClose",
        "InvalidOffset",
        "NoPendingWork",
        "ProtocolError",
        "RequestError",
        "ServerError",
        "StreamConflict",
        "StreamNotFound",
        "StreamRewound",
        "StreamSilent",
        "SubscriptionConflict",
        "SubscriptionNotFound",
        "TokenInvalid",
        "TransportError",
    }
)


def __getattr__(name: str) -> object:
    if name in _MOVED_TO_ERRORS:
        warnings.warn(f"import {name} from runner.errors", DeprecationWarning, stacklevel=2)
        return getattr(errors, name)
    if name == "Backoff":
        warnings.warn("runner.Backoff is internal and leaves the public API in 0.2", DeprecationWarning, stacklevel=2)
        from ._wire.retrying import Backoff

        return Backoff
    raise AttributeError(f"module 'runner' has no attribute {name!r}")
