"""The lifecycle as data: complete, pure, and the README's diagram in step with it."""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

import machine
from machine import _lifecycle
from machine._lifecycle import IncompleteTableError

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_every_state_event_pair_is_decided() -> None:
    assert len(machine.TABLE) == 5
    assert all(len(row) == len(machine.Event) == 12 for row in machine.TABLE.values())


def test_a_row_missing_an_event_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_lifecycle, "ROWS", _lifecycle.ROWS[:-1])
    with pytest.raises(IncompleteTableError, match="DRAINED"):
        _lifecycle._build_table()


def test_a_row_missing_a_state_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    event, cells = _lifecycle.ROWS[0]
    monkeypatch.setattr(_lifecycle, "ROWS", ((event, cells[:-1]), *_lifecycle.ROWS[1:]))
    with pytest.raises(IncompleteTableError, match="START"):
        _lifecycle._build_table()


def test_every_state_but_stopped_has_an_activity_whose_crash_event_it_handles() -> None:
    for state, activity in machine.ACTIVITIES.items():
        if state is machine.State.STOPPED:
            assert activity is None
            continue
        assert activity is not None
        assert not machine.TABLE[state][activity.on_crash].ignored, f"{state} would ignore its own crash"


def test_the_machine_package_is_pure() -> None:
    forbidden = {"trio", "httpx", "httpx_sse", "runner", "anyio", "asyncio", "socket"}
    for path in (ROOT / "machine").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in forbidden, f"{path.name} imports {name}"


def test_the_mermaid_diagram_draws_every_decided_cell() -> None:
    diagram = machine.mermaid()
    assert diagram.startswith("stateDiagram-v2\n")
    assert "streaming --> stopping : STREAM_CLOSED / fatal" in diagram
    assert "streaming --> streaming : WAKE / claim" in diagram
    arrows = [line for line in diagram.splitlines() if "-->" in line and "[*]" not in line]
    decided = sum(not cell.ignored for row in machine.TABLE.values() for cell in row.values())
    assert len(arrows) == decided == 15


def test_the_readme_shows_the_current_diagram() -> None:
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- lifecycle:begin -->\n```mermaid\n(.*?)```\n<!-- lifecycle:end -->", readme, re.S)
    assert found, "README.md must contain the lifecycle diagram between the lifecycle markers"
    assert found.group(1) == machine.mermaid(), "README.md's diagram drifted: paste `pullwake machine --mermaid`"


TABLE_TEXT = """\
event            stopped     connecting                         streaming         reconnecting  stopping
START            connecting  -                                  -                 -             -
STOP             -           stopping                           stopping          stopping      -
CONNECTED        -           streaming (reset backoff, resync)  -                 -             -
CONNECT_FAILED   -           reconnecting                       -                 -             -
STREAM_END       -           -                                  connecting        -             -
STREAM_ERROR     -           -                                  reconnecting      -             -
STREAM_CLOSED    -           -                                  stopping (fatal)  -             -
STREAM_RESET     -           reconnecting                       reconnecting      -             -
BACKOFF_ELAPSED  -           -                                  -                 connecting    -
PROBE_OK         -           -                                  -                 connecting    -
WAKE             -           -                                  - (claim)         -             -
DRAINED          -           -                                  -                 -             stopped
"""


def test_the_plain_table_reads_like_the_design_documents_table() -> None:
    assert machine.table_text() == TABLE_TEXT


def test_building_the_table_again_gives_the_same_table() -> None:
    assert _lifecycle._build_table() == machine.TABLE


def test_columns_that_do_not_name_every_state_once_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_lifecycle, "COLUMNS", (*_lifecycle.COLUMNS, machine.State.STOPPED))
    with pytest.raises(IncompleteTableError, match=r"^columns .* must name every state exactly once$"):
        _lifecycle._build_table()


def test_a_state_without_a_declared_activity_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    activities = {
        state: activity for state, activity in machine.ACTIVITIES.items() if state is not machine.State.STOPPED
    }
    monkeypatch.setattr(_lifecycle, "ACTIVITIES", activities)
    with pytest.raises(IncompleteTableError, match=r"^every state must declare its activity \(or None\)$"):
        _lifecycle._build_table()
