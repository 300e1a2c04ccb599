"""Fault tools shared by the tests and the benchmarks: they stand between the runner and a server."""
