"""Fixtures: the real reference server on a free loopback port, and per-test names on it."""

from __future__ import annotations

import itertools
import logging
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import structlog

from runner._service.devserver import DevServer, install
from tests.support import World

# The reference server holds live reads (and spaces SSE keep-alives) this long.
SERVER_HOLD = 2.0


@pytest.fixture(scope="session")
def reference_server_install() -> Path:
    return install()


@pytest.fixture(scope="session")
def shared_server(reference_server_install: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevServer]:
    """One server for the tests that do not stop or restart it; names keep tests apart."""
    logs = tmp_path_factory.mktemp("shared-server")
    server = DevServer(long_poll_timeout=SERVER_HOLD, log_file=logs / "server.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_server(reference_server_install: Path, tmp_path: Path) -> Iterator[DevServer]:
    """A server this test may stop, kill and restart; its streams live in a data directory."""
    server = DevServer(
        long_poll_timeout=SERVER_HOLD, data_dir=tmp_path / "server-data", log_file=tmp_path / "server.log"
    )
    server.start()
    yield server
    server.stop()


_counter = itertools.count()


@pytest.fixture
async def world(shared_server: DevServer, tmp_path: Path) -> AsyncIterator[World]:
    async with World.open(shared_server, f"t{next(_counter)}{uuid.uuid4().hex[:6]}", tmp_path) as made:
        yield made


@pytest.fixture
async def own_world(own_server: DevServer, tmp_path: Path) -> AsyncIterator[World]:
    async with World.open(own_server, f"o{next(_counter)}{uuid.uuid4().hex[:6]}", tmp_path) as made:
        yield made


@pytest.fixture
def record_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where handlers in runner processes (tests/file_handlers.py) write what they handled."""
    path = tmp_path / "record.txt"
    path.touch()
    monkeypatch.setenv("PULLWAKE_TEST_RECORD", str(path))
    return path


@pytest.fixture(autouse=True, scope="session")
def quiet_logs() -> None:
    """Only warnings and errors show up in a failing test's captured output (PULLWAKE_TEST_LOG_LEVEL)."""
    level = os.environ.get("PULLWAKE_TEST_LOG_LEVEL", "warning").upper()
    # Plain tracebacks: rich (installed with mutmut) renders one in seconds, which mutation runs repeat.
    *processors, _renderer = structlog.get_config()["processors"]
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level)),
        processors=[*processors, structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)],
    )
