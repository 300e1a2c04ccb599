"""Seeing durable runs: a span per executed step and per wait under the batch's `process` span,
and `pullwake_runs{status}` / step counters from what a runner saw."""

from __future__ import annotations

import trio
import trio.testing
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from runner import Run
from runner._runs.journal import JournalState, journal_path
from runner._runs.stats import RunStats
from runner._runs.workflow import WorkflowHandler
from runner._tracing import Tracing
from tests.fake_wire import FakeWire
from tests.test_runs import RUN, batch
from tests.test_tracing import spans  # noqa: F401  (the fixture)


async def test_a_step_and_a_wait_are_spans_under_the_process_span(spans: tuple[Tracing, InMemorySpanExporter]) -> None:  # noqa: F811
    tracing, exporter = spans
    wire = FakeWire()
    wire.add_stream(RUN, ["input", {"type": "go"}])

    async def workflow(run: Run) -> object:
        await run.step("first", lambda: 1)
        await run.wait_for("go")
        return await run.wait_for("never")

    handler = WorkflowHandler("agent-runs", workflow)
    handler.bind(wire, tracing=tracing)
    with tracing.process("agent-runs", RUN, 1, attempt=1, replayed=False):
        await handler(batch(1))
    finished = {span.name: span for span in exporter.get_finished_spans()}
    process = finished["process agent-runs"]
    step = finished["step agent-runs"]
    assert step.parent is not None
    assert step.parent.span_id == process.context.span_id
    assert step.attributes is not None
    assert step.attributes["pullwake.step.name"] == "first"
    assert step.attributes["pullwake.run.id"] == RUN
    waits = [span for span in exporter.get_finished_spans() if span.name == "wait agent-runs"]
    assert [span.attributes["pullwake.wait.outcome"] for span in waits if span.attributes] == ["event", "suspended"]
    assert all(span.parent is not None and span.parent.span_id == process.context.span_id for span in waits)

    exporter.clear()
    with tracing.process("agent-runs", RUN, 1, attempt=1, replayed=False):
        await handler(batch(2))
    assert "step agent-runs" not in {span.name for span in exporter.get_finished_spans()}, "a replayed step: no span"


def test_the_runs_gauge_counts_each_run_once_by_its_last_status() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    stats = RunStats(registry)
    stats.seen("runs/1", "running")
    stats.seen("runs/1", "suspended")
    stats.seen("runs/2", "running")
    stats.seen("runs/2", "completed")
    stats.step("executed", 3)
    text = generate_latest(registry).decode()
    assert 'pullwake_runs{status="suspended"} 1.0' in text
    assert 'pullwake_runs{status="completed"} 1.0' in text
    assert 'pullwake_runs{status="running"} 0.0' in text
    assert 'pullwake_run_steps_total{result="executed"} 3.0' in text
    assert 'pullwake_runs_ended_total{status="completed"} 1.0' in text
    assert 'pullwake_runs_ended_total{status="failed"} 0.0' in text, "served before the first failure"
    assert stats.snapshot()["by_status"]["suspended"] == 1


async def test_a_live_holder_keeps_its_run_running_through_a_long_step_and_a_silent_one_reads_interrupted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire = FakeWire()
    wire.add_stream(RUN, [{}])

    async def long_step(run: Run) -> object:
        await run.step("long", trio.sleep, 100)
        return "done"

    handler = WorkflowHandler("agent-runs", long_step)
    handler.bind(wire, now=trio.current_time)
    handler.hold = 3.0

    def view() -> dict[str, object]:
        return JournalState.of(wire.streams[journal_path(RUN)]).view(RUN, now=trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handler, batch(1))
        for _ in range(30):  # 90 s of a step thirty times longer than the hold
            await trio.sleep(3)
            assert view()["status"] == "running", view()
            assert view()["holder_lost"] is False
    assert view()["status"] == "completed"

    wire.streams[journal_path(RUN)] = wire.streams[journal_path(RUN)][:-2]  # as if killed before its end
    await trio.sleep(2)
    assert view()["status"] == "running", "within its hold"
    await trio.sleep(2)
    assert view()["status"] == "interrupted"
    assert view()["holder_lost"] is True
