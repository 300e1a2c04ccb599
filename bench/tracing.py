"""What traces cost: the latency workload with tracing off, with the OpenTelemetry API and no SDK, and with
an SDK whose exporter drops every span (issue 25).

- `off`: `Tracing(enabled=False)`, what a runner without the `otel` extra uses (one shared do-nothing
  context manager per span);
- `api`: the API installed, no SDK configured: its no-op tracer (what `pip install
  'pullwake-runner[otel]'` costs an application that does not trace);
- `sdk`: an SDK `TracerProvider` with a `SimpleSpanProcessor` and an exporter that drops every span:
  spans are made, filled and ended, but never serialized or sent (the cost of the runner's spans,
  not of an exporter).

Two measurements: the in-process latency workload (one append every `latency_gap`, append → handler,
and the bench process's CPU time per event), in rounds that alternate the modes so drift on a shared
machine hits all alike; and the spans of one claim of one batch (receive, process, ack) made in a
tight loop, per mode, in microseconds.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from bench.core import Bench, percentiles, running, until
from runner import Batch, Runner, SubscriptionSpec
from runner._tracing import Tracing

MODES = ("off", "api", "sdk")
ROUNDS = 2
SPAN_LOOPS = 20_000


class _Drop(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def _tracing(mode: str) -> tuple[Tracing, TracerProvider | None]:
    if mode == "off":
        return Tracing(enabled=False), None
    if mode == "api":
        return Tracing(), None  # the global provider: the API's no-op (the bench never sets one)
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(_Drop()))
    return Tracing(provider), provider


async def tracing(bench: Bench) -> None:
    events, gap = bench.scale.latency_events, bench.scale.latency_gap
    per_round = max(1, events // ROUNDS)
    samples: dict[str, list[float]] = {mode: [] for mode in MODES}
    cpu: dict[str, float] = dict.fromkeys(MODES, 0.0)
    for number in range(ROUNDS):
        for mode in MODES if number % 2 == 0 else tuple(reversed(MODES)):
            latencies, cpu_seconds = await _round(bench, mode, per_round, gap)
            samples[mode] += latencies
            cpu[mode] += cpu_seconds
    bench.results["tracing"] = {
        "events_per_mode": per_round * ROUNDS,
        "gap_s": gap,
        "modes": {
            mode: {
                "append_to_handler": percentiles(samples[mode]),
                "cpu_ms_per_event": cpu[mode] / max(1, len(samples[mode])) * 1000,
                "spans_of_one_claim_us": _spans_of_one_claim(mode),
            }
            for mode in MODES
        },
    }


async def _round(bench: Bench, mode: str, events: int, gap: float) -> tuple[list[float], float]:
    uid, wake = bench.names("trc")
    stream = f"{uid}/a"
    await bench.producer.create_stream(stream)
    handled_at: dict[int, float] = {}

    async def handler(batch: Batch) -> None:
        now = time.perf_counter()
        for message in batch.messages:
            handled_at.setdefault(message["i"], now)

    spec = SubscriptionSpec(id=f"sub-{uid}", pattern=f"{uid}/*")
    chosen, provider = _tracing(mode)
    runner = Runner(bench.settings(wake, (spec,)), handlers={spec.id: handler})
    runner._tracing = chosen  # the bench's switch: `off` is what a runner without the extra uses
    async with running(runner):
        await bench.producer.append(stream, {"i": -1})  # warm up: the first claim's one-off costs
        await until(lambda: -1 in handled_at, 60, "a warm-up event to be handled")
        cpu_before = time.process_time()
        appended = await bench.produce_spaced(stream, events, gap)
        await until(lambda: len(handled_at) > events, 60, f"{events} events handled ({mode})")
        cpu_seconds = time.process_time() - cpu_before
    if provider is not None:
        provider.shutdown()
    return [handled_at[i] - at for i, at in appended.values()], cpu_seconds


def _spans_of_one_claim(mode: str) -> float:
    """Microseconds for the spans of a claim of one batch: receive, process, ack (the runner's own code)."""
    chosen, provider = _tracing(mode)
    started = time.perf_counter()
    for _ in range(SPAN_LOOPS):
        with chosen.receive("sub") as span:
            with chosen.process("sub", "jobs/a", 1, attempt=1, replayed=False):
                pass
            with chosen.settle("sub", "ack", ["jobs/a"], done=True):
                pass
            span.set_attribute("pullwake.claim.outcome", "completed")
    took = time.perf_counter() - started
    if provider is not None:
        provider.shutdown()
    return took / SPAN_LOOPS * 1e6


def render(results: dict[str, Any]) -> str:
    section = results.get("tracing")
    if not section:
        return ""
    lines = [
        f"Tracing overhead ({section['events_per_mode']} appends per mode, {section['gap_s'] * 1000:.0f} ms apart, "
        f"in-process runner; modes alternate in {ROUNDS} rounds)",
        f"  {'mode':<5} {'append→handler p50':>19} {'p90':>8} {'p99':>8} {'CPU ms/event':>13} {'spans/claim µs':>15}",
    ]
    for mode, figures in section["modes"].items():
        latency = figures["append_to_handler"]
        lines.append(
            f"  {mode:<5} {latency['p50_ms']:>16.2f} ms {latency['p90_ms']:>8.2f} {latency['p99_ms']:>8.2f} "
            f"{figures['cpu_ms_per_event']:>13.3f} {figures['spans_of_one_claim_us']:>15.1f}"
        )
    return "\n".join(lines) + "\n"
