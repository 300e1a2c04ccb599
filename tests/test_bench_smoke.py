"""The benchmark entry point runs a tiny configuration to completion (numbers are not checked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.test_end_to_end import ROOT


def test_the_bench_runs_a_tiny_configuration_to_completion(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    assert {"machine", "latency", "throughput", "recovery", "footprint", "stop"} <= results.keys()
    assert "Latency" in result.stdout
    assert "Throughput" in result.stdout
    assert [row["subscriptions"] for row in results["throughput"]["rows"]] == [1, 10, 200]
