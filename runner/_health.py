"""What the runner has been doing, for operators (docs/design.md §7.6): one recorder, one immutable snapshot, and the
rules that judge them (`status_of`, `Health.verdict`, `progressing`).

The lifecycle state is not recorded here: the driver owns it, and a snapshot
is always taken with the state the driver is in at that moment.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from machine import State

from ._claims.outcome import FAILED, GAP_REPLAY_FAILED, HANDLER_FAILING, SUCCEEDED, Outcome
from ._metrics import Metrics

# Why a runner that follows its wake stream can still be degraded: a small fixed set (a metric label).
# Claims report the two of theirs (runner/_claims/outcome.py); the state directory's is health's own.
STATE_WRITE_FAILED = "state_write_failed"
PROBLEMS = (STATE_WRITE_FAILED, HANDLER_FAILING, GAP_REPLAY_FAILED)
_DESCRIBED = {
    STATE_WRITE_FAILED: "state writes failing",
    HANDLER_FAILING: "handler failing every attempt, no dead-letter stream",
    GAP_REPLAY_FAILED: "gap replay failing",
}

BATCH_OUTCOMES = ("ok", "suspended", "retried", "failed", "dead_lettered")
LEASE_RENEWAL_RESULTS = ("ok", "lost")
GAP_ACTIONS = ("replayed", "skipped")
"""The label values `batch`, `lease_renewal` and `gap` are given (the metrics are pre-set with them)."""

# A transition that takes longer than this means the driver is wedged: cancelled
# activities finish their (bounded) cleanup within a couple of seconds.
WEDGED_AFTER = 10.0


@dataclass(frozen=True)
class InFlightClaim:
    subscription: str
    wake_id: str | None
    generation: int | None
    started_at: float
    stream: str | None
    batches_done: int


@dataclass(frozen=True)
class Health:
    """A point-in-time picture of one runner. Times are Unix seconds (None: never)."""

    runner_id: str
    state: str
    state_since: float | None
    status: str
    """`ok`, `degraded` (not following the wake stream right now, or `problems`), or `stopped`."""
    reason: str | None
    offset: str | None
    started_at: float | None
    stream_connected: bool
    stream_connected_since: float | None
    reconnect_count: int
    last_error: str | None
    last_error_at: float | None
    last_heartbeat_at: float | None
    last_heartbeat_ok: bool | None
    heartbeat_failures: int
    liveness_resets: int
    """STREAM_RESETs sent by the heartbeat (failed probes or a stalled stream) in this run."""
    last_claim_at: float | None
    last_claim_result: str | None
    last_dispatch_at: float | None
    events_received: int
    claims_succeeded: int
    claims_skipped: int
    claims_failed: int
    claims: dict[str, int]
    batches: dict[str, int]
    in_flight: list[InFlightClaim] = field(default_factory=list)
    cooldowns: dict[str, float] = field(default_factory=dict)
    """Subscriptions resting after a failure or an abort, and until when."""
    problems: dict[str, list[str]] = field(default_factory=dict)
    """Why the runner is degraded although it follows its wake stream: reason -> what is
    affected (a subscription, or the state file). Each clears when its cause is gone."""
    state_for: float | None = None
    """Seconds since `state_since`, on a monotonic clock (a wall-clock step cannot fake a stall)."""
    runs: dict[str, Any] = field(default_factory=dict)
    """Durable runs this runner saw (runner/_runs/stats.py): by status, steps, timers; empty without workflows."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def verdict(self, *, stuck_after: float) -> tuple[bool, str]:
        """Is the runner working? Degraded for less than `stuck_after` seconds still counts.

        Problems (`problems`) alone do not fail it: the runner follows its wake stream and
        serves the rest, and a restart would not cure a full disk or a failing handler. They
        show as `status` "degraded" with the reason, and in the `pullwake_degraded` metric.
        """
        if self.status == "ok":
            return True, "following the wake stream"
        if self.status == "stopped":
            return False, "stopped"
        if self.problems and self.state == "streaming" and not self.heartbeat_failures:
            return True, f"degraded: {self.reason}"
        stalled_for = self.state_for or 0.0
        if self.state != "stopping" and stalled_for >= stuck_after:
            return False, f"stuck for {stalled_for:.0f} s: {self.reason}"
        return True, f"recovering: {self.reason}"


class Vitals:
    """The mutable record behind `Health`; components report, the runner snapshots."""

    def __init__(self, runner_id: str, redact: Callable[[str], str] = str) -> None:
        self.runner_id = runner_id
        self._redact = redact
        self.metrics = Metrics(runner_id)
        self._preset()
        self.reset()

    def _preset(self) -> None:
        """Every known label value of the labelled counters starts at 0, so `increase()` sees a first event."""
        metrics = self.metrics
        for outcome in Outcome:
            metrics.claims.labels(outcome.value)
        for batch in BATCH_OUTCOMES:
            metrics.batches.labels(batch)
        for result in LEASE_RENEWAL_RESULTS:
            metrics.lease_renewals.labels(result)
        for action in GAP_ACTIONS:
            metrics.gaps.labels(action)

    def reset(self) -> None:
        """Called at every start: counters describe the current run."""
        self.state_since: float | None = None
        self._state_since_monotonic: float | None = None
        self._in_outage = False
        self.started_at: float | None = None
        self.connected_since: float | None = None
        self.reconnect_count = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.last_heartbeat_at: float | None = None
        self.last_heartbeat_ok: bool | None = None
        self.heartbeat_failures = 0
        self.liveness_resets = 0
        self.last_claim_at: float | None = None
        self.last_claim_result: Outcome | None = None
        self.last_dispatch_at: float | None = None
        self.events_received = 0
        self.claims: Counter[Outcome] = Counter()
        self.batches: Counter[str] = Counter()
        self.problems: dict[str, set[str]] = {reason: set() for reason in PROBLEMS}
        for reason in PROBLEMS:
            self.metrics.degraded.labels(reason).set(0)

    # -- reports ---------------------------------------------------------------------------

    def started(self) -> None:
        self.reset()
        self.started_at = time.time()

    def entered(self, state: State) -> None:
        if state is State.STREAMING:
            self.connected_since = time.time()
        elif self.connected_since is not None or state is State.STOPPED:
            self.connected_since = None
        if state is State.RECONNECTING:
            self.reconnect_count += 1
            self.metrics.reconnects.inc()
        self.metrics.entered(state)
        # "Since" counts from the first state that is not streaming, so a connect/backoff
        # loop reads as one long outage rather than many short ones.
        following = state in (State.STREAMING, State.STOPPED)
        if following or not self._in_outage:
            self.state_since = time.time()
            self._state_since_monotonic = time.monotonic()
        self._in_outage = not following

    def error(self, error: BaseException | str) -> None:
        # Server text can echo a token: every surface reading last_error gets it clean.
        self.last_error = self._redact(error if isinstance(error, str) else f"{type(error).__name__}: {error}")
        self.last_error_at = time.time()

    def heartbeat(self, ok: bool, consecutive_failures: int, error: BaseException | str | None = None) -> None:
        self.last_heartbeat_at = time.time()
        self.last_heartbeat_ok = ok
        self.heartbeat_failures = consecutive_failures
        if error is not None:
            self.error(error)
        if not ok:
            self.metrics.heartbeat_failures.inc()

    def liveness_reset(self, reason: str) -> None:
        self.liveness_resets += 1
        self.metrics.liveness_resets.inc()
        self.error(f"liveness reset: {reason}")

    def wake_received(self) -> None:
        self.events_received += 1
        self.metrics.wake_events.inc()

    def dispatched(self) -> None:
        self.last_dispatch_at = time.time()

    def claim_ended(self, outcome: Outcome) -> None:
        self.claims[outcome] += 1
        self.last_claim_at = time.time()
        self.last_claim_result = outcome
        self.metrics.claims.labels(outcome.value).inc()

    def claim_race_lost(self) -> None:
        self.metrics.claim_races_lost.inc()

    def pending(self, subscription: str, streams: int) -> None:
        """How many streams of `subscription` have pending work, as the server last said."""
        self.metrics.pending_streams.labels(subscription).set(streams)

    def batch(self, outcome: str) -> None:
        self.batches[outcome] += 1
        self.metrics.batches.labels(outcome).inc()

    def handler_ran(self, seconds: float) -> None:
        self.metrics.handler_duration.observe(seconds)

    def events_handled(self, count: int) -> None:
        self.metrics.events_handled.inc(count)

    def wake_latency(self, seconds: float) -> None:
        self.metrics.wake_to_handler.observe(max(seconds, 0.0))

    def ignored(self, reason: str, count: int = 1) -> None:
        self.metrics.ignored.labels(reason).inc(count)

    def gap(self, action: str) -> None:
        self.metrics.gaps.labels(action).inc()

    def lease_renewal(self, result: str) -> None:
        self.metrics.lease_renewals.labels(result).inc()

    def in_flight(self, count: int) -> None:
        self.metrics.in_flight.set(count)

    def problem(self, reason: str, subject: str) -> None:
        """`subject` (a subscription, a state file) is degraded for `reason` until `resolved`."""
        if subject not in self.problems[reason]:
            self.problems[reason].add(subject)
            self.metrics.degraded.labels(reason).set(1)

    def resolved(self, reason: str, subject: str) -> None:
        affected = self.problems[reason]
        if subject in affected:
            affected.discard(subject)
            if not affected:
                self.metrics.degraded.labels(reason).set(0)

    def state_written(self, file: str, ok: bool) -> None:
        """A write of a state file (journal, checkpoint) ended; a failed one costs the fast resume."""
        if ok:
            self.resolved(STATE_WRITE_FAILED, file)
        else:
            self.metrics.state_write_failures.inc()
            self.problem(STATE_WRITE_FAILED, file)

    # -- snapshot --------------------------------------------------------------------------

    def snapshot(
        self,
        state: State,
        in_flight: list[InFlightClaim],
        offset: str | None,
        *,
        cooldowns: dict[str, float] | None = None,
    ) -> Health:
        status, reason = status_of(state, self)
        return Health(
            runner_id=self.runner_id,
            state=state.value,
            state_since=self.state_since,
            status=status,
            reason=reason,
            offset=offset,
            started_at=self.started_at,
            stream_connected=self.connected_since is not None,
            stream_connected_since=self.connected_since,
            reconnect_count=self.reconnect_count,
            last_error=self.last_error,
            last_error_at=self.last_error_at,
            last_heartbeat_at=self.last_heartbeat_at,
            last_heartbeat_ok=self.last_heartbeat_ok,
            heartbeat_failures=self.heartbeat_failures,
            liveness_resets=self.liveness_resets,
            last_claim_at=self.last_claim_at,
            last_claim_result=self.last_claim_result.value if self.last_claim_result else None,
            last_dispatch_at=self.last_dispatch_at,
            events_received=self.events_received,
            claims_succeeded=sum(self.claims[o] for o in SUCCEEDED),
            claims_skipped=self.claims[Outcome.SKIPPED],
            claims_failed=sum(self.claims[o] for o in FAILED),
            claims={outcome.value: self.claims[outcome] for outcome in Outcome},
            batches=dict(self.batches),
            in_flight=in_flight,
            cooldowns=dict(cooldowns or {}),
            problems={reason: sorted(affected) for reason, affected in self.problems.items() if affected},
            state_for=time.monotonic() - self._state_since_monotonic if self._state_since_monotonic else None,
        )


# -- the rules --------------------------------------------------------------------------------


def status_of(state: State, vitals: Vitals) -> tuple[str, str | None]:
    """`ok` while following the wake stream with the heartbeat answering; else why not."""
    if state is State.STOPPED:
        return "stopped", "the runner is not running"
    if state is State.STOPPING:
        return "degraded", "stopping"
    last_error = f" (last error: {vitals.last_error})" if vitals.last_error else ""
    if vitals.heartbeat_failures:
        return "degraded", f"{vitals.heartbeat_failures} liveness probe(s) failed in a row{last_error}"
    if state is not State.STREAMING:
        return "degraded", f"{state.value}: not following the wake stream{last_error}"
    if problems := [f"{_DESCRIBED[r]} ({', '.join(sorted(a))})" for r, a in vitals.problems.items() if a]:
        return "degraded", "; ".join(problems)
    return "ok", None


def progressing(
    health: Health, *, busy_for: float, silent_for: float, beat_limit: float, stop_deadline: float
) -> tuple[bool, str]:
    """Is the runner making progress? False when wedged: what a watchdog should act on.

    Wedged means: the lifecycle driver is stuck inside one transition, the liveness
    heartbeat stopped beating, or a stop has overrun its deadline. Waiting for a
    server that is down is not wedged: the runner is doing its job, retrying.
    """
    if busy_for > WEDGED_AFTER:
        return False, f"the lifecycle driver is stuck in one transition for {busy_for:.0f} s"
    if silent_for > beat_limit:
        return False, f"the liveness heartbeat has not completed a beat for {silent_for:.0f} s"
    if health.state == State.STOPPING.value and health.state_for is not None:
        stopping = health.state_for
        if stopping > stop_deadline:
            return False, f"stopping for {stopping:.0f} s, past its {stop_deadline:.0f} s deadline"
    return True, health.state
