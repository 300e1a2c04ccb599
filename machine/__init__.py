"""The pullwake runner's lifecycle as data: states, events, transitions, activities.

Pure: no trio, no I/O, and nothing imported from `runner`.
"""

from ._diagram import mermaid, table_text
from ._lifecycle import (
    ACTIVITIES,
    COLUMNS,
    IGNORE,
    INITIAL,
    TABLE,
    Activity,
    Cell,
    Effect,
    Event,
    IncompleteTableError,
    State,
)
from ._machine import Lifecycle, Step

__all__ = [
    "ACTIVITIES",
    "COLUMNS",
    "IGNORE",
    "INITIAL",
    "TABLE",
    "Activity",
    "Cell",
    "Effect",
    "Event",
    "IncompleteTableError",
    "Lifecycle",
    "State",
    "Step",
    "mermaid",
    "table_text",
]
