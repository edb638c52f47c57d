"""scripts/gpu-smoke.sh offline: it installs only the wheels its python lacks and puts the three src folders on
PYTHONPATH; the whole script runs the smoke on CPU with this venv's python (which lacks nothing)."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu-smoke.sh"


def _run(*args, wheels: Path, target: Path, timeout: float = 30) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "GPU_WHEELS": str(wheels), "GPU_TARGET": str(target)}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_dry_run_skips_wheels_of_installed_packages_and_prints_the_pythonpath(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in ("msgpack-1.0.0-py3-none-any.whl", "mmref_not_installed_dist-1.0-py3-none-any.whl"):
        (wheels / name).write_bytes(b"")
    done = _run("--dry-run", wheels=wheels, target=tmp_path / "site")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "gpu-smoke: has msgpack" in lines
    assert "gpu-smoke: install mmref_not_installed_dist-1.0-py3-none-any.whl" in lines
    (path_line,) = [line for line in lines if line.startswith("gpu-smoke: PYTHONPATH=")]
    parts = path_line.split("=", 1)[1].split(":")
    assert parts == [str(tmp_path / "site"), *(str(ROOT / "packages" / p / "src") for p in ("renderers", "client", "trainer"))]
    assert not (tmp_path / "site").exists()  # a dry run installs nothing


def test_install_only_puts_missing_wheels_on_the_printed_pythonpath(tmp_path):
    # uv's venv has no pip, so this is the unzip path; a python with pip runs pip install --no-index
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "mmref_offline_probe-1.0-py3-none-any.whl", "w") as whl:
        whl.writestr("mmref_offline_probe.py", "ANSWER = 42\n")
        whl.writestr("mmref_offline_probe-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: mmref-offline-probe\n"
                                                                    "Version: 1.0\n")
    done = _run("--install-only", wheels=wheels, target=tmp_path / "site")
    assert done.returncode == 0, done.stderr
    pythonpath = done.stdout.splitlines()[-1].split("=", 1)[1]
    probe = subprocess.run([sys.executable, "-c", "import mmref_offline_probe, mmref.trainer.smoke; "
                            "print(mmref_offline_probe.ANSWER)"], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": pythonpath}, timeout=60)
    assert probe.stdout.strip() == "42", probe.stderr


@pytest.mark.timeout(150)
def test_script_runs_the_cpu_smoke_and_ends_with_its_json_line(tmp_path):
    done = _run("--device", "cpu", "--tiny-only", "--steps", "1", "--out", str(tmp_path / "out"),
                wheels=tmp_path / "no-wheels", target=tmp_path / "site", timeout=140)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert line["errors"] == [] and line["runs"][0]["steps"] == 1
