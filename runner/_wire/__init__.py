"""The wire: every call the runner makes to a Durable Streams server, and nothing of the lifecycle.

`protocol` (the `Wire` protocol and its values), `client` (`Wire` over HTTP; the one place
that maps transport and HTTP errors to `runner.errors`), `answers` (what answers must look
like), `sse`, `transport` + `connection` (the lean HTTP/1.1 transport), `retrying`
(backoff, and retries of transient request errors).
"""
