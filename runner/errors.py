"""Every error pullwake-runner raises, as one hierarchy: what it means, and what to do.

Errors marked (handled) are met and dealt with by the runner itself: they show up in
logs, `Health.last_error` and `StopError.errors`, and are never raised to your code.

PullwakeError                   the base: catch this to catch anything of ours
├── ConfigError                 the configuration is invalid: fix the setting named (the CLI exits 78)
│   └── StateDirInUse           another runner holds the state_dir: give each runner its own (README)
├── ClientError                 talking to the server failed: the runner retries; see `Health.last_error`
│   ├── TransportError          (handled) no usable answer: refused, reset, timed out, cut off
│   │   ├── Unreachable         (handled) refused, reset or closed before any answer: asked again soon
│   │   ├── StreamSilent        (handled) the live stream went quiet past `keepalive_timeout`
│   │   └── ImmediateClose      (handled) the live stream ended at once, having delivered nothing
│   ├── ProtocolError           (handled) an answer the protocol does not allow: check the server
│   │   └── StreamRewound       (handled) a stream's offsets went backwards (deleted and re-created)
│   ├── ServerError             (handled) the server answered 5xx
│   └── RequestError            the server refused a request (4xx)
│       ├── TokenRefused        the server refused the service token (401/403): fix `token` / `token_file`
│       ├── SSERefused          (handled) no SSE here: the runner falls back to long-poll
│       ├── StreamNotFound      (handled) the stream does not exist
│       ├── StreamConflict      (handled) the stream exists with another configuration
│       ├── SubscriptionNotFound  (handled) the subscription is gone: a managed one is put back
│       ├── SubscriptionConflict  (handled) the subscription exists with another configuration: logged
│       ├── AlreadyClaimed      (handled) another runner holds the subscription: a lost race
│       ├── NoPendingWork       (handled) nothing to claim: a lost race, or a sweep
│       ├── Fenced              (handled) the claim is someone else's now: the handler is cancelled
│       │   └── ProducerFenced  (handled) a newer producer epoch wrote to the stream (403): this writer lost its claim
│       ├── ProducerSequenceGap an idempotent producer skipped a sequence number (409): a bug in the writer
│       ├── InvalidOffset       (handled) the server refused an ack's offset: the claim is handed back
│       └── TokenInvalid        (handled) the claim token was refused: the lease is lost
├── HandlerError                raised by a handler to give a verdict on its batch
│   └── PermanentFailure        raise it: this batch will never succeed, skip the retries
├── RunError                    a durable run cannot go on: it ends `failed`, with this error journaled
│   ├── StepFailed              a step raised (after its attempts); replays raise it again, without running it
│   ├── WaitTimeout             the deadline of `wait_for(timeout=)` passed first: catch it, or the run fails
│   └── NondeterministicRun     a replay asked for another step than the journal holds: make the code deterministic
└── RunnerError                 the runner cannot do what was asked
    ├── AlreadyRunning          `start()` on a running runner: stop it first, or use another `Runner`
    ├── WakeStreamClosed        the wake stream was closed for good (EOF): the runner stopped itself
    └── StopError               stopped, but not cleanly: `errors` lists what went wrong (work is handed back)
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


class Unreachable(TransportError):
    """The server could not be reached: the connection was refused, reset or closed before any answer.

    Cheap to find out again (a server restarting is refused at once), so the runner asks again
    soon rather than backing off: an answer, even an error, is what paces it (docs/design.md §4.2).
    """


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


class ProducerFenced(Fenced):
    """An append with an idempotent producer's epoch lower than the newest the stream has seen (403).

    A durable run writes its journal with the claim's generation as the epoch, so this
    means a newer claim holder has written: this one lost its lease and must record nothing.
    """


class ProducerSequenceGap(RequestError):
    """An idempotent producer's sequence number skipped ahead of what the server expected (409)."""


class InvalidOffset(RequestError):
    """An ack regressed, went beyond the tail, named an unknown stream, or used -1."""


class TokenInvalid(RequestError):
    """The claim token was refused (invalid or expired): the lease is lost."""


class HandlerError(PullwakeError):
    """Raised by handlers to give a verdict on a batch other than 'try again'."""


class PermanentFailure(HandlerError):
    """This batch will never succeed: skip the remaining retries."""


class RunError(PullwakeError):
    """A durable run cannot go on; the run ends `failed` with this error in its journal."""


class StepFailed(RunError):
    """A step raised; its error is journaled, and every replay raises it again at that step."""

    def __init__(self, step: str, error: str) -> None:
        super().__init__(f"step {step!r} failed: {error}")
        self.step = step
        self.error = error


class WaitTimeout(RunError):
    """`Run.wait_for(..., timeout=...)`: the deadline passed before a matching event arrived.

    Raised in the workflow, which may catch it; uncaught, it fails the run like any error.
    """

    def __init__(self, type: str, key: str | None, timeout: float | None) -> None:
        super().__init__(f"no {type!r} event{f' with key {key!r}' if key is not None else ''} within {timeout} s")
        self.type = type
        self.key = key
        self.timeout = timeout


class NondeterministicRun(RunError):
    """A replay asked for a different step than the journal holds at that position.

    The code between steps must take the same path on every replay: anything that varies
    (time, randomness, I/O) belongs inside a step, whose result is journaled.
    """


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
