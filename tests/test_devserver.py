"""DevServer start-up: the address line is found in whatever read it arrives, and no output is lost."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx
import pytest

from runner._service.devserver import DevServer, DevServerError

FAKE = Path(__file__).parent / "fake_devserver.py"


def test_the_address_in_the_same_read_as_a_log_line_is_seen_at_once(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    server = DevServer(command=(sys.executable, str(FAKE), "announce"), log_file=log)
    began = time.monotonic()
    try:
        # Before the fix, this waited out the whole timeout: the address line sat in a
        # buffered reader while select() waited for the pipe, which stays quiet until stop.
        url = server.start(timeout=10)
        took = time.monotonic() - began
    finally:
        server.stop()
    assert url == "http://127.0.0.1:4999"
    assert server.port == 4999
    assert took < 5, f"start took {took:.1f} s"
    lines = log.read_text().splitlines()
    assert lines[0].startswith("starting with {")
    assert lines[1:] == ['{"url": "http://127.0.0.1:4999"}', "log line continued at stop", "server stopped"], (
        "every byte, before and after the address, reaches the log in order"
    )


def test_a_server_that_exits_before_announcing_is_an_error_with_its_output(tmp_path: Path) -> None:
    server = DevServer(command=(sys.executable, str(FAKE), "die"))
    with pytest.raises(DevServerError, match="exited at start") as error:
        server.start(timeout=10)
    assert "cannot listen: address in use" in str(error.value)
    assert not server.running


def test_the_real_reference_server_starts_serves_and_logs(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with DevServer(log_file=log) as server:
        assert server.url is not None
        answer = httpx.put(f"{server.url}/v1/stream/devserver/check", headers={"content-type": "application/json"})
        assert answer.status_code in (200, 201)
    assert '"url"' in log.read_text(), "the announcement is in the log too"
