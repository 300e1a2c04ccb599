"""Render the lifecycle for people: a Mermaid diagram and a plain table."""

from __future__ import annotations

from ._lifecycle import ACTIVITIES, COLUMNS, INITIAL, TABLE, Cell, Event, State


def _effects(cell: Cell) -> str:
    return ", ".join(effect.value for effect in cell.effects)


def _label(event: Event, cell: Cell) -> str:
    return f"{event.value} / {_effects(cell)}" if cell.effects else event.value


def mermaid() -> str:
    """The lifecycle as a Mermaid `stateDiagram-v2` (ignored cells are not drawn)."""
    lines = ["stateDiagram-v2", f"    [*] --> {INITIAL.value}"]
    for state in State:
        activity = ACTIVITIES[state]
        if activity is not None:
            lines.append(f"    {state.value} : do / {activity.name}")
    for source in State:
        for event, cell in TABLE[source].items():
            if cell.ignored:
                continue
            target = cell.target if cell.target is not None else source
            lines.append(f"    {source.value} --> {target.value} : {_label(event, cell)}")
    return "\n".join(lines) + "\n"


def table_text() -> str:
    """The lifecycle as the event-by-state table of docs/design.md §4."""
    header = ["event", *[state.value for state in COLUMNS]]
    rows = [header]
    for event in Event:
        row = [event.value]
        for state in COLUMNS:
            cell = TABLE[state][event]
            if cell.ignored:
                row.append("-")
            elif cell.target is None:
                row.append(f"- ({_effects(cell)})")
            else:
                row.append(cell.target.value + (f" ({_effects(cell)})" if cell.effects else ""))
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return (
        "\n".join(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
        )
        + "\n"
    )
