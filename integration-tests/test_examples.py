"""Example scripts run as a new user runs them."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_refs_quickstart_runs_and_refuses_drift():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "refs_quickstart.py")],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert "placeholder tokens" in out and "refused: trainer" in out
