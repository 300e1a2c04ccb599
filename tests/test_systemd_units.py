"""The systemd units as systemd itself reads them: valid, bounded, and hardened (systemd-analyze)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "systemd"
ANALYZE = shutil.which("systemd-analyze")
# Measured 1.1 ("OK") with systemd 252; what is left is what the service needs (the network,
# local sockets) and the rtc read access ProtectClock= grants. A change that loosens the
# sandboxing shows up here.
EXPOSURE_THRESHOLD = 1.2

pytestmark = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed on this machine")


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(params=["pullwake-runner.service", "pullwake-runner@.service"])
def unit(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A copy of the unit whose ExecStart= names a program that exists here (verify checks it).

    A template is checked as an instance of it (pullwake-runner@demo.service).
    """
    name: str = request.param
    text = (UNITS / name).read_text()
    text = text.replace("/opt/pullwake-runner/bin/pullwake run", f"{sys.executable} -m runner run")
    copy = tmp_path / name.replace("@.", "@demo.")
    copy.write_text(text)
    return copy


def test_the_units_keep_the_bounds_and_hardening_they_promise() -> None:
    for path in UNITS.glob("*.service"):
        keys = {line.split("=", 1)[0] for line in path.read_text().splitlines() if "=" in line}
        for key in ("MemoryMax", "TasksMax", "ProcSubset", "PrivateUsers", "SystemCallFilter", "LoadCredential"):
            assert key in keys, f"{path.name} lacks {key}="


def test_systemd_analyze_verify_finds_nothing_to_say(unit: Path) -> None:
    result = _analyze("verify", str(unit))
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", f"systemd-analyze verify complained:\n{result.stderr}"


def test_the_exposure_score_stays_low(unit: Path) -> None:
    if "--offline" not in _analyze("security", "--help").stdout:
        pytest.skip("this systemd-analyze cannot review a unit file offline (needs systemd 250 or newer)")
    result = _analyze("security", "--offline=yes", "--no-pager", str(unit))
    assert result.returncode == 0, result.stderr
    found = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert found, result.stdout[-2000:]
    score = float(found.group(1))
    assert score <= EXPOSURE_THRESHOLD, f"{unit.name}: exposure {score} over {EXPOSURE_THRESHOLD}:\n" + "\n".join(
        line for line in result.stdout.splitlines() if "✗" in line
    )
