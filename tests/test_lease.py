"""The lease of a held claim, counted by the runner's own clock from when a renewal was sent."""

from __future__ import annotations

from runner._claims.claim import Lease

TTL = 30.0


def test_the_lease_runs_out_one_ttl_after_the_request_was_sent() -> None:
    lease = Lease(TTL, sent_at=100.0)
    assert lease.deadline == 130.0


def test_the_keeper_renews_after_a_third_of_the_lease() -> None:
    lease = Lease(TTL, sent_at=100.0)
    assert lease.renew_at == 110.0


def test_a_renewal_counts_from_when_it_was_sent() -> None:
    lease = Lease(TTL, sent_at=100.0)
    lease.renewed(sent_at=107.0)
    assert (lease.renewed_at, lease.deadline, lease.renew_at) == (107.0, 137.0, 117.0)


def test_a_renewal_sent_before_the_last_one_does_not_move_the_lease_back() -> None:
    lease = Lease(TTL, sent_at=100.0)
    lease.renewed(sent_at=107.0)
    lease.renewed(sent_at=104.0)  # an older request whose answer came in late
    assert lease.deadline == 137.0


def test_a_lease_is_fresh_while_two_thirds_of_it_are_left() -> None:
    lease = Lease(TTL, sent_at=100.0)
    assert lease.fresh(100.0)
    assert lease.fresh(109.999)  # just over two thirds left
    assert not lease.fresh(110.001)
    assert not lease.fresh(200.0)  # a process frozen past its lease
