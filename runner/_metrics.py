"""Prometheus metrics from a registry owned by one runner: two runners in a process never collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from machine import State

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """The series an operator scrapes. Counters only ever grow, across restarts too."""

    def __init__(self, runner_id: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = {"runner_id": runner_id}
        r = self.registry
        self.state = Gauge("pullwake_state", "1 for the lifecycle state the runner is in", ["state"], registry=r)
        self.wake_events = Counter("pullwake_wake_events", "Events read from the wake stream", registry=r)
        self.claims = Counter("pullwake_claims", "Claims by how they ended", ["result"], registry=r)
        self.claim_races_lost = Counter(
            "pullwake_claim_races_lost",
            "Claims refused with ALREADY_CLAIMED: another runner won the race (counted as skipped claims too)",
            registry=r,
        )
        self.pending_streams = Gauge(
            "pullwake_pending_streams",
            "Streams with pending work in the subscription's last claim answer (0 after a done ack that said "
            "nothing more is pending, or a NO_PENDING_WORK answer)",
            ["subscription"],
            registry=r,
        )
        self.batches = Counter("pullwake_batches", "Batches by how they ended", ["outcome"], registry=r)
        self.events_handled = Counter(
            "pullwake_events_handled", "Events in batches that handlers finished (ok or suspended)", registry=r
        )
        self.handler_duration = Histogram(
            "pullwake_handler_duration_seconds",
            "Time spent in handlers per batch",
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.wake_to_handler = Histogram(
            "pullwake_wake_to_handler_seconds",
            "From the server writing a wake to the handler being called",
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.reconnects = Counter("pullwake_reconnects", "Times the wake stream was lost", registry=r)
        self.heartbeat_failures = Counter("pullwake_heartbeat_failures", "Failed liveness probes", registry=r)
        self.liveness_resets = Counter("pullwake_liveness_resets", "Streams reset by the heartbeat", registry=r)
        self.in_flight = Gauge("pullwake_claims_in_flight", "Claims being worked on now", registry=r)
        self.lease_renewals = Counter(
            "pullwake_lease_renewals", "Lease renewals (acks without done) by result", ["result"], registry=r
        )
        self.ignored = Counter(
            "pullwake_wake_items_ignored",
            "Items of the wake and control streams that were ignored, by reason",
            ["reason"],
            registry=r,
        )
        self.gaps = Counter(
            "pullwake_subscription_gaps",
            "Ranges of a stream the server skipped when it re-created a subscription, by what the runner did",
            ["action"],
            registry=r,
        )
        self.state_write_failures = Counter(
            "pullwake_state_write_failures",
            "Writes of the journal or the wake checkpoint that failed (disk full, read-only, ...)",
            registry=r,
        )
        self.degraded = Gauge(
            "pullwake_degraded",
            "1 while the runner is degraded for this reason (state_write_failed, handler_failing, gap_replay_failed)",
            ["reason"],
            registry=r,
        )
        self.info = Gauge("pullwake_runner_info", "Constant 1, labelled with the runner id", ["runner_id"], registry=r)
        self.info.labels(**labels).set(1)
        for state in State:
            self.state.labels(state.value).set(0)

    def entered(self, state: State) -> None:
        for each in State:
            self.state.labels(each.value).set(1 if each is state else 0)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
