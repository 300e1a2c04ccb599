"""Who imports whom among runner's parts, from the code (docs/design.md §3.3 is checked against it).

A part is a sub-package of runner (`_wire`, `_claims`, ...) or a module at its top. Imports
made only for type checking count too: a part's reader meets them all the same.

    .venv/bin/python tools/layout.py     # prints the table for docs/design.md
"""

from __future__ import annotations

import grimp

BEGIN = "<!-- imports:begin -->"
END = "<!-- imports:end -->"


def part(module: str) -> str | None:
    """`runner._wire.client` -> `_wire`; `machine._lifecycle` -> `machine`; others -> None."""
    if module.startswith("machine"):
        return "machine"
    if not module.startswith("runner."):
        return None
    return module.split(".")[1]


def imports_by_part() -> dict[str, set[str]]:
    graph = grimp.build_graph("runner", "machine")
    table: dict[str, set[str]] = {}
    for module in graph.modules:
        source = part(module)
        if source is None or source == "machine":
            continue
        targets = table.setdefault(source, set())
        for imported in graph.find_modules_directly_imported_by(module):
            target = part(imported)
            if target is not None and target != source:
                targets.add(target)
    return table


def table_text() -> str:
    rows = ["| part | imports |", "|---|---|"]
    for source, targets in sorted(imports_by_part().items()):
        listed = ", ".join(f"`{target}`" for target in sorted(targets)) or "nothing of ours"
        rows.append(f"| `{source}` | {listed} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(table_text(), end="")
