"""Print the score of the last `mutmut run`: killed / total, and what survived per file.

Reads mutmut's per-file results (mutants/<path>.meta) and judges them with
mutmut's own table of exit codes. A mutant counts as killed when the tests
failed on it or timed out on it (a mutant that makes the code hang is caught).
With `-v`, the surviving mutants are listed by name (`mutmut show NAME` shows one).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code

KILLED = {"killed", "timeout", "segfault"}
NOT_COUNTED = {"skipped", "not checked"}


def main(argv: list[str]) -> int:
    metas = sorted(Path("mutants").rglob("*.py.meta"))
    if not metas:
        print("no mutation results: run `make mutate` first", file=sys.stderr)
        return 1
    statuses: Counter[str] = Counter()
    survivors: dict[str, list[str]] = {}
    for meta in metas:
        source = str(meta.relative_to("mutants"))[: -len(".meta")]
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            status = status_by_exit_code[code]
            statuses[status] += 1
            if status not in KILLED | NOT_COUNTED:
                survivors.setdefault(source, []).append(f"{name} ({status})")
    total = sum(count for status, count in statuses.items() if status not in NOT_COUNTED)
    killed = sum(statuses[status] for status in KILLED)
    print(f"mutation score: {killed}/{total} killed ({100 * killed / max(total, 1):.1f} %)  {dict(statuses)}")
    for source, names in sorted(survivors.items(), key=lambda item: -len(item[1])):
        print(f"  {len(names):4d} not killed in {source}")
        if "-v" in argv:
            for name in names:
                print(f"         {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
