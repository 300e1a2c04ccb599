"""OpenTelemetry spans of a claim (runner._tracing): their names, kinds, attributes and parents.

The structure is shown against the in-memory wire in virtual time, with the SDK's in-memory exporter
behind a tracer provider handed to the claim (the global provider is never set); one test follows a
runner against the real reference server; two run in a subprocess: without OpenTelemetry installed,
and with the API but no SDK.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from runner import Batch, Runner
from runner._claims.claim import ClaimResult, ClaimRun
from runner._claims.outcome import Outcome
from runner._handlers.batch import HandlerResult
from runner._tracing import Tracing
from tests.claim_harness import JOBS, SUB, Recorder, jobs, make_context
from tests.fake_wire import FakeWire, offset_of
from tests.support import World, eventually, running

ROOT = Path(__file__).resolve().parent.parent

SUBSCRIPTION_ATTRIBUTES = {
    "messaging.system": "durable_streams",
    "messaging.consumer.group.name": SUB,
    "messaging.destination.subscription.name": SUB,
}


@pytest.fixture
def spans() -> Iterator[tuple[Tracing, InMemorySpanExporter]]:
    """A `Tracing` that exports to memory, through its own provider (nothing global is touched)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield Tracing(provider), exporter
    provider.shutdown()


def server(count: int) -> FakeWire:
    wire = FakeWire(chunk=2)
    wire.add_stream(JOBS, jobs(count))
    wire.subscribe(SUB, [JOBS])
    return wire


async def claim(wire: FakeWire, handler: Recorder, tracing: Tracing, **overrides: Any) -> ClaimResult:
    with trio.fail_after(3600):
        return await ClaimRun(make_context(wire, handler, tracing=tracing, **overrides), SUB).run()


def shape(span: ReadableSpan) -> tuple[str, SpanKind, str]:
    assert span.attributes is not None
    return span.name, span.kind, str(span.attributes["messaging.operation.type"])


def the_receive_span(finished: tuple[ReadableSpan, ...]) -> ReadableSpan:
    (receive,) = [span for span in finished if span.name.startswith("receive ")]
    assert receive.parent is None, "a claim's receive span is a root (a wake is no trace context)"
    return receive


def children_of(receive: ReadableSpan, finished: tuple[ReadableSpan, ...]) -> list[ReadableSpan]:
    assert receive.context is not None
    others = [span for span in finished if span is not receive]
    for span in others:
        assert span.parent is not None, f"{span.name} has no parent"
        assert span.parent.span_id == receive.context.span_id, f"{span.name} is not a child of the receive span"
        assert span.context is not None
        assert span.context.trace_id == receive.context.trace_id
    return others


def no_secrets(finished: tuple[ReadableSpan, ...], token_prefix: str = "token-") -> None:
    """No claim token and no message content in any attribute (messages are {"job": "jobs/a#n"})."""
    for span in finished:
        for key, value in (span.attributes or {}).items():
            assert token_prefix not in str(value), f"{span.name} {key} holds a claim token"
            assert "#" not in str(value), f"{span.name} {key} holds message contents"
        assert span.status.description is None, "a status description could echo a token or a message"
        assert not span.events, "no exception events: their text could echo a token or a message"


async def test_a_claim_with_two_batches_is_a_receive_span_with_process_and_ack_children(
    autojump_clock: trio.testing.MockClock, spans: tuple[Tracing, InMemorySpanExporter]
) -> None:
    tracing, exporter = spans
    current: list[trace.Span] = []

    async def behave(batch: Batch) -> HandlerResult:
        current.append(trace.get_current_span())  # what the handler's own spans would nest under
        return None

    result = await claim(server(4), Recorder(behave), tracing)
    assert result.outcome is Outcome.COMPLETED

    finished = exporter.get_finished_spans()
    assert [shape(span) for span in finished] == [
        (f"process {SUB}", SpanKind.CONSUMER, "process"),
        (f"ack {SUB}", SpanKind.CLIENT, "settle"),
        (f"process {SUB}", SpanKind.CONSUMER, "process"),
        (f"ack {SUB}", SpanKind.CLIENT, "settle"),
        (f"receive {SUB}", SpanKind.CLIENT, "receive"),
    ]
    receive = the_receive_span(finished)
    first, renewal, second, done, _ = finished
    assert children_of(receive, finished) == [first, renewal, second, done]
    assert dict(receive.attributes or {}) == {
        **SUBSCRIPTION_ATTRIBUTES,
        "messaging.operation.type": "receive",
        "messaging.operation.name": "receive",
        "messaging.batch.message_count": 4,
        "pullwake.claim.generation": 1,
        "pullwake.wake_id": "w1",
        "pullwake.claim.pending_streams": 1,
        "pullwake.claim.batches": 2,
        "pullwake.claim.outcome": "completed",
    }
    for span in (first, second):
        assert dict(span.attributes or {}) == {
            **SUBSCRIPTION_ATTRIBUTES,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": JOBS,
            "messaging.batch.message_count": 2,
            "pullwake.batch.attempt": 1,
            "pullwake.batch.replayed": False,
        }
        assert span.status.status_code is StatusCode.UNSET
    for span, is_done in ((renewal, False), (done, True)):
        assert dict(span.attributes or {}) == {
            **SUBSCRIPTION_ATTRIBUTES,
            "messaging.operation.type": "settle",
            "messaging.operation.name": "ack",
            "messaging.destination.name": JOBS,
            "pullwake.ack.done": is_done,
            "pullwake.ack.streams": 1,
        }
    # The handler runs inside its process span: spans it makes are that span's children.
    assert [span.get_span_context().span_id for span in current] == [
        s.context.span_id for s in (first, second) if s.context is not None
    ]
    no_secrets(finished)


async def test_a_failed_batch_is_a_process_span_per_attempt_with_error_type_and_the_claim_is_released(
    autojump_clock: trio.testing.MockClock, spans: tuple[Tracing, InMemorySpanExporter]
) -> None:
    tracing, exporter = spans

    async def behave(batch: Batch) -> HandlerResult:
        if batch.start_offset != "-1":
            raise ValueError(f"cannot handle {batch.messages}")  # the text holds message contents
        return None

    result = await claim(server(4), Recorder(behave), tracing, handler_max_attempts=2)
    assert result.outcome is Outcome.FAILED

    finished = exporter.get_finished_spans()
    assert [span.name for span in finished] == [
        f"process {SUB}",
        f"ack {SUB}",
        f"process {SUB}",
        f"process {SUB}",
        f"release {SUB}",
        f"receive {SUB}",
    ]
    receive = the_receive_span(finished)
    ok, ack, failed_once, failed_twice, release = children_of(receive, finished)
    assert ok.status.status_code is StatusCode.UNSET
    assert "error.type" not in (ok.attributes or {})
    for attempt, span in enumerate((failed_once, failed_twice), start=1):
        attributes = span.attributes or {}
        assert attributes["error.type"] == "ValueError"
        assert attributes["pullwake.batch.attempt"] == attempt
        assert attributes["messaging.batch.message_count"] == 2
        assert span.status.status_code is StatusCode.ERROR
    assert (ack.attributes or {})["pullwake.ack.done"] is False
    assert dict(release.attributes or {}) == {
        **SUBSCRIPTION_ATTRIBUTES,
        "messaging.operation.type": "settle",
        "messaging.operation.name": "release",
    }
    assert (receive.attributes or {})["pullwake.claim.outcome"] == "failed"
    assert (receive.attributes or {})["messaging.batch.message_count"] == 4
    no_secrets(finished)


async def test_a_refused_ack_is_a_failed_settle_span_and_a_fenced_claim(
    autojump_clock: trio.testing.MockClock, spans: tuple[Tracing, InMemorySpanExporter]
) -> None:
    tracing, exporter = spans
    wire = server(4)

    async def behave(batch: Batch) -> HandlerResult:
        wire.take_over(SUB)  # the server gave the subscription to someone else meanwhile
        return None

    result = await claim(wire, Recorder(behave), tracing)
    assert result.outcome is Outcome.FENCED

    finished = exporter.get_finished_spans()
    assert [span.name for span in finished] == [f"process {SUB}", f"ack {SUB}", f"receive {SUB}"]
    receive = the_receive_span(finished)
    _, ack = children_of(receive, finished)
    assert (ack.attributes or {})["error.type"] == "FENCED"
    assert ack.status.status_code is StatusCode.ERROR
    assert (receive.attributes or {})["error.type"] == "fenced"
    assert (receive.attributes or {})["pullwake.claim.outcome"] == "fenced"
    assert receive.status.status_code is StatusCode.ERROR
    assert wire.acked(SUB) == {JOBS: "-1"}
    no_secrets(finished)


async def test_a_claim_with_no_pending_work_is_one_receive_span(
    autojump_clock: trio.testing.MockClock, spans: tuple[Tracing, InMemorySpanExporter]
) -> None:
    tracing, exporter = spans
    assert (await claim(server(0), Recorder(), tracing)).outcome is Outcome.SKIPPED
    (receive,) = exporter.get_finished_spans()
    assert (receive.attributes or {})["pullwake.claim.outcome"] == "skipped"
    assert receive.status.status_code is StatusCode.UNSET


def run_isolated(*parts: str) -> list[str]:
    """Run a script in a fresh interpreter; its lines that start with RESULT."""
    script = "\n".join(textwrap.dedent(part) for part in parts)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [line.removeprefix("RESULT ") for line in done.stdout.splitlines() if line.startswith("RESULT ")]


CLAIM_SCRIPT = """
    import trio, trio.testing
    from runner._claims.claim import ClaimRun
    from runner._tracing import Tracing
    from tests.claim_harness import JOBS, SUB, Recorder, jobs, make_context
    from tests.fake_wire import FakeWire

    async def main():
        wire = FakeWire(chunk=2)
        wire.add_stream(JOBS, jobs(3))
        wire.subscribe(SUB, [JOBS])
        handler = Recorder(CHECK)
        result = await ClaimRun(make_context(wire, handler, tracing=Tracing()), SUB).run()
        print("RESULT", result.outcome.value, len(handler.seen), wire.acked(SUB)[JOBS])

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
"""


def test_without_opentelemetry_installed_nothing_of_it_is_imported_and_claims_work() -> None:
    out = run_isolated(
        """
        import sys
        sys.modules["opentelemetry"] = None  # as if the `otel` extra were not installed

        import runner
        from runner import Runner
        from runner._tracing import Tracing

        tracing = Tracing()
        assert not tracing.on
        # One shared do-nothing context manager: no object is made per span.
        assert tracing.receive("a") is tracing.process("a", "s", 1, attempt=1, replayed=False)
        assert tracing.settle("a", "ack") is tracing.receive("b")
        Runner(tracer_provider=None)

        async def CHECK(batch):
            return None
        """,
        CLAIM_SCRIPT,
        """
        loaded = [name for name, module in sys.modules.items() if name.startswith("opentelemetry") and module]
        print("RESULT loaded:", loaded)
        """,
    )
    assert out == [f"completed 2 {offset_of(3)}", "loaded: []"]


def test_with_the_api_and_no_sdk_the_no_op_tracer_is_used() -> None:
    out = run_isolated(
        """
        import sys
        sys.modules["opentelemetry.sdk"] = None  # the application configured no SDK

        from opentelemetry import trace
        from runner._tracing import Tracing

        assert Tracing().on

        async def CHECK(batch):
            span = trace.get_current_span()
            assert not span.is_recording(), span
            return None
        """,
        CLAIM_SCRIPT,
    )
    assert out == [f"completed 2 {offset_of(3)}"]


async def test_a_runner_against_the_reference_server_traces_its_claims(world: World) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    await world.create("a")
    handled: list[Batch] = []

    async def handler(batch: Batch) -> None:
        handled.append(batch)

    runner = Runner(world.settings(), handlers={world.sub: handler}, tracer_provider=provider)
    async with running(runner):
        await world.append("a", *({"n": n} for n in range(5)))
        await eventually(lambda: sum(len(b.messages) for b in handled) >= 5, what="5 events handled")
        await eventually(lambda: not runner.health().in_flight, what="the claim to finish")
    provider.shutdown()

    finished = exporter.get_finished_spans()
    receives = {span.context.span_id: span for span in finished if span.name == f"receive {world.sub}" and span.context}
    processes = [span for span in finished if span.name == f"process {world.sub}"]
    acks = [span for span in finished if span.name == f"ack {world.sub}"]
    assert receives, "every claim has a receive span"
    counts = [(span.attributes or {})["messaging.batch.message_count"] for span in processes]
    assert sum(count for count in counts if isinstance(count, int)) == 5
    for span in processes + acks:
        assert span.parent is not None
        assert span.parent.span_id in receives, f"{span.name} is not a child of a claim's receive span"
    for span in processes:
        attributes = span.attributes or {}
        assert attributes["messaging.destination.name"] == world.stream("a")
        assert attributes["messaging.destination.subscription.name"] == world.sub
        assert span.kind is SpanKind.CONSUMER
    assert any((span.attributes or {})["pullwake.ack.done"] for span in acks), "the claim ended with a done ack"
    completed = [s for s in receives.values() if (s.attributes or {})["pullwake.claim.outcome"] == "completed"]
    assert completed
    for span in finished:
        for key, value in (span.attributes or {}).items():
            assert "token" not in key
            assert '"n"' not in str(value)
