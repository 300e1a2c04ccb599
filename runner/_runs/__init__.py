"""Durable runs (docs/design.md §9): a workflow handler replayed over a run stream and its journal.

Sits beside `_claims`, on `_handlers` and `_wire`: a workflow becomes an ordinary handler,
so the claim machinery knows nothing of runs, and runs know nothing of claims.
"""
