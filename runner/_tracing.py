"""OpenTelemetry traces of claims, batches and acks, per the messaging semantic conventions (docs/design.md §7.10).

Optional: the `otel` extra installs `opentelemetry-api` only; the application configures an SDK and an
exporter (globally, or hands a tracer provider to the `Runner`). Without the API installed nothing of
OpenTelemetry is imported and every span below is one shared do-nothing context manager (no object is made
per claim or batch); with the API and no SDK configured, the API's no-op tracer is used.

The spans, with their kinds from the conventions' table (receive: CLIENT, process: CONSUMER, settle: CLIENT),
named `{messaging.operation.name} {subscription}` (a subscription id is low-cardinality: bounded by
configuration; a stream path is not, so it is an attribute, never part of a name):

- `receive <subscription>`: one claim, from POST /claim (and a replay of skipped gaps) to its final ack
  or hand-back, with the reads of its streams; the parent of everything below.
- `process <subscription>`: one handler call on one batch (a retried batch has one per attempt), with
  `messaging.destination.name` = the stream and `error.type` when the handler raised.
- `step <subscription>` / `wait <subscription>`: a durable run's executed step and each wait, INTERNAL,
  children of the batch's `process` span (`pullwake.run.id` = the run stream, `pullwake.step.name`,
  `pullwake.wait.type`, `pullwake.wait.outcome`); a step replayed from the journal has no span.
- `ack <subscription>` / `release <subscription>`: a settlement (`messaging.operation.type` = settle);
  acks also renew the lease.

`messaging.system` is "durable_streams": the conventions name the systems they know (kafka, rabbitmq, ...)
and ask any other for its own name, in snake case; Durable Streams is the protocol whose subscriptions
this runner consumes (the server's implementation is not the point).

Attributes never carry claim tokens, message contents or error texts (a server's or a handler's text can
echo either): a failure is described by its type (`error.type`) and the span's status only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

try:
    from opentelemetry import trace as otel
    from opentelemetry.trace.status import Status, StatusCode
except ImportError:  # the `otel` extra is not installed: tracing is off, and costs nothing
    otel = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer, TracerProvider

INSTRUMENTATION = "pullwake-runner"
SYSTEM = "durable_streams"


class Span(Protocol):
    """What the runner does with a span: an OpenTelemetry span, or a do-nothing one."""

    def set_attribute(self, key: str, value: Any) -> None: ...


class _NoSpan:
    def set_attribute(self, key: str, value: Any) -> None:
        pass


_OFF: contextlib.nullcontext[Span] = contextlib.nullcontext(_NoSpan())
"""Every span when tracing is off: one object, reused (a nullcontext can be entered any number of times)."""


def error_type(error: BaseException) -> str:
    """`error.type`: the protocol's error code when the server gave one, else the exception's qualified type."""
    code = getattr(error, "code", None)
    if isinstance(code, str) and code:
        return code
    kind = type(error)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


class Tracing:
    """Makes the spans of one runner's claims; off (and free) without the OpenTelemetry API."""

    def __init__(self, provider: TracerProvider | None = None, *, enabled: bool = True) -> None:
        """`provider`: None uses the global one (the API's no-op until the application configures an SDK)."""
        self._tracer: Tracer | None = None
        if otel is not None and enabled:
            self._tracer = (
                provider.get_tracer(INSTRUMENTATION) if provider is not None else otel.get_tracer(INSTRUMENTATION)
            )

    @property
    def on(self) -> bool:
        return self._tracer is not None

    def receive(self, subscription: str) -> contextlib.AbstractContextManager[Span]:
        if self._tracer is None:
            return _OFF
        return self._span(
            f"receive {subscription}",
            otel.SpanKind.CLIENT,
            {
                **_subscription(subscription),
                "messaging.operation.type": "receive",
                "messaging.operation.name": "receive",
            },
        )

    def process(
        self, subscription: str, stream: str, messages: int, *, attempt: int, replayed: bool
    ) -> contextlib.AbstractContextManager[Span]:
        if self._tracer is None:
            return _OFF
        return self._span(
            f"process {subscription}",
            otel.SpanKind.CONSUMER,
            {
                **_subscription(subscription),
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "messaging.destination.name": stream,
                "messaging.batch.message_count": messages,
                "pullwake.batch.attempt": attempt,
                "pullwake.batch.replayed": replayed,
            },
        )

    def settle(
        self, subscription: str, operation: str, streams: Sequence[str] = (), *, done: bool = False
    ) -> contextlib.AbstractContextManager[Span]:
        """`operation`: "ack" or "release"; `streams`: those whose offsets this settlement carries."""
        if self._tracer is None:
            return _OFF
        attributes: dict[str, Any] = {
            **_subscription(subscription),
            "messaging.operation.type": "settle",
            "messaging.operation.name": operation,
        }
        if len(set(streams)) == 1:
            attributes["messaging.destination.name"] = streams[0]
        if operation == "ack":
            attributes["pullwake.ack.done"] = done
            attributes["pullwake.ack.streams"] = len(streams)
        return self._span(f"{operation} {subscription}", otel.SpanKind.CLIENT, attributes)

    def internal(self, name: str, attributes: dict[str, Any]) -> contextlib.AbstractContextManager[Span]:
        """An INTERNAL span under the current one (a durable run's step or wait under its batch's `process`)."""
        if self._tracer is None:
            return _OFF
        return self._span(name, otel.SpanKind.INTERNAL, attributes)

    def failed(self, span: Span, error: BaseException | str) -> None:
        """Mark `span` as failed: `error.type` (a type or a code, never a text) and status ERROR."""
        if self._tracer is None:
            return
        span.set_attribute("error.type", error if isinstance(error, str) else error_type(error))
        if isinstance(span, otel.Span):
            span.set_status(Status(StatusCode.ERROR))

    @contextlib.contextmanager
    def _span(self, name: str, kind: otel.SpanKind, attributes: dict[str, Any]) -> Iterator[Span]:
        assert self._tracer is not None
        # Neither the exception's text (it can hold tokens or message contents) nor a status from it:
        # `failed` says what went wrong, by type. Cancellation (a BaseException) is no failure.
        with self._tracer.start_as_current_span(
            name, kind=kind, attributes=attributes, record_exception=False, set_status_on_exception=False
        ) as span:
            try:
                yield span
            except Exception as exc:
                self.failed(span, exc)
                raise


def _subscription(subscription: str) -> dict[str, Any]:
    return {
        "messaging.system": SYSTEM,
        "messaging.consumer.group.name": subscription,
        "messaging.destination.subscription.name": subscription,
    }


OFF = Tracing(enabled=False)
"""No spans (the default of a claim context and a delivery that were not given a `Tracing`)."""
