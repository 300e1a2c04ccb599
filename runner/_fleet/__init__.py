"""A fleet: many runners on one wake stream that know of each other, with no coordinator.

`ring` (who is preferred for a subscription: rendezvous hashing), `peers` (`Fleet`: the
fleet stream followed and written; who may claim a wake, and when).
"""
