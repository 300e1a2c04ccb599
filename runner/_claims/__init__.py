"""Claims: one claim of one subscription, from `POST /claim` to its final ack or hand-back.

`claim` (`ClaimRun`: `ClaimContext` in, `ClaimResult` out; the held claim, its lease and its acks), `early_read`,
`delivery` (a batch to a handler: retries, dead letters), `recovery` (gaps replayed,
claims of an earlier run handed back), `outcome` (how a claim ended).
"""
