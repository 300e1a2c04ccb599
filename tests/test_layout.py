"""The house as documented is the house as built: the import table, the public names, the errors."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import runner
import runner.errors

ROOT = Path(__file__).resolve().parent.parent


def test_the_design_documents_who_imports_whom_as_the_code_does() -> None:
    generated = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "layout.py")], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    design = (ROOT / "docs" / "design.md").read_text()
    documented = design.split("<!-- imports:begin -->\n", 1)[1].split("<!-- imports:end -->", 1)[0]
    assert documented == generated, "docs/design.md §3.3 is stale: paste `python tools/layout.py` between its markers"


def test_every_public_name_is_importable_and_none_is_private() -> None:
    for name in runner.__all__:
        assert not name.startswith("_")
        assert getattr(runner, name) is not None


def test_the_errors_module_lists_every_error_it_defines() -> None:
    """Its docstring is the table of contents a user reads: no error may be missing from it."""
    doc = runner.errors.__doc__ or ""
    defined = [
        name
        for name, value in vars(runner.errors).items()
        if inspect.isclass(value) and issubclass(value, runner.errors.PullwakeError)
    ]
    assert len(defined) > 20
    missing = [
        name for name in defined if f" {name} " not in doc and f"─ {name}" not in doc and f"\n{name} " not in doc
    ]
    assert missing == []
    for name in defined:
        assert (getattr(runner.errors, name).__doc__ or "").strip(), f"{name} has no one-line docstring"
