"""The lease of a held claim: how long it is ours, by the runner's own clock (docs/design.md §5.4).

A lease is only as fresh as the request that granted or renewed it: it is
counted from when that request was *sent*, since the server may have started
its clock at any moment after that. Time the process spent frozen (SIGSTOP, a
suspended VM) counts too, because the monotonic clock keeps running, so a claim
that slept past its lease is never treated as fresh.
"""

from __future__ import annotations

# The lease keeper renews after a third of the lease has gone by without an ack.
RENEW_FRACTION = 1 / 3


class Lease:
    """When the lease was last proven, and what follows from it."""

    def __init__(self, ttl: float, sent_at: float) -> None:
        self.ttl = ttl
        self.renewed_at = sent_at

    def renewed(self, sent_at: float) -> None:
        """A renewal sent at `sent_at` was accepted."""
        self.renewed_at = max(self.renewed_at, sent_at)

    @property
    def deadline(self) -> float:
        """When the lease runs out, at the latest, unless renewed."""
        return self.renewed_at + self.ttl

    @property
    def renew_at(self) -> float:
        """When the keeper renews it, unless an ack did meanwhile."""
        return self.renewed_at + self.ttl * RENEW_FRACTION

    def fresh(self, now: float) -> bool:
        """Is it safe to hand a batch to a handler now without proving the lease first?

        While the keeper keeps up, at least two thirds of the lease are always left. Less
        than that means renewals fell behind: the process may have been frozen, and the
        server may have given the subscription to someone else meanwhile.
        """
        return self.deadline - now >= self.ttl * (1 - RENEW_FRACTION)
