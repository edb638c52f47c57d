"""Package boundaries: renderers and client install without torch; imports point one way."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def closure(lock: dict, name: str) -> set[str]:
    """Transitive runtime dependencies of ``name`` in uv.lock (no extras, no dev groups)."""
    packages = {p["name"]: p for p in lock["package"]}
    seen, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo.extend(dep["name"] for dep in packages[current].get("dependencies", []))
    return seen


@pytest.mark.parametrize("package", ["mmref-renderers", "mmref-client"])
def test_package_installs_without_torch(package):
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    deps = closure(lock, package)
    assert "torch" not in deps and "vllm" not in deps, sorted(deps)


def test_trainer_depends_on_torch_and_vllm_is_only_an_extra():
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    deps = closure(lock, "mmref-trainer")
    assert "torch" in deps and "vllm" not in deps


@pytest.mark.parametrize("module", ["mmref.renderers.refs", "mmref.renderers.layout", "mmref.renderers.store"])
def test_foundation_modules_import_without_torch(module):
    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
