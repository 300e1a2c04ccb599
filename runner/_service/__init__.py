"""The runner as a service: the `pullwake` command, the daemon and what an operator talks to.

`cli`, `daemon` (`pullwake run`), `control` (the control socket and metrics listener: the
only users of the HTTP server stack), `systemd`, `logs`, `devserver` (the pinned reference
server), `demo`.
"""
