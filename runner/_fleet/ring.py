"""Who is preferred for a subscription: rendezvous (highest random weight) hashing over the members.

Every runner computes the same order from the same member ids, with no coordinator; when a
member joins or leaves, only the subscriptions it is (or was) first for change hands: about
1/N of them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable


def _weight(member: str, subscription: str) -> int:
    digest = hashlib.blake2b(f"{member}\0{subscription}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _preference(subscription: str) -> Callable[[str], tuple[int, str]]:
    return lambda member: (_weight(member, subscription), member)


def ranked(subscription: str, members: Iterable[str]) -> list[str]:
    """`members` in order of preference for `subscription`: the first claims its wakes at once."""
    return sorted(set(members), key=_preference(subscription), reverse=True)


def first(subscription: str, members: Iterable[str]) -> str:
    """The member that claims `subscription`'s wakes at once: `ranked(...)[0]`, without the sort."""
    return max(members, key=_preference(subscription))
