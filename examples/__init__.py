"""Runnable examples of embedding pullwake-runner (run by the test suite)."""
