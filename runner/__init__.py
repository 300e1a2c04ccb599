"""pullwake-runner: follow Durable Streams pull-wake subscriptions, claim, handle, ack."""

from machine import State

from ._asyncio_host import AsyncioHost
from ._backoff import Backoff
from ._batch import SUSPEND, Batch, Handler, Suspend
from ._bridge import asyncio_handler
from ._config import Settings, SubscriptionSpec, load_settings
from ._exceptions import (
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
from ._guest import Ended
from ._handlers import CommandHandler
from ._health import Health, InFlightClaim, Outcome
from ._hosts import BackgroundRunner
from ._runner import Runner

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
