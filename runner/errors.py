"""Every error this package raises, as one hierarchy.

PullwakeError
├── ConfigError                 the configuration is invalid
│   └── StateDirInUse           another runner holds the state_dir
├── ClientError                 talking to the Durable Streams server failed
│   ├── TransportError          no usable answer: refused, reset, timed out, cut off
│   │   ├── StreamSilent        the live stream went quiet past the keep-alive timeout
│   │   └── ImmediateClose      the live stream ended at once, having delivered nothing
│   ├── ProtocolError           an answer the protocol does not allow
│   │   └── StreamRewound       a stream's offsets went backwards (deleted and re-created)
│   ├── ServerError             the server answered 5xx
│   └── RequestError            the server refused the request (4xx)
│       ├── SSERefused          (internal: the runner falls back to long-poll; never escapes)
│       ├── TokenRefused        the server refused the service token (401/403)
│       ├── StreamNotFound
│       ├── StreamConflict
│       ├── SubscriptionNotFound
│       ├── SubscriptionConflict
│       ├── AlreadyClaimed
│       ├── NoPendingWork
│       ├── Fenced
│       ├── InvalidOffset
│       └── TokenInvalid
├── HandlerError                a handler's verdict on a batch
│   └── PermanentFailure
└── RunnerError                 the runner cannot do what was asked
    ├── AlreadyRunning
    ├── WakeStreamClosed
    └── StopError
"""

from __future__ import annotations


class PullwakeError(Exception):
    """Base class of every error raised by pullwake-runner."""


class ConfigError(PullwakeError):
    """The configuration is invalid; the CLI exits with 78 (EX_CONFIG)."""


class StateDirInUse(ConfigError):
    """Another runner (the pid is in the message) holds the `state_dir`: give each runner its own.

    Raised by `Runner.run()` before anything in the directory is read; `pullwake run` exits 78.
    """


class ClientError(PullwakeError):
    """Talking to the Durable Streams server failed."""

    retryable = False


class TransportError(ClientError):
    """No usable answer: connection refused or reset, timed out, or the body was cut off."""

    retryable = True


class StreamSilent(TransportError):
    """The live stream sent nothing, not even a keep-alive, for longer than `keepalive_timeout`."""


class ImmediateClose(TransportError):
    """The live stream ended cleanly at once without delivering anything (no tight reconnect loops)."""


class ProtocolError(ClientError):
    """The server answered something the protocol does not allow (bad JSON, missing header)."""

    retryable = True


class StreamRewound(ProtocolError):
    """The server reported an offset before ours: the stream was deleted and re-created."""


class ServerError(ClientError):
    """The server answered with a 5xx status."""

    retryable = True

    def __init__(self, message: str, *, status: int, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        """Seconds the server asked to wait (Retry-After), if it said."""


class RequestError(ClientError):
    """The server refused the request (4xx); `code` is the protocol's error code, if any."""

    def __init__(self, message: str, *, status: int, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class SSERefused(RequestError):
    """The server or a proxy will not serve SSE here; the runner falls back to long-poll."""


class TokenRefused(RequestError):
    """The server refused the service token (401 or 403): check `token` / `token_file`."""


class StreamNotFound(RequestError):
    """The stream does not exist."""


class StreamConflict(RequestError):
    """The stream exists with a different configuration (e.g. content type)."""


class SubscriptionNotFound(RequestError):
    """The subscription does not exist (reference servers forget them on restart)."""


class SubscriptionConflict(RequestError):
    """A subscription with this id exists with a different configuration."""


class AlreadyClaimed(RequestError):
    """Another worker holds the subscription; normal when runners race for a wake."""

    def __init__(
        self, message: str, *, status: int, code: str | None, holder: str | None, generation: int | None
    ) -> None:
        super().__init__(message, status=status, code=code)
        self.holder = holder
        self.generation = generation


class NoPendingWork(RequestError):
    """Nothing is pending past the acknowledged cursor; normal after a race."""


class Fenced(RequestError):
    """The wake or generation is stale: someone else owns the subscription now."""


class InvalidOffset(RequestError):
    """An ack regressed, went beyond the tail, named an unknown stream, or used -1."""


class TokenInvalid(RequestError):
    """The claim token was refused (invalid or expired): the lease is lost."""


class HandlerError(PullwakeError):
    """Raised by handlers to give a verdict on a batch other than 'try again'."""


class PermanentFailure(HandlerError):
    """This batch will never succeed: skip the remaining retries."""


class RunnerError(PullwakeError):
    """The runner cannot do what was asked."""


class AlreadyRunning(RunnerError):
    """`start()` or `run()` was called while the runner is already running."""


class WakeStreamClosed(RunnerError):
    """The wake stream was closed by its owner (EOF); the runner stopped itself."""


class StopError(RunnerError):
    """The runner stopped, but not cleanly; `errors` lists what went wrong on the way."""

    def __init__(self, message: str, errors: list[BaseException]) -> None:
        super().__init__(message)
        self.errors = errors
