"""Following the server: the lifecycle's activities and the runner-lifetime readers.

`follower` (the `connect` and `consume` activities), `reconnect` (the `backoff` activity),
`liveness` (the heartbeat), `subscriptions` (managed subscriptions put back),
`control_stream` (remote aborts), `reading` (reads the server cannot turn into a loop).
"""
