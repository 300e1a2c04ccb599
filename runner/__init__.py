"""pullwake-runner: follow Durable Streams pull-wake subscriptions, claim, handle, ack."""

from machine import State

from ._claims.outcome import Outcome
from ._config import Settings, SubscriptionSpec, load_settings
from ._handlers.batch import SUSPEND, Batch, Handler, Suspend
from ._handlers.bridge import asyncio_handler
from ._handlers.command import CommandHandler
from ._health import Health, InFlightClaim
from ._hosts.asyncio_host import AsyncioHost
from ._hosts.guest import Ended
from ._hosts.thread import BackgroundRunner
from ._runner import Runner
from ._wire.retrying import Backoff
from .errors import (
    AlreadyClaimed,
    AlreadyRunning,
    ClientError,
    ConfigError,
    Fenced,
    HandlerError,
    ImmediateClose,
    InvalidOffset,
    NoPendingWork,
    PermanentFailure,
    ProtocolError,
    PullwakeError,
    RequestError,
    RunnerError,
    ServerError,
    StateDirInUse,
    StopError,
    StreamConflict,
    StreamNotFound,
    StreamRewound,
    StreamSilent,
    SubscriptionConflict,
    SubscriptionNotFound,
    TokenInvalid,
    TransportError,
    WakeStreamClosed,
)

__all__ = [
    "SUSPEND",
    "AlreadyClaimed",
    "AlreadyRunning",
    "AsyncioHost",
    "BackgroundRunner",
    "Backoff",
    "Batch",
    "ClientError",
    "CommandHandler",
    "ConfigError",
    "Ended",
    "Fenced",
    "Handler",
    "HandlerError",
    "Health",
    "ImmediateClose",
    "InFlightClaim",
    "InvalidOffset",
    "NoPendingWork",
    "Outcome",
    "PermanentFailure",
    "ProtocolError",
    "PullwakeError",
    "RequestError",
    "Runner",
    "RunnerError",
    "ServerError",
    "Settings",
    "State",
    "StateDirInUse",
    "StopError",
    "StreamConflict",
    "StreamNotFound",
    "StreamRewound",
    "StreamSilent",
    "SubscriptionConflict",
    "SubscriptionNotFound",
    "SubscriptionSpec",
    "Suspend",
    "TokenInvalid",
    "TransportError",
    "WakeStreamClosed",
    "asyncio_handler",
    "load_settings",
]
