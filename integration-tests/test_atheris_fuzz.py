"""Coverage-guided fuzzing (atheris) of ref parsing, data URLs and image bytes: only typed errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris", reason="atheris (dev group, Linux only) is not installed")
HARNESS = Path(__file__).parent / "fuzz" / "fuzz_inputs.py"
RUNS = int(os.environ.get("MMREF_FUZZ_RUNS", "20000"))
# A fixed seed keeps CI reproducible; MMREF_FUZZ_SEED=0 draws a random seed.
SEED = int(os.environ.get("MMREF_FUZZ_SEED", "1"))
# Linux carries a process's peak RSS across exec (ru_maxrss), so a harness exec'd straight from a
# pytest process that grew to 2 GB running models would start "over" libFuzzer's 2 GB RSS limit.
# A shell forks the harness instead, from its own small address space: the limit then measures
# the harness alone.
FRESH_PROCESS = ["/bin/sh", "-c", '"$@"; exit $?', "sh"]


@pytest.mark.timeout(300)
def test_untrusted_inputs_raise_only_typed_errors(tmp_path):
    result = subprocess.run([*FRESH_PROCESS, sys.executable, str(HARNESS), f"-runs={RUNS}", "-max_total_time=240", f"-seed={SEED}"],
                            cwd=tmp_path,
                            capture_output=True, text=True, timeout=280)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "Done" in log and "crash-" not in log, log[-4000:]
    assert not list(tmp_path.glob("crash-*")), log[-4000:]
